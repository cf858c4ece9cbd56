"""Which task each global step trains: a pure function of the step (DESIGN contract 1).

Every rank computes the same schedule locally, so all ranks run the same head at the same step
and ZeRO-3's gathers and reduce-scatters match; nothing is communicated to agree on it.

Random samplers draw step t's task from a counter-based hash of (seed, t) (splitmix64, in numpy's
wrapping uint64 arithmetic), so any step is computed without replaying the ones before it, and
the result is the same bits on every machine. The occurrence of a step (how many times its task
ran before, which selects the task's global batch, contract 2) does depend on the past: it is
counted over steps 0..t-1 in vectorized blocks whose per-task prefix counts are cached, so
sequential access costs O(1) per step and a resume at step t costs one scan of t hashes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mtpeft.errors import CheckpointError, ConfigError, DataError


@dataclass(frozen=True)
class Slot:
    task: int
    occurrence: int  # how many times this task ran before this step: selects its global batch


class RoundRobin:
    """One single-task batch per task per cycle, in config order (the code-analysis study's sampler).

    Smaller datasets are recycled by the shard's endless epoch stream, not here.
    """

    def __init__(self, num_tasks: int):
        self.num_tasks = num_tasks

    def slot(self, step: int) -> Slot:
        return Slot(task=step % self.num_tasks, occurrence=step // self.num_tasks)

    def probabilities(self) -> list[float]:
        return [1.0 / self.num_tasks] * self.num_tasks

    def state_dict(self) -> dict:
        return {"kind": "round_robin", "num_tasks": self.num_tasks}

    def load_state_dict(self, state: dict) -> None:
        _check_same(self.state_dict(), state)


_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """Steele et al.'s SplitMix64 finalizer: a bijective, well-mixed hash of a 64-bit counter."""
    x = x.astype(np.uint64)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def step_uniforms(seed: int, start: int, count: int) -> np.ndarray:
    """Uniform [0, 1) doubles for steps start..start+count-1, each a function of (seed, step) only."""
    key = _splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64) ^ np.uint64(0x5CED))[0]
    steps = np.arange(start, start + count, dtype=np.uint64)
    with np.errstate(over="ignore"):
        bits = _splitmix64(steps * _GOLDEN + key)
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)


class RandomSampler:
    """Independent draws with p_i ∝ N_i^T: T=1 is proportional, T=0 uniform, T=0.5 in between.

    Temperature here is the exponent on the size (p ∝ Nᵢ^T), so lower T flattens the mixture
    towards small tasks; some papers write the same family as Nᵢ^(1/T).
    """

    BLOCK = 4096

    def __init__(self, sizes: list[int], seed: int, temperature: float = 1.0, kind: str = "temperature"):
        if not sizes:
            raise DataError("sampler: no tasks to schedule; list at least one task")
        for i, n in enumerate(sizes):
            if n <= 0:
                raise DataError(f"sampler: task {i} has {n} training examples; every task needs at least one")
        check_temperature(temperature)
        self.kind, self.sizes, self.seed, self.temperature = kind, list(sizes), int(seed), float(temperature)
        log_weights = self.temperature * np.log(np.asarray(self.sizes, dtype=np.float64))
        weights = np.exp(log_weights - log_weights.max())  # Nᵢ^T without overflow for a large T
        self._probs = weights / weights.sum()
        self._cdf = np.cumsum(self._probs)
        self._prefix: list[np.ndarray] = [np.zeros(len(sizes), dtype=np.int64)]  # counts before block b
        self._block_index = -1
        self._block_tasks = self._block_occ = np.zeros(0, dtype=np.int64)

    def probabilities(self) -> list[float]:
        return self._probs.tolist()

    def tasks(self, start: int, count: int) -> np.ndarray:
        """Tasks of steps start..start+count-1 (inverse CDF of the step's uniform)."""
        u = step_uniforms(self.seed, start, count)
        return np.minimum(np.searchsorted(self._cdf, u, side="right"), len(self.sizes) - 1)

    def _load_block(self, b: int) -> None:
        while len(self._prefix) <= b:  # extend prefix counts up to block b
            last = len(self._prefix) - 1
            counts = np.bincount(self.tasks(last * self.BLOCK, self.BLOCK), minlength=len(self.sizes))
            self._prefix.append(self._prefix[last] + counts)
        tasks = self.tasks(b * self.BLOCK, self.BLOCK)
        onehot = np.zeros((self.BLOCK, len(self.sizes)), dtype=np.int64)
        onehot[np.arange(self.BLOCK), tasks] = 1
        self._block_occ = np.cumsum(onehot, axis=0)[np.arange(self.BLOCK), tasks] - 1
        self._block_tasks, self._block_index = tasks, b

    def slot(self, step: int) -> Slot:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        b, i = divmod(step, self.BLOCK)
        if b != self._block_index:
            self._load_block(b)
        task = int(self._block_tasks[i])
        return Slot(task=task, occurrence=int(self._prefix[b][task] + self._block_occ[i]))

    def state_dict(self) -> dict:
        """What identifies the schedule: resuming needs nothing else, since slots are recomputed."""
        return {"kind": self.kind, "sizes": list(self.sizes), "seed": self.seed, "temperature": self.temperature}

    def load_state_dict(self, state: dict) -> None:
        _check_same(self.state_dict(), state)


def _check_same(mine: dict, saved: dict) -> None:
    """A resumed run whose tasks, sizes or seed changed would silently train on a different schedule."""
    for key, value in saved.items():
        if mine.get(key) != value:
            raise CheckpointError(f"checkpoint sampler state: {key} was {value!r}, this run has "
                                  f"{mine.get(key)!r}; resume with the original tasks, sampler and seed "
                                  f"or start a new run")


def check_temperature(temperature: float) -> None:
    """``sampler.temperature``: the exponent T of p ∝ Nᵢ^T, finite and >= 0 (0: every task alike)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not np.isfinite(temperature) \
            or temperature < 0:
        raise ConfigError(f"sampler.temperature must be a finite number >= 0, got {temperature}")


SAMPLERS = {
    "round_robin": lambda sizes, seed, temperature: RoundRobin(len(sizes)),
    "proportional": lambda sizes, seed, temperature: RandomSampler(sizes, seed, temperature=1.0, kind="proportional"),
    "temperature": lambda sizes, seed, temperature: RandomSampler(sizes, seed, temperature=temperature,
                                                                  kind="temperature"),
}
SAMPLER_KINDS = tuple(SAMPLERS)  # the only list of sampler names; config validation reads it


def make_schedule(kind: str, sizes: list[int], seed: int, temperature: float = 0.5):
    """The sampler ``sampler.kind`` names, over tasks with ``sizes`` training examples."""
    if kind not in SAMPLERS:
        raise ConfigError(f"sampler.kind must be one of {', '.join(SAMPLER_KINDS)}, got {kind!r}")
    return SAMPLERS[kind](sizes, seed, temperature)
