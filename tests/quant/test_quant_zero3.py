"""2-rank ZeRO-3 on CPU: a QuantLinear model's forward is exact and its quantized bytes are sharded.

One ``deepspeed`` launch (gloo, CPU accelerator) runs tests/dist_scripts/quant_zero3_forward.py,
which writes per-rank JSON results; the checks here read them, and recompute the single-process
logits in this process as an independent reference.
"""

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from distributed import REPO
import pytest
import torch

pytestmark = pytest.mark.distributed  # real DeepSpeed engines or several processes

SCRIPT = REPO / "tests" / "dist_scripts" / "quant_zero3_forward.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quant_zero3")
    launcher = Path(sys.executable).parent / "deepspeed"
    env = dict(os.environ, DS_ACCELERATOR="cpu", MTPEFT_KERNELS="torch", OMP_NUM_THREADS="1")
    cmd = [str(launcher), "--num_gpus", "2", "--master_port", str(_free_port()), str(SCRIPT), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    return ranks, torch.load(out / "logits_rank0.pt")


def test_zero3_forward_equals_single_process(zero3_run):
    ranks, logits = zero3_run
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert all(r["logits_equal"] and r["max_abs_diff"] == 0.0 for r in ranks)
    spec = importlib.util.spec_from_file_location("quant_zero3_forward", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with torch.no_grad():
        expected = script.build_model()(input_ids=script.input_ids()).logits
    assert torch.equal(logits, expected)


def test_zero3_shards_the_quantized_bytes(zero3_run):
    ranks, _ = zero3_run
    total = ranks[0]["total_quant_elements"]
    # 14 QuantLinears x 5 storage tensors; ZeRO-3 pads each to a multiple of the world size
    slack = 14 * 5
    assert total > 10_000 and all(r["total_quant_elements"] == total for r in ranks)
    for r in ranks:
        assert total / 2 <= r["local_quant_elements"] <= total / 2 + slack
        assert r["partitioned_outside_forward"] and r["quant_dtypes"] == ["torch.bfloat16"]
