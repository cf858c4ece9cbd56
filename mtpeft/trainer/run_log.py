"""What a run writes as it goes: ``log.jsonl`` (one line per optimizer step) and TensorBoard events.

Only rank 0 writes; the values it writes are already reduced over ranks.
"""

from __future__ import annotations

import json
from pathlib import Path


class RunLog:
    def __init__(self, run_dir: Path, enabled: bool, purge_step: int | None = None):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._jsonl = open(run_dir / "log.jsonl", "a", encoding="utf-8")
            # on resume, events past the checkpoint (written before a crash) are purged
            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge_step)

    def step(self, record: dict) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        step = record["step"]
        if not record.get("skipped"):
            self._tb.add_scalar(f"loss/{record['task']}", record["loss"], step)
        self._tb.add_scalar("lr", record["lr"], step)
        for task, weight in record.get("weights", {}).items():
            self._tb.add_scalar(f"loss_weight/{task}", weight, step)
        self._tb.add_scalar("tokens_per_second", record["tokens"] / max(record["seconds"], 1e-9), step)

    def metrics(self, metrics: dict, step: int) -> None:
        if not self.enabled:
            return
        for task, m in metrics.items():
            self._tb.add_scalar(f"eval/{task}/{m['metric']}", m["value"], step)
        self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()
