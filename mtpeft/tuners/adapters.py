"""Bottleneck adapters shared by all tasks: serial (Houlsby) and parallel (He et al.).

Serial: after the attention output projection and after the feed-forward output projection of every
layer (both found by ``structure.find_blocks``), ``h ← h + s·up(act(down(h)))``. Parallel: beside each feed-forward block,
``mlp_out ← mlp(x) + s·up(act(down(x)))`` with x the block's input. The up-projection starts at zero,
so both start as the identity. Every adapter runs through ``mtpeft.kernels.bottleneck_adapter``
(Triton on CUDA, the torch reference on CPU). HF peft has no bottleneck adapter: the export is
mtpeft's own (adapter_model.safetensors with the names below + the manifest in tasks.json).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from mtpeft.errors import ConfigError
from mtpeft.kernels.bottleneck_adapter import bottleneck_adapter
from mtpeft.kernels.bottleneck_adapter_reference import ACTIVATIONS, check_activation
from mtpeft.tuners.base import Tuner, WrappedLinear
from mtpeft.tuners.family import replace_module
from mtpeft.tuners.settings import MethodSettings, positive
from mtpeft.tuners.structure import ffn_modules, find_blocks


@dataclass
class AdapterSettings(MethodSettings):
    """``peft.bottleneck``, ``peft.adapter_activation``, ``peft.adapter_scaling`` (serial and parallel)."""

    bottleneck: int = 64
    activation: str = field(default="relu", metadata={"key": "adapter_activation"})
    scaling: float = field(default=1.0, metadata={"key": "adapter_scaling"})

    def check(self) -> None:
        positive("bottleneck", self.bottleneck)
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"peft.adapter_activation must be one of {', '.join(ACTIVATIONS)}, "
                              f"got {self.activation!r}")
        if not math.isfinite(self.scaling):
            raise ConfigError(f"peft.adapter_scaling must be a finite number, got {self.scaling}")


class BottleneckParams(nn.Module):
    """``down [b, width_in]`` (Kaiming, as nn.Linear), ``up [width_out, b]`` and both biases at zero.

    Direct parameters of the wrapping module, so ZeRO-3 gathers them when its forward runs."""

    def _init_adapter(self, width_in: int, width_out: int, s: AdapterSettings) -> None:
        self.activation, self.scaling = check_activation(s.activation), s.scaling
        self.adapter_down = nn.Parameter(torch.empty(s.bottleneck, width_in))
        self.adapter_down_bias = nn.Parameter(torch.zeros(s.bottleneck))
        self.adapter_up = nn.Parameter(torch.zeros(width_out, s.bottleneck))
        self.adapter_up_bias = nn.Parameter(torch.zeros(width_out))
        nn.init.kaiming_uniform_(self.adapter_down, a=math.sqrt(5))

    def _adapt(self, h: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        dt = h.dtype
        return bottleneck_adapter(h, self.adapter_down.to(dt), self.adapter_down_bias.to(dt), self.adapter_up.to(dt),
                                  self.adapter_up_bias.to(dt), self.activation, self.scaling, residual)


class SerialAdapterLinear(BottleneckParams, WrappedLinear):
    """A frozen output projection followed by a serial adapter on its output."""

    def __init__(self, base: nn.Module, s: AdapterSettings):
        super().__init__()
        self.base = base
        self._init_adapter(base.out_features, base.out_features, s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._adapt(self.base(x))


class ParallelAdapterBlock(BottleneckParams):
    """A feed-forward block ``y = block(x)`` with a bottleneck branch from its input to its output."""

    def __init__(self, block: nn.Module, width: int, s: AdapterSettings):
        super().__init__()
        self.block = block
        self._init_adapter(width, width, s)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self._adapt(x, residual=self.block(x, *args, **kwargs))


class ParallelAdapterBertOutput(BottleneckParams):
    """BERT-style ``output`` (dense → dropout → LayerNorm(· + input)): the branch from the feed-forward
    input (``input_tensor``) joins the dense output before the residual and LayerNorm."""

    def __init__(self, output: nn.Module, width: int, s: AdapterSettings):
        super().__init__()
        self.block = output
        self._init_adapter(width, width, s)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        h = self._adapt(input_tensor, residual=self.block.dense(hidden_states))
        return self.block.LayerNorm(self.block.dropout(h) + input_tensor)


def _width(backbone: nn.Module) -> int:
    cfg = backbone.config
    return getattr(cfg, "hidden_size", None) or cfg.d_model


class AdapterTuner(Tuner):
    def named_tensors(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return {f"{name}.{p}": getattr(m, p) for name, m in model.backbone.named_modules()
                if isinstance(m, BottleneckParams)
                for p in ("adapter_down", "adapter_down_bias", "adapter_up", "adapter_up_bias")}


class SerialAdapterTuner(AdapterTuner):
    name = "serial_adapter"

    def inject(self, backbone: nn.Module) -> None:
        outputs = [name for b in find_blocks(backbone) for name in (b.attention_out, b.ffn_out)]
        for name in outputs:
            if isinstance(backbone.get_submodule(name), SerialAdapterLinear):
                continue
            replace_module(backbone, name, SerialAdapterLinear(backbone.get_submodule(name), self.settings))
        return None


class ParallelAdapterTuner(AdapterTuner):
    name = "parallel_adapter"

    def inject(self, backbone: nn.Module) -> None:
        names, split = ffn_modules(backbone)
        wrapper = ParallelAdapterBertOutput if split else ParallelAdapterBlock
        for name in names:
            replace_module(backbone, name, wrapper(backbone.get_submodule(name), _width(backbone), self.settings))
        return None
