"""Forward of the 4-bit linear layer for few rows (decoding, evaluation, tiny micro-batches).

With M ≤ 64 rows the layer is bound by reading the weight: 4-bit moves 3.7× fewer bytes than
bf16, so the kernel's job is to keep the decode cheap and every SM busy. Three choices, each read
off the sm_90a SASS (``bench/sass_report.py``):

- **Swapped operands**: ``yᵀ[N, M] = deq(W)[N, K] · xᵀ[K, M]``. The decoded weight tile is wgmma's
  A operand straight from registers (the rows of W fill the 64-row MMA, the few tokens its 16..64
  columns); the old orientation put 16 tokens in the MMA's rows, got mma.sync only, and staged
  every decoded tile through shared memory.
- **No nibble interleave**: a dot product does not care about the order of K, so each packed byte
  tile gives two half tiles, the high nibbles (even columns) and the low nibbles (odd columns),
  each multiplied with the matching strided half of x. The code table is a register tensor
  (``tl.gather``: one conflict-free shared-memory load per element). ~7–8 instructions per weight
  element against ~12.6 for the row-major fused kernel.
- **Split-K**: N / BLOCK_N tiles alone leave most of 132 SMs idle (32 programs at N = 4096), so K is
  split until about two programs per SM. Partial sums (fp32) are reduced **in a fixed order** by
  the last program of each tile to arrive (an atomic ticket per tile, acquire/release), which
  then adds the LoRA term (exact by linearity: it is added once), bias and IA3 and writes y. One
  launch, deterministic, no zero-filled output.

Used by ``NF4LoRALinearFunction`` when K is a multiple of BLOCK_K (every LLM width; otherwise the
row-major fused kernel runs). The tickets live in a per-device counter buffer that every program
resets after use; launches on one stream never overlap (do not share it across streams).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mtpeft.kernels.backend import empty_output, interpreter_enabled
from mtpeft.kernels.triton_compat import cast, dot

BLOCK_N = 64
BLOCK_K = 128
NUM_WARPS = 4
NUM_STAGES = 3
MAX_ROWS = 64
TARGET_PROGRAMS = 264  # two per SM on an H100 / H200 (132 SMs)


@triton.jit
def nf4_half_tiles(packed_ptr, absmax_ptr, code_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset,
                   rows, row_ok, k0, K, row_bytes, BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr,
                   DOUBLE_QUANT: tl.constexpr):
    """fp32 ``(W[rows, k0::2], W[rows, k0+1::2])`` over ``k0 .. k0 + BLOCK_K``: the high and the low
    nibbles of the tile's packed bytes, each times its NF4 block's absmax (K, k0 multiples of the
    blocksize, so every row of the tile holds whole blocks)."""
    HALF: tl.constexpr = BLOCK_K // 2
    ROWS: tl.constexpr = rows.shape[0]
    pairs = k0 // 2 + tl.arange(0, HALF)
    byte = tl.load(packed_ptr + rows[:, None] * row_bytes + pairs[None, :], mask=row_ok[:, None],
                   other=0).to(tl.int32)
    code = tl.load(code_ptr + tl.arange(0, 16))
    hi = tl.gather(code, tl.reshape(byte >> 4, (ROWS * HALF,)), 0)
    lo = tl.gather(code, tl.reshape(byte & 15, (ROWS * HALF,)), 0)
    NB: tl.constexpr = BLOCK_K // BLOCKSIZE
    block = rows[:, None] * (K // BLOCKSIZE) + (k0 // BLOCKSIZE + tl.arange(0, NB))[None, :]
    if DOUBLE_QUANT:
        absmax_q = tl.load(absmax_ptr + block, mask=row_ok[:, None], other=0).to(tl.int32)
        scale = tl.load(absmax_scale_ptr + block // 256, mask=row_ok[:, None], other=0.0)  # bnb's nested block
        absmax = tl.load(absmax_code_ptr + absmax_q) * scale + absmax_offset
    else:
        absmax = tl.load(absmax_ptr + block, mask=row_ok[:, None], other=0.0)
    hi = tl.reshape(tl.reshape(hi, (ROWS, NB, BLOCKSIZE // 2)) * absmax[:, :, None], (ROWS, HALF))
    lo = tl.reshape(tl.reshape(lo, (ROWS, NB, BLOCKSIZE // 2)) * absmax[:, :, None], (ROWS, HALF))
    return hi, lo


@triton.jit
def nf4_lora_fwd_split_k_kernel(x_ptr, xa_ptr, b_ptr, y_ptr, ypre_ptr, bias_ptr, ia3_ptr,
                                packed_ptr, absmax_ptr, code_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset,
                                lora_scale, part_ptr, ticket_ptr,
                                M, N, K, R, row_bytes, k_per_split,
                                stride_xm, stride_xk, stride_am, stride_ar, stride_bn, stride_br,
                                stride_ym, stride_yn,
                                HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_IA3: tl.constexpr,
                                STORE_PRE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, BLOCKSIZE: tl.constexpr,
                                IEEE: tl.constexpr, BLOCK_R: tl.constexpr, SPLIT_K: tl.constexpr,
                                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    split = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    half = tl.arange(0, BLOCK_K // 2)
    n_ok = rn < N
    m_ok = rm < M
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    k_start = split * k_per_split
    k_stop = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_stop, BLOCK_K):
        w_even, w_odd = nf4_half_tiles(packed_ptr, absmax_ptr, code_ptr, absmax_code_ptr, absmax_scale_ptr,
                                       absmax_offset, rn, n_ok, k0, K, row_bytes, BLOCK_K, BLOCKSIZE, DOUBLE_QUANT)
        cols = k0 + 2 * half
        x_even = tl.load(x_ptr + rm[None, :] * stride_xm + cols[:, None] * stride_xk, mask=m_ok[None, :], other=0.0)
        x_odd = tl.load(x_ptr + rm[None, :] * stride_xm + (cols + 1)[:, None] * stride_xk, mask=m_ok[None, :],
                        other=0.0)
        acc = dot(cast(w_even, dtype), x_even, acc, IEEE)
        acc = dot(cast(w_odd, dtype), x_odd, acc, IEEE)
    last = True
    if SPLIT_K > 1:
        tile = pid_m * tl.num_programs(0) + pid_n
        cell = tl.arange(0, BLOCK_N)[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
        tiles = tl.num_programs(0) * tl.num_programs(1)
        tl.store(part_ptr + (split * tiles + tile) * (BLOCK_N * BLOCK_M) + cell, acc)
        ticket = tl.atomic_add(ticket_ptr + tile, 1, sem="acq_rel")
        last = ticket == SPLIT_K - 1
        if last:  # every other split's partial is visible (acquire): sum them in split order
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for s in range(SPLIT_K):
                acc += tl.load(part_ptr + (s * tiles + tile) * (BLOCK_N * BLOCK_M) + cell, cache_modifier=".cg")
            tl.atomic_xchg(ticket_ptr + tile, 0)  # ready for the next launch
    if last:
        if HAS_LORA:
            rr = tl.arange(0, BLOCK_R)
            for r0 in range(0, R, BLOCK_R):
                r_ok = (r0 + rr) < R
                b = tl.load(b_ptr + rn[:, None] * stride_bn + (r0 + rr)[None, :] * stride_br,
                            mask=n_ok[:, None] & r_ok[None, :], other=0.0)
                xa_t = tl.load(xa_ptr + rm[None, :] * stride_am + (r0 + rr)[:, None] * stride_ar,
                               mask=m_ok[None, :] & r_ok[:, None], other=0.0)
                acc = dot(b, cast(xa_t.to(tl.float32) * lora_scale, dtype), acc, IEEE)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        out = rm[None, :] * stride_ym + rn[:, None] * stride_yn
        out_ok = m_ok[None, :] & n_ok[:, None]
        if STORE_PRE:
            tl.store(ypre_ptr + out, cast(acc, ypre_ptr.dtype.element_ty), mask=out_ok)
        if HAS_IA3:
            acc *= tl.load(ia3_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(y_ptr + out, cast(acc, y_ptr.dtype.element_ty), mask=out_ok)


_TICKETS: dict[torch.device, torch.Tensor] = {}


def _tickets(count: int, device: torch.device) -> torch.Tensor:
    buf = _TICKETS.get(device)
    if buf is None or buf.numel() < count:
        buf = torch.zeros(max(count, 1024), dtype=torch.int32, device=device)
        _TICKETS[device] = buf
    return buf


def block_m_for(m: int) -> int:
    return max(16, triton.next_power_of_2(m))


def applies(m: int, k: int, blocksize: int) -> bool:
    """Whether this kernel serves the shape: few rows, K whole tiles of whole NF4 blocks."""
    return 0 < m <= MAX_ROWS and BLOCK_K % blocksize == 0 and k % BLOCK_K == 0


def split_count(m: int, n: int, k: int) -> int:
    tiles = triton.cdiv(n, BLOCK_N) * triton.cdiv(m, block_m_for(m))
    steps = k // BLOCK_K
    if interpreter_enabled():  # programs run one by one: split in two, enough to test the reduction
        return min(2, steps)
    return max(1, min(steps, triton.cdiv(TARGET_PROGRAMS, tiles)))


def launch_split_k(x2, xa, b_cast, y, ypre, bias, ia3, qargs, scaling: float, m: int, n: int, k: int, r: int,
                   double_quant: bool, blocksize: int, has_lora: bool, store_pre: bool, block_r: int) -> None:
    """Write y (and ypre) for ``x2`` [m, k] (``applies(m, k, blocksize)`` must hold)."""
    bm = block_m_for(m)
    splits = split_count(m, n, k)
    per_split = triton.cdiv(k // BLOCK_K, splits) * BLOCK_K
    splits = triton.cdiv(k, per_split)
    grid = (triton.cdiv(n, BLOCK_N), triton.cdiv(m, bm), splits)
    tiles = grid[0] * grid[1]
    part = empty_output((splits * tiles * BLOCK_N * bm,), torch.float32, x2.device) if splits > 1 else y
    nf4_lora_fwd_split_k_kernel[grid](
        x2, xa if has_lora else x2, b_cast if has_lora else x2, y, ypre,
        bias if bias is not None else y, ia3 if ia3 is not None else y, *qargs, scaling,
        part, _tickets(tiles, x2.device), m, n, k, r, k // 2, per_split,
        x2.stride(0), x2.stride(1), xa.stride(0) if has_lora else 0, xa.stride(1) if has_lora else 0,
        b_cast.stride(0) if has_lora else 0, b_cast.stride(1) if has_lora else 0, y.stride(0), y.stride(1),
        HAS_LORA=has_lora, HAS_BIAS=bias is not None, HAS_IA3=ia3 is not None, STORE_PRE=store_pre,
        DOUBLE_QUANT=double_quant, BLOCKSIZE=blocksize, IEEE=x2.dtype == torch.float32, BLOCK_R=block_r,
        SPLIT_K=splits, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_M=bm, num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )
