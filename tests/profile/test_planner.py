"""The memory planner against independent references: published parameter totals, hand formulas,
bitsandbytes' own NF4 tensors, and the bytes autograd really saves for one decoder block."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
from torch import nn

from distributed import REPO
from mtpeft.errors import UserError
from mtpeft.profile import plan_cli
from mtpeft.profile.architecture import count_architecture, load_architecture
from mtpeft.profile.planner import (
    PeftSpec,
    PlanSettings,
    _layer_saved_bytes,
    model_state_bytes,
    nf4_tensor_bytes,
    parse_peft,
    plan,
    plan_model_states,
    search,
)

GIB = 1024**3

# Totals printed on each model card / computed by HF for the released checkpoints.
PUBLISHED_TOTALS = {
    "codellama-7b": 6_738_546_688,
    "codellama-13b": 13_016_028_160,
    "codellama-34b": 33_743_970_304,
    "deepseek-coder-1.3b": 1_346_471_936,
    "deepseek-coder-6.7b": 6_740_512_768,
    "qwen2.5-coder-1.5b": 1_543_714_304,
    "qwen2.5-coder-7b": 7_615_616_512,
    "qwen2.5-coder-32b": 32_763_876_352,
    "starcoder2-3b": 3_030_371_328,
    "starcoder2-7b": 7_173_923_840,
    "starcoder2-15b": 15_957_889_024,
}


def _cli(*argv: str, capsys) -> dict:
    parser = argparse.ArgumentParser()
    plan_cli.add_arguments(parser)
    assert plan_cli.run(parser.parse_args(list(argv) + ["--json"])) == 0
    return json.loads(capsys.readouterr().out)


def test_codellama_34b_fits_one_24gib_gpu(capsys):
    out = _cli("--model", "codellama-34b", "--gpus", "1", "--gpu-mem", "24", "--seq", "2048",
               "--micro-batch", "1", capsys=capsys)
    assert abs(out["total_params"] - 33_743_970_304) <= 0.001 * 33_743_970_304
    assert out["fits"] is True
    assert out["predicted_peak_gib"] <= 22.0
    assert out["settings"]["checkpointing"] is True
    assert out["per_gpu_bytes"] == sum(out["breakdown"].values())
    # 4-bit packed weights are half a byte per quantized element: 33.22e9 / 2 bytes.
    assert out["breakdown"]["packed_weights"] == 33_218_887_680 // 2


def test_eight_gpus_hold_one_eighth_of_the_weights(capsys):
    one = _cli("--model", "codellama-34b", "--gpus", "1", capsys=capsys)["breakdown"]
    eight = _cli("--model", "codellama-34b", "--gpus", "8", capsys=capsys)["breakdown"]
    for key in ("packed_weights", "quant_constants", "bf16_weights", "optimizer_states", "gradients"):
        assert eight[key] == pytest.approx(one[key] / 8, rel=1e-4), key
    assert one["master_weights"] == 0 and eight["master_weights"] == eight["trainable_params"]
    assert eight["activations"] == one["activations"]


@pytest.mark.parametrize("name", sorted(PUBLISHED_TOTALS))
def test_shipped_architectures_match_published_totals(name):
    assert load_architecture(name).total_params == PUBLISHED_TOTALS[name]


def test_local_config_counts_match_hand_formula(tmp_path):
    cfg = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 3,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    arch = load_architecture(tmp_path)
    h, i, kv, v, n = 64, 160, 32, 300, 3
    linears = n * (2 * h * h + 2 * h * kv + 3 * h * i)
    assert arch.quantizable_linear_params == linears
    assert arch.embedding_params == v * h and arch.lm_head_params == 0 and arch.tied_lm_head
    assert arch.norm_params == (2 * n + 1) * h
    assert arch.total_params == linears + v * h + (2 * n + 1) * h


def test_nf4_bytes_match_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(97, 131)  # 12707 elements: partial last block and partial 256-group
    for dq in (True, False):
        packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=dq)
        ours_packed, consts = nf4_tensor_bytes(w.numel(), dq)
        assert ours_packed == packed.numel() * packed.element_size()
        theirs = [state.absmax.numel() * state.absmax.element_size()]
        if dq:
            theirs += [state.state2.absmax.numel() * 4, state.state2.code.numel() * 4, 4]
        assert consts == theirs


def test_zero3_padding_per_tensor():
    arch = load_architecture("deepseek-coder-1.3b")
    s = PlanSettings(world_size=3, peft=PeftSpec("lora", {"r": 5}))
    states = model_state_bytes(arch, s)
    # Hand count: every tensor padded to ceil(items / 3), items are 2-byte storage elements.
    expected = 0
    for kind, numel, _ in arch.tensors:
        if kind == "quant":
            expected += math.ceil(math.ceil(numel / 2 / 2) / 3) * 2
    assert states["packed_weights"] == expected
    lora = [5 * 2048, 2048 * 5] * 4 + [5 * 2048, 5504 * 5] * 2 + [5 * 5504, 2048 * 5]
    assert states["optimizer_states"] == 24 * sum(math.ceil(n / 3) * 8 for n in lora)
    assert states["master_weights"] == 24 * sum(math.ceil(n / 3) * 4 for n in lora)  # ZeRO-3 (world 3)


class _FakeQuantLinear(nn.Module):
    """Stands in for a quantized linear: packed bytes and constants as frozen bf16 tensors."""

    def __init__(self):
        super().__init__()
        self.packed = nn.Parameter(torch.zeros(1001, dtype=torch.bfloat16), requires_grad=False)
        self.absmax = nn.Parameter(torch.zeros(33, dtype=torch.bfloat16), requires_grad=False)


@pytest.mark.parametrize("engine", ["deepspeed", "torch"])
def test_plan_model_states_counts_an_actual_module(engine):
    model = nn.Module()
    model.q = _FakeQuantLinear()
    model.norm = nn.LayerNorm(7).to(torch.bfloat16).requires_grad_(False)
    model.lora_A = nn.Parameter(torch.zeros(5, 7))
    model.prompt = nn.Parameter(torch.zeros(11, dtype=torch.bfloat16))
    got = plan_model_states(model, world_size=4, engine=engine)
    assert got["packed_weights"] == math.ceil(1001 / 4) * 2
    assert got["quant_constants"] == math.ceil(33 / 4) * 2
    assert got["bf16_weights"] == 2 * math.ceil(7 / 4) * 2
    lora, prompt = math.ceil(35 / 4), math.ceil(11 / 4)
    assert got["trainable_params"] == lora * 4 + prompt * 2
    # fp32 master: always for bf16 params; for fp32 ones only under DeepSpeed (measured, 0.19.8).
    assert got["master_weights"] == prompt * 4 + (lora * 4 if engine == "deepspeed" else 0)
    assert got["gradients"] == lora * 4 + prompt * 2
    assert got["optimizer_states"] == (lora + prompt) * 8
    assert got["total"] == sum(v for k, v in got.items() if k != "total")


def test_plan_model_states_agrees_with_the_architecture_plan():
    quant = pytest.importorskip("mtpeft.quant.linear")
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    arch = count_architecture(model, "tiny")
    model.requires_grad_(False)
    quant.quantize_model(model, skip=("lm_head",))
    planned = model_state_bytes(arch, PlanSettings(world_size=2, peft=PeftSpec("ia3", {}), persistence_threshold=0))
    measured = plan_model_states(model, world_size=2)
    for key in ("packed_weights", "quant_constants", "bf16_weights"):
        assert measured[key] == planned[key], key


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_layer_activation_bytes_equal_what_autograd_saves(attention, dropout):
    """Sum the storages autograd keeps for one LoRA'd bf16 block (frozen base) and compare."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300, attn_implementation=attention)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).to(torch.bfloat16)
    arch = count_architecture(base, "tiny")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules=targets))
    model.to(torch.bfloat16).train()
    b, L = 2, 16
    inner = model.base_model.model.model
    x = torch.randn(b, L, 64, dtype=torch.bfloat16, requires_grad=True)
    pos = torch.arange(L)[None].expand(b, L)
    cos, sin = inner.rotary_emb(x, pos)
    shared = {t.untyped_storage().data_ptr() for t in [*model.parameters(), cos, sin, x]}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in shared:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        inner.layers[1](x, attention_mask=None, position_ids=pos, position_embeddings=(cos, sin))
    # On CPU dropout keeps a bf16 noise tensor (2 bytes) where CUDA keeps a bool mask.
    s = PlanSettings(peft=PeftSpec("lora", {"dropout": dropout}), attention=attention, dropout_mask_bytes=2,
                     quant="none")
    assert _layer_saved_bytes(arch, s, b, L) == sum(saved.values())


def test_checkpointing_off_needs_more_and_searches_are_tight():
    arch = load_architecture("deepseek-coder-1.3b")
    base = PlanSettings(gpu_mem_gib=16, seq=1024)
    on = plan(arch, base)
    off = plan(arch, PlanSettings(gpu_mem_gib=16, seq=1024, checkpointing=False))
    assert off["breakdown"]["activations"] > 3 * on["breakdown"]["activations"]
    s, notes = search(arch, base, micro_batch_auto=True)
    b = notes["micro_batch"]
    assert plan(arch, s)["fits"] and not plan(arch, PlanSettings(gpu_mem_gib=16, seq=1024, micro_batch=b + 1))["fits"]
    s, notes = search(arch, PlanSettings(gpu_mem_gib=4), seq_auto=True)
    assert notes["seq"] % 64 == 0 and plan(arch, s)["fits"]
    assert not plan(arch, PlanSettings(gpu_mem_gib=4, seq=notes["seq"] + 64))["fits"]


def test_offload_auto_picks_cpu_when_states_do_not_fit():
    arch = load_architecture("codellama-34b")
    s, notes = search(arch, PlanSettings(gpu_mem_gib=12, world_size=1), offload_auto=True)
    assert notes["offload"] == "cpu"
    result = plan(arch, s)
    kept = plan(arch, PlanSettings(gpu_mem_gib=12))["breakdown"]
    deepspeed = plan(arch, PlanSettings(gpu_mem_gib=12, engine="deepspeed"))["breakdown"]
    assert deepspeed["master_weights"] == kept["trainable_params"] and kept["master_weights"] == 0
    moved = sum(deepspeed[k] for k in ("packed_weights", "quant_constants", "bf16_weights", "trainable_params",
                                       "master_weights", "gradients", "optimizer_states"))
    assert result["fits"] and result["cpu_bytes_per_node"] == moved and result["breakdown"]["packed_weights"] == 0


def test_user_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(UserError, match="known: .*codellama-13b"):
        load_architecture("llama-9000b")
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="unreadable config.json"):
        load_architecture(bad)
    for spec in ("lora:r=x", "lora:rank=4", "adapterx", "prompt:0"):
        with pytest.raises(UserError):
            parse_peft(spec)
    assert parse_peft("prompt:20").get("n") == 20
    assert parse_peft("lora:r=8,targets=q_proj+v_proj").get("targets") == "q_proj+v_proj"
    with pytest.raises(UserError, match="--seq"):
        _cli("--model", "codellama-7b", "--seq", "-3", capsys=capsys)
    for err in (UserError("x"),):
        assert "\n" not in str(err)


def _bench():
    import importlib.util

    path = REPO / "bench" / "fit_34b.py"
    spec = importlib.util.spec_from_file_location("fit_34b", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_fit_34b_bench_refuses_cpu_and_smoke_runs(tmp_path, capsys):
    bench = _bench()
    with pytest.raises(SystemExit):
        bench.parse_args(["--help"])
    assert bench.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    cfg = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 1,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 64}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "bench.json"
    assert bench.main(["--allow-cpu", "--model", str(tmp_path), "--seq", "8", "--steps", "1",
                       "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert math.isfinite(result["losses"][0]) and result["layers"] == 1
    arch = load_architecture(tmp_path)
    assert result["predicted_peak_bytes"] == plan(arch, PlanSettings(
        seq=8, peft=PeftSpec("lora", {"dropout": 0.0}), saves_dequantized_weight=not result["fused_lora_path"]
    ))["predicted_peak_bytes"]


def test_whole_model_saved_bytes_without_checkpointing():
    """All blocks + final norm + saved log-softmax, against autograd over a full LoRA forward with
    loss. The planner counts block 0's input RMSNorm (saved only when the embedding output needs a
    gradient, as under HF checkpointing) and ignores int64 labels: 2.4 % here, ~0 at scale."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300, attn_implementation="sdpa")
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).to(torch.bfloat16)
    arch = count_architecture(base, "tiny")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets))
    model.to(torch.bfloat16).train()
    b, L = 2, 16
    ids = torch.randint(0, 300, (b, L))
    shared = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in shared:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    s = PlanSettings(peft=PeftSpec("lora", {"dropout": 0.0}), seq=L, micro_batch=b, checkpointing=False,
                     quant="none")
    T = b * L
    predicted = arch.num_layers * _layer_saved_bytes(arch, s, b, L) + (4 * T * 64 + 4 * T) + 4 * T * 300
    assert predicted == pytest.approx(sum(saved.values()), rel=0.03)
    assert predicted >= sum(saved.values())


class _LiveBytes:
    """Bytes of tensor storages created during a training step and still alive, and their peak:
    a CPU stand-in for ``torch.cuda.max_memory_allocated`` minus the memory held before the step."""

    def __init__(self, preexisting: set):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in torch.utils._pytree.tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor):
                        tracker.track(t.untyped_storage())
                return out

        self.mode, self.pre, self.alive, self.current, self.peak = Mode(), preexisting, set(), 0, 0

    def track(self, storage) -> None:
        import weakref

        key, n = storage.data_ptr(), storage.nbytes()
        if n == 0 or key in self.alive or key in self.pre:
            return
        self.alive.add(key)
        self.current += n
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self.release, key, n)

    def release(self, key: int, n: int) -> None:
        self.alive.discard(key)
        self.current -= n


@pytest.mark.parametrize("checkpointing", [True, False])
def test_step_peak_matches_live_storage_trace(checkpointing):
    """Whole training step (bf16 autocast, fp32 LoRA, AdamW, HF loss): the predicted activation +
    logits peak against the peak of live storages created during the step."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mtpeft.tuners.lora import LoraSettings, inject_lora

    H, V, L, b = 64, 300, 64, 2
    cfg = LlamaConfig(hidden_size=H, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=V, attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    arch = count_architecture(model, "tiny")
    model.requires_grad_(False)
    inject_lora(model, LoraSettings(r=16, alpha=32, dropout=0.0))
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    lora = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(lora, lr=1e-4, foreach=False)
    ids = torch.randint(0, V, (b, L))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)

    step()  # Adam states and grads exist before the measured step, as in the plan's model states
    held = [*model.parameters(), *model.buffers(), ids, *(p.grad for p in lora)]
    held += [v for state in opt.state.values() for v in state.values() if torch.is_tensor(v)]
    live = _LiveBytes({t.untyped_storage().data_ptr() for t in held})
    with live.mode:
        step()
    s = PlanSettings(seq=L, micro_batch=b, peft=PeftSpec("lora", {"dropout": 0.0}), quant="none",
                     checkpointing=checkpointing)
    predicted = plan(arch, s)["breakdown"]
    assert live.current == 0
    assert predicted["activations"] + predicted["logits_loss"] == pytest.approx(live.peak, rel=0.05)


def test_dequantized_weight_is_never_saved_and_the_override_models_f_linear():
    """QuantLinear trains through an op that dequantizes again in backward, so autograd saves no
    dequantized weight (checked on the real module); the planner's override models a base that does."""
    quant = pytest.importorskip("mtpeft.quant.linear")
    q = quant.QuantLinear.from_linear(nn.Linear(128, 64, bias=False).to(torch.bfloat16))
    x = torch.randn(3, 128, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        q(x).sum().backward()
    assert 128 * 64 not in saved and x.grad is not None
    arch = load_architecture("codellama-7b")
    plain = plan(arch, PlanSettings(peft=parse_peft("ia3")))
    keeps = plan(arch, PlanSettings(peft=parse_peft("ia3"), saves_dequantized_weight=True))
    assert not plain["settings"]["saves_dequantized_weight"] and keeps["settings"]["saves_dequantized_weight"]
    extra = keeps["activations_checkpointing_bytes"] - plain["activations_checkpointing_bytes"]
    assert extra == 2 * arch.block_linear_params


@pytest.mark.parametrize("name,published", [("codegen-350m", 0.35e9), ("codegen-2b", 2.7e9), ("codegen-16b", 16.1e9)])
def test_codegen_architectures_match_the_published_sizes(name, published):
    """CodeGen (Nijkamp et al.: 350M, 2.7B, 16.1B parameters): GPT-style config keys (n_inner None =
    4h, fused qkv) are read, and the counts match the paper's within 3 %."""
    from mtpeft.profile.architecture import load_architecture

    arch = load_architecture(name)
    assert abs(arch.total_params - published) <= 0.03 * published, arch.total_params
    assert arch.intermediate_size == 4 * arch.hidden_size and not arch.gated_mlp


def test_dequant_path_bytes_by_hand():
    """DeepSeek-Coder-1.3B (hidden 2048, MLP 5504), LoRA r=16, 1 × 2048 tokens: the buffer holds the
    down projection plus A ((2048 + 16) × 5504 bf16), the [dy, g] copy the widest output (2048 ×
    (5504 + 16)); nothing for a bf16 base or for a micro-batch the fused kernels serve."""
    from mtpeft.kernels.backend import FUSED_MAX_M
    from mtpeft.profile.planner import PeftSpec, PlanSettings, dequant_path_bytes

    arch = load_architecture("deepseek-coder-1.3b")
    lora = PeftSpec("lora", {"r": 16})
    got = dequant_path_bytes(arch, PlanSettings(peft=lora, quant="nf4", seq=2048, micro_batch=1))
    assert got == 2 * (2048 + 16) * 5504 + 2 * 2048 * (5504 + 16)
    assert dequant_path_bytes(arch, PlanSettings(peft=lora, quant="none", seq=2048, micro_batch=1)) == 0
    assert dequant_path_bytes(arch, PlanSettings(peft=lora, quant="nf4", seq=FUSED_MAX_M, micro_batch=1)) == 0
