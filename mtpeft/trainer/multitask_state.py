"""Everything a multitask step depends on besides the engine: which task (sampler), how much its
loss counts (loss weighting), and the periodic gradient-transfer probe. A resume restores it.

The transfer probe reads, within one schedule cycle that ends at a multiple of
``train.transfer_every``, each task's gradient of the shared (non-head) parameters at the step that
task ran — consecutive steps, so the gradients are taken at slightly different weights, which is
the price of not running extra backward passes. Under ZeRO-3 each rank contributes dot products
of its gradient partitions; one all-reduce gives the full cosine matrix.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from mtpeft.config import RunConfig
from mtpeft.data.dist import DistContext
from mtpeft.data.schedule import make_schedule
from mtpeft.errors import ConfigError
from mtpeft.trainer.transfer import GradientProbe, plot
from mtpeft.trainer.weighting import make_weighting


class MultitaskState:
    def __init__(self, cfg: RunConfig, task_names: list[str], sizes: list[int]):
        w = cfg.weighting
        self.task_names = task_names
        self.schedule = make_schedule(cfg.sampler.kind, sizes, cfg.train.seed, temperature=cfg.sampler.temperature)
        self.weighting = make_weighting(w.kind, task_names, static_weights=w.weights, lr=w.lr,
                                        dwa_temperature=w.temperature, famo_gamma=w.gamma, gradnorm_alpha=w.alpha)
        self.transfer_every = cfg.train.transfer_every
        if self.transfer_every and self.transfer_every < len(task_names):
            raise ConfigError(f"train.transfer_every must be 0 or at least the number of tasks "
                              f"({len(task_names)}), got {self.transfer_every}")
        self.probe = GradientProbe(task_names) if self.transfer_every else None

    def state_dict(self) -> dict:
        return {"sampler": self.schedule.state_dict(), "weighting": self.weighting.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.schedule.load_state_dict(state["sampler"])
        self.weighting.load_state_dict(state["weighting"])

    def weights(self) -> dict[str, float]:
        return dict(zip(self.task_names, self.weighting.weights()))

    def probing(self, step: int) -> bool:
        e = self.transfer_every
        return bool(e) and step % e >= e - len(self.task_names)

    def record_gradients(self, task_index: int, model: torch.nn.Module) -> None:
        from deepspeed.utils import safe_get_local_grad

        grads = []
        for name, p in model.named_parameters():
            if p.requires_grad and not name.startswith("heads."):
                g = safe_get_local_grad(p) if hasattr(p, "ds_id") else p.grad
                grads.append(torch.zeros(0) if g is None else g.detach().float().reshape(-1).cpu())
        self.probe.record(task_index, grads)

    def finish_probe(self, step: int, ctx: DistContext, run_dir: Path) -> list | None:
        stats = self.probe.local_stats()
        if ctx.world > 1:
            dist.all_reduce(stats)
        matrix = self.probe.finish(stats)
        if ctx.is_main:
            path = run_dir / "transfer.jsonl"
            self.probe.save(path, step)
            plot(path, run_dir / "transfer.png")
        return matrix
