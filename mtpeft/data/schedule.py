"""Which task each global step trains: a pure function of the step (DESIGN contract 1).

Every rank computes the same schedule locally, so all ranks run the same head at the same step
and ZeRO-3's gathers and reduce-scatters match; nothing is communicated to agree on it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Slot:
    task: int
    occurrence: int  # how many times this task ran before this step: selects its global batch


class RoundRobin:
    """One single-task batch per task per cycle, in config order (the code-analysis study's sampler)."""

    def __init__(self, num_tasks: int):
        self.num_tasks = num_tasks

    def slot(self, step: int) -> Slot:
        return Slot(task=step % self.num_tasks, occurrence=step // self.num_tasks)

    def state_dict(self) -> dict:
        return {"kind": "round_robin", "num_tasks": self.num_tasks}


def make_schedule(kind: str, sizes: list[int], seed: int):
    if kind == "round_robin":
        return RoundRobin(len(sizes))
    raise ValueError(kind)  # validated in config
