"""Write what profile, savings and compare measured: markdown tables, JSON, PNG plots (matplotlib's
Agg backend, so no display is needed) and TensorBoard scalars.

Nothing here measures or decides; callers pass plain numbers, so every figure in a report can be
traced to the JSON written beside it. Each file goes to a temporary name first and then replaces the
previous one, so a full disk leaves the last complete report in place and ends in one error line that
names the file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from mtpeft.failed_writes import FREE_SPACE, replacing, writing

MIB = 1024**2


def fmt(value, unit: str = "") -> str:
    """A table cell: bytes as MiB, large counts with thousands separators, '—' for missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if unit == "bytes":
        return f"{value / MIB:,.3f} MiB"
    if unit == "flops":
        return f"{value:.4g}"
    if unit == "%":
        return f"{100 * value:.3f} %"
    if isinstance(value, float):
        return f"{value:,.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(headers: Sequence[str], rows: Iterable[Sequence]) -> str:
    """The same table for a terminal: aligned columns."""
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h)) for i, h in enumerate(headers)]
    out = ["  ".join(str(h).ljust(w) for h, w in zip(headers, widths)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(out)


def write_text(path: Path, text: str) -> Path:
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: Path, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2, default=str))


def _save_figure(plt, fig, path: Path) -> Path:
    try:
        with replacing(path) as tmp:
            fig.savefig(tmp, dpi=110, format=Path(path).suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return Path(path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def grouped_bars(path: Path, title: str, series: Mapping[str, Mapping[str, float]], ylabel: str,
                 scale: float = 1.0) -> Path:
    """One bar group per category (the inner keys), one bar per series (the outer keys)."""
    plt = _pyplot()
    categories: List[str] = []
    for values in series.values():
        categories += [c for c in values if c not in categories]
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(categories) * max(len(series), 1)), 4.2))
    for i, (name, values) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(categories))]
        ax.bar(xs, [(values.get(c) or 0) / scale for c in categories], width, label=name)
    ax.set_xticks(range(len(categories)))
    ax.set_xticklabels(categories, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return _save_figure(plt, fig, path)


def stacked_bars(path: Path, title: str, bars: Mapping[str, Mapping[str, float]], ylabel: str,
                 scale: float = 1.0) -> Path:
    """One stacked bar per outer key, stacked by the inner keys (e.g. a memory breakdown per variant)."""
    plt = _pyplot()
    parts: List[str] = []
    for values in bars.values():
        parts += [p for p in values if p not in parts]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(bars)), 4.5))
    bottom = [0.0] * len(bars)
    names = list(bars)
    for part in parts:
        heights = [(bars[n].get(part) or 0) / scale for n in names]
        ax.bar(names, heights, bottom=bottom, label=part)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize="small")
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    return _save_figure(plt, fig, path)


def loss_curves(path: Path, title: str, curves: Mapping[str, Mapping[str, Sequence[Tuple[int, float]]]]) -> Path:
    """One panel per task; one line per run (outer key) of (step, loss) points."""
    plt = _pyplot()
    tasks: List[str] = []
    for per_task in curves.values():
        tasks += [t for t in per_task if t not in tasks]
    cols = min(len(tasks), 2) or 1
    rows = math.ceil(len(tasks) / cols) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.4 * rows), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        for run, per_task in curves.items():
            points = per_task.get(task) or []
            if points:
                ax.plot([s for s, _ in points], [v for _, v in points], marker="o", markersize=3, label=run)
        ax.set_title(task)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    return _save_figure(plt, fig, path)


def task_curves(records: Iterable[dict]) -> Dict[str, List[Tuple[int, float]]]:
    """Per-task (step, loss) points of ``log.jsonl`` records (skipped steps left out)."""
    out: Dict[str, List[Tuple[int, float]]] = {}
    for r in records:
        if not r.get("skipped") and r.get("loss") == r.get("loss"):
            out.setdefault(r["task"], []).append((int(r["step"]), float(r["loss"])))
    return out


def read_log(path: Path) -> List[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def tensorboard_scalars(log_dir: Path, scalars: Mapping[str, Optional[float]], step: int = 0,
                        curves: Optional[Mapping[str, Sequence[Tuple[int, float]]]] = None) -> Path:
    """Scalars (``None`` skipped) at ``step`` and optional curves, as TensorBoard events."""
    from torch.utils.tensorboard import SummaryWriter

    with writing(Path(log_dir), f"the event files already there are unchanged; {FREE_SPACE}"):
        writer = SummaryWriter(log_dir=str(log_dir))
        try:
            for tag, value in scalars.items():
                if value is not None:
                    writer.add_scalar(tag, float(value), step)
            for tag, points in (curves or {}).items():
                for s, v in points:
                    writer.add_scalar(tag, float(v), int(s))
        finally:
            writer.close()
    return Path(log_dir)
