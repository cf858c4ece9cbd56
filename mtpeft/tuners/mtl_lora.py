"""MTL-LoRA: one LoRA shared by all tasks plus a per-task diagonal transform between A and B.

``Δy = s · B · diag(Λ_t) · A · x``: A and B carry what the tasks share, Λ_t (r values per task,
initialised to 1 so every task starts from the same LoRA, which starts at zero through B) lets each
task re-weight the shared rank directions. Folding Λ_t into A (``diag(Λ_t)·A``) keeps the fused
NF4+LoRA kernel usable. HF peft has no such method: the export is mtpeft's own (see export.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from mtpeft.tuners.base import TaskSelector, Tuner, WrappedLinear
from mtpeft.tuners.family import peft_target_names, replace_module
from mtpeft.tuners.lora import LoraSettings, lora_forward, lora_targets


class MtlLoraLinear(WrappedLinear):
    """A frozen linear plus shared ``lora_A [r,in]``, ``lora_B [out,r]`` and ``lora_T [tasks,r]``."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float, selector: TaskSelector):
        super().__init__()
        self.base = base
        self.scaling = alpha / r
        self.selector = selector
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))
        self.lora_T = nn.Parameter(torch.ones(len(selector.names), r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        task_a = self.lora_T[self.selector.current()].unsqueeze(1) * self.lora_A
        return lora_forward(self.base, x, task_a, self.lora_B, self.scaling, self.lora_dropout, self.training)


class MtlLoraTuner(Tuner):
    name = "mtl_lora"
    planned_as = "lora"

    def inject(self, backbone: nn.Module) -> None:
        s: LoraSettings = self.settings
        self.selector = TaskSelector(self.task_names)
        chosen, self.notice = lora_targets(backbone, s, skip=(MtlLoraLinear,))
        self.resolved = peft_target_names(backbone, chosen)
        for name in chosen:
            replace_module(backbone, name, MtlLoraLinear(backbone.get_submodule(name), s.r, s.alpha, s.dropout,
                                                         self.selector))
        return None

    def resolved_targets(self) -> dict:
        return {"target_modules": self.resolved}

    def named_tensors(self, model: nn.Module) -> dict[str, nn.Parameter]:
        out = {}
        for name, module in model.backbone.named_modules():
            if isinstance(module, MtlLoraLinear):
                for p in ("lora_A", "lora_B", "lora_T"):
                    out[f"{name}.{p}"] = getattr(module, p)
        return out

    def manifest(self) -> dict:
        return {**super().manifest(), "task_order": list(self.task_names)}
