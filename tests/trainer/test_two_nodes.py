"""Two "nodes" on localhost, one rank each, started by launch/per_node_no_ssh.sh (deepspeed --no_ssh).

Contract 2 across nodes: their per-step losses equal a single process with twice the micro-batch
(tests/trainer/test_zero3_training.py shows the single process equals one node with two ranks, so all three
agree). The hostfile names the two nodes differently (``localhost`` / ``127.0.0.1``) because the
launcher keys its world layout by host name; both resolve to this machine.
"""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from distributed import REPO, env, free_port, run, tiny_config

pytestmark = pytest.mark.distributed  # real DeepSpeed engines or several processes

STEPS = 4  # one step of each of the four demo tasks


def _log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two_nodes")
    hostfile = tmp / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    nodes_dir, single_dir = tmp / "two_nodes_run", tmp / "one_rank_run"
    cfg_nodes = tiny_config(tmp, "nodes.yaml", keep_dropout=True, micro_batch_size=2, max_steps=STEPS)
    cfg_single = tiny_config(tmp, "single.yaml", keep_dropout=True, micro_batch_size=4, max_steps=STEPS)
    e = dict(env(), PYTHON=sys.executable,
             DEEPSPEED=shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed")))
    port = str(free_port())
    nodes = []
    for rank in (0, 1):
        log = open(tmp / f"node{rank}.log", "w")
        cmd = [str(REPO / "launch" / "per_node_no_ssh.sh"), "--node_rank", str(rank), "--master_addr", "127.0.0.1",
               "--master_port", port, "--num_gpus", "1", str(hostfile), str(cfg_nodes), "--set", f"output.dir={nodes_dir}"]
        nodes.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=e, cwd=str(REPO)), log))
    try:
        run([sys.executable, "-m", "mtpeft", "train", str(cfg_single), "--set", f"output.dir={single_dir}"],
            tmp / "single.log")
        for rank, (proc, log) in enumerate(nodes):
            code = proc.wait(timeout=400)
            log.close()
            assert code == 0, (tmp / f"node{rank}.log").read_text()[-4000:]
    finally:
        for proc, _ in nodes:
            if proc.poll() is None:
                proc.kill()
    return nodes_dir, single_dir, tmp


def test_two_nodes_form_one_world_of_two_ranks(runs):
    nodes_dir, _, tmp = runs
    assert json.loads((nodes_dir / "partition.json").read_text())["world_size"] == 2
    logs = [(tmp / f"node{rank}.log").read_text() for rank in (0, 1)]
    assert "--node_rank=0" in logs[0] and "--node_rank=1" in logs[1]


def test_two_nodes_losses_equal_one_rank_with_twice_the_micro_batch(runs):
    nodes_dir, single_dir, _ = runs
    a, b = _log(nodes_dir), _log(single_dir)
    assert len(a) == len(b) == STEPS
    assert {r["task"] for r in a} == {"defect", "clone", "search", "codegen"}
    for ra, rb in zip(a, b):
        assert ra["task"] == rb["task"] and ra["tokens"] == rb["tokens"]
        assert math.isfinite(ra["loss"]) and abs(ra["loss"] - rb["loss"]) <= 1e-4 * abs(rb["loss"]), (ra, rb)
