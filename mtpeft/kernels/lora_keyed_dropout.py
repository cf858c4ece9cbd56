"""LoRA's rank-r products with keyed dropout applied to x inside the kernels (x' never stored).

With LoRA dropout the branch reads ``x' = dropout(x)``. Materialized, x' costs a pass to write it,
a pass to read it for ``x'·Aᵀ``, its memory until backward, and in backward ``g·A`` written at full
size, dropout's backward and autograd's accumulation into dx. mtpeft's dropout mask is a hash of
(row key, index) (``keyed_dropout``), so each kernel here regenerates it for its tile of x:

- ``dropout_xa``: ``xa = x'·Aᵀ`` ([M, r]), x read once;
- ``dropout_tail``: ``dx += keep ⊙ (g·A) / (1 - p)`` in place on the dx the base GEMM wrote;
- ``dropout_da``: ``dA = gᵀ·x'`` ([r, K]), x read once.

Rows of the 2-D view ``x2 = x.reshape(-1, K)`` map to example ``b = row // T`` and index
``(row % T)·K + k`` of ``keep_mask`` over ``x``'s shape ``[B, T, K]``, so the masks are exactly the
ones ``keyed_dropout`` draws (kept values are multiplied by ``1 / (1 - p)`` rather than divided:
within one rounding). Partial sums over split axes are fp32 and summed in torch in a fixed
order (deterministic).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from mtpeft.kernels.backend import empty_output, interpreter_enabled
from mtpeft.kernels.keyed_dropout import lowbias32
from mtpeft.kernels.keyed_dropout_reference import mix
from mtpeft.kernels.triton_compat import cast, dot

# (BLOCK_M, BLOCK_K) per activation dtype, without spills on sm_90a (fp32 products run on FFMA)
TILES = {"16-bit": (64, 64), "fp32": (32, 32)}
NUM_WARPS = 4
NUM_STAGES = 3
TARGET_PROGRAMS = 264


@dataclasses.dataclass
class KeyedMask:
    """What the kernels need to redraw ``keyed_dropout(x, row_keys, site, p)``'s mask."""

    row_keys: torch.Tensor  # int64 [B], one per example (x's first dimension)
    site: int
    p: float

    def mixed_keys(self, device: torch.device) -> torch.Tensor:
        return mix(self.row_keys.to(device), self.site)

    def threshold_signed(self) -> int:
        return int(self.p * 2**32) - 2**31


@triton.jit
def keep_of(key_ptr, rm, cols, m_ok, T, K, threshold_signed):
    """The keyed mask for rows rm (example rm // T, index (rm % T)·K + col) and columns cols."""
    key = tl.load(key_ptr + rm // T, mask=m_ok, other=0).to(tl.uint32)
    index = ((rm % T) * K)[:, None] + cols[None, :]
    salt = key * tl.full((), 0x9E37, tl.uint32)
    bits = lowbias32(lowbias32(index.to(tl.uint32) ^ key[:, None]) ^ salt[:, None])
    return (bits ^ tl.full((), 0x80000000, tl.uint32)).to(tl.int32, bitcast=True) >= threshold_signed


@triton.jit
def dropped(v, keep, keep_scale, dtype: tl.constexpr):
    """``v·keep·(1 / (1 - p))`` in fp32, rounded once to ``dtype``. A product by the reciprocal rather
    than keyed_dropout's IEEE division (which costs ~15 instructions per element here, a third of
    the kernel): within one rounding of it, on the same mask."""
    return cast(v.to(tl.float32) * tl.where(keep, keep_scale, 0.0), dtype)


@triton.jit
def dropped_x_tile(x_ptr, key_ptr, rm, cols, m_ok, k_ok, T, K, stride_xm, threshold_signed, keep_scale):
    """``dropout(x)[rm, cols]`` in x's dtype, the mask redrawn from the keys."""
    x = tl.load(x_ptr + rm[:, None] * stride_xm + cols[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
    keep = keep_of(key_ptr, rm, cols, m_ok, T, K, threshold_signed)
    return dropped(x, keep, keep_scale, x_ptr.dtype.element_ty)


@triton.jit
def dropout_xa_kernel(x_ptr, key_ptr, a_ptr, part_ptr, M, K, T, R, k_per_split, stride_xm, stride_ar,
                      threshold_signed, keep_scale, IEEE: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Partial ``dropout(x)·Aᵀ`` over one K range: part[split] = x'[rows, range]·A[:, range]ᵀ."""
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    m_ok = rm < M
    r_ok = rr < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    k_start = split * k_per_split
    k_stop = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_stop, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        k_ok = cols < k_stop
        xk = dropped_x_tile(x_ptr, key_ptr, rm, cols, m_ok, k_ok, T, K, stride_xm, threshold_signed, keep_scale)
        at = tl.load(a_ptr + rr[None, :] * stride_ar + cols[:, None], mask=r_ok[None, :] & k_ok[:, None], other=0.0)
        acc = dot(xk, at, acc, IEEE)
    tl.store(part_ptr + (split * M + rm[:, None]) * R + rr[None, :], acc, mask=m_ok[:, None] & r_ok[None, :])


@triton.jit
def dropout_tail_kernel(dx_ptr, g_ptr, a_ptr, key_ptr, M, K, T, R, stride_dxm, stride_gm, stride_ar,
                        threshold_signed, keep_scale, IEEE: tl.constexpr, BLOCK_R: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """``dx += dropout_backward(g·A)`` in place: g·A rounded to dx's dtype (as autograd holds it),
    masked and divided like keyed_dropout's backward, then added (autograd's accumulation)."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    m_ok = rm < M
    k_ok = cols < K
    r_ok = rr < R
    dtype = dx_ptr.dtype.element_ty
    g = tl.load(g_ptr + rm[:, None] * stride_gm + rr[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
    a = tl.load(a_ptr + rr[:, None] * stride_ar + cols[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
    tail = cast(dot(g, a, tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32), IEEE), dtype)
    tail = dropped(tail, keep_of(key_ptr, rm, cols, m_ok, T, K, threshold_signed), keep_scale, dtype)
    offsets = rm[:, None] * stride_dxm + cols[None, :]
    ok = m_ok[:, None] & k_ok[None, :]
    dx = tl.load(dx_ptr + offsets, mask=ok, other=0.0)
    tl.store(dx_ptr + offsets, cast(dx.to(tl.float32) + tail.to(tl.float32), dtype), mask=ok)


@triton.jit
def dropout_da_kernel(x_ptr, key_ptr, g_ptr, part_ptr, M, K, T, R, m_per_split, stride_xm, stride_gm,
                      threshold_signed, keep_scale, IEEE: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Partial ``gᵀ·dropout(x)`` over one row range: part[split] = g[range]ᵀ·x'[range, cols]."""
    pid_k = tl.program_id(0)
    split = tl.program_id(1)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    k_ok = cols < K
    r_ok = rr < R
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    m_start = split * m_per_split
    m_stop = tl.minimum(m_start + m_per_split, M)
    for m0 in range(m_start, m_stop, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        m_ok = rm < m_stop
        xk = dropped_x_tile(x_ptr, key_ptr, rm, cols, m_ok, k_ok, T, K, stride_xm, threshold_signed, keep_scale)
        gt = tl.load(g_ptr + rm[None, :] * stride_gm + rr[:, None], mask=m_ok[None, :] & r_ok[:, None], other=0.0)
        acc = dot(gt, xk, acc, IEEE)
    tl.store(part_ptr + (split * R + rr[:, None]) * K + cols[None, :], acc, mask=r_ok[:, None] & k_ok[None, :])


def _splits(tiles: int, steps: int) -> int:
    if interpreter_enabled():
        return min(2, steps)
    return max(1, min(steps, triton.cdiv(TARGET_PROGRAMS, max(tiles, 1))))


def tiles_for(dtype: torch.dtype) -> tuple[int, int]:
    return TILES["fp32" if dtype == torch.float32 else "16-bit"]


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def dropout_xa(x2: torch.Tensor, lora_A: torch.Tensor, mask: KeyedMask, keys: torch.Tensor, rows_per_example: int):
    """``dropout(x)·Aᵀ`` ([M, r], x2's dtype) for x2 = x.reshape(-1, K), contiguous rows."""
    m, k = x2.shape
    r = lora_A.shape[0]
    block_m, block_k = tiles_for(x2.dtype)
    tiles = triton.cdiv(m, block_m)
    splits = _splits(tiles, triton.cdiv(k, block_k))
    per_split = triton.cdiv(triton.cdiv(k, block_k), splits) * block_k
    splits = triton.cdiv(k, per_split)
    part = empty_output((splits, m, r), torch.float32, x2.device)
    if m:
        dropout_xa_kernel[(tiles, splits)](x2, keys, lora_A, part, m, k, rows_per_example, r, per_split, x2.stride(0),
                                           lora_A.stride(0), mask.threshold_signed(), 1.0 / (1.0 - mask.p),
                                           IEEE=x2.dtype == torch.float32, BLOCK_R=_block_r(r), BLOCK_M=block_m,
                                           BLOCK_K=block_k, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return part.sum(0).to(x2.dtype)


def dropout_tail_(dx: torch.Tensor, g: torch.Tensor, lora_A: torch.Tensor, mask: KeyedMask, keys: torch.Tensor,
                  rows_per_example: int) -> torch.Tensor:
    """``dx += dropout_backward(g·A)`` in place (dx contiguous [M, K]); returns dx."""
    m, k = dx.shape
    r = lora_A.shape[0]
    block_m, block_k = tiles_for(dx.dtype)
    if m:
        grid = (triton.cdiv(m, block_m), triton.cdiv(k, block_k))
        dropout_tail_kernel[grid](dx, g, lora_A, keys, m, k, rows_per_example, r, dx.stride(0), g.stride(0),
                                  lora_A.stride(0), mask.threshold_signed(), 1.0 / (1.0 - mask.p),
                                  IEEE=dx.dtype == torch.float32, BLOCK_R=_block_r(r), BLOCK_M=block_m,
                                  BLOCK_K=block_k, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return dx


def dropout_da(x2: torch.Tensor, g: torch.Tensor, mask: KeyedMask, keys: torch.Tensor,
               rows_per_example: int) -> torch.Tensor:
    """``gᵀ·dropout(x)`` ([r, K], fp32)."""
    m, k = x2.shape
    r = g.shape[1]
    block_m, block_k = tiles_for(x2.dtype)
    tiles = triton.cdiv(k, block_k)
    splits = _splits(tiles, triton.cdiv(m, block_m))
    per_split = triton.cdiv(triton.cdiv(m, block_m), splits) * block_m
    splits = max(1, triton.cdiv(m, per_split))
    part = empty_output((splits, r, k), torch.float32, x2.device)
    if not m:
        return torch.zeros(r, k, dtype=torch.float32, device=x2.device)
    dropout_da_kernel[(tiles, splits)](x2, keys, g, part, m, k, rows_per_example, r, per_split, x2.stride(0),
                                       g.stride(0), mask.threshold_signed(), 1.0 / (1.0 - mask.p),
                                       IEEE=x2.dtype == torch.float32, BLOCK_R=_block_r(r), BLOCK_M=block_m,
                                       BLOCK_K=block_k, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return part.sum(0)
