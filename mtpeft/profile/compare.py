"""Multitask versus single-task on the user's own tasks, with the same budget.

Budget rule: the multitask run trains ``steps`` optimizer steps and its sampler decides which task
each step trains; task *i*'s single-task run then trains exactly as many steps as task *i* got in
the multitask run (counted from its ``log.jsonl``), with the same micro-batch, sequence length,
learning rates and seed. So every task sees the same number of examples either way (not the same
examples: a one-task run draws its own shuffle), and each run's learning-rate schedule spans its
own steps. A task the sampler never picked gets no single-task run.

Every run is the real ``mtpeft.trainer.recipe.train`` (ZeRO-3 engine, evaluation, export), called in
this process one after another. Costs: trainable parameters and bytes on disk read from each run's
export (multitask: one shared module + all heads; single-task: the sum over the separate modules and
their heads), training FLOPs from ``flops.step_flops`` on the real padded shapes of every step, and
time (the training steps from ``log.jsonl``, and the whole run's wall clock with evaluation).
"""

from __future__ import annotations

import copy
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional

from mtpeft.profile import report
from mtpeft.trainer.export import ADAPTER_FILE, HEADS_FILE

EXPORT_FILES = (ADAPTER_FILE, HEADS_FILE)


def _run_config(cfg, out_dir: Path, steps: int, tasks: Optional[list] = None):
    c = copy.deepcopy(cfg)
    c.train.max_steps = steps
    c.train.eval_every = c.train.save_every = c.train.transfer_every = 0
    c.train.warmup_steps = min(c.train.warmup_steps, max(steps - 1, 0))
    c.output.dir = str(out_dir)
    if tasks is not None:
        c.tasks = tasks
        names = {t.name for t in tasks}
        if c.weighting.kind == "static":
            c.weighting.weights = {k: v for k, v in c.weighting.weights.items() if k in names}
    return c


def export_cost(run_dir: Path) -> Dict[str, int]:
    """Trainable parameters and bytes on disk of a run's export (adapter + heads files)."""
    from safetensors import safe_open

    params = nbytes = 0
    for name in EXPORT_FILES:
        path = Path(run_dir) / "export" / name
        if not path.is_file():
            continue
        nbytes += path.stat().st_size
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():
                params += _numel(fh.get_slice(key).get_shape())
    return {"trainable_params": params, "bytes_on_disk": nbytes}


def _numel(shape: List[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _train(cfg) -> Dict[str, Any]:
    from mtpeft.trainer.recipe import train

    start = time.perf_counter()
    run_dir = Path(train(cfg))
    wall = time.perf_counter() - start
    records = report.read_log(run_dir / "log.jsonl")
    metrics_path = run_dir / "metrics.json"
    return {"run_dir": str(run_dir), "wall_seconds": wall, "train_seconds": sum(r["seconds"] for r in records),
            "steps": len(records), "records": records,
            "metrics": json.loads(metrics_path.read_text()) if metrics_path.is_file() else {},
            **export_cost(run_dir)}


def _flops(cfg) -> Optional[int]:
    """Training FLOPs of every step of ``cfg`` (one process), None where step_flops cannot read the model."""
    from mtpeft.profile.architecture import load_architecture
    from mtpeft.profile.run_flops import step_flops_of_run
    from mtpeft.trainer.build import load_tokenizer
    from mtpeft.trainer.loop import prepare_tasks

    try:
        arch = load_architecture(cfg.model.name_or_path)
    except Exception:  # encoders and unknown families: the analytic counter does not apply
        return None
    tasks = prepare_tasks(cfg)
    return sum(s["flops"] for s in step_flops_of_run(cfg, tasks, load_tokenizer(cfg.model.name_or_path), 1,
                                                     cfg.train.max_steps, arch))


def run_compare(cfg, out: Path, steps: Optional[int] = None) -> Dict[str, Any]:
    """Train the multitask run and one single-task run per task; write the comparison to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    steps = steps or cfg.train.max_steps
    multi_cfg = _run_config(cfg, out / "multitask", steps)
    multi = _train(multi_cfg)
    multi["flops"] = _flops(multi_cfg)
    budget = Counter(r["task"] for r in multi["records"])
    singles = {}
    for task in cfg.tasks:
        n = budget.get(task.name, 0)
        if n == 0:
            continue
        c = _run_config(cfg, out / "single" / task.name, n, [copy.deepcopy(task)])
        singles[task.name] = _train(c)
        singles[task.name]["flops"] = _flops(c)
    result = {"config": cfg.source, "steps": steps, "budget": dict(budget),
              "budget_rule": "each single-task run trains as many steps as its task got in the multitask run",
              "multitask": multi, "single": singles}
    write_compare_report(out, result)
    return result


def _sum(values) -> Optional[float]:
    values = list(values)
    return None if not values or any(v is None for v in values) else sum(values)


def cost_rows(r: Dict[str, Any]) -> List[List[Any]]:
    m, s = r["multitask"], r["single"]
    rows = [["multitask (one shared module)", 1, m["steps"], m["trainable_params"], m["bytes_on_disk"], m["flops"],
             m["train_seconds"], m["wall_seconds"]],
            ["single-task (sum over runs)", len(s), _sum(v["steps"] for v in s.values()),
             _sum(v["trainable_params"] for v in s.values()), _sum(v["bytes_on_disk"] for v in s.values()),
             _sum(v["flops"] for v in s.values()), _sum(v["train_seconds"] for v in s.values()),
             _sum(v["wall_seconds"] for v in s.values())]]
    rows += [[f"  single: {name}", 1, v["steps"], v["trainable_params"], v["bytes_on_disk"], v["flops"],
              v["train_seconds"], v["wall_seconds"]] for name, v in s.items()]
    return rows


def metric_rows(r: Dict[str, Any]) -> List[List[Any]]:
    rows = []
    for name, steps in r["budget"].items():
        multi = r["multitask"]["metrics"].get(name, {})
        single = r["single"].get(name, {}).get("metrics", {}).get(name, {})
        mv, sv = multi.get("value"), single.get("value")
        rows.append([name, multi.get("metric") or single.get("metric"), steps, mv, sv,
                     None if mv is None or sv is None else mv - sv, multi.get("chance")])
    return rows


COST_HEADERS = ("setup", "runs", "steps", "trainable params", "adapter bytes on disk", "training FLOPs",
                "train time (s)", "wall time (s)")
METRIC_HEADERS = ("task", "metric", "steps per task", "multitask", "single-task", "multi − single", "chance")


def write_compare_report(out: Path, r: Dict[str, Any]) -> None:
    f = report.fmt
    units = (None, None, None, None, "bytes", "flops", None, None)
    cost = [[f(v, u) if u else f(v) for v, u in zip(row, units)] for row in cost_rows(r)]
    metrics = [[f(v) for v in row] for row in metric_rows(r)]
    r["table"] = report.text_table(COST_HEADERS, cost) + "\n\n" + report.text_table(METRIC_HEADERS, metrics)
    report.grouped_bars(out / "compare_metrics.png", "per-task metric: multitask vs single-task (same steps per task)",
                        {"multitask": {row[0]: row[3] for row in metric_rows(r)},
                         "single-task": {row[0]: row[4] for row in metric_rows(r)}}, "metric value")
    rows = cost_rows(r)[:2]
    ratios = {}
    for label, col in (("trainable params", 3), ("bytes on disk", 4), ("training FLOPs", 5), ("train time", 6)):
        if rows[0][col]:
            ratios[label] = (rows[1][col] or 0) / rows[0][col]
    report.grouped_bars(out / "compare_cost.png", "single-task total / multitask", {"ratio": ratios}, "× multitask")
    md = [f"# mtpeft compare: {r['config']}", "",
          f"Multitask run: {r['steps']} steps. Budget rule: {r['budget_rule']} ({', '.join(f'{k}: {v}' for k, v in r['budget'].items())}).",
          "", "## Cost", "", report.markdown_table(COST_HEADERS, cost), "",
          "Adapter bytes on disk: `export/adapter_model.safetensors` + `export/heads.safetensors` of each run. "
          "Training FLOPs: `flops.step_flops` (frozen base) on every step's padded shapes; they differ between "
          "setups only by the lengths of the examples drawn. Wall time includes evaluation and export, and the "
          "multitask run, which goes first, also pays the process's one-time imports and process-group setup.", "", "## Per-task metrics (each run's metrics.json)", "",
          report.markdown_table(METRIC_HEADERS, metrics), "",
          "![metrics](compare_metrics.png)", "![cost](compare_cost.png)", ""]
    report.write_text(out / "report.md", "\n".join(md))
    slim = copy.deepcopy(r)
    for run in [slim["multitask"], *slim["single"].values()]:
        run.pop("records", None)
    report.write_json(out / "compare.json", slim)
