"""Dropout whose mask is a function of (seed, task, the example's position in its task's stream, the
module, the backbone pass) instead of a per-rank random stream, so 1 rank × micro-batch 2b and
2 ranks × micro-batch b drop the same elements of the same examples (DESIGN contract 2 with
dropout on). ``torch.nn.Dropout`` draws from each rank's generator, which no world size shares.

The mask element of row r at flat index i (over the row's trailing dimensions) is a hash of the
row's key and i, so it does not depend on how wide the batch was padded (the hash and the mask:
``kernels.keyed_dropout_reference``; on a GPU ``kernels.keyed_dropout`` computes it in registers in
one pass over x, and again in backward instead of keeping a mask).

The trainer sets the batch's row keys (``row_keys``) before each micro-batch; ``MultitaskModel``
derives one set per backbone pass. Without keys (a forward outside the trainer, or gradient
checkpointing, whose recomputation would read later keys) the module is plain dropout.
"""

from __future__ import annotations

import zlib
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from mtpeft.kernels.keyed_dropout import keyed_dropout
from mtpeft.kernels.keyed_dropout_reference import hash32, keep_mask, mix
from mtpeft.kernels.lora_keyed_dropout import KeyedMask

__all__ = ["DropoutKeys", "KeyedDropout", "hash32", "keep_mask", "key_dropouts", "mix", "site_key"]


def site_key(name: str) -> int:
    """A module's stable number: the CRC of its path in the model, the same on every rank."""
    return zlib.crc32(name.encode())


class DropoutKeys:
    """The per-row keys of the backbone pass under way; ``None`` when no keys were given."""

    def __init__(self):
        self.batch: Optional[torch.Tensor] = None
        self.current: Optional[torch.Tensor] = None
        self.passes = 0

    def begin(self, row_keys: Optional[torch.Tensor]) -> None:
        """A new micro-batch: its rows' keys (int64, any values), or None."""
        self.batch = None if row_keys is None else hash32(row_keys ^ (row_keys >> 32))
        self.current, self.passes = None, 0

    def next_pass(self) -> None:
        if self.batch is not None:
            self.current = mix(self.batch, self.passes)
            self.passes += 1

    def rows(self, n: int) -> Optional[torch.Tensor]:
        """Keys for a tensor of ``n`` rows: the pass keys, or for a pass over k stacked copies of the
        batch (anchors and partners) one derived set per copy."""
        if self.current is None or n % len(self.current):
            return None
        copies = n // len(self.current)
        return torch.cat([mix(self.current, j) for j in range(copies)]) if copies > 1 else self.current


class KeyedDropout(nn.Module):
    def __init__(self, p: float, keys: DropoutKeys, site: int):
        super().__init__()
        self.p, self.keys, self.site = p, keys, site

    def mask_for(self, x: torch.Tensor) -> Optional[KeyedMask]:
        """The mask ``forward(x)`` would draw, for a kernel to draw it itself (None: not keyed now)."""
        if not self.training or self.p == 0 or x.dim() == 0:
            return None
        rows = self.keys.rows(x.shape[0])
        return None if rows is None else KeyedMask(rows, self.site, self.p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        rows = self.keys.rows(x.shape[0]) if x.dim() > 0 else None
        if rows is None:
            return F.dropout(x, self.p, True)
        return keyed_dropout(x, rows, self.site, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}, site={self.site:#010x}"


def key_dropouts(model: nn.Module, keys: DropoutKeys) -> int:
    """Replace every ``nn.Dropout`` with p > 0 in ``model`` (tuner, heads and the backbone's own
    dropout modules) by a ``KeyedDropout`` reading ``keys``; returns how many."""
    count = 0
    for name, module in list(model.named_modules()):
        if type(module) is nn.Dropout and module.p > 0:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child,
                    KeyedDropout(module.p, keys, site_key(name)))
            count += 1
    return count
