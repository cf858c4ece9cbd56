"""Gradient-transfer probe: cosines against float64 numpy, exact under a two-rank split, and the
JSON-lines record and heat map it writes."""

import json
import math
import struct

import numpy as np
import pytest
import torch

from mtpeft.trainer.transfer import GradientProbe, plot

TASKS = ["clone", "defect", "search"]


def _task_grads(seed=0):
    """Three tasks' gradients over two shared tensors (a 5×7 matrix and a 4-vector, 39 elements)."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=39)
    vecs = [base + 0.3 * rng.normal(size=39), -base + 0.5 * rng.normal(size=39), rng.normal(size=39)]
    return [[torch.tensor(v[:35].reshape(5, 7), dtype=torch.float32), torch.tensor(v[35:], dtype=torch.float32)]
            for v in vecs]


def _reference(grads):
    flat = [np.concatenate([g.double().numpy().ravel() for g in task]) for task in grads]
    return [[float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))) for b in flat] for a in flat]


def test_cosine_matrix_matches_float64():
    grads = _task_grads()
    probe = GradientProbe(TASKS)
    for i, g in enumerate(grads):
        probe.record(i, g)
    cos = probe.cosine_matrix()
    ref = _reference(grads)
    for row, ref_row in zip(cos, ref):
        assert row == pytest.approx(ref_row, abs=1e-12)
    assert cos[0][1] < -0.5 < 0.5 < cos[0][0]  # the hand-made conflicting pair shows up as negative
    # hand example: [1, 0] vs [1, 1] -> 1/sqrt(2); [1, 0] vs [-2, 0] -> -1
    small = GradientProbe(["a", "b", "c"])
    for i, v in enumerate([[1.0, 0.0], [1.0, 1.0], [-2.0, 0.0]]):
        small.record(i, [torch.tensor(v)])
    assert small.cosine_matrix()[0] == pytest.approx([1.0, 1 / math.sqrt(2), -1.0])


def test_two_rank_partitions_summed_give_the_same_matrix():
    grads = _task_grads(seed=1)
    flat = [torch.cat([g.reshape(-1) for g in task]) for task in grads]
    ranks = [GradientProbe(TASKS), GradientProbe(TASKS)]
    for i, f in enumerate(flat):  # ZeRO-3 style: rank 0 holds 20 elements, rank 1 the other 19
        ranks[0].record(i, [f[:20]])
        ranks[1].record(i, [f[20:]])
    reduced = ranks[0].local_stats() + ranks[1].local_stats()  # what all_reduce(SUM) does
    assert reduced.shape == (len(TASKS) ** 2,) and reduced.dtype == torch.float64
    cos = ranks[0].finish(reduced)
    ref = _reference(grads)
    for row, ref_row in zip(cos, ref):
        assert row == pytest.approx(ref_row, abs=1e-12)
    assert ranks[0].cosine_matrix() == cos  # finished matrix is kept until the next record


def test_unrecorded_task_is_nan_and_saved_as_null(tmp_path):
    probe = GradientProbe(TASKS)
    probe.record(0, [torch.tensor([1.0, 2.0])])
    probe.record(2, [torch.tensor([2.0, 4.0])])
    cos = probe.cosine_matrix()
    assert cos[0][2] == pytest.approx(1.0) and math.isnan(cos[1][1]) and math.isnan(cos[0][1])
    path = tmp_path / "transfer.jsonl"
    probe.save(path, step=50)
    rec = json.loads(path.read_text().splitlines()[-1])
    assert rec["step"] == 50 and rec["tasks"] == TASKS and rec["cosine"][1] == [None, None, None]


def test_save_appends_and_plot_writes_a_png(tmp_path):
    path = tmp_path / "transfer.jsonl"
    probe = GradientProbe(TASKS)
    for step in (10, 20):
        for i, g in enumerate(_task_grads(seed=step)):
            probe.record(i, g)
        probe.save(path, step)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 20]
    assert records[1]["cosine"][0][0] == pytest.approx(1.0)
    png = plot(path, tmp_path / "plots" / "transfer.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 100 and height > 100
    import matplotlib.image

    assert matplotlib.image.imread(png).shape[:2] == (height, width)  # decodes as a whole image
