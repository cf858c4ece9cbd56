"""IA3 shared by all tasks: learned scaling vectors (init 1) on chosen projections.

HF peft's semantics: a projection listed in ``feedforward_modules`` scales its *input*
(``y = W(x ⊙ l)``), any other target scales its *output* (``y = (Wx + b) ⊙ l``). The default targets
are ``k_proj``, ``v_proj`` (output) and ``down_proj`` (input), as in the IA3 paper. On a 4-bit base the
output scale runs inside the fused NF4 GEMM's epilogue (``nf4_lora_linear(..., ia3=l)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from mtpeft.conv1d import may_hold_conv1d
from mtpeft.errors import ConfigError
from mtpeft.quant.linear import QuantLinear
from mtpeft.tuners.base import Tuner, WrappedLinear, peft_task_type
from mtpeft.tuners.family import default_or_all_linear, find_linears, peft_target_names, replace_module
from mtpeft.tuners.settings import MethodSettings, module_names
from mtpeft.tuners.structure import find_blocks


@dataclass
class IA3Settings(MethodSettings):
    """``peft.ia3_target_modules`` (a learned scale each) and ``peft.ia3_feedforward_modules`` (those
    of them that scale their input)."""

    target_modules: list = field(default_factory=lambda: ["k_proj", "v_proj", "down_proj"],
                                 metadata={"key": "ia3_target_modules"})
    feedforward_modules: list = field(default_factory=lambda: ["down_proj"],
                                      metadata={"key": "ia3_feedforward_modules"})

    def check(self) -> None:
        module_names("ia3_target_modules", self.target_modules)
        module_names("ia3_feedforward_modules", self.feedforward_modules)
        if not self.target_modules:
            raise ConfigError("peft.ia3_target_modules is empty; list projections such as k_proj, v_proj")
        stray = [n for n in self.feedforward_modules if n not in self.target_modules]
        if stray:
            raise ConfigError(f"peft.ia3_feedforward_modules {stray} are not in peft.ia3_target_modules; "
                              f"add them there or drop them")


class IA3Linear(WrappedLinear):
    """``ia3_l`` has HF peft's shape: ``[1, in]`` for an input scale, ``[out, 1]`` for an output scale."""

    def __init__(self, base: nn.Module, feedforward: bool):
        super().__init__()
        self.base = base
        self.feedforward = feedforward
        shape = (1, base.in_features) if feedforward else (base.out_features, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.ia3_l.flatten().to(x.dtype)
        if self.feedforward:
            return self.base(x * scale)
        if isinstance(self.base, QuantLinear):  # 4-bit base: the scale rides in the fused kernel
            return self.base.fused(x, ia3=scale)
        return self.base(x) * scale


def ia3_targets(backbone: nn.Module, s: IA3Settings, skip: tuple = ()) -> tuple[list[str], set[str], str]:
    """(scaled module paths, those that scale their input, notice); the memory planner reads it too."""
    targets, notice = default_or_all_linear(backbone, s.target_modules, IA3Settings().target_modules,
                                            "peft.ia3_target_modules")
    chosen = find_linears(backbone, targets, "peft.ia3_target_modules", skip=skip or (IA3Linear,))
    if notice:  # all-linear: the feed-forward outputs scale their input, as down_proj does by default
        ff = {b.ffn_out for b in find_blocks(backbone)} & set(chosen)
    else:
        ff = set(find_linears(backbone, s.feedforward_modules, "peft.ia3_feedforward_modules")
                 if s.feedforward_modules else []) & set(chosen)
    return chosen, ff, notice


class IA3Tuner(Tuner):
    name = "ia3"
    hf_peft = True

    def inject(self, backbone: nn.Module) -> None:
        chosen, ff, self.notice = ia3_targets(backbone, self.settings)
        self.peft_targets = peft_target_names(backbone, chosen)
        self.peft_feedforward = peft_target_names(backbone, sorted(ff)) if ff else []
        for name in chosen:
            replace_module(backbone, name, IA3Linear(backbone.get_submodule(name), name in ff))
        return None

    def resolved_targets(self) -> dict:
        return {"ia3_target_modules": self.peft_targets, "ia3_feedforward_modules": self.peft_feedforward}

    def named_tensors(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return {f"base_model.model.{name}.ia3_l": m.ia3_l for name, m in model.backbone.named_modules()
                if isinstance(m, IA3Linear)}

    def peft_config(self, model: nn.Module, base_model_name_or_path: str):
        from peft import IA3Config

        return IA3Config(target_modules=self.peft_targets, feedforward_modules=self.peft_feedforward,
                         task_type=peft_task_type(model), base_model_name_or_path=base_model_name_or_path,
                         fan_in_fan_out=may_hold_conv1d(type(model.backbone)))  # GPT-2: its base holds Conv1D
