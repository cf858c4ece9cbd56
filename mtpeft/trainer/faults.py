"""What a long multi-node run must survive: preemption, non-finite losses, a stuck peer.

Every decision here is taken by all ranks together (a flag all-reduced once per step), because
a rank that skips a step or stops alone leaves the others waiting in a collective.
"""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path

import torch
import torch.distributed as dist

from mtpeft.data.dist import DistContext
from mtpeft.launch.process_group import PREEMPTED_FILE_ENV


class RunAborted(Exception):
    """The run cannot go on; printed as one ``error:`` line (exit status 3, not bad input)."""

    exit_code = 3


class Preemption:
    """SIGTERM (SLURM sends it before preemption) asks for a checkpoint at the end of the step."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)

    @staticmethod
    def report_to(path: str) -> None:
        """Name the file ``report_saved`` writes: for launchers that forward no environment (pdsh,
        MPI, srun), ``mtpeft train --preempted-file`` carries it on the command line."""
        os.environ[PREEMPTED_FILE_ENV] = str(Path(path).absolute())

    @staticmethod
    def report_saved(tag: str) -> None:
        """Tell the launch script that the checkpoint of a preempted run is complete. DeepSpeed's
        per-node launcher exits 1 after a SIGTERM whatever its ranks did (``launch.py`` ends its
        signal handler with ``sys.exit(1)``), so the scripts in ``launch/`` read this file (named by
        ``MTPEFT_PREEMPTED_FILE``, written by each node's local rank 0) to exit 0 instead."""
        marker = os.environ.get(PREEMPTED_FILE_ENV)
        if marker and int(os.environ.get("LOCAL_RANK", "0") or 0) == 0:
            try:
                Path(marker).write_text(tag + "\n")
            except OSError:  # only the exit status depends on it; the checkpoint is on disk
                pass


class StepVote:
    """One all-reduce per step carrying each rank's flags: [loss not finite, SIGTERM seen]."""

    def __init__(self, ctx: DistContext):
        self.ctx = ctx

    def __call__(self, nonfinite: bool, stop: bool) -> tuple[bool, bool]:
        flags = torch.tensor([float(nonfinite), float(stop)])
        if self.ctx.world > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return bool(flags[0]), bool(flags[1])


class NonFiniteGuard:
    """Counts skipped steps; too many in a row means the run diverged, not a fluke."""

    def __init__(self, max_in_a_row: int):
        self.max_in_a_row = max_in_a_row
        self.in_a_row = 0
        self.total = 0

    @staticmethod
    def is_bad(loss: torch.Tensor) -> bool:
        return not math.isfinite(float(loss.detach()))

    def skipped(self) -> None:
        self.in_a_row += 1
        self.total += 1

    def check(self, step: int, task: str) -> None:
        if self.in_a_row >= self.max_in_a_row:
            raise RunAborted(f"step {step}: the loss of task {task!r} was not finite {self.in_a_row} steps in a row "
                             f"({self.total} skipped in all); lower train.lr or check the data, then resume "
                             "from the last checkpoint")

    def ok(self) -> None:
        self.in_a_row = 0


def collective_failure(step: int, exc: BaseException, timeout_s: float) -> RunAborted:
    text = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    return RunAborted(f"step {step}: a collective operation failed or exceeded "
                      f"train.collective_timeout_s={timeout_s:g}s ({text}); another rank died or hangs. "
                      "Resume from the last checkpoint once every node is healthy")
