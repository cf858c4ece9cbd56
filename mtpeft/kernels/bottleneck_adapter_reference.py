"""Torch reference of the fused bottleneck adapter (CPU path and test oracle).

``out = residual + scaling * up(act(down(h)))``; plain autograd is enough here because nothing
large is rebuilt (the adapter weights are small and trainable).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from mtpeft.errors import ConfigError

# "gelu" is the exact erf form (torch.nn.GELU()), "gelu_tanh" the tanh approximation
# (GELU(approximate="tanh"), HF's gelu_new); both are offered because checkpoints differ.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "silu": F.silu,
}


def check_activation(name: str) -> str:
    key = str(name).lower()
    if key == "swish":
        key = "silu"
    if key not in ACTIVATIONS:
        raise ConfigError(
            f"bottleneck adapter activation {name!r} is not supported; use one of {', '.join(ACTIVATIONS)}"
        )
    return key


def bottleneck_adapter_reference(
    h: torch.Tensor,
    down_w: torch.Tensor,
    down_b: Optional[torch.Tensor],
    up_w: torch.Tensor,
    up_b: Optional[torch.Tensor],
    activation: str,
    scaling: float,
    residual: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Same contract as :func:`mtpeft.kernels.bottleneck_adapter`, in plain torch."""
    act = ACTIVATIONS[check_activation(activation)]
    dtype = h.dtype
    z = F.linear(h, down_w.to(dtype), None if down_b is None else down_b.to(dtype))
    delta = F.linear(act(z), up_w.to(dtype), None if up_b is None else up_b.to(dtype))
    return (h if residual is None else residual) + scaling * delta
