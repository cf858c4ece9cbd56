"""Evaluate every task on its eval split, on all ranks at once, and write ``metrics.json``.

Each rank takes every world-th example, padded so all ranks run the same number of forward passes
(ZeRO-3 gathers parameters collectively: an extra pass on one rank would hang the others). Results
are gathered, de-duplicated and scored once, against the task's chance baseline.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from mtpeft.data.dist import DistContext
from mtpeft.failed_writes import replacing


def _rank_indices(n: int, ctx: DistContext) -> list[int]:
    per_rank = math.ceil(n / ctx.world)
    mine = list(range(ctx.rank, n, ctx.world))
    return mine + [mine[-1] if mine else 0] * (per_rank - len(mine))


def evaluate_task(model, task, tok, ctx: DistContext, max_len: int, batch_size: int) -> dict:
    kind, examples = task.kind, task.eval_set
    n = len(examples)
    mine = _rank_indices(n, ctx)
    outputs: list = []
    for start in range(0, len(mine), batch_size):
        chunk = mine[start:start + batch_size]
        rows = [examples[i] for i in chunk]
        outputs.extend(zip(chunk, kind.predict_rows(model, task.name, rows, tok, max_len, synced=ctx.world > 1)))
    by_index = {}
    for part in ctx.gather_objects(outputs):
        by_index.update(dict(part))
    preds = [by_index[i] for i in range(n)]
    ordered = [examples[i] for i in range(n)]
    return {"kind": kind.name, **kind.score(preds, ordered), "examples": n, **kind.eval_extras(preds, ordered)}


def evaluate(model, tasks: list, tok, ctx: DistContext, max_len: int, batch_size: int) -> dict:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return {t.name: evaluate_task(model, t, tok, ctx, max_len, batch_size) for t in tasks}
    finally:
        model.train(was_training)


def write_metrics(metrics: dict, run_dir: Path) -> Path:
    path = run_dir / "metrics.json"
    with replacing(path) as tmp:
        tmp.write_text(json.dumps(metrics, indent=2))
    return path


def format_table(metrics: dict) -> str:
    rows = [("task", "kind", "metric", "value", "chance", "margin")]
    for name, m in metrics.items():
        rows.append((name, m["kind"], m["metric"], f"{m['value']:.4f}", f"{m['chance']:.4f}",
                     f"{m['value'] - m['chance']:+.4f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
