"""GPT-2-style ``Conv1D`` layers (``transformers.pytorch_utils.Conv1D``: a linear layer whose weight is
stored transposed, ``[in, out]``) turned into ``nn.Linear`` when a backbone is built, so that the
tuners, the 4-bit layer, the structural search and the planner see one kind of linear layer.

GPT-2 (and CodeParrot, trained on it) and OpenAI GPT use it. The swap happens before any tuner or
quantization: on a loaded model (``as_linear``), on a meta skeleton whose checkpoint is then
streamed (``as_linear`` names the swapped modules, ``from_checkpoint`` transposes their weights on
read), or on a planned meta model. HF peft applies LoRA and IA3 to the original ``Conv1D`` layers
with ``fan_in_fan_out``; the adapter weights are the same, so an export loads there unchanged."""

from __future__ import annotations

import sys

import torch
from torch import nn


def _conv1d_class():
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def may_hold_conv1d(model_class) -> bool:
    """Whether a transformers model class's modeling file uses ``Conv1D`` (GPT-2, OpenAI GPT, ...):
    read before the model is built, so that it is not built partitioned by ZeRO-3 (a partitioned
    ``Conv1D`` weight cannot be turned in place)."""
    module = sys.modules.get(getattr(model_class, "__module__", ""), None)
    return getattr(module, "Conv1D", None) is _conv1d_class()


def as_linear(model: nn.Module) -> list[str]:
    """Replace every ``Conv1D`` of ``model`` by an ``nn.Linear`` holding the transposed weight (on the
    meta device: only the shape), keeping dtype, device and ``requires_grad``; the swapped names."""
    conv1d = _conv1d_class()
    swapped = [(name, m) for name, m in model.named_modules() if isinstance(m, conv1d)]
    for name, conv in swapped:
        if hasattr(conv.weight, "ds_id"):
            raise RuntimeError(f"{name}: a ZeRO-3 partitioned Conv1D cannot be turned into a linear layer in place")
        weight = conv.weight
        linear = nn.Linear(conv.nx, conv.nf, bias=conv.bias is not None, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            if weight.device.type != "meta":
                linear.weight.copy_(weight.t())
                if conv.bias is not None:
                    linear.bias.copy_(conv.bias)
        linear.weight.requires_grad_(weight.requires_grad)
        if conv.bias is not None:
            linear.bias.requires_grad_(conv.bias.requires_grad)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, linear)
    return [name for name, _ in swapped]


def from_checkpoint(weight: torch.Tensor) -> torch.Tensor:
    """A swapped module's weight as its checkpoint stores it (``[in, out]``), as ``nn.Linear`` holds it."""
    return weight.t().contiguous()
