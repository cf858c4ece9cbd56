"""LoRA's two rank-r products of the output gradient in one pass over it.

``g = s·dy·B`` ([M, r], the gradient flowing into ``x·Aᵀ``) and ``dB = s·dyᵀ·xa`` ([N, r]) both read
dy, the largest tensor of a LoRA layer's backward (M×N; 64 MiB in bf16 at M=8192, N=4096). Two
cuBLAS calls read it twice; this kernel reads each dy tile once and feeds both products from
registers. Programs own a BLOCK_M × (N / SPLIT_N) slab of dy: each writes its part of g (fp32, summed
over SPLIT_N afterwards) and its rows' contribution to dB (fp32, summed over the row tiles
afterwards). The sums run in torch in a fixed order, so the result is deterministic (no atomics),
and the partial sums are small (M·r and N·r per slab) and mostly stay in L2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mtpeft.kernels.backend import empty_output, interpreter_enabled
from mtpeft.kernels.lora_dy_pass_reference import lora_dy_pass_reference
from mtpeft.kernels.triton_compat import dot

BLOCK_M = 64
BLOCK_N = 64
NUM_WARPS = 4
NUM_STAGES = 3


@triton.jit
def lora_dy_pass_kernel(dy_ptr, b_ptr, xa_ptr, g_part_ptr, db_part_ptr, M, N, R, n_per_split,
                        stride_dym, stride_dyn, stride_bn, stride_br, stride_xam, stride_xar,
                        IEEE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    m_ok = rm < M
    r_ok = rr < R
    xa = tl.load(xa_ptr + rm[:, None] * stride_xam + rr[None, :] * stride_xar,
                 mask=m_ok[:, None] & r_ok[None, :], other=0.0)
    g = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    n_start = split * n_per_split
    n_stop = tl.minimum(n_start + n_per_split, N)
    for n0 in range(n_start, n_stop, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        n_ok = rn < n_stop
        d = tl.load(dy_ptr + rm[:, None] * stride_dym + rn[None, :] * stride_dyn,
                    mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        b = tl.load(b_ptr + rn[:, None] * stride_bn + rr[None, :] * stride_br,
                    mask=n_ok[:, None] & r_ok[None, :], other=0.0)
        g = dot(d, b, g, IEEE)
        db = dot(tl.trans(d), xa, tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32), IEEE)
        tl.store(db_part_ptr + (pid_m * N + rn[:, None]) * R + rr[None, :], db,
                 mask=n_ok[:, None] & r_ok[None, :])
    tl.store(g_part_ptr + (split * M + rm[:, None]) * R + rr[None, :], g, mask=m_ok[:, None] & r_ok[None, :])


def split_n(m: int, n: int) -> int:
    """Column slabs per row tile: enough programs to cover an H100/H200's 132 SMs twice."""
    tiles = triton.cdiv(m, BLOCK_M)
    return max(1, min(triton.cdiv(n, BLOCK_N), triton.cdiv(264, tiles)))


def lora_dy_pass_triton(dy: torch.Tensor, lora_B: torch.Tensor, xa: torch.Tensor, scaling: float):
    """``(s·dy·B, s·dyᵀ·xa)`` as (``dy.dtype`` [M, r], fp32 [N, r]); dy [M, N] any strides."""
    m, n = dy.shape
    r = lora_B.shape[1]
    if interpreter_enabled():
        splits = 2 if n > BLOCK_N else 1  # the interpreter runs programs one by one: keep it short
    else:
        splits = split_n(m, n)
    per_split = triton.cdiv(triton.cdiv(n, splits), BLOCK_N) * BLOCK_N
    splits = triton.cdiv(n, per_split)
    tiles = triton.cdiv(m, BLOCK_M)
    g_part = empty_output((splits, m, r), torch.float32, dy.device)
    db_part = empty_output((tiles, n, r), torch.float32, dy.device)
    if m > 0:
        lora_dy_pass_kernel[(tiles, splits)](
            dy, lora_B, xa, g_part, db_part, m, n, r, per_split,
            dy.stride(0), dy.stride(1), lora_B.stride(0), lora_B.stride(1), xa.stride(0), xa.stride(1),
            IEEE=dy.dtype == torch.float32, BLOCK_R=max(16, triton.next_power_of_2(r)),
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    g = (g_part.sum(0) * scaling).to(dy.dtype)
    db = db_part.sum(0) * scaling if m > 0 else torch.zeros(n, r, dtype=torch.float32, device=dy.device)
    return g, db


__all__ = ["lora_dy_pass_triton", "lora_dy_pass_reference"]
