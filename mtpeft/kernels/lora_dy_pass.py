"""LoRA's two rank-r products of the output gradient in one pass over it.

``g = s·dy·B`` ([M, r], the gradient flowing into ``x·Aᵀ``) and ``dB = s·dyᵀ·xa`` ([N, r]) both read
dy, the largest tensor of a LoRA layer's backward (M×N; 64 MiB in bf16 at M=8192, N=4096). Two
cuBLAS calls read it twice; this kernel reads each dy tile once and feeds both products from
registers. Each program owns a BLOCK_N-column slab of dy over a range of rows: it keeps its slab's
part of dB in registers across its rows, and writes its slab's part of g per row tile. Partial sums
are fp32 (``N / BLOCK_N`` of g, one per row range of dB: ~13 MB at M=8192, N=4096, mostly L2) and
are summed in torch in a fixed order: deterministic, no atomics.

With ``dy_ext`` ([M, N + r]) the kernel also copies dy into its first N columns as it reads it, and
the caller puts g in the last r: then ``dx = dy_ext · [W; A]`` is ONE GEMM with the LoRA tail
folded in, instead of ``dy·W`` plus an ``addmm_`` that reads and writes dx once more.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from mtpeft.kernels.backend import empty_output, interpreter_enabled
from mtpeft.kernels.lora_dy_pass_reference import lora_dy_pass_reference
from mtpeft.kernels.triton_compat import dot

# (BLOCK_M, BLOCK_N, num_warps) per activation dtype, each without spills on sm_90a (bench/sass_report.py):
# fp32's products run on FFMA, whose operand tiles need smaller blocks.
TILES = {"16-bit": (64, 256, 8), "fp32": (32, 64, 4)}
NUM_STAGES = 3
TARGET_PROGRAMS = 264  # two per SM on an H100 / H200


@triton.jit
def lora_dy_pass_kernel(dy_ptr, b_ptr, xa_ptr, g_part_ptr, db_part_ptr, dy_out_ptr, M, N, R, rows_per_split,
                        stride_dym, stride_dyn, stride_bn, stride_br, stride_xam, stride_xar, stride_outm,
                        COPY_DY: tl.constexpr, IEEE: tl.constexpr, BLOCK_R: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    n_ok = rn < N
    r_ok = rr < R
    b = tl.load(b_ptr + rn[:, None] * stride_bn + rr[None, :] * stride_br, mask=n_ok[:, None] & r_ok[None, :],
                other=0.0)
    db = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    m_start = split * rows_per_split
    m_stop = tl.minimum(m_start + rows_per_split, M)
    for m0 in range(m_start, m_stop, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        m_ok = rm < m_stop
        d = tl.load(dy_ptr + rm[:, None] * stride_dym + rn[None, :] * stride_dyn,
                    mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        xa = tl.load(xa_ptr + rm[:, None] * stride_xam + rr[None, :] * stride_xar,
                     mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        g = dot(d, b, tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32), IEEE)
        tl.store(g_part_ptr + (pid_n * M + rm[:, None]) * R + rr[None, :], g, mask=m_ok[:, None] & r_ok[None, :])
        db = dot(tl.trans(d), xa, db, IEEE)
        if COPY_DY:
            tl.store(dy_out_ptr + rm[:, None] * stride_outm + rn[None, :], d, mask=m_ok[:, None] & n_ok[None, :])
    tl.store(db_part_ptr + (split * N + rn[:, None]) * R + rr[None, :], db, mask=n_ok[:, None] & r_ok[None, :])


def tiles_for(dtype: torch.dtype) -> tuple[int, int, int]:
    return TILES["fp32" if dtype == torch.float32 else "16-bit"]


def row_splits(m: int, n: int, block_m: int, block_n: int) -> int:
    """Row ranges per column slab: about two programs per SM in all."""
    if interpreter_enabled():  # programs run one by one: two ranges are enough to test the reduction
        return min(2, triton.cdiv(m, block_m))
    return max(1, min(triton.cdiv(m, block_m), triton.cdiv(TARGET_PROGRAMS, triton.cdiv(n, block_n))))


def lora_dy_pass_triton(dy: torch.Tensor, lora_B: torch.Tensor, xa: torch.Tensor, scaling: float,
                        dy_ext: Optional[torch.Tensor] = None):
    """``(s·dy·B, s·dyᵀ·xa)`` as (``dy.dtype`` [M, r], fp32 [N, r]); dy [M, N] any strides.

    ``dy_ext`` (contiguous [M, N + r], dy's dtype): filled with ``[dy, g]``."""
    m, n = dy.shape
    r = lora_B.shape[1]
    block_m, block_n, warps = tiles_for(dy.dtype)
    slabs = triton.cdiv(n, block_n)
    splits = row_splits(m, n, block_m, block_n) if m > 0 else 1
    per_split = triton.cdiv(triton.cdiv(m, splits), block_m) * block_m if m > 0 else block_m
    splits = max(1, triton.cdiv(m, per_split))
    g_part = empty_output((slabs, m, r), torch.float32, dy.device)
    db_part = empty_output((splits, n, r), torch.float32, dy.device)
    if dy_ext is not None and (dy_ext.shape != (m, n + r) or not dy_ext.is_contiguous() or dy_ext.dtype != dy.dtype):
        raise ValueError(f"lora_dy_pass: dy_ext must be a contiguous {dy.dtype} [{m}, {n + r}] tensor")
    if m > 0:
        lora_dy_pass_kernel[(slabs, splits)](
            dy, lora_B, xa, g_part, db_part, dy_ext if dy_ext is not None else dy, m, n, r, per_split,
            dy.stride(0), dy.stride(1), lora_B.stride(0), lora_B.stride(1), xa.stride(0), xa.stride(1),
            n + r if dy_ext is not None else 0,
            COPY_DY=dy_ext is not None, IEEE=dy.dtype == torch.float32, BLOCK_R=max(16, triton.next_power_of_2(r)),
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=NUM_STAGES)
        g = (g_part.sum(0) * scaling).to(dy.dtype)
        db = db_part.sum(0) * scaling
    else:
        g = torch.zeros(0, r, dtype=dy.dtype, device=dy.device)
        db = torch.zeros(n, r, dtype=torch.float32, device=dy.device)
    if dy_ext is not None:
        dy_ext[:, n:] = g
    return g, db


__all__ = ["lora_dy_pass_triton", "lora_dy_pass_reference"]
