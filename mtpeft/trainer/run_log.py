"""What a run writes as it goes: ``log.jsonl`` (one line per optimizer step) and TensorBoard events.

Only rank 0 writes; the values it writes are already reduced over ranks. A full disk here is one
error line (``failed_writes``): the log only ever grows, and a resume truncates it to the checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

from mtpeft.failed_writes import FREE_SPACE, writing


class RunLog:
    def __init__(self, run_dir: Path, enabled: bool, purge_step: int | None = None):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        self._where = run_dir / "log.jsonl"
        self._then = f"the checkpoints in {run_dir / 'checkpoints'} are unaffected: {FREE_SPACE} the same command"
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            with writing(self._where, self._then):
                self._jsonl = open(self._where, "a", encoding="utf-8")
                # on resume, events past the checkpoint (written before a crash) are purged
                self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge_step)

    def step(self, record: dict) -> None:
        if not self.enabled:
            return
        with writing(self._where, self._then):
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
        with writing(self._where.with_name("tensorboard"), self._then):
            self._tb.flush()

    def close(self) -> None:
        if self.enabled and not self._jsonl.closed:
            with writing(self._where, self._then):
                try:
                    self._tb.close()
                finally:
                    self._jsonl.close()
