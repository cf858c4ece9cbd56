"""Metrics against hand-computed values and independent float64 / brute-force references."""

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from mtpeft.tasks.metrics import (
    accuracy,
    chance_mrr,
    em_at_k,
    exact_match,
    f1_binary,
    map_at_r,
    mrr,
    pass_at_k,
)


def test_accuracy_and_f1_hand_values():
    preds, labels = [1, 1, 0, 0, 1], [1, 0, 1, 0, 1]
    assert accuracy(preds, labels) == pytest.approx(3 / 5)
    # tp=2 (idx 0, 4), fp=1 (idx 1), fn=1 (idx 2): F1 = 2*2 / (2*2 + 1 + 1) = 2/3
    assert f1_binary(preds, labels) == pytest.approx(2 / 3)
    # positive=0: tp=1 (idx 3), fp=1 (idx 2), fn=1 (idx 1): F1 = 2 / 4
    assert f1_binary(preds, labels, positive=0) == pytest.approx(0.5)
    # no positive predicted, none gold: 0.0 by convention
    assert f1_binary([0, 0], [0, 0]) == 0.0
    with pytest.raises(ValueError):
        accuracy([1], [1, 0])


def _mrr_by_enumeration(scores, gold, top_k=None):
    """Reference: the reciprocal rank averaged over every order of the candidates that sorts them by
    score (ties broken every possible way), ranks past top_k counting 0."""
    total = 0.0
    for row, g in zip(np.asarray(scores, dtype=float), gold):
        rrs = []
        for perm in itertools.permutations(range(len(row))):
            if all(row[perm[i]] >= row[perm[i + 1]] for i in range(len(perm) - 1)):
                rank = perm.index(g) + 1
                rrs.append(1 / rank if top_k is None or rank <= top_k else 0.0)
        total += sum(rrs) / len(rrs)
    return total / len(gold)


def test_mrr_without_ties_is_the_plain_rank():
    scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.8, 0.7], [0.3, 0.6, 0.1]])
    # q0: 0.9 is top -> 1; q1: gold idx 2 (0.7) behind 0.8 -> 1/2; q2: 0.3 behind 0.6 -> 1/2
    assert mrr(scores, [0, 2, 0]) == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert mrr(torch.tensor(scores, dtype=torch.float32), [0, 2, 0]) == pytest.approx((1 + 0.5 + 0.5) / 3)


def test_mrr_ties_are_averaged_over_their_orders():
    rng = np.random.default_rng(0)
    for _ in range(20):
        scores = rng.integers(0, 3, size=(4, 5)).astype(float)  # many ties
        gold = rng.integers(0, 5, size=4).tolist()
        for top_k in (None, 1, 2, 4):
            assert mrr(scores, gold, top_k) == pytest.approx(_mrr_by_enumeration(scores, gold, top_k))


@pytest.mark.parametrize("candidates,top_k", [(7, None), (128, None), (300, 100), (50, 100)])
def test_collapsed_encoder_scores_chance(candidates, top_k):
    scores = np.zeros((candidates, candidates))  # every embedding equal
    got = mrr(scores, list(range(candidates)), top_k)
    assert got == pytest.approx(chance_mrr(candidates, top_k))
    ranks = np.arange(1, candidates + 1)  # a uniformly random ranking, by hand
    assert got == pytest.approx(np.mean(np.where(ranks <= (top_k or candidates), 1 / ranks, 0.0)))


def test_mrr_top_k_list_counts_later_ranks_as_zero():
    rng = np.random.default_rng(1)
    scores = rng.standard_normal((40, 250))  # no ties, more candidates than the AdvTest list
    gold = rng.integers(0, 250, size=40)
    order = np.argsort(-scores, axis=1)  # CodeXGLUE: rank = position in the sorted list, top 100 kept
    ranks = np.array([list(order[i]).index(gold[i]) + 1 for i in range(40)])
    assert mrr(scores, gold.tolist(), 100) == pytest.approx(np.mean(np.where(ranks <= 100, 1 / ranks, 0.0)))
    assert mrr(scores, gold.tolist()) == pytest.approx(np.mean(1 / ranks))


def test_non_finite_scores_never_help():
    scores = np.array([[np.nan, 0.1, 0.5], [0.9, np.nan, 0.2], [0.5, np.inf, 0.1]])
    # q0: gold NaN -> 0; q1: gold 0.9, the NaN counts as higher -> 1/2; q2: gold 0.5 behind inf -> 1/2
    assert mrr(scores, [0, 0, 0]) == pytest.approx((0 + 0.5 + 0.5) / 3)


def test_chance_mrr_equals_brute_force_over_permutations():
    assert chance_mrr(3) == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
    for c in (1, 4, 5):
        # the gold item's position in a uniformly random ranking, averaged over all permutations
        ranks = [perm.index(0) + 1 for perm in itertools.permutations(range(c))]
        assert chance_mrr(c) == pytest.approx(sum(1 / r for r in ranks) / len(ranks))


def test_map_at_r_hand_example():
    # scalar embeddings, all positive: every query ranks the others by value 5 > 4 > 3 > 2 > 1.
    emb = np.array([[5.0], [4.0], [3.0], [2.0], [1.0]])
    labels = [0, 1, 0, 0, 1]
    # item0 (R=2): top2 = [B, A] -> P@2 = 1/2 -> AP = 0.25; item1 (R=1): [A] -> 0
    # item2 (R=2): [A(5), B(4)] -> AP = 1/2; item3 (R=2): [A(5), B(4)] -> 1/2; item4 (R=1): [A] -> 0
    assert map_at_r(emb, labels) == pytest.approx((0.25 + 0 + 0.5 + 0.5 + 0) / 5)
    # perfect clustering -> 1.0
    emb2 = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    assert map_at_r(emb2, [0, 0, 1, 1]) == pytest.approx(1.0)


def _ap_at_r_pessimistic(sims_row, same, r):
    """Reference: sort by score, and among equal scores put the other labels first."""
    order = sorted(range(len(sims_row)), key=lambda j: (-sims_row[j], bool(same[j])))
    hits = [float(same[j]) for j in order[:r]]
    return sum(h * sum(hits[:j + 1]) / (j + 1) for j, h in enumerate(hits)) / r


def test_map_at_r_ties_rank_pessimistically():
    labels = [0, 0, 0, 1, 1, 1, 2, 2]  # sorted by label: index order would reward ties
    collapsed = np.ones((8, 4))
    assert map_at_r(collapsed, labels) == pytest.approx(0.0)
    rng = np.random.default_rng(2)
    emb = rng.integers(0, 2, size=(8, 3)).astype(float)  # many equal dot products
    sims = emb @ emb.T
    y = np.array(labels)
    aps = []
    for i in range(8):
        others = [j for j in range(8) if j != i]
        aps.append(_ap_at_r_pessimistic(sims[i, others], y[others] == y[i], int((y == y[i]).sum()) - 1))
    assert map_at_r(emb, labels) == pytest.approx(np.mean(aps))
    for _ in range(5):  # breaking the ties any other way can only score higher
        jitter = emb + 1e-9 * rng.standard_normal(emb.shape)
        assert map_at_r(jitter, labels) >= map_at_r(emb, labels) - 1e-12


def _study_em_at_k(candidates, refs, k):
    """The code-generation study's rule written out: test.py strips each decoded beam and turns
    newlines and tabs into spaces; compute_metrics.py counts a hit when ``reference in predictions[:k]``."""
    flat = [[c.strip().replace("\n", " ").replace("\t", " ") for c in cands] for cands in candidates]
    gold = [r.strip().replace("\n", " ").replace("\t", " ") for r in refs]
    return sum(g in f[:k] for f, g in zip(flat, gold)) / len(gold)


def test_exact_match_and_em_at_k_follow_the_study_flattening():
    refs = ["def f(x):\n    return x", "a = 1", "for i in x:\n\tprint(i)", "y = 2"]
    candidates = [
        ["def f(x):     return x", "def f(x):\n  return x"],  # same after flattening / indentation differs
        ["a =  1", "a = 1 "],                                  # a double space is a different string
        ["for i in x:\n    print(i)", "for i in x: print(i)", "for i in x:\n\tprint(i)"],
        ["y = 3", "z = 2", "y=2", "y = 2\n"],
    ]
    for k in (1, 2, 3, 4, 10):
        assert em_at_k(candidates, refs, k) == _study_em_at_k(candidates, refs, k)
    assert [em_at_k(candidates, refs, k) for k in (1, 2, 3, 4)] == [0.25, 0.5, 0.75, 1.0]
    assert exact_match([c[0] for c in candidates], refs) == em_at_k(candidates, refs, 1)


def test_pass_at_k_hand_and_exact_binomials():
    assert pass_at_k(5, 2, 1) == pytest.approx(2 / 5)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 8, 5) == 1.0  # n - c < k
    for n, c, k in [(200, 37, 10), (200, 1, 100), (1000, 3, 1000), (20, 19, 1)]:
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12, abs=1e-15)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 5)


def test_classification_headline_is_chosen_and_both_are_reported():
    from mtpeft.tasks.classification import Classify

    examples = [{"label": y} for y in (1, 1, 0, 0, 0)]
    preds = [1, 0, 0, 0, 1]  # tp=1, fp=1, fn=1, tn=2
    acc = Classify().score(preds, examples)
    f1 = Classify(metric="f1").score(preds, examples)
    assert acc["metric"] == "accuracy" and acc["value"] == pytest.approx(3 / 5) and acc["chance"] == pytest.approx(3 / 5)
    assert f1["metric"] == "f1" and f1["value"] == pytest.approx(0.5)
    assert f1["chance"] == pytest.approx(2 * 0.4 / 1.4)  # always "yes": precision 0.4, recall 1
    assert f1_binary([1] * 5, [e["label"] for e in examples]) == pytest.approx(f1["chance"])
    assert acc["f1"] == f1["value"] and f1["accuracy"] == acc["value"]


def test_task_metric_is_validated_against_the_kind(tmp_path):
    from distributed import tiny_config
    from mtpeft.config import load_config
    from mtpeft.errors import ConfigError

    cfg = load_config(tiny_config(tmp_path), ["tasks.clone.metric=f1"])
    assert [t.metric for t in cfg.tasks if t.name == "clone"] == ["f1"]
    with pytest.raises(ConfigError, match=r"tasks\[0\]\.metric: kind classify reports accuracy, f1, got 'mrr'"):
        load_config(tiny_config(tmp_path), ["tasks.defect.metric=mrr"])
    with pytest.raises(ConfigError, match="kind generate reports exact_match"):
        load_config(tiny_config(tmp_path), ["tasks.codegen.metric=f1"])
