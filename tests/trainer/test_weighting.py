"""Loss weighting rules against hand-computed examples of their formulas, driven through the
one-task-per-step protocol the loop uses: weight() every step, observe_grad_norm(), observe()."""

import copy
import io
import logging
import math

import numpy as np
import pytest
import torch

from mtpeft.errors import CheckpointError, ConfigError
from mtpeft.trainer import weighting as W
from mtpeft.trainer.weighting import make_weighting

ONE = torch.tensor(1.0)


def _run_round_robin(rule, losses_per_cycle, first_step=0, grad_norms=None):
    """Feed whole cycles: at step t, task t % K runs with the given loss (and raw gradient norm)."""
    k = rule.num_tasks
    step = first_step
    for c, losses in enumerate(losses_per_cycle):
        for i, loss in enumerate(losses):
            assert step % k == i
            out = rule.weight(i, torch.tensor(loss), step)
            if grad_norms is not None:  # the loop measures the gradient of the weighted loss
                rule.observe_grad_norm(i, grad_norms[c][i] * rule._used[i])
            rule.observe(i, loss, step)
            step += 1
    return step, out


def test_uniform_and_static():
    u = make_weighting("uniform", ["a", "b"])
    assert float(u.weight(1, torch.tensor(0.7), 0)) == pytest.approx(0.7)
    assert u.weights() == [1.0, 1.0] and u.parameters() == []
    s = make_weighting("static", ["a", "b"], static_weights={"a": 0.25, "b": 3})
    assert float(s.weight(0, torch.tensor(2.0), 0)) == pytest.approx(0.5)  # 0.25 × 2
    assert float(s.weight(1, torch.tensor(2.0), 1)) == pytest.approx(6.0)  # 3 × 2
    assert s.weights() == [0.25, 3.0]
    with pytest.raises(ConfigError, match="no weight for"):
        make_weighting("static", ["a", "b"], static_weights={"a": 1.0})
    with pytest.raises(ConfigError, match="unknown task"):
        make_weighting("static", ["a"], static_weights={"a": 1.0, "z": 2.0})
    with pytest.raises(ConfigError, match="weighting.weights.a must be a number >= 0"):
        make_weighting("static", ["a"], static_weights={"a": -1.0})
    with pytest.raises(ConfigError, match="weighting.weights are all 0"):
        make_weighting("static", ["a", "b"], static_weights={"a": 0, "b": 0.0})
    for kind, key, values in (("dwa", "dwa_temperature", (0.0, -1.0, math.inf)), ("famo", "famo_gamma", (-0.1, math.nan)),
                              ("gradnorm", "gradnorm_alpha", (-1.0, math.inf))):
        for value in values:
            with pytest.raises(ConfigError, match=f"weighting.{key.split('_')[-1]} must be a finite number"):
                make_weighting(kind, ["a", "b"], **{key: value})
    with pytest.raises(ConfigError, match="weighting.kind"):
        make_weighting("pcgrad", ["a"])


def test_dwa_hand_example():
    rule = make_weighting("dwa", ["a", "b"])  # T = 2, K = 2
    # cycle 0 (c-2): L = [1.0, 0.8]; cycle 1 (c-1): L = [0.5, 0.8]; uniform meanwhile
    step, _ = _run_round_robin(rule, [[1.0, 0.8]])
    assert rule.weights() == [1.0, 1.0]
    step, _ = _run_round_robin(rule, [[0.5, 0.8]], first_step=step)
    # r = [0.5/1.0, 0.8/0.8] = [0.5, 1.0]; r/T = [0.25, 0.5]
    # w = 2·softmax([0.25, 0.5]) = 2·[e^.25, e^.5]/(e^.25 + e^.5) = 2·[1.28403, 1.64872]/2.93275
    #   = [0.875647, 1.124353]
    out = rule.weight(0, torch.tensor(2.0), step)
    assert rule.weights() == pytest.approx([0.8756469982, 1.1243530018], abs=1e-9)
    assert float(out) == pytest.approx(2.0 * 0.8756469982)


def test_dwa_averages_repeated_visits_within_a_cycle():
    rule = make_weighting("dwa", ["a", "b"], dwa_temperature=1.0)
    # sampled schedule: cycle 0 runs a, a (mean (1 + 3)/2 = 2) and cycle 0 never sees b
    for step, (task, loss) in enumerate([(0, 1.0), (0, 3.0), (1, 1.0), (0, 1.0), (1, 1.0), (1, 1.0)]):
        rule.weight(task, ONE, step)
        rule.observe(task, loss, step)
    rule.weight(0, ONE, 6)
    # a: cycles [2.0, 1.0] -> r = 0.5; b: cycles [1.0, 1.0] -> r = 1; T = 1
    e = [math.exp(0.5), math.exp(1.0)]
    assert rule.weights() == pytest.approx([2 * e[0] / sum(e), 2 * e[1] / sum(e)], abs=1e-12)


def test_famo_hand_example():
    rule = make_weighting("famo", ["a", "b"])  # beta = 0.025, gamma = 0.01
    assert rule.weights() == [1.0, 1.0]
    step, _ = _run_round_robin(rule, [[1.0, 2.0], [0.5, 1.8]])
    rule.weight(0, ONE, step)  # closes cycle 1: first logit update
    # d = log L(c-1) - log L(c) = [ln 2, ln(2/1.8)] = [0.693147, 0.105361]; z = [0.5, 0.5]
    # zᵀd = 0.399254; δ = z ⊙ (d - zᵀd) = [0.146947, -0.146947]
    # ξ = 0 - 0.025·(δ + 0.01·0) = [-0.00367366, 0.00367366]
    assert rule.logits.tolist() == pytest.approx([-0.00367366, 0.00367366], abs=1e-8)
    # z = softmax(ξ) = [0.4981631, 0.5018369]; z/ℓ = [0.9963262, 0.2787983]; c = 1/1.2751245
    # w = K·c·z/ℓ = [1.5627122, 0.4372878]
    assert rule.weights() == pytest.approx([1.5627122, 0.4372878], abs=2e-7)

    step, _ = _run_round_robin(rule, [[0.45, 1.5]], first_step=step)
    rule.weight(0, ONE, step)  # second update exercises the γ·ξ decay: float64 reference
    xi = _famo_ref_xi([[1.0, 2.0], [0.5, 1.8], [0.45, 1.5]])
    assert rule.logits.tolist() == pytest.approx(xi.tolist(), abs=1e-12)


def _famo_ref_xi(cycles, beta=0.025, gamma=0.01):
    xi = np.zeros(len(cycles[0]))
    for prev, cur in zip(cycles, cycles[1:]):
        z = np.exp(xi) / np.exp(xi).sum()
        d = np.log(np.array(prev) + 1e-8) - np.log(np.array(cur) + 1e-8)
        jac = np.diag(z) - np.outer(z, z)  # ∂z/∂ξ
        xi = xi - beta * (jac.T @ d + gamma * xi)
    return xi


def test_gradnorm_hand_example():
    rule = make_weighting("gradnorm", ["a", "b"])  # alpha = 1.5, lr = 0.025, w = [1, 1]
    # cycle 0: L = [1, 1] (so L(first) = [1, 1]); raw gradient norms g = [2, 1]
    step, _ = _run_round_robin(rule, [[1.0, 1.0]], grad_norms=[[2.0, 1.0]])
    rule.weight(0, ONE, step)  # closes cycle 0: G = [2, 1], Ḡ = 1.5, r = [1, 1], target = [1.5, 1.5]
    # ∂L_grad/∂w = sign(G - target)·g = [2, -1]; Adam's first step moves each by lr·sign: [0.975, 1.025]
    assert rule.weights() == pytest.approx([0.975, 1.025], abs=1e-7)
    # cycle 1: L = [0.5, 1.0], g = [2, 1] again
    step, _ = _run_round_robin(rule, [[0.5, 1.0]], first_step=step, grad_norms=[[2.0, 1.0]])
    # G = w·g ≈ [1.95, 1.025], Ḡ = 1.4875; L̃ = [0.5, 1], r = L̃/0.75 = [2/3, 4/3],
    # r^1.5 = [0.544331, 1.539601]; target = [0.809692, 2.290156]; L_grad = 1.140308 + 1.265156 = 2.405464
    g = np.array(rule.weights()) * [2.0, 1.0]  # w is 0.975 only up to Adam's eps
    r = np.array([2 / 3, 4 / 3]) ** 1.5
    assert float(rule.gradnorm_loss().detach()) == pytest.approx(np.abs(g - g.mean() * r).sum(), rel=1e-12)
    assert float(rule.gradnorm_loss().detach()) == pytest.approx(2.405464, abs=2e-6)
    rule.weight(0, ONE, step)  # same gradient signs: Adam's second step is lr·sign again
    assert rule.weights() == pytest.approx([0.95, 1.05], abs=1e-7)
    assert sum(rule.weights()) == pytest.approx(2.0)


def test_uncertainty_gradient_and_optimum():
    rule = make_weighting("uncertainty", ["a", "b", "c"], lr=0.05)
    with torch.no_grad():
        rule.param.copy_(torch.tensor([-0.3, 0.0, 0.7], dtype=torch.float64))
    for i, loss in enumerate([0.4, 1.3, 2.5]):
        rule.param.grad = None
        rule._objective(i, loss).backward()
        s = rule.param.detach()[i].item()
        assert rule.param.grad[i].item() == pytest.approx(-math.exp(-s) * loss + 1, rel=1e-12)
        out = rule.weight(i, torch.tensor(loss), i)  # exp(-s)·L + s
        assert float(out) == pytest.approx(math.exp(-s) * loss + s, rel=1e-6)
    # at fixed losses, min_s exp(-s)·L + s is s = log L: the weights exp(-s) tend to 1/L
    fixed = [0.5, 1.0, 2.0]
    _run_round_robin(rule, [fixed] * 800, first_step=3)
    assert rule.weights() == pytest.approx([2.0, 1.0, 0.5], rel=0.03)


def test_softmax_learnable_collapses_onto_easiest_task_and_warns(caplog):
    W._warned_collapse = False
    with caplog.at_level(logging.WARNING, logger="mtpeft.trainer.weighting"):
        rule = make_weighting("softmax_learnable", ["easy", "mid", "hard"])
        make_weighting("softmax_learnable", ["easy", "mid", "hard"])
    assert sum("smallest loss" in r.message for r in caplog.records) == 1  # warned once
    assert rule.weights() == pytest.approx([1.0, 1.0, 1.0])
    with torch.no_grad():
        rule.param.copy_(torch.tensor([0.0, math.log(3.0), 0.0], dtype=torch.float64))
    # softmax([0, ln 3, 0]) = [1, 3, 1]/5 -> K·softmax = [0.6, 1.8, 0.6]
    assert rule.weights() == pytest.approx([0.6, 1.8, 0.6])
    rule.param.data.zero_()
    _run_round_robin(rule, [[0.2, 1.0, 2.0]] * 300)
    w = rule.weights()
    assert w[0] > 0.95 * 3 and w[2] < w[1] < 0.1  # nearly all weight on the smallest loss


@pytest.mark.parametrize("kind", W.WEIGHTING_KINDS)
def test_state_dict_round_trip_continues_identically(kind):
    opts = {"static_weights": {"a": 1.0, "b": 2.0, "c": 0.5}}
    rng = np.random.default_rng(0)
    cycles = rng.uniform(0.2, 2.0, size=(8, 3)).tolist()
    norms = rng.uniform(0.5, 3.0, size=(8, 3)).tolist()
    live = make_weighting(kind, ["a", "b", "c"], **opts)
    step, _ = _run_round_robin(live, cycles[:4], grad_norms=norms[:4])
    buf = io.BytesIO()
    torch.save(live.state_dict(), buf)  # as in a checkpoint's client state
    buf.seek(0)
    restored = make_weighting(kind, ["a", "b", "c"], **opts)
    restored.load_state_dict(torch.load(buf, weights_only=False))
    twin = copy.deepcopy(live)
    _run_round_robin(live, cycles[4:], first_step=step, grad_norms=norms[4:])
    _run_round_robin(restored, cycles[4:], first_step=step, grad_norms=norms[4:])
    assert restored.weights() == live.weights()
    assert all(math.isfinite(w) and w >= 0 for w in live.weights())
    if kind not in ("uniform", "static"):
        assert live.weights() != twin.weights()  # the rule did move
    other = "dwa" if kind != "dwa" else "famo"
    with pytest.raises(CheckpointError, match="weighting"):
        make_weighting(other, ["a", "b", "c"]).load_state_dict(live.state_dict())


@pytest.mark.parametrize("kind", W.WEIGHTING_KINDS)
def test_ranks_with_different_local_losses_keep_identical_weights(kind):
    """Contract: weights depend only on the all-reduced values passed to observe()."""
    opts = {"static_weights": {"a": 1.0, "b": 2.0}}
    ranks = [make_weighting(kind, ["a", "b"], **opts) for _ in range(2)]
    rng = np.random.default_rng(3)
    for step in range(40):
        task, mean_loss, norm = step % 2, float(rng.uniform(0.2, 2.0)), float(rng.uniform(0.5, 2.0))
        for r, rule in enumerate(ranks):
            local = torch.tensor(mean_loss * (0.5 + r), dtype=torch.float64, requires_grad=True)  # this rank's micro-batch
            out = rule.weight(task, local, step)
            out.backward()
            assert local.grad.item() == pytest.approx(rule.weights()[task], rel=1e-12)  # d(out)/dL = w
            rule.observe_grad_norm(task, norm * rule.weights()[task])
            rule.observe(task, mean_loss, step)
        assert ranks[0].weights() == ranks[1].weights()
    assert ranks[0].parameters() == []
