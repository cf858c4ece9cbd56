"""The examples of a global step, and this rank's part of them (DESIGN contract 2).

A task's examples form an endless stream of epochs, each a permutation seeded by (seed, task,
epoch); smaller datasets simply wrap into their next epoch. The k-th time a task is scheduled it
takes the next ``global_batch`` positions of its stream. That window is split first by
accumulation micro-step, then by rank, so 1 rank × micro-batch 2b and 2 ranks × micro-batch b see
exactly the same examples at every step, and a rank touches only the rows it needs.
"""

from __future__ import annotations

import torch


class TaskStream:
    def __init__(self, size: int, seed: int, task_index: int):
        self.size, self.seed, self.task_index = size, seed, task_index
        self._cache: dict[int, list[int]] = {}

    def _epoch(self, epoch: int) -> list[int]:
        if epoch not in self._cache:
            gen = torch.Generator().manual_seed((self.seed * 1_000_003 + self.task_index * 10_007 + epoch) % 2**62)
            if len(self._cache) > 1:
                self._cache.pop(min(self._cache))
            self._cache[epoch] = torch.randperm(self.size, generator=gen).tolist()
        return self._cache[epoch]

    def window(self, start: int, length: int) -> list[int]:
        out = []
        for pos in range(start, start + length):
            epoch, offset = divmod(pos, self.size)
            out.append(self._epoch(epoch)[offset])
        return out


def micro_batch_positions(occurrence: int, micro_step: int, rank: int, micro_batch: int, grad_accum: int,
                          world: int) -> range:
    """Stream positions of (occurrence, micro_step, rank) of one task: each row's identity in the run,
    the same whatever the world size (the key of its dropout masks)."""
    global_batch = micro_batch * grad_accum * world
    start = occurrence * global_batch + (micro_step * world + rank) * micro_batch
    return range(start, start + micro_batch)


def micro_batch_indices(stream: TaskStream, occurrence: int, micro_step: int, rank: int,
                        micro_batch: int, grad_accum: int, world: int) -> list[int]:
    """Dataset rows for (occurrence, micro_step, rank) of one task."""
    positions = micro_batch_positions(occurrence, micro_step, rank, micro_batch, grad_accum, world)
    return stream.window(positions.start, micro_batch)
