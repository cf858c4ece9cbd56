"""``mtpeft compare`` on CPU: a row for every task, the budget rule honoured (each single-task run
trains the steps its task got in the multitask run, read back from the logs), and adapter bytes on
disk equal to the exported files' sizes."""

from __future__ import annotations

import argparse
import json
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

from distributed import tiny_config
from mtpeft.profile import compare_cli
from mtpeft.profile.report import read_log

pytestmark = pytest.mark.distributed  # real DeepSpeed engines or several processes

TASKS = ("defect", "clone", "search", "codegen")
FILES = ("adapter_model.safetensors", "heads.safetensors")


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    parser = argparse.ArgumentParser()
    compare_cli.add_arguments(parser)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        args = parser.parse_args([str(tiny_config(tmp)), "--out", str(tmp / "out"), "--steps", "4"])
        assert compare_cli.run(args) == 0
    finally:
        torch.set_num_threads(threads)
    out = tmp / "out"
    return out, json.loads((out / "compare.json").read_text())


def test_table_and_plot_have_every_task(compared):
    out, r = compared
    for name in ("report.md", "compare.json", "compare_metrics.png", "compare_cost.png"):
        assert (out / name).stat().st_size > 0, name
    md = (out / "report.md").read_text()
    for task in TASKS:
        assert f"| {task} |" in md and f"single: {task}" in md
        assert r["multitask"]["metrics"][task]["metric"] == r["single"][task]["metrics"][task]["metric"]


def test_budget_rule_each_single_run_gets_its_tasks_steps(compared):
    out, r = compared
    multi = Counter(x["task"] for x in read_log(out / "multitask" / "log.jsonl"))
    assert dict(multi) == r["budget"] and sum(multi.values()) == 4
    for task in TASKS:
        single = read_log(out / "single" / task / "log.jsonl")
        assert len(single) == multi[task] and {x["task"] for x in single} == {task}


def test_adapter_bytes_on_disk_are_the_files_sizes(compared):
    out, r = compared
    sizes = {run: sum((out / run / "export" / f).stat().st_size for f in FILES)
             for run in ["multitask", *(f"single/{t}" for t in TASKS)]}
    assert r["multitask"]["bytes_on_disk"] == sizes["multitask"]
    for task in TASKS:
        assert r["single"][task]["bytes_on_disk"] == sizes[f"single/{task}"]
    # parameters: one shared module + every head, versus a module per task + the same heads
    adapter = sum(t.numel() for t in load_file(str(out / "multitask/export/adapter_model.safetensors")).values())
    heads = sum(t.numel() for t in load_file(str(out / "multitask/export/heads.safetensors")).values())
    assert r["multitask"]["trainable_params"] == adapter + heads
    assert sum(r["single"][t]["trainable_params"] for t in TASKS) == len(TASKS) * adapter + heads


def test_flops_and_times_are_reported(compared):
    _, r = compared
    for run in [r["multitask"], *r["single"].values()]:
        assert run["flops"] > 0 and run["wall_seconds"] >= run["train_seconds"] > 0


def test_bad_input_is_a_user_error(tmp_path):
    import yaml

    from mtpeft.errors import UserError

    raw = yaml.safe_load(tiny_config(tmp_path).read_text())
    raw["tasks"] = raw["tasks"][:1]
    one = tmp_path / "one.yaml"
    one.write_text(yaml.safe_dump(raw))
    parser = argparse.ArgumentParser()
    compare_cli.add_arguments(parser)
    with pytest.raises(UserError, match="at least two tasks"):
        compare_cli.run(parser.parse_args([str(one)]))


def test_a_report_rewrite_past_a_file_size_limit_keeps_the_report(compared, tmp_path):
    """Writing the report again where no file may grow past 1 kB (every report file is larger): one
    WriteError naming the first file, and the folder's report files unchanged, byte for byte."""
    import hashlib
    import shutil

    from write_limits import file_size_limit
    from mtpeft.errors import WriteError
    from mtpeft.profile.compare import write_compare_report

    out, r = compared
    copy = tmp_path / "report"
    copy.mkdir()
    for name in ("report.md", "compare.json", "compare_metrics.png", "compare_cost.png"):
        shutil.copy(out / name, copy / name)
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in copy.iterdir()}
    with file_size_limit(1000), pytest.raises(WriteError, match=rf"^{copy / 'compare_metrics.png'}: cannot be written"):
        write_compare_report(copy, json.loads(json.dumps(r)))
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in copy.iterdir()} == before
    write_compare_report(copy, json.loads(json.dumps(r)))  # and without the limit, the same report again
    assert (copy / "report.md").read_text() == (out / "report.md").read_text()
