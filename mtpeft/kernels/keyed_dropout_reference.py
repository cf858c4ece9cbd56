"""Torch reference of the keyed dropout kernel: the mask as a hash of (row key, index in the row).

The mask element of row r at flat index i (over the row's trailing dimensions) is a hash of the
row's key and i, so it does not depend on how wide the batch was padded or how rows are split over
ranks. The hash is Chris Wellons' lowbias32 on 32-bit lanes held in int64 (no overflow:
multiplications are split in 16-bit halves), computed on the tensor's device. This is the CPU path
and the tests' oracle; ``keyed_dropout`` runs the same hash in uint32 registers in one pass.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x · c) mod 2³² for 0 ≤ x < 2³², without int64 overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 tensors holding 32-bit values."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def mix(keys: torch.Tensor, value: int) -> torch.Tensor:
    """New 32-bit keys from ``keys`` and one more integer (a site, a pass, a block)."""
    return hash32(keys ^ hash32(torch.tensor(value & _M32, dtype=torch.int64, device=keys.device)))


def keep_mask(row_keys: torch.Tensor, site: int, shape: torch.Size, p: float) -> torch.Tensor:
    """Boolean keep-mask of ``shape`` (rows first) with P(keep) = 1 - p."""
    keys = mix(row_keys, site).view(-1, *([1] * (len(shape) - 1)))
    index = torch.arange(int(torch.tensor(shape[1:]).prod()) if len(shape) > 1 else 1, device=row_keys.device)
    index = index.view(shape[1:]) if len(shape) > 1 else index.view(())
    bits = hash32(hash32(index ^ keys) ^ (keys * 0x9E37 & _M32))
    return bits >= int(p * 2**32)


def keyed_dropout_reference(x: torch.Tensor, row_keys: torch.Tensor, site: int, p: float) -> torch.Tensor:
    """``x`` with the elements ``keep_mask`` drops zeroed and the rest divided by ``1 - p``."""
    return x * keep_mask(row_keys.to(x.device), site, x.shape, p).to(x.dtype) / (1 - p)
