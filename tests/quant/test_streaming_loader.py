"""Streaming NF4 loading: 2-rank ZeRO-3 memory and logits vs. a full load; bitsandbytes checkpoints; errors.

The ZeRO-3 half is one ``deepspeed`` launch (tests/dist_scripts/streaming_load.py zero3) run beside a
single-process reference (the same script, ``reference``: ``from_pretrained`` + ``quantize_model``).
Peak memory is each process's VmHWM growth over the load, so the numbers compare like with like.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from mtpeft.errors import CheckpointError
from mtpeft.quant import QuantLinear, quantize_model
from mtpeft.quant.streaming_loader import load_quantized_backbone, parameters_on_meta
from distributed import REPO, deepspeed_cmd, env

SCRIPT = REPO / "tests" / "dist_scripts" / "streaming_load.py"
MISSING = "model.layers.3.mlp.up_proj.weight"


def _llama(vocab, hidden, inter, layers, seed=0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


@pytest.fixture(scope="module")
def zero3_runs(tmp_path_factory):
    """Layers dominate (small vocab): 6 x 3.1M linear parameters, ~80 MB fp32 in 5 shards."""
    ckpt = tmp_path_factory.mktemp("sharded_llama")
    _llama(1024, 512, 1536, 6).save_pretrained(ckpt, max_shard_size="20MB")
    assert len(list(ckpt.glob("*.safetensors"))) >= 4
    broken = tmp_path_factory.mktemp("broken_llama")  # the same shards, an index missing one key
    for f in ckpt.iterdir():
        (broken / f.name).symlink_to(f)
    (broken / "model.safetensors.index.json").unlink()
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    del index["weight_map"][MISSING]
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    out = tmp_path_factory.mktemp("streaming_out")
    e = dict(env(), DS_ACCELERATOR="cpu", MTPEFT_KERNELS="torch")
    ref = subprocess.Popen([sys.executable, str(SCRIPT), "reference", str(ckpt), str(out)], env=e,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    cmd = deepspeed_cmd(2, str(SCRIPT), "zero3", str(ckpt), str(out), str(broken))
    proc = subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=400, cwd=str(REPO))
    ref_log = ref.communicate(timeout=300)[0]
    assert ref.returncode == 0, ref_log[-3000:]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    return ranks, json.loads((out / "reference.json").read_text()), out


@pytest.mark.distributed
def test_zero3_stream_peak_memory_well_under_full_load(zero3_runs):
    ranks, reference, _ = zero3_runs
    fp32_kb = (6 * (2 * 512 * 512 + 2 * 512 * 256 + 3 * 512 * 1536) + 2 * 1024 * 512) * 4 / 1024
    assert reference["peak_growth_kb"] >= 0.9 * fp32_kb  # the measurement sees a full load
    for r in ranks:
        assert r["world_size"] == 2
        assert 0 < r["peak_growth_kb"] <= 0.5 * reference["peak_growth_kb"], (r, reference)


@pytest.mark.distributed
def test_zero3_stream_partitions_every_parameter(zero3_runs):
    ranks, _, _ = zero3_runs
    total = ranks[0]["total_quant_elements"]
    for r in ranks:
        assert r["quant_linears"] == 6 * 7 and r["all_partitioned"]
        assert total / 2 <= r["local_quant_elements"] <= total / 2 + 42 * 5


@pytest.mark.distributed
def test_zero3_stream_forward_equals_full_load(zero3_runs):
    _, _, out = zero3_runs
    expected = torch.load(out / "reference_logits.pt")
    got = torch.load(out / "zero3_logits.pt")
    assert got.shape == expected.shape == (1, 12, 1024)
    assert ((got - expected).abs().max() / expected.abs().max()).item() <= 1e-6


@pytest.mark.distributed
def test_zero3_stream_error_reaches_every_rank(zero3_runs):
    """Rank 0 reads; a key missing halfway must stop all ranks with its message, not hang them."""
    ranks, _, _ = zero3_runs
    for r in ranks:
        assert r["broken_error"] and f"missing key '{MISSING}'" in r["broken_error"], r


# ---- single process (no ZeRO-3): same streaming path, tiny model ----

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    model = _llama(96, 64, 192, 2, seed=3)
    model.save_pretrained(path, max_shard_size="60KB")
    return path, model


def _ids():
    return torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(5))


def _reference_logits(model):
    ref = quantize_model(_copy(model), skip=("lm_head",)).eval()
    with torch.no_grad():
        return ref(input_ids=_ids()).logits


def _copy(model):
    fresh = LlamaForCausalLM(model.config)
    fresh.load_state_dict(model.state_dict())
    return fresh


def test_single_process_stream_equals_quantize_model(tiny):
    path, model = tiny
    assert (path / "model.safetensors.index.json").is_file()
    got = load_quantized_backbone(path, None, torch.float32)
    assert not any(p.requires_grad for p in got.parameters())
    assert type(got.lm_head) is torch.nn.Linear and isinstance(got.model.layers[0].mlp.up_proj, QuantLinear)
    with torch.no_grad():
        assert torch.equal(got(input_ids=_ids()).logits, _reference_logits(model))


def _qwen2_tied():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(4)
    cfg = Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    return Qwen2ForCausalLM(cfg)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_stream_matches_from_pretrained_with_biases_tied_head_and_dtype(tmp_path, dtype):
    """Qwen2: q/k/v biases, lm_head tied to the embeddings (absent from the files)."""
    from transformers import AutoModelForCausalLM

    _qwen2_tied().save_pretrained(tmp_path, max_shard_size="60KB")
    assert "lm_head.weight" not in _index(tmp_path)["weight_map"]
    ref = quantize_model(AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype), skip=("lm_head",)).eval()
    got = load_quantized_backbone(tmp_path, None, dtype)
    assert got.lm_head.weight is got.model.embed_tokens.weight and got.lm_head.weight.dtype == dtype
    q = got.model.layers[1].self_attn.q_proj
    assert isinstance(q, QuantLinear) and q.bias is not None and q.weight_dtype == dtype
    with torch.no_grad():
        assert torch.equal(got(input_ids=_ids()).logits, ref(input_ids=_ids()).logits)


def test_loads_bitsandbytes_checkpoint_without_requantizing(tiny, tmp_path):
    """Every linear written by bitsandbytes itself (quantize_4bit + QuantState.as_dict(packed=True))."""
    BF = pytest.importorskip("bitsandbytes.functional")
    import torch._dynamo

    path, model = tiny
    state = {}
    for f in path.glob("*.safetensors"):
        state.update(load_file(f))
    packed_of = {}
    with torch._dynamo.config.patch(disable=True):
        for key in [k for k in state if k.endswith("_proj.weight")]:
            packed, qs = BF.quantize_4bit(state.pop(key), quant_type="nf4", blocksize=64, compress_statistics=True)
            state[key] = packed
            packed_of[key] = packed
            state.update({f"{key}.{k}": v for k, v in qs.as_dict(packed=True).items()})
    for name in ("config.json", "generation_config.json"):
        (tmp_path / name).write_bytes((path / name).read_bytes())
    save_file(state, str(tmp_path / "model.safetensors"))

    got = load_quantized_backbone(tmp_path, None, torch.float32)
    up = got.model.layers[1].mlp.up_proj
    assert torch.equal(up.quant_weight().packed, packed_of["model.layers.1.mlp.up_proj.weight"].reshape(-1))
    with torch.no_grad():
        assert torch.equal(got(input_ids=_ids()).logits, _reference_logits(model))


def test_base_model_class_reads_a_checkpoint_saved_with_its_head(tiny):
    """AutoModel (LlamaModel: ``layers.0...``) from a LlamaForCausalLM save (``model.layers.0...``)."""
    from transformers import AutoModel

    path, _ = tiny
    ref = quantize_model(AutoModel.from_pretrained(path, dtype=torch.float32)).eval()
    got = load_quantized_backbone(path, None, torch.float32, model_class=AutoModel)
    assert type(got).__name__ == "LlamaModel" and isinstance(got.layers[0].self_attn.o_proj, QuantLinear)
    with torch.no_grad():
        assert torch.equal(got(input_ids=_ids()).last_hidden_state, ref(input_ids=_ids()).last_hidden_state)


def _index(path: Path) -> dict:
    return json.loads((path / "model.safetensors.index.json").read_text())


def _clone_ckpt(src: Path, dst: Path) -> Path:
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_missing_shard_names_the_file(tiny, tmp_path):
    ckpt = _clone_ckpt(tiny[0], tmp_path)
    shard = sorted(ckpt.glob("*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        load_quantized_backbone(ckpt, None)


def test_missing_key_names_the_key(tiny, tmp_path):
    ckpt = _clone_ckpt(tiny[0], tmp_path)
    index = _index(ckpt)
    del index["weight_map"]["model.layers.1.self_attn.k_proj.weight"]
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: missing key 'model\.layers\.1\.self_attn\.k_proj\.weight'"):
        load_quantized_backbone(ckpt, None)


def test_shape_mismatch_names_file_and_key(tiny, tmp_path):
    ckpt = _clone_ckpt(tiny[0], tmp_path)
    key = "model.layers.0.mlp.down_proj.weight"
    shard = ckpt / _index(ckpt)["weight_map"][key]
    tensors = load_file(shard)
    tensors[key] = tensors[key][:, :-1].contiguous()
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{shard.name}: '{key}' has shape \(64, 191\) .* gives \(64, 192\)"):
        load_quantized_backbone(ckpt, None)


def test_parameters_on_meta_patch_lives_only_inside_the_block_even_after_an_error():
    original = torch.nn.Module.register_parameter
    with pytest.raises(ValueError, match="inside"):
        with parameters_on_meta():
            layer = torch.nn.Linear(3, 2)
            layer.register_buffer("table", torch.ones(2))
            assert layer.weight.device.type == "meta" and layer.table.device.type == "cpu"
            assert torch.nn.Module.register_parameter is not original
            raise ValueError("inside")
    assert torch.nn.Module.register_parameter is original
    assert torch.nn.Linear(3, 2).weight.device.type == "cpu"
