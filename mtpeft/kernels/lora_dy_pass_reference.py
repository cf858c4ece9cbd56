"""Torch reference of ``lora_dy_pass``: the two rank-r products of dy as two GEMMs."""

from __future__ import annotations

import torch


def lora_dy_pass_reference(dy: torch.Tensor, lora_B: torch.Tensor, xa: torch.Tensor, scaling: float):
    """``(s·dy·B, s·dyᵀ·xa)`` as (``dy.dtype`` [M, r], fp32 [N, r])."""
    g = ((dy @ lora_B) * scaling).to(dy.dtype)
    db = (dy.t() @ xa).float() * scaling
    return g, db
