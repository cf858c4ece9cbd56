"""One reusable buffer per (device, dtype) that the large-M 4-bit path dequantizes weights into.

Each layer call dequantizes its weight, hands it to cuBLAS and is done with it before the next
layer's kernel runs (same stream, stream order), so one buffer sized to the largest weight serves
every layer: the bf16 copy of the base never exists for more than one layer at a time, and the
caching allocator sees no churn of weight-sized blocks. A caller on another CUDA stream must not
share it (mtpeft runs every layer on the current stream).
"""

from __future__ import annotations

import torch

_BUFFERS: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def dequant_workspace(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A contiguous ``[rows, cols]`` view of the shared buffer (grown when too small; contents undefined)."""
    key = (torch.device(device), dtype)
    need = rows * cols
    buf = _BUFFERS.get(key)
    if buf is None or buf.numel() < need:
        _BUFFERS.pop(key, None)
        buf = torch.empty(need, dtype=dtype, device=device)
        _BUFFERS[key] = buf
    return buf[:need].view(rows, cols)
