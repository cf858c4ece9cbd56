"""Gather ZeRO-3-partitioned parameters for a read (init from the frozen base, export)."""

from __future__ import annotations

import contextlib

import torch


def gathered(params: list[torch.nn.Parameter], modifier_rank: int | None = None):
    """Full tensors inside the block on every rank; a no-op for ordinary (non-ZeRO-3) parameters."""
    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)
