"""LoRA shared by every task: a layer that wraps a frozen linear, an injection rule, and the HF peft
state-dict names used at export.

The LoRA factors are direct parameters of ``LoraLinear`` (not child ``nn.Linear`` modules) so that
ZeRO-3, which gathers a module's own parameters when its forward runs, has them in hand when they
are passed to a fused kernel together with the base weight.
"""

from __future__ import annotations

import functools
import math
import warnings
import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from mtpeft.errors import ConfigError


@dataclass
class LoraSettings:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                          "gate_proj", "up_proj", "down_proj"])

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


class LoraLinear(nn.Module):
    """``y = base(x) + s · dropout(x) Aᵀ Bᵀ``; A is Kaiming-uniform, B starts at zero (as in HF peft)."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float):
        super().__init__()
        self.base = base
        in_features, out_features = base.in_features, base.out_features
        self.r, self.scaling = r, alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(r, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = getattr(self.base, "forward_with_lora", None)
        if fused is not None:
            if isinstance(self.lora_dropout, nn.Identity) or not self.training:
                return fused(x, self.lora_A, self.lora_B, self.scaling)
            _warn_dropout_unfused()
        delta = F.linear(F.linear(self.lora_dropout(x), self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))
        return self.base(x) + delta * self.scaling


@functools.lru_cache(maxsize=1)
def _warn_dropout_unfused() -> None:
    warnings.warn("peft.dropout > 0: the fused NF4+LoRA kernel has no dropout, so LoRA layers on a 4-bit "
                  "base run the unfused reference path while training; set peft.dropout: 0 to use the kernel",
                  stacklevel=3)


def _matches(name: str, targets: list) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return any(leaf == t or re.fullmatch(t, name) for t in targets)


def inject_lora(model: nn.Module, settings: LoraSettings) -> list[str]:
    """Wrap every targeted linear of ``model`` in place; returns the wrapped module paths."""
    wrapped = []
    for name, module in list(model.named_modules()):
        if not name or not _matches(name, settings.target_modules):
            continue
        if not hasattr(module, "in_features") or isinstance(module, LoraLinear):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoraLinear(module, settings.r, settings.alpha, settings.dropout))
        wrapped.append(name)
    if not wrapped:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError(f"peft.target_modules {settings.target_modules} matched no linear layer; "
                          f"this model has: {', '.join(leaves)}")
    return wrapped


def lora_modules(model: nn.Module):
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            yield name, module


def peft_state_dict(model: nn.Module, prefix: str = "base_model.model.") -> dict[str, nn.Parameter]:
    """Map HF peft's saved-adapter key names to our LoRA parameters (not yet gathered)."""
    out = {}
    for name, module in lora_modules(model):
        out[f"{prefix}{name}.lora_A.weight"] = module.lora_A
        out[f"{prefix}{name}.lora_B.weight"] = module.lora_B
    return out
