"""The NF4 storage format, bit-compatible with bitsandbytes (DESIGN contract 3).

Layout (all along the flattened row-major ``[out, in]`` weight):
  * ``packed``: uint8 ``[ceil(numel / 2)]``; element ``2i`` in the high nibble, ``2i+1`` in the low.
    Each nibble indexes the 16-entry NF4 code table.
  * blocks of ``blocksize`` (64) consecutive elements share one absmax.
  * without double quantization: ``absmax`` is fp32 ``[nblocks]``.
  * with double quantization: ``absmax`` is uint8 ``[nblocks]`` codes into ``absmax_code`` (the
    256-entry dynamic map), scaled per block of 256 by ``absmax_scale`` (fp32) and shifted by
    ``absmax_offset``: ``real_absmax[j] = absmax_code[absmax[j]] * absmax_scale[j // 256] + offset``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class NF4Weight:
    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    absmax_scale: Optional[torch.Tensor] = None
    absmax_code: Optional[torch.Tensor] = None
    absmax_offset: Optional[float] = None

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n
