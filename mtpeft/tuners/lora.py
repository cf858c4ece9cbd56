"""LoRA shared by every task: a layer that wraps a frozen linear, an injection rule, and the HF peft
state-dict names used at export.

The LoRA factors are direct parameters of ``LoraLinear`` (not child ``nn.Linear`` modules) so that
ZeRO-3, which gathers a module's own parameters when its forward runs, has them in hand when they
are passed to a fused kernel together with the base weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from mtpeft.conv1d import may_hold_conv1d
from mtpeft.errors import ConfigError
from mtpeft.quant.linear import QuantLinear
from mtpeft.tuners.base import Tuner, WrappedLinear, peft_task_type
from mtpeft.tuners.family import default_or_all_linear, find_linears, peft_target_names, replace_module
from mtpeft.tuners.keyed_dropout import KeyedDropout
from mtpeft.tuners.settings import MethodSettings, module_names, positive


@dataclass
class LoraSettings(MethodSettings):
    """``peft.r``, ``alpha``, ``dropout``, ``target_modules`` (LoRA and MTL-LoRA)."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                          "gate_proj", "up_proj", "down_proj"])

    def check(self) -> None:
        positive("r", self.r)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"peft.dropout must be in [0, 1), got {self.dropout}")
        positive("alpha", self.alpha)
        module_names("target_modules", self.target_modules)
        if not self.target_modules:
            raise ConfigError("peft.target_modules is empty; list projections such as q_proj, v_proj")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


class LoraLinear(WrappedLinear):
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lora_forward(self.base, x, self.lora_A, self.lora_B, self.scaling, self.lora_dropout, self.training)


def lora_forward(base: nn.Module, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                 dropout: nn.Module, training: bool) -> torch.Tensor:
    """``base(x) + s·dropout(x)·Aᵀ·Bᵀ``. On a 4-bit base (a ``QuantLinear``) its one fused entry point
    does it all, dropout included: mtpeft's keyed dropout as a mask the kernels redraw
    (``lora_dropout``), any other dropout as the LoRA branch's input ``lora_x = dropout(x)``."""
    a, b = lora_A.to(x.dtype), lora_B.to(x.dtype)
    if isinstance(base, QuantLinear):
        if isinstance(dropout, nn.Identity) or not training:
            return base.fused(x, a, b, scaling)
        mask = dropout.mask_for(x) if isinstance(dropout, KeyedDropout) else None
        if mask is not None:  # the kernels draw the keyed mask themselves (x' never stored)
            return base.fused(x, a, b, scaling, lora_dropout=mask)
        return base.fused(x, a, b, scaling, lora_x=dropout(x))
    return base(x) + F.linear(F.linear(dropout(x), a), b) * scaling


def lora_targets(model: nn.Module, settings: LoraSettings, key: str = "peft.target_modules",
                 skip: tuple = ()) -> tuple[list, str]:
    """The module paths LoRA (or MTL-LoRA) wraps, and a notice when the defaults became ``all-linear``."""
    targets, notice = default_or_all_linear(model, settings.target_modules, LoraSettings().target_modules, key)
    return find_linears(model, targets, key, skip=skip or (LoraLinear,)), notice


def inject_lora(model: nn.Module, settings: LoraSettings, key: str = "peft.target_modules") -> list[str]:
    """Wrap every targeted linear of ``model`` in place; returns the wrapped module paths."""
    wrapped, _ = lora_targets(model, settings, key)
    for name in wrapped:
        replace_module(model, name, LoraLinear(model.get_submodule(name), settings.r, settings.alpha,
                                               settings.dropout))
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


class LoraTuner(Tuner):
    """Shared LoRA on the attention and MLP projections (r=16, α=32, dropout 0.05 by default)."""

    name = "lora"
    hf_peft = True

    def inject(self, backbone: nn.Module) -> None:
        chosen, self.notice = lora_targets(backbone, self.settings)
        self.peft_targets = peft_target_names(backbone, chosen)
        for name in chosen:
            replace_module(backbone, name, LoraLinear(backbone.get_submodule(name), self.settings.r,
                                                      self.settings.alpha, self.settings.dropout))
        return None

    def resolved_targets(self) -> dict:
        return {"target_modules": self.peft_targets}

    def named_tensors(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return peft_state_dict(model.backbone)

    def peft_config(self, model: nn.Module, base_model_name_or_path: str):
        from peft import LoraConfig

        s = self.settings
        return LoraConfig(r=s.r, lora_alpha=s.alpha, lora_dropout=s.dropout, target_modules=self.peft_targets,
                          bias="none", task_type=peft_task_type(model), base_model_name_or_path=base_model_name_or_path,
                          fan_in_fan_out=may_hold_conv1d(type(model.backbone)))  # GPT-2: its base holds Conv1D
