"""Backbones other than the demo's Llama under ZeRO-3 on 2 ranks, from files on disk as a user
brings them (tiny random models saved with the demo tokenizer): CodeGen (fused qkv) with a 4-bit
base and LoRA through the streaming NF4 loader, and a RoBERTa encoder (UniXcoder-style) with a 4-bit
base and the serial adapter, GPT-2 (Conv1D layers) with a bf16 base and LoRA. Each 2-rank × micro-batch 2 run must give the per-step losses of one
process × micro-batch 4 (contract 2), and each rank must hold half of the frozen base."""

import json
import math
import sys

import pytest
import torch
import yaml

from distributed import REPO, deepspeed_cmd, run, tiny_config

pytestmark = pytest.mark.distributed


def _save_backbone(family: str, folder, tok) -> None:
    import transformers as tf

    torch.manual_seed(0)
    if family == "codegen":
        cfg = tf.CodeGenConfig(n_embd=64, n_inner=128, n_layer=2, n_head=4, rotary_dim=8, vocab_size=len(tok),
                               n_positions=256, n_ctx=256, bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        model = tf.CodeGenForCausalLM(cfg)
    elif family == "gpt2":
        cfg = tf.GPT2Config(n_embd=64, n_inner=128, n_layer=2, n_head=4, vocab_size=len(tok), n_positions=256,
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = tf.GPT2LMHeadModel(cfg)
    else:
        cfg = tf.RobertaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                               vocab_size=len(tok), max_position_embeddings=256, pad_token_id=tok.pad_token_id,
                               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        model = tf.RobertaModel(cfg)
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))


@pytest.fixture(scope="module", params=[("codegen", "lora", "nf4"), ("roberta", "serial_adapter", "nf4"),
                                        ("gpt2", "lora", "none")],
                ids=["codegen-lora-nf4", "roberta-serial-nf4", "gpt2-lora-bf16"])
def runs(request, tmp_path_factory):
    """GPT-2's Conv1D layers are turned into linears before the engine partitions them (a bf16 base
    that does not load partitioned, unlike the others)."""
    from transformers import AutoTokenizer

    family, method, quant = request.param
    tmp = tmp_path_factory.mktemp(family)
    _save_backbone(family, tmp / "base", AutoTokenizer.from_pretrained(str(REPO / "mtpeft/assets/demo/base_model")))
    raw = yaml.safe_load(tiny_config(tmp, max_steps=6).read_text())
    raw["model"].update({"name_or_path": str(tmp / "base"), "quant": quant})
    raw["peft"].update({"method": method, "bottleneck": 16})
    if family == "roberta":  # an encoder: no generation task
        raw["tasks"] = [t for t in raw["tasks"] if t["kind"] != "generate"]
    config = tmp / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    two, one = tmp / "two", tmp / "one"
    run(deepspeed_cmd(2, "--module", "mtpeft", "train", str(config), "--set", f"output.dir={two}",
                      "--set", "train.micro_batch_size=2"), tmp / "two.log")
    run([sys.executable, "-m", "mtpeft", "train", str(config), "--set", f"output.dir={one}",
         "--set", "train.micro_batch_size=4"], tmp / "one.log")
    return two, one


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_two_ranks_equal_one_rank_with_twice_the_micro_batch(runs):
    two, one = runs
    a, b = _losses(two), _losses(one)
    assert len(a) == len(b) == 6
    for x, y in zip(a, b):
        assert abs(x - y) <= 1e-4 * abs(y), (a, b)


def test_each_rank_holds_half_of_the_frozen_base_and_the_run_finishes(runs):
    two, _ = runs
    report = json.loads((two / "partition.json").read_text())
    assert report["world_size"] == 2
    total = report["ranks"][0]["frozen_total"]
    for rank in report["ranks"]:
        assert abs(rank["frozen"] - total / 2) <= 0.02 * total / 2, rank
    metrics = json.loads((two / "metrics.json").read_text())
    assert metrics and all(math.isfinite(m["value"]) for m in metrics.values())
    assert (two / "export" / "tasks.json").is_file()


def test_the_run_records_the_targets_the_defaults_became(runs):
    two, _ = runs
    text = (two / "config.yaml").read_text()
    if "roberta" in two.parent.name:
        assert "# resolved on this backbone" not in text  # the serial adapter has no target list
        return
    adapter = json.loads((two / "export" / "adapter_config.json").read_text())
    if "gpt2" in two.parent.name:  # HF peft applies the adapter to the original Conv1D layers
        assert sorted(adapter["target_modules"]) == ["c_attn", "c_fc", "c_proj"] and adapter["fan_in_fan_out"]
        return
    assert '#   peft.target_modules: ["fc_in", "fc_out", "out_proj", "qkv_proj"]' in text
    assert sorted(adapter["target_modules"]) == ["fc_in", "fc_out", "out_proj", "qkv_proj"]
    assert not adapter["fan_in_fan_out"]
