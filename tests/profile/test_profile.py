"""``mtpeft profile`` and the savings study on CPU: the report files exist and every figure is
consistent with an independent recount (log.jsonl, flops.step_flops on the recorded shapes, torch's
FlopCounterMode, tensor sizes counted from the model)."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
import yaml

from distributed import REPO, tiny_config
from mtpeft.profile import profile_cli
from mtpeft.profile.flops import step_flops
from mtpeft.profile.report import read_log

pytestmark = pytest.mark.distributed  # real DeepSpeed engines or several processes

DEMO_CONFIG = json.loads((REPO / "mtpeft/assets/demo/base_model/config.json").read_text())
PEAK_TFLOPS = 0.5


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    profile_cli.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture(scope="module")
def profiled(tmp_path_factory, one_thread):
    tmp = tmp_path_factory.mktemp("profile")
    config = tiny_config(tmp)
    out = tmp / "out"
    assert profile_cli.run(_args(str(config), "--steps", "4", "--out", str(out), "--peak-tflops", str(PEAK_TFLOPS))) == 0
    return out, json.loads((out / "report.json").read_text())


def test_report_and_plots_are_written(profiled):
    out, r = profiled
    for name in ("report.md", "report.json", "memory_breakdown.png", "throughput.png", "loss_curves.png"):
        assert (out / name).stat().st_size > 0, name
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    md = (out / "report.md").read_text()
    for quantity in ("tokens/s", "FLOPs per step", "MFU", "peak memory", "communication per step"):
        assert quantity in md


def test_tokens_per_second_is_tokens_over_seconds_of_the_log(profiled):
    out, r = profiled
    records = read_log(out / "run" / "log.jsonl")
    assert [x["step"] for x in records] == [1, 2, 3, 4]
    kept = records[1:]  # the first step is warm-up
    assert r["timing"]["tokens_per_s"] == pytest.approx(sum(x["tokens"] for x in kept) / sum(x["seconds"] for x in kept))
    assert r["timing"]["step_seconds_mean"] == pytest.approx(sum(x["seconds"] for x in kept) / 3)


def test_flops_per_step_equal_step_flops_on_the_recorded_shapes(profiled):
    _, r = profiled
    tasks = {t["name"]: t["kind"] for t in yaml.safe_load((REPO / "configs/demo.yaml").read_text())["tasks"]}
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for step in r["flops_per_step"]:
        expected = 0
        for rows, length in step["passes"]:
            terms = step_flops(DEMO_CONFIG, seq=length, micro_batch=rows, peft="lora", r=16, checkpointing=False,
                               targets=targets)
            lm = terms["forward_lm_head"] + terms["backward_lm_head_input_grad"]
            expected += terms["total"] - (0 if tasks[step["task"]] == "generate" else lm)
        assert step["flops"] == expected, step["task"]
        assert sum(rows for rows, _ in step["passes"]) in (2, 4)  # micro-batch 2; retrieval embeds two sides
    timed = r["flops_per_step"][1:]
    assert r["flops_per_step_mean"] == pytest.approx(sum(s["flops"] for s in timed) / len(timed))


def test_flop_counter_agrees_with_the_analytic_count(profiled):
    """torch counts every matmul of step 1 (task heads included; on CPU it has no rule for the fused
    attention kernel), so it must sit just above the analytic count without attention."""
    _, r = profiled
    first = r["flops_per_step"][0]
    counted = r["flops_counted_step1"]
    assert first["flops_no_attention"] <= counted <= 1.001 * first["flops_no_attention"]


def test_mfu_uses_the_given_peak(profiled):
    _, r = profiled
    assert r["peak_tflops"] == PEAK_TFLOPS
    expected = r["flops_per_step_mean"] / r["timing"]["step_seconds_mean"] / (PEAK_TFLOPS * 1e12)
    assert r["mfu"] == pytest.approx(expected)


def test_measured_model_states_match_the_plan_and_the_export(profiled):
    out, r = profiled
    measured, planned = r["model_states_measured"], r["model_states_planned"]
    for key in ("bf16_weights", "trainable_params", "master_weights", "gradients"):
        assert measured[key] == planned[key], key
    assert measured["optimizer_states"] == pytest.approx(planned["optimizer_states"], abs=64)
    # one rank: the trainable partitions are whole fp32 tensors: the LoRA factors + the task heads
    lora = 4 * 16 * sum(i + o for i, o in [(128, 128), (128, 64), (128, 64), (128, 128), (128, 352), (128, 352),
                                           (352, 128)])
    heads = sum(128 * 64 + 64 + 64 + 1 for _ in range(2)) + 128 * 512 + 512  # 2 classifiers + retrieval head
    assert measured["trainable_params"] == 4 * (lora + heads)
    assert r["memory"]["rss_peak_bytes"] >= r["memory"]["rss_ready_bytes"] > 0
    assert r["comm_bytes_per_step"] is not None and all(v >= 0 for v in r["comm_bytes_per_step"].values())


@pytest.fixture(scope="module")
def savings(tmp_path_factory, one_thread):
    from mtpeft.config import load_config
    from mtpeft.profile.savings import run_savings

    tmp = tmp_path_factory.mktemp("savings")
    out = tmp / "out"
    return out, run_savings(load_config(tiny_config(tmp)), out, steps=4)  # every task once


def test_savings_report_files(savings):
    out, r = savings
    for name in ("report.md", "report.json", "memory_breakdown.png", "throughput.png", "loss_curves.png"):
        assert (out / name).stat().st_size > 0, name
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert set(r["variants"]) == {"full_ft", "lora", "qlora_bnb_peft", "qlora_mtpeft"}
    assert "bitsandbytes.nn.modules.Linear4bit" in r["variants"]["qlora_bnb_peft"]["lora_layer"]
    assert "QuantLinear" in r["variants"]["qlora_mtpeft"]["lora_layer"]


def test_savings_state_bytes_against_counts_of_the_model(savings):
    _, r = savings
    v = r["variants"]
    block_linears = 4 * sum(i * o for i, o in [(128, 128), (128, 64), (128, 64), (128, 128), (128, 352), (128, 352),
                                               (352, 128)])
    for name in ("qlora_bnb_peft", "qlora_mtpeft"):
        assert v[name]["states"]["packed_weights"] == block_linears // 2, name  # two NF4 codes per byte
    # per weight, double quant: 1 byte per 64-block, fp32 scale per 256 blocks, 256-entry fp32 code,
    # fp32 offset; bitsandbytes also keeps the 16 NF4 levels (fp32); mtpeft pads each tensor to 2 bytes
    blocks = [i * o // 64 for i, o in [(128, 128), (128, 64), (128, 64), (128, 128), (128, 352), (128, 352),
                                       (352, 128)]]
    even = lambda n: n + n % 2  # noqa: E731
    mtpeft = 4 * sum(even(b) + 4 * math.ceil(b / 256) + 1024 + 4 for b in blocks)
    bnb = 4 * sum(b + 4 * math.ceil(b / 256) + 1024 + 64 + 4 for b in blocks)
    assert v["qlora_mtpeft"]["states"]["quant_constants"] == mtpeft
    assert v["qlora_bnb_peft"]["states"]["quant_constants"] == bnb
    assert v["lora"]["states"]["bf16_weights"] == 4 * sum(p for p in [block_linears, 2 * 1122 * 128, 9 * 128])
    assert v["lora"]["trainable_params"] == v["qlora_bnb_peft"]["trainable_params"] == v["qlora_mtpeft"]["trainable_params"]
    assert v["full_ft"]["trainable_params"] > 4 * v["lora"]["trainable_params"]
    for name, x in v.items():  # AdamW: two fp32 moments per trainable element + one fp32 step per tensor
        s = x["states"]
        assert s["trainable_params"] == 4 * x["trainable_params"], name
        tensors = (s["optimizer_states"] - 8 * x["trainable_params"]) / 4
        assert tensors == int(tensors) and 0 < tensors < 400, name


def test_multitask_versus_per_task_bytes_are_the_files(savings):
    out, r = savings
    mt = r["multitask_vs_per_task"]
    shared = sum(f.stat().st_size for f in (out / "multitask_adapter").iterdir())
    separate = sum(f.stat().st_size for f in (out / "per_task_adapters").rglob("*.safetensors"))
    assert mt["multitask"]["bytes_on_disk"] == shared and mt["per_task"]["bytes_on_disk"] == separate
    from safetensors.torch import load_file

    adapter = sum(t.numel() for t in load_file(str(out / "multitask_adapter/adapter_model.safetensors")).values())
    heads = sum(t.numel() for t in load_file(str(out / "multitask_adapter/heads.safetensors")).values())
    assert mt["multitask"]["trainable_params"] == adapter + heads
    assert mt["per_task"]["trainable_params"] == 4 * adapter + heads


def test_full_fine_tuning_of_a_large_model_is_refused(tmp_path, monkeypatch):
    from mtpeft.config import load_config
    from mtpeft.errors import ConfigError
    from mtpeft.profile import savings

    monkeypatch.setattr(savings, "FULL_FT_MAX_PARAMS", 1_000_000)  # the demo base has 1.0M + heads
    with pytest.raises(ConfigError, match="full fine-tuning"):
        savings.build_variant("full_ft", load_config(tiny_config(tmp_path)))
