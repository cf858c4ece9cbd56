"""Task samplers: their distributions, determinism, DESIGN contract 1 (any rank, any resume point,
same slot) and the occurrence counts that contract 2 relies on."""

import math

import numpy as np
import pytest

from mtpeft.data.schedule import _GOLDEN, RandomSampler, RoundRobin, Slot, _splitmix64, make_schedule, step_uniforms
from mtpeft.errors import CheckpointError, ConfigError, DataError

SIZES = [120, 1_000, 9_000]
N = 20_000


def _expected(kind, sizes, temperature=0.5):
    power = {"proportional": 1.0, "temperature": temperature}[kind]
    w = [n ** power for n in sizes]
    return [x / sum(w) for x in w]


@pytest.mark.parametrize("kind,temperature", [("proportional", 0.5), ("temperature", 0.5), ("temperature", 0.0)])
def test_empirical_distribution_matches_probabilities(kind, temperature):
    sched = make_schedule(kind, SIZES, seed=11, temperature=temperature)
    p = _expected(kind, SIZES, temperature)  # e.g. T=0.5: sqrt(120), sqrt(1000), sqrt(9000) normalised
    assert sched.probabilities() == pytest.approx(p, rel=1e-12)
    counts = np.bincount([sched.slot(t).task for t in range(N)], minlength=len(SIZES))
    for c, pi in zip(counts, p):  # each count within 5 binomial standard deviations
        assert abs(c - N * pi) <= 5 * math.sqrt(N * pi * (1 - pi)), (counts, p)
    chi2 = sum((c - N * pi) ** 2 / (N * pi) for c, pi in zip(counts, p))
    df = len(SIZES) - 1
    assert chi2 < df + 5 * math.sqrt(2 * df)  # far beyond the 99.99th percentile (18.4 for df=2)


def test_a_large_temperature_does_not_overflow():
    """p ∝ Nᵢ^T with T = 300: 9000^300 overflows a float64, the probabilities must not. Against exact
    rational arithmetic on the integers (Python's Fraction), to float64 rounding."""
    from fractions import Fraction

    sched = make_schedule("temperature", SIZES, seed=1, temperature=300)
    weights = [Fraction(n) ** 300 for n in SIZES]
    exact = [float(w / sum(weights)) for w in weights]
    assert sched.probabilities() == pytest.approx(exact, rel=1e-12, abs=1e-300)
    assert {sched.slot(t).task for t in range(200)} == {2}


def test_hash_is_splitmix64():
    """Vigna's SplitMix64 from state 0 outputs e220a8397b1dcdaf, 6e789e6aa1b965f4, ...: pinning the
    published sequence keeps schedules reproducible across numpy versions and machines."""
    with np.errstate(over="ignore"):
        states = np.arange(1, 5, dtype=np.uint64) * _GOLDEN
    assert [int(v) for v in _splitmix64(states)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4,
                                                     0x06C45D188009454F, 0xF88BB8A8724C81EC]


def test_step_uniforms_are_uniform_and_counter_based():
    u = step_uniforms(seed=5, start=0, count=N)
    assert u.min() >= 0.0 and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 5 * math.sqrt(1 / 12 / N)
    np.testing.assert_array_equal(step_uniforms(5, 7_000, 50), u[7_000:7_050])


def test_round_robin_order():
    sched = make_schedule("round_robin", [5, 500, 50], seed=3)
    assert isinstance(sched, RoundRobin)
    assert [sched.slot(t) for t in range(6)] == [Slot(0, 0), Slot(1, 0), Slot(2, 0),
                                                 Slot(0, 1), Slot(1, 1), Slot(2, 1)]
    assert sched.probabilities() == [1 / 3] * 3


@pytest.mark.parametrize("kind", ["proportional", "temperature"])
def test_deterministic_given_seed_and_seeds_differ(kind):
    a = [make_schedule(kind, SIZES, seed=1).slot(t) for t in range(300)]
    b = [make_schedule(kind, SIZES, seed=1).slot(t) for t in range(300)]
    c = [make_schedule(kind, SIZES, seed=2).slot(t) for t in range(300)]
    assert a == b
    assert [s.task for s in a] != [s.task for s in c]


def test_two_ranks_agree_on_every_step_in_any_access_order():
    rank0 = make_schedule("temperature", SIZES, seed=4)
    rank1 = make_schedule("temperature", SIZES, seed=4)
    steps = list(range(10_000))
    seq = [rank0.slot(t) for t in steps]
    rng = np.random.default_rng(0)
    order = rng.permutation(steps)[:500]  # random access crosses block boundaries both ways
    assert all(rank1.slot(int(t)) == seq[t] for t in order)


def test_restored_sampler_continues_like_an_uninterrupted_one():
    live = make_schedule("proportional", SIZES, seed=9)
    resume_at = RandomSampler.BLOCK + 123  # not on a block boundary
    for t in range(resume_at):
        live.slot(t)
    state = live.state_dict()
    restored = make_schedule("proportional", SIZES, seed=9)  # fresh process: empty cache
    restored.load_state_dict(state)
    for t in range(resume_at, resume_at + 2_000):
        assert restored.slot(t) == live.slot(t)


def test_resume_with_changed_sizes_or_seed_is_refused():
    state = make_schedule("temperature", SIZES, seed=9).state_dict()
    with pytest.raises(CheckpointError, match="sizes"):
        make_schedule("temperature", [1, 2, 3], seed=9).load_state_dict(state)
    with pytest.raises(CheckpointError, match="seed"):
        make_schedule("temperature", SIZES, seed=8).load_state_dict(state)
    with pytest.raises(CheckpointError, match="kind"):
        make_schedule("round_robin", SIZES, seed=9).load_state_dict(state)


@pytest.mark.parametrize("kind", ["round_robin", "proportional", "temperature"])
def test_occurrences_of_each_task_count_up_from_zero(kind):
    sched = make_schedule(kind, SIZES, seed=0)
    seen = {i: [] for i in range(len(SIZES))}
    for t in range(3 * RandomSampler.BLOCK):
        s = sched.slot(t)
        seen[s.task].append(s.occurrence)
    for occ in seen.values():
        assert occ == list(range(len(occ)))


def test_bad_sampler_inputs_are_user_errors():
    with pytest.raises(ConfigError, match="sampler.kind"):
        make_schedule("shuffled", SIZES, seed=0)
    with pytest.raises(DataError, match="task 1"):
        make_schedule("proportional", [3, 0], seed=0)
    with pytest.raises(ConfigError, match="sampler.temperature"):
        make_schedule("temperature", SIZES, seed=0, temperature=-1.0)
