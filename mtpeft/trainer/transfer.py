"""Which tasks help each other: cosine similarity of their gradients on the shared PEFT module.

The code-analysis study found that task pairing decides who gains from multitask training; a
negative cosine between two tasks' gradients is the direct sign of that conflict. Under ZeRO-3
every rank holds only a slice of each flattened gradient, and a cosine is not additive over
slices, but dot products are: each rank computes its local Gram matrix (dot products and squared
norms), the loop all-reduces it with a sum, and ``finish`` turns the sum into cosines.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from mtpeft.failed_writes import FREE_SPACE, replacing, writing

_CHUNK = 1 << 22  # elements per float64 block, so the Gram never needs a float64 copy of everything


class GradientProbe:
    """Collects one gradient per task (this rank's slice), then their cosine matrix."""

    def __init__(self, task_names: list[str]):
        self.task_names = list(task_names)
        self._grads: dict[int, torch.Tensor] = {}
        self._cosine: list[list[float]] | None = None

    def record(self, task_index: int, grads: list[torch.Tensor]) -> None:
        """Task ``task_index``'s gradient of the shared parameters (or this rank's partitions of it)."""
        if not 0 <= task_index < len(self.task_names):
            raise IndexError(f"task index {task_index} out of range for {len(self.task_names)} tasks")
        flat = [g.detach().reshape(-1).float() for g in grads if g is not None]
        self._grads[task_index] = torch.cat(flat) if flat else torch.zeros(0)

    def local_stats(self) -> torch.Tensor:
        """Flattened [T*T] float64 dot products of this rank's slices; all-reduce (sum) across ranks.

        A task not recorded contributes zeros, so its row of the cosine matrix comes out NaN.
        """
        t = len(self.task_names)
        lengths = {g.numel() for g in self._grads.values()}
        if len(lengths) > 1:
            raise ValueError(f"recorded gradients differ in length {sorted(lengths)}; record the same parameters")
        device = next(iter(self._grads.values())).device if self._grads else torch.device("cpu")
        gram = torch.zeros(t, t, dtype=torch.float64, device=device)
        if not self._grads:
            return gram.reshape(-1)
        n, idx = lengths.pop(), sorted(self._grads)
        sub = torch.zeros(len(idx), len(idx), dtype=torch.float64, device=device)
        for start in range(0, n, _CHUNK):
            block = torch.stack([self._grads[i][start:start + _CHUNK].to(device) for i in idx]).double()
            sub += block @ block.T
        where = torch.tensor(idx, device=device)
        gram[where.unsqueeze(1), where.unsqueeze(0)] = sub
        return gram.reshape(-1)

    def finish(self, reduced_stats: torch.Tensor) -> list[list[float]]:
        """Cosines from the summed Gram matrix; clears the recorded gradients for the next probe."""
        t = len(self.task_names)
        gram = reduced_stats.detach().double().cpu().reshape(t, t)
        norms = gram.diagonal().clamp(min=0).sqrt().tolist()
        self._cosine = [[float(gram[i, j]) / (norms[i] * norms[j]) if norms[i] > 0 and norms[j] > 0 else math.nan
                         for j in range(t)] for i in range(t)]
        self._grads.clear()
        return self._cosine

    def cosine_matrix(self) -> list[list[float]]:
        """The latest finished matrix; with gradients pending, finishes them as one rank's whole."""
        if self._grads or self._cosine is None:
            return self.finish(self.local_stats())
        return self._cosine

    def save(self, path_jsonl: str | Path, step: int) -> None:
        """Append ``{step, tasks, cosine}`` (NaN written as null) to a JSON-lines file."""
        cos = [[None if math.isnan(v) else round(v, 6) for v in row] for row in self.cosine_matrix()]
        path = Path(path_jsonl)
        with writing(path, f"the earlier lines are unchanged; {FREE_SPACE}"):
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                f.write(json.dumps({"step": int(step), "tasks": self.task_names, "cosine": cos}) + "\n")


def plot(jsonl_path: str | Path, png_path: str | Path) -> Path:
    """Heat map of the latest matrix in ``jsonl_path``: red pairs conflict, blue pairs agree."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [ln for ln in Path(jsonl_path).read_text().splitlines() if ln.strip()]
    if not lines:
        raise ValueError(f"{jsonl_path}: no gradient-similarity records to plot")
    rec = json.loads(lines[-1])
    tasks = rec["tasks"]
    values = [[math.nan if v is None else v for v in row] for row in rec["cosine"]]
    size = 1.2 + 0.9 * len(tasks)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    im = ax.imshow(values, cmap="RdBu", vmin=-1, vmax=1)
    ax.set_xticks(range(len(tasks)), labels=tasks, rotation=45, ha="right")
    ax.set_yticks(range(len(tasks)), labels=tasks)
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            text = "n/a" if math.isnan(v) else f"{v:.2f}"
            ax.text(j, i, text, ha="center", va="center", color="white" if abs(v) > 0.6 else "black")
    ax.set_title(f"task gradient cosine, step {rec['step']}")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    png_path = Path(png_path)
    try:
        png_path.parent.mkdir(parents=True, exist_ok=True)
        with replacing(png_path) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)
    return png_path
