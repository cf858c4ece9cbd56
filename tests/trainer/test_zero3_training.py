"""End-to-end ZeRO-3 runs on CPU: contract 2 (world-size-independent losses), real partitioning,
the run's outputs, HF peft loading of the export, and `mtpeft eval` recomputing the metrics.

One 2-rank run through the deepspeed launcher (micro-batch 2) and one single-process run without
the launcher (micro-batch 4) are shared by all tests in this module.
"""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from distributed import REPO, deepspeed_cmd, free_port, run, tiny_config

pytestmark = pytest.mark.distributed  # real DeepSpeed engines or several processes


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zero3")
    two, one = tmp / "two_ranks", tmp / "one_rank"
    # the demo's dropouts on (LoRA 0.05, heads 0.1): their masks are keyed by example, not by rank
    cfg2 = tiny_config(tmp, "two.yaml", keep_dropout=True, micro_batch_size=2)
    cfg1 = tiny_config(tmp, "one.yaml", keep_dropout=True, micro_batch_size=4)
    port = free_port()
    run(deepspeed_cmd(2, "--module", "mtpeft", "train", str(cfg2), "--set", f"output.dir={two}", port=port),
        tmp / "two.log")
    run([sys.executable, "-m", "mtpeft", "train", str(cfg1), "--set", f"output.dir={one}"], tmp / "one.log")
    return {"two": two, "one": one, "port": port}


def _log(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_contract2_same_losses_for_1x4_and_2x2(runs):
    a, b = _log(runs["one"]), _log(runs["two"])
    assert len(a) == len(b) == 8
    for ra, rb in zip(a, b):
        assert ra["task"] == rb["task"] and ra["tokens"] == rb["tokens"]
        assert math.isfinite(ra["loss"])
        assert abs(ra["loss"] - rb["loss"]) <= 1e-4 * abs(ra["loss"]), (ra, rb)
    assert {r["task"] for r in a} == {"defect", "clone", "search", "codegen"}


def test_zero3_each_rank_holds_half_of_the_frozen_base(runs):
    report = json.loads((runs["two"] / "partition.json").read_text())
    assert report["world_size"] == 2
    total = report["ranks"][0]["frozen_total"]
    # the frozen base is the pretrained Llama: every one of its elements is counted
    from safetensors import safe_open

    with safe_open(str(REPO / "mtpeft/assets/demo/base_model/model.safetensors"), "pt") as f:
        base_numel = sum(f.get_slice(k).get_shape().numel() if hasattr(f.get_slice(k).get_shape(), "numel")
                         else math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    assert total == base_numel
    for rank in report["ranks"]:
        assert abs(rank["frozen"] - total / 2) <= 0.01 * total / 2, rank
        assert abs(rank["trainable"] - rank["trainable_total"] / 2) <= 0.01 * rank["trainable_total"] / 2


def test_run_writes_log_tensorboard_and_metrics(runs):
    rows = _log(runs["two"])
    for key in ("step", "task", "loss", "lr", "tokens", "seconds"):
        assert all(key in r for r in rows)
    assert [r["step"] for r in rows] == list(range(1, 9))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(runs["two"] / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss/defect", "loss/codegen", "lr", "tokens_per_second"} <= tags
    losses = [e.value for e in acc.Scalars("loss/defect")]
    assert losses == pytest.approx([r["loss"] for r in rows if r["task"] == "defect"], rel=1e-6)
    metrics = json.loads((runs["two"] / "metrics.json").read_text())
    assert set(metrics) == {"defect", "clone", "search", "codegen"}
    for m in metrics.values():
        assert {"kind", "metric", "value", "chance"} <= set(m)
    assert metrics["search"]["chance"] == pytest.approx(sum(1 / k for k in range(1, 13)) / 12)


def test_export_loads_with_hf_peft_and_reproduces_backbone(runs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mtpeft.run_dir import load_trained_model

    export = runs["two"] / "export"
    cfg = json.loads((export / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["base_model_name_or_path"].endswith("base_model")
    _, model = load_trained_model(runs["two"])
    vocab = model.backbone.config.vocab_size
    ids = torch.randint(5, vocab, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.backbone(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"], dtype=torch.float32)
        plain = base(input_ids=ids).logits
        peft_model = PeftModel.from_pretrained(base, str(export)).eval()
        theirs = peft_model(input_ids=ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-5
    assert (theirs - plain).abs().max().item() > 1e-3  # the adapter is not a no-op


def test_eval_command_recomputes_metrics(runs, capsys):
    from mtpeft.cli import main

    before = json.loads((runs["two"] / "metrics.json").read_text())
    assert main(["eval", str(runs["two"])]) == 0
    after = json.loads((runs["two"] / "metrics.json").read_text())
    for task in before:
        assert after[task]["value"] == pytest.approx(before[task]["value"], abs=1e-6), task
        assert after[task]["chance"] == pytest.approx(before[task]["chance"])
    assert "codegen" in capsys.readouterr().out


def test_the_run_leaves_no_shared_memory_behind(runs):
    """DeepSpeed's CPU allreduce workspace (66 MiB of /dev/shm per rank) is never removed by
    DeepSpeed itself; the ranks unlink its names once all have mapped them."""
    from mtpeft.launch.extension_lock import extensions_root

    assert (extensions_root() / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").is_file()  # the op that makes it
    left = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{runs['port']}_*"))
    assert left == []
