"""Evaluation metrics for the task kinds: classification, ranking, exact match, pass@k (BLEU and
CodeBLEU in their conventions: ``tasks/bleu.py``, ``tasks/codebleu.py``).

Every function is pure Python / numpy on host data so the same numbers come out on every rank and
every machine; conventions (ties, empty inputs, smoothing) are spelled out in docs/METRICS.md.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch


def check_same_length(a: Sequence, b: Sequence, what: str) -> None:
    """One prediction per reference, and at least one: a silent zip() would hide a misaligned split."""
    if len(a) != len(b):
        raise ValueError(f"{what}: {len(a)} predictions but {len(b)} references; pass one per example")
    if len(a) == 0:
        raise ValueError(f"{what}: no examples; evaluate on a non-empty split")


def accuracy(preds: Sequence[int], labels: Sequence[int]) -> float:
    """Fraction of predictions equal to their label."""
    check_same_length(preds, labels, "accuracy")
    return sum(int(p) == int(y) for p, y in zip(preds, labels)) / len(labels)


def f1_binary(preds: Sequence[int], labels: Sequence[int], positive: int = 1) -> float:
    """F1 of the positive class; 0.0 when there is no true positive.

    That includes the degenerate split with no positive predicted and none gold, where precision
    and recall are both 0/0: scoring it 0 (as scikit-learn's zero_division=0) keeps an
    all-negative predictor from looking perfect.
    """
    check_same_length(preds, labels, "f1_binary")
    tp = fp = fn = 0
    for p, y in zip(preds, labels):
        pp, yp = int(p) == positive, int(y) == positive
        tp += pp and yp
        fp += pp and not yp
        fn += yp and not pp
    if tp == 0:
        return 0.0
    return 2 * tp / (2 * tp + fp + fn)


def _as_float64(x: "torch.Tensor | np.ndarray") -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def mrr(scores: "torch.Tensor | np.ndarray", gold: Sequence[int], top_k: int | None = None) -> float:
    """Mean reciprocal rank of the gold candidate among the eval candidates.

    Ties are averaged: a gold candidate tied with t others, behind h strictly higher ones, gets the
    expected reciprocal rank over the orders of the tied group, (H(h+t+1) - H(h)) / (t+1), so tied
    scores never help a model (an encoder that maps everything to one vector scores ``chance_mrr``
    exactly). A non-finite score counts as higher than the gold one, and a non-finite gold score
    ranks last. ``top_k``: only a top-k list is scored, ranks past it count 0 (CodeXGLUE AdvTest
    scores its top-100 list; None scores every rank).
    """
    s = _as_float64(scores)
    if s.ndim != 2:
        raise ValueError(f"mrr: scores must be [queries, candidates], got shape {s.shape}")
    g = np.asarray(gold, dtype=np.int64)
    check_same_length(list(range(s.shape[0])), g, "mrr")
    if g.min() < 0 or g.max() >= s.shape[1]:
        raise ValueError(f"mrr: gold index out of range for {s.shape[1]} candidates")
    rows, c = np.arange(s.shape[0]), s.shape[1]
    k = c if top_k is None else min(int(top_k), c)
    gold_scores = s[rows, g]
    others = np.ones_like(s, dtype=bool)
    others[rows, g] = False
    higher = ((s > gold_scores[:, None]) | ~np.isfinite(s)) & others
    tied = (s == gold_scores[:, None]) & others
    h, t = higher.sum(axis=1), tied.sum(axis=1)
    harmonic = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, c + 1))])
    rr = (harmonic[np.minimum(h + t + 1, k)] - harmonic[np.minimum(h, k)]) / (t + 1)
    rr = np.where(np.isfinite(gold_scores), rr, 0.0)
    return float(np.mean(rr))


def chance_mrr(num_candidates: int, top_k: int | None = None) -> float:
    """Expected MRR of a uniformly random ranking of C candidates: H_min(C,k) / C."""
    if num_candidates < 1:
        raise ValueError("chance_mrr: need at least one candidate")
    k = num_candidates if top_k is None else min(int(top_k), num_candidates)
    return math.fsum(1.0 / r for r in range(1, k + 1)) / num_candidates


def map_at_r(embeddings: "torch.Tensor | np.ndarray", labels: Sequence[int]) -> float:
    """POJ-104 MAP@R as CodeXGLUE computes it.

    Each item queries all others ranked by dot product (L2-normalise first for cosine); R is the
    number of other items with its label; AP@R = (1/R) Σ_{j≤R, hit at j} precision@j. Ties rank
    pessimistically: within a group of equal scores the other labels come first, so ties never help
    a model (CodeXGLUE's argsort leaves their order to the sort, and data sorted by label would then
    reward a collapsed encoder); a non-finite similarity ranks first. Items whose label is unique
    (R = 0) are skipped: CodeXGLUE divides by zero there; POJ-104 splits never contain one.
    """
    e = _as_float64(embeddings)
    y = np.asarray(labels)
    if e.ndim != 2 or e.shape[0] != len(y):
        raise ValueError(f"map_at_r: embeddings {e.shape} do not match {len(y)} labels")
    sims = e @ e.T
    sims[~np.isfinite(sims)] = np.inf
    np.fill_diagonal(sims, -np.inf)
    aps = []
    for i in range(len(y)):
        r = int((y == y[i]).sum()) - 1
        if r == 0:
            continue
        same = y == y[i]
        order = np.lexsort((same, -sims[i]))  # by score, then misses before hits among equal scores
        hits = same[order[:r]].astype(np.float64)
        precision_at_j = np.cumsum(hits) / np.arange(1, r + 1)
        aps.append(float((precision_at_j * hits).sum() / r))
    if not aps:
        raise ValueError("map_at_r: every label is unique, so no item has a relevant neighbour")
    return float(np.mean(aps))


def flatten(s: str) -> str:
    """The code-generation study's normalisation: strip, then every newline and tab becomes one space
    (runs of spaces stay as they are, so indentation still counts)."""
    return s.strip().replace("\n", " ").replace("\t", " ")


def exact_match(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Fraction of predictions equal to the reference after ``flatten`` (the study's EM)."""
    check_same_length(preds, refs, "exact_match")
    return sum(flatten(p) == flatten(r) for p, r in zip(preds, refs)) / len(refs)


def em_at_k(candidates: Sequence[Sequence[str]], refs: Sequence[str], k: int) -> float:
    """EM@k: an example is a hit if any of its first k candidates (beams, best first) matches after
    ``flatten`` (the study's ``reference in predictions[:k]``)."""
    check_same_length(candidates, refs, "em_at_k")
    if k < 1:
        raise ValueError("em_at_k: k must be >= 1")
    hits = 0
    for cands, ref in zip(candidates, refs):
        target = flatten(ref)
        hits += any(flatten(c) == target for c in list(cands)[:k])
    return hits / len(refs)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c pass: 1 - C(n-c, k) / C(n, k).

    Computed as 1 - Π_{i=n-c+1}^{n} (1 - k/i) (Chen et al., 2021), which never forms the huge
    binomials and stays exact in float64 for any n.
    """
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got n={n}, k={k}; draw at least k samples")
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))
