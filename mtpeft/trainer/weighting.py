"""Per-task loss weighting for a loop that trains ONE task per global step.

The published rules (Kendall et al. 2018, Liu et al. 2019 and 2023, Chen et al. 2018) see every
task's loss in every step; here step t sees only its own task's loss. So each rule keeps the
latest statistics of every task and updates once per *cycle* (K consecutive global steps, one
visit per task under round robin), from losses the loop has already all-reduced over ranks.
The model's gradient only ever flows through ``loss * w`` with ``w`` a plain float: the rules'
own parameters are updated inside ``observe`` from those all-reduced values, with deterministic
CPU float64 math, so every rank holds bit-identical weights without communicating. Hence
``parameters()`` is always empty: nothing for the model optimizer (a ZeRO-3 optimizer only
manages module parameters, and a per-rank gradient would let the ranks' weights drift apart).

Loop protocol, every global step t of task i:
    loss_w = weighting.weight(i, loss, t)       # per micro-batch; backpropagate loss_w
    weighting.observe_grad_norm(i, norm)        # gradnorm only: ||grad of loss_w|| on shared params
    weighting.observe(i, all_reduced_loss, t)   # once per step, the unweighted loss
"""

from __future__ import annotations

import copy
import logging
import math

import torch

from mtpeft.errors import CheckpointError, ConfigError

_log = logging.getLogger(__name__)
_warned_collapse = False


class _CycleLosses:
    """Each task's mean loss over each cycle of K steps; the last two cycle means are kept."""

    def __init__(self, num_tasks: int):
        self.num_tasks, self.cycle = num_tasks, 0
        self.sums, self.counts = [0.0] * num_tasks, [0] * num_tasks
        self.history: list[list[float]] = [[] for _ in range(num_tasks)]  # [L(c-2), L(c-1)]
        self.latest: list = [None] * num_tasks
        self.first: list = [None] * num_tasks

    def add(self, task: int, value: float) -> None:
        self.sums[task] += value
        self.counts[task] += 1
        self.latest[task] = value
        if self.first[task] is None:
            self.first[task] = value

    def advance(self, step: int) -> bool:
        """Close the open cycle when ``step`` lies past it; a task unseen in it keeps its history."""
        if step // self.num_tasks <= self.cycle:
            return False
        for i in range(self.num_tasks):
            if self.counts[i]:
                self.history[i] = (self.history[i] + [self.sums[i] / self.counts[i]])[-2:]
        self.sums, self.counts = [0.0] * self.num_tasks, [0] * self.num_tasks
        self.cycle = step // self.num_tasks
        return True

    def full(self, depth: int) -> bool:
        return all(len(h) >= depth for h in self.history)

    def state_dict(self) -> dict:
        return copy.deepcopy({k: getattr(self, k) for k in ("cycle", "sums", "counts", "history", "latest", "first")})

    def load_state_dict(self, state: dict) -> None:
        for key, value in copy.deepcopy(state).items():
            setattr(self, key, value)


class LossWeighting:
    """``uniform``: every task's loss counts once (the sound default)."""

    kind = "uniform"

    def __init__(self, task_names: list[str]):
        self.task_names = list(task_names)
        self.num_tasks = len(self.task_names)
        self.cycles = _CycleLosses(self.num_tasks)
        self._used = [1.0] * self.num_tasks  # the weight the last weight() call applied, per task

    def _task_weight(self, task: int) -> float:
        return 1.0

    def _on_cycle_end(self) -> None:
        pass

    def _sync(self, step: int) -> None:
        if self.cycles.advance(step):
            self._on_cycle_end()

    def weight(self, task_index: int, loss: torch.Tensor, step: int) -> torch.Tensor:
        """The loss to backpropagate at global step ``step``, which trains task ``task_index``."""
        self._sync(step)
        w = self._task_weight(task_index)
        self._used[task_index] = w
        return loss * w

    def observe(self, task_index: int, loss_value: float, step: int) -> None:
        """Record the step's unweighted loss, already averaged over ranks (identical everywhere)."""
        self._sync(step)
        self.cycles.add(task_index, float(loss_value))
        self._update(task_index, float(loss_value))

    def _update(self, task: int, loss_value: float) -> None:
        pass

    def observe_grad_norm(self, task_index: int, norm: float) -> None:
        """Norm over the shared parameters of the gradient of ``weight()``'s result; gradnorm uses it."""

    def parameters(self) -> list[torch.Tensor]:
        """Always empty: learned weights are updated inside ``observe``, not by the model optimizer."""
        return []

    def weights(self) -> list[float]:
        """Current per-task weights, for TensorBoard."""
        return [self._task_weight(i) for i in range(self.num_tasks)]

    def state_dict(self) -> dict:
        return {"kind": self.kind, "tasks": list(self.task_names), "cycles": self.cycles.state_dict(),
                "used": list(self._used), **self._extra_state()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != self.kind or state.get("tasks") != self.task_names:
            raise CheckpointError(f"checkpoint loss weighting is {state.get('kind')!r} over tasks "
                                  f"{state.get('tasks')}, this run has {self.kind!r} over {self.task_names}; "
                                  f"resume with the original weighting.kind and tasks or start a new run")
        self.cycles.load_state_dict(state["cycles"])
        self._used = list(state["used"])
        self._load_extra(state)

    def _extra_state(self) -> dict:
        return {}

    def _load_extra(self, state: dict) -> None:
        pass


class StaticWeighting(LossWeighting):
    """``static``: fixed weights given per task name (not renormalised)."""

    kind = "static"

    def __init__(self, task_names: list[str], static_weights: dict):
        super().__init__(task_names)
        static_weights = dict(static_weights or {})
        unknown = sorted(set(static_weights) - set(self.task_names))
        missing = [n for n in self.task_names if n not in static_weights]
        if unknown or missing:
            what = f"unknown task(s) {unknown}" if unknown else f"no weight for {missing}"
            raise ConfigError(f"weighting.weights: {what}; give one weight per task: "
                              f"{', '.join(self.task_names)}")
        for name, w in static_weights.items():
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise ConfigError(f"weighting.weights.{name} must be a number >= 0, got {w!r}")
        self._static = [float(static_weights[n]) for n in self.task_names]
        if not any(self._static):
            raise ConfigError("weighting.weights are all 0, so no task would train; give at least one task a "
                              "positive weight")

    def _task_weight(self, task: int) -> float:
        return self._static[task]


class _LearnedWeighting(LossWeighting):
    """Rules with a small float64 parameter vector trained by its own optimizer inside ``observe``."""

    def __init__(self, task_names: list[str], lr: float, init: float = 0.0):
        super().__init__(task_names)
        self.param = torch.full((self.num_tasks,), init, dtype=torch.float64, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.param], lr=lr)

    def _objective(self, task: int, loss_value: float) -> torch.Tensor:
        raise NotImplementedError

    def _update(self, task: int, loss_value: float) -> None:
        self.optimizer.zero_grad()
        self._objective(task, loss_value).backward()
        self.optimizer.step()

    def _extra_state(self) -> dict:
        return {"param": self.param.detach().clone(), "optimizer": self.optimizer.state_dict()}

    def _load_extra(self, state: dict) -> None:
        with torch.no_grad():
            self.param.copy_(state["param"])
        self.optimizer.load_state_dict(state["optimizer"])


class SoftmaxLearnable(_LearnedWeighting):
    """``softmax_learnable`` (the code-analysis study): w = K·softmax(θ), θ minimising Σ wᵢLᵢ.

    Offered for comparison only. ∂(Σ wᵢLᵢ)/∂θⱼ = K·sⱼ(Lⱼ − Σ sᵢLᵢ) lowers the logit of every task
    whose loss is above the weighted mean, so all weight drifts onto the easiest task. The factor K
    (the study has none) makes the starting point equal to ``uniform``.
    """

    kind = "softmax_learnable"

    def __init__(self, task_names: list[str], lr: float):
        super().__init__(task_names, lr)
        global _warned_collapse
        if not _warned_collapse:
            _warned_collapse = True
            _log.warning("weighting.kind=softmax_learnable minimises sum softmax(theta)_i * L_i, which moves all "
                         "weight onto the task with the smallest loss; use it only for comparison "
                         "(uncertainty, dwa or famo are sound)")

    def _objective(self, task: int, loss_value: float) -> torch.Tensor:
        return self.num_tasks * torch.softmax(self.param, 0)[task] * loss_value

    def _task_weight(self, task: int) -> float:
        return float(self.num_tasks * torch.softmax(self.param.detach(), 0)[task])


class Uncertainty(_LearnedWeighting):
    """``uncertainty`` (Kendall, Gal & Cipolla 2018): L = Σ exp(−sᵢ)Lᵢ + sᵢ, sᵢ = log σᵢ² learned.

    The +sᵢ term keeps σ from growing without bound; at a fixed loss the optimum is sᵢ = log Lᵢ,
    so each task's weighted loss tends to 1. The weight reported is exp(−sᵢ).
    """

    kind = "uncertainty"

    def _objective(self, task: int, loss_value: float) -> torch.Tensor:
        s = self.param[task]
        return torch.exp(-s) * loss_value + s

    def weight(self, task_index: int, loss: torch.Tensor, step: int) -> torch.Tensor:
        return super().weight(task_index, loss, step) + float(self.param.detach()[task_index])

    def _task_weight(self, task: int) -> float:
        return math.exp(-float(self.param.detach()[task]))


class DynamicWeightAverage(LossWeighting):
    """``dwa`` (Liu, Johns & Davison 2019): wᵢ(c) = K·exp(rᵢ/T) / Σⱼ exp(rⱼ/T), rᵢ = Lᵢ(c−1)/Lᵢ(c−2).

    Lᵢ(c) is task i's mean loss over cycle c; weights are uniform until two cycles have closed.
    """

    kind = "dwa"

    def __init__(self, task_names: list[str], temperature: float = 2.0):
        super().__init__(task_names)
        self.temperature = temperature

    def weights(self) -> list[float]:
        if not self.cycles.full(2):
            return [1.0] * self.num_tasks
        ratios = torch.tensor([h[-1] / max(h[-2], 1e-12) for h in self.cycles.history], dtype=torch.float64)
        return (self.num_tasks * torch.softmax(ratios / self.temperature, 0)).tolist()

    def _task_weight(self, task: int) -> float:
        return self.weights()[task]


class Famo(LossWeighting):
    """``famo`` (Liu, Liu, Jin, Stone & Liu 2023, Algorithm 1), one task per step.

    Logits ξ (init 0), z = softmax(ξ). Model update: the paper descends Σᵢ c·zᵢ/ℓᵢ ∇ℓᵢ with
    c = (Σⱼ zⱼ/ℓⱼ)⁻¹ (the gradient of c·Σ zᵢ log ℓᵢ); step t of task i backpropagates wᵢ·ℓᵢ with
    wᵢ = K·c·zᵢ/ℓᵢ, ℓ the latest observed losses (K× so that equal losses give weight 1).
    Logit update, once per cycle: d = log ℓ(c−1) − log ℓ(c) (how much each task's cycle-mean loss
    fell), δ = J_z(ξ)ᵀd = z ⊙ (d − zᵀd), ξ ← ξ − β(δ + γξ), β = 0.025 and γ = 0.01 the authors'
    defaults. Approximation: ℓ(c−1), ℓ(c) come from different batches one cycle apart, where the
    paper re-evaluates the same batch after one step. The authors' code swaps the plain step for
    Adam; this is the paper's rule. Losses get +1e-8, as there, so log and 1/ℓ stay finite.
    """

    kind = "famo"
    EPS = 1e-8

    def __init__(self, task_names: list[str], lr: float = 0.025, gamma: float = 0.01):
        super().__init__(task_names)
        self.beta, self.gamma = lr, gamma
        self.logits = torch.zeros(self.num_tasks, dtype=torch.float64)

    def weights(self) -> list[float]:
        if any(v is None for v in self.cycles.latest):
            return [1.0] * self.num_tasks
        z = torch.softmax(self.logits, 0)
        inv = z / (torch.tensor(self.cycles.latest, dtype=torch.float64) + self.EPS)
        return (self.num_tasks * inv / inv.sum()).tolist()

    def _task_weight(self, task: int) -> float:
        return self.weights()[task]

    def _on_cycle_end(self) -> None:
        if not self.cycles.full(2):
            return
        h = torch.tensor(self.cycles.history, dtype=torch.float64) + self.EPS
        d = h[:, 0].log() - h[:, 1].log()
        z = torch.softmax(self.logits, 0)
        delta = z * (d - (z * d).sum())
        self.logits = self.logits - self.beta * (delta + self.gamma * self.logits)

    def _extra_state(self) -> dict:
        return {"logits": self.logits.clone()}

    def _load_extra(self, state: dict) -> None:
        self.logits = state["logits"].clone().to(torch.float64)


class GradNorm(_LearnedWeighting):
    """``gradnorm`` (Chen et al. 2018), α = 1.5, once per cycle from each task's latest statistics.

    Gᵢ = wᵢ·gᵢ, gᵢ = ||∇_W Lᵢ|| on the shared parameters W, Ḡ = mean Gᵢ, L̃ᵢ = Lᵢ/Lᵢ(first),
    rᵢ = L̃ᵢ / mean L̃; L_grad = Σᵢ |Gᵢ − Ḡ·rᵢ^α| with Ḡ·rᵢ^α held constant; one Adam step on w,
    then w is floored at 1e-3 and renormalised to Σ wᵢ = K. Approximation: the paper takes all
    task gradients at the same parameters in one step; here gᵢ is measured at the step task i last
    ran (``observe_grad_norm``), up to one cycle old, and Lᵢ is that step's all-reduced loss.
    """

    kind = "gradnorm"

    def __init__(self, task_names: list[str], lr: float = 0.025, alpha: float = 1.5):
        super().__init__(task_names, lr, init=1.0)
        self.alpha = alpha
        self.grad_norms: list = [None] * self.num_tasks

    def observe_grad_norm(self, task_index: int, norm: float) -> None:
        used = self._used[task_index]
        self.grad_norms[task_index] = float(norm) / used if used > 0 else None

    def _update(self, task: int, loss_value: float) -> None:
        pass  # w moves once per cycle, not per step

    def gradnorm_loss(self) -> torch.Tensor:
        g = torch.tensor(self.grad_norms, dtype=torch.float64)
        G = self.param * g
        rel = torch.tensor([c / f for c, f in zip(self.cycles.latest, self.cycles.first)], dtype=torch.float64)
        target = (G.mean() * (rel / rel.mean()) ** self.alpha).detach()
        return (G - target).abs().sum()

    def _on_cycle_end(self) -> None:
        if any(v is None for v in self.grad_norms + self.cycles.latest) or any(f <= 0 for f in self.cycles.first):
            return
        self.optimizer.zero_grad()
        self.gradnorm_loss().backward()
        self.optimizer.step()
        with torch.no_grad():
            self.param.clamp_(min=1e-3)
            self.param.mul_(self.num_tasks / self.param.sum())

    def _task_weight(self, task: int) -> float:
        return float(self.param.detach()[task])

    def _extra_state(self) -> dict:
        return {**super()._extra_state(), "grad_norms": list(self.grad_norms)}

    def _load_extra(self, state: dict) -> None:
        super()._load_extra(state)
        self.grad_norms = list(state["grad_norms"])


def _dwa(task_names: list[str], o: dict) -> LossWeighting:
    _at_least_zero("weighting.temperature", o["dwa_temperature"], zero_allowed=False)
    return DynamicWeightAverage(task_names, o["dwa_temperature"])


def _famo(task_names: list[str], o: dict) -> LossWeighting:
    _at_least_zero("weighting.gamma", o["famo_gamma"])
    return Famo(task_names, o["lr"], o["famo_gamma"])


def _gradnorm(task_names: list[str], o: dict) -> LossWeighting:
    _at_least_zero("weighting.alpha", o["gradnorm_alpha"])
    return GradNorm(task_names, o["lr"], o["gradnorm_alpha"])


def _at_least_zero(key: str, value: float, zero_allowed: bool = True) -> None:
    if not (math.isfinite(value) and (value >= 0 if zero_allowed else value > 0)):
        raise ConfigError(f"{key} must be a finite number {'>= 0' if zero_allowed else '> 0'}, got {value}")


WEIGHTINGS = {
    "uniform": lambda names, o: LossWeighting(names),
    "static": lambda names, o: StaticWeighting(names, o["static_weights"] or {}),
    "softmax_learnable": lambda names, o: SoftmaxLearnable(names, o["lr"]),
    "uncertainty": lambda names, o: Uncertainty(names, o["lr"]),
    "dwa": _dwa,
    "famo": _famo,
    "gradnorm": _gradnorm,
}
WEIGHTING_KINDS = tuple(WEIGHTINGS)  # the only list of weighting names; config validation reads it


def make_weighting(kind: str, task_names: list[str], *, static_weights: dict | None = None, lr: float = 0.025,
                   dwa_temperature: float = 2.0, famo_gamma: float = 0.01, gradnorm_alpha: float = 1.5
                   ) -> LossWeighting:
    """The rule ``weighting.kind`` names; the keyword arguments are the other ``weighting.*`` keys."""
    if lr <= 0 or not math.isfinite(lr):
        raise ConfigError(f"weighting.lr must be a positive number, got {lr}")
    if kind not in WEIGHTINGS:
        raise ConfigError(f"weighting.kind must be one of {', '.join(WEIGHTING_KINDS)}, got {kind!r}")
    return WEIGHTINGS[kind](task_names, {"static_weights": static_weights, "lr": lr, "dwa_temperature": dwa_temperature,
                                         "famo_gamma": famo_gamma, "gradnorm_alpha": gradnorm_alpha})
