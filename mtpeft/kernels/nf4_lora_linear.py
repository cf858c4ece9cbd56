"""The NF4 base + LoRA (+ IA3) linear layer: its entry point and dispatch, and the fused path.

``nf4_lora_linear`` dispatches (``backend.nf4_path``): the torch reference on CPU; on Triton, up to
``backend.fused_max_m()`` rows the fused kernels below (the forward through ``nf4_split_k`` when K
is a multiple of its tile), above it ``nf4_lora_linear_dequant`` (dequantize into a reused buffer,
then cuBLAS). The fused path, for the few rows of decoding and evaluation:

Forward ``y = (x·deq(W)ᵀ + s·(x·Aᵀ)·Bᵀ + bias) * ia3`` as ONE GEMM over the concatenated
reduction axis ``[x, s·xA] @ [W; B]ᵀ``: the K loop dequantizes W tiles from packed nibbles and
per-block absmax in registers (the bf16 weight never reaches memory), then r more columns fold the
LoRA term into the same fp32 accumulator, so y is written once (no read-modify-write for the LoRA
add). Backward ``dx = dy'·deq(W) + s·(dy'·B)·A`` is the same idea with W read untransposed; the
tiny rank-r GEMMs (x·Aᵀ, dy'·B, dA, dB) stay in torch/cuBLAS. ``dy' = dy * ia3`` is never
materialized: ia3 is applied to dy tiles in-kernel and folded into B for the rank-r GEMMs.

NF4 blocks run along the flattened ``[N, K]`` weight (element (n, k) at flat index n*K + k), so the
prologue indexes by flat position and K needs no alignment to the blocksize.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from mtpeft.kernels.backend import as_output, empty_output, nf4_path, use_triton
from mtpeft.kernels.nf4_dequant import quant_kernel_args
from mtpeft.kernels.keyed_dropout import keyed_dropout
from mtpeft.kernels.lora_keyed_dropout import KeyedMask
from mtpeft.kernels.nf4_lora_linear_dequant import DequantNF4LoRALinearFunction
from mtpeft.kernels.nf4_split_k import applies as split_k_applies
from mtpeft.kernels.nf4_split_k import launch_split_k
from mtpeft.kernels.triton_compat import autotune_configs, cast, dot, grouped_tile
from mtpeft.kernels.nf4_lora_linear_reference import (WeightSource, check_weight_shape, nf4_lora_linear_reference,
                                                      resolve_weight)
from mtpeft.quant.nf4_format import NF4Weight

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) the autotuner may pick: every one compiles for
# sm_90a without spills and within shared memory, with wgmma from BLOCK_M = 64 up (the static gate,
# tests/kernels/test_kernel_static_gate.py; the table: bench/sass_report.py).
# Dropped by the gate: 128×256×64 (239,616 B of shared memory), 128×128×64 at 4 warps, 16×64×256 and
# 32×32×256 (their dx variants spill).
GEMM_TILES = [
    (128, 128, 64, 8, 3), (256, 128, 64, 8, 3), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4),
    (16, 32, 128, 4, 4), (16, 64, 128, 4, 4), (16, 32, 256, 4, 3), (32, 64, 128, 4, 4),
]
# 64-wide under the interpreter, so the tests reach the blocksize-aligned absmax path (K a multiple of 64)
INTERPRETER_TILE = (16, 64, 64)


def _prune_by_m(configs, named_args, **kwargs):
    """Tiles much taller than M only waste the dequant work; keep those that fit the batch."""
    m = named_args["M_BUCKET"]
    cap = max(16, m)
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= cap and (m > 64 or c.kwargs["BLOCK_M"] <= 32)]
    return kept or configs[:1]


@triton.jit
def _block_absmax(block, mask, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset,
                  DOUBLE_QUANT: tl.constexpr):
    """fp32 absmax of NF4 blocks ``block``, undoing the double quantization in registers."""
    if DOUBLE_QUANT:
        absmax_q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(absmax_scale_ptr + block // 256, mask=mask, other=0.0)  # bnb's nested block
        absmax = tl.load(absmax_code_ptr + absmax_q) * scale + absmax_offset
    else:
        absmax = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return absmax


@triton.jit
def _nf4_tile(packed_ptr, absmax_ptr, code_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset,
              rows, row_ok, k0, K, row_bytes, BLOCK_C: tl.constexpr, BLOCKSIZE: tl.constexpr,
              DOUBLE_QUANT: tl.constexpr, PAIRED: tl.constexpr, ALIGNED: tl.constexpr):
    """fp32 ``W[rows, k0:k0+BLOCK_C]`` decoded in registers, 0 outside the matrix.

    PAIRED (K even): every row starts on a byte, so the tile's bytes are one contiguous
    (vectorizable) [rows, BLOCK_C/2] load split into nibbles; otherwise each element fetches its
    byte by flat index. ALIGNED (K and BLOCK_C multiples of the blocksize): each tile row covers
    whole NF4 blocks, so absmax is a [rows, BLOCK_C/blocksize] load broadcast over its block instead
    of a per-element gather."""
    cols = k0 + tl.arange(0, BLOCK_C)
    flat = rows[:, None] * K + cols[None, :]
    mask = row_ok[:, None] & (cols < K)[None, :]
    if PAIRED:
        pairs = k0 // 2 + tl.arange(0, BLOCK_C // 2)
        byte = tl.load(packed_ptr + rows[:, None] * row_bytes + pairs[None, :],
                       mask=row_ok[:, None] & (pairs < row_bytes)[None, :], other=0).to(tl.int32)
        nibble = tl.interleave(byte >> 4, byte & 15)
    else:
        byte = tl.load(packed_ptr + (flat >> 1), mask=mask, other=0).to(tl.int32)
        nibble = tl.where((flat & 1) == 0, byte >> 4, byte & 15)
    # The 16-entry code table as a register tensor: tl.gather stages it once in 64 bytes of shared
    # memory, one word per bank, so the lookup is a conflict-free LDS instead of a global gather.
    code = tl.load(code_ptr + tl.arange(0, 16))
    value = tl.gather(code, tl.reshape(nibble, (rows.shape[0] * BLOCK_C,)), 0)
    value = tl.reshape(value, (rows.shape[0], BLOCK_C))
    if ALIGNED and (BLOCK_C % BLOCKSIZE == 0):
        NB: tl.constexpr = BLOCK_C // BLOCKSIZE
        blocks = k0 // BLOCKSIZE + tl.arange(0, NB)
        absmax = _block_absmax(rows[:, None] * (K // BLOCKSIZE) + blocks[None, :],
                               row_ok[:, None] & (blocks * BLOCKSIZE < K)[None, :],
                               absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset, DOUBLE_QUANT)
        w = tl.reshape(value, (rows.shape[0], NB, BLOCKSIZE)) * absmax[:, :, None]
        w = tl.reshape(w, (rows.shape[0], BLOCK_C))
    else:
        w = value * _block_absmax(flat // BLOCKSIZE, mask, absmax_ptr, absmax_code_ptr, absmax_scale_ptr,
                                  absmax_offset, DOUBLE_QUANT)
    return tl.where(mask, w, 0.0)


@triton.autotune(configs=autotune_configs(GEMM_TILES, INTERPRETER_TILE), key=["M_BUCKET", "N", "K", "R"],
                 prune_configs_by={"early_config_prune": _prune_by_m})
@triton.jit
def nf4_lora_fwd_kernel(x_ptr, xa_ptr, b_ptr, y_ptr, ypre_ptr, bias_ptr, ia3_ptr,
                packed_ptr, absmax_ptr, code_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset,
                lora_scale, M, N, K, R, M_BUCKET, row_bytes,
                stride_xm, stride_xk, stride_am, stride_ar, stride_bn, stride_br, stride_ym, stride_yn,
                HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_IA3: tl.constexpr,
                STORE_PRE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, BLOCKSIZE: tl.constexpr,
                PAIRED: tl.constexpr, ALIGNED: tl.constexpr, IEEE: tl.constexpr, BLOCK_R: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        a = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = _nf4_tile(packed_ptr, absmax_ptr, code_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset,
                      rn, n_ok, k0, K, row_bytes, BLOCK_K, BLOCKSIZE, DOUBLE_QUANT, PAIRED, ALIGNED)
        acc = dot(a, tl.trans(cast(w, dtype)), acc, IEEE)
    if HAS_LORA:
        rr = tl.arange(0, BLOCK_R)
        for r0 in range(0, R, BLOCK_R):
            r_ok = (r0 + rr) < R
            xa = tl.load(xa_ptr + rm[:, None] * stride_am + (r0 + rr)[None, :] * stride_ar,
                         mask=m_ok[:, None] & r_ok[None, :], other=0.0)
            xa = cast(xa.to(tl.float32) * lora_scale, dtype)
            bt = tl.load(b_ptr + rn[None, :] * stride_bn + (r0 + rr)[:, None] * stride_br,
                         mask=r_ok[:, None] & n_ok[None, :], other=0.0)
            acc = dot(xa, bt, acc, IEEE)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_offsets = rm[:, None] * stride_ym + rn[None, :] * stride_yn
    out_mask = m_ok[:, None] & n_ok[None, :]
    if STORE_PRE:
        tl.store(ypre_ptr + out_offsets, cast(acc, ypre_ptr.dtype.element_ty), mask=out_mask)
    if HAS_IA3:
        acc *= tl.load(ia3_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + out_offsets, cast(acc, y_ptr.dtype.element_ty), mask=out_mask)


@triton.autotune(configs=autotune_configs(GEMM_TILES, INTERPRETER_TILE), key=["M_BUCKET", "N", "K", "R"],
                 prune_configs_by={"early_config_prune": _prune_by_m})
@triton.jit
def nf4_lora_dx_kernel(dy_ptr, g_ptr, a_ptr, dx_ptr, ia3_ptr,
               packed_ptr, absmax_ptr, code_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset,
               M, N, K, R, M_BUCKET, row_bytes,
               stride_dym, stride_dyn, stride_gm, stride_gr, stride_ar, stride_ak, stride_dxm, stride_dxk,
               HAS_LORA: tl.constexpr, HAS_IA3: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
               BLOCKSIZE: tl.constexpr, PAIRED: tl.constexpr, ALIGNED: tl.constexpr, IEEE: tl.constexpr,
               BLOCK_R: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """dx[M, K] = (dy*ia3)[M, N] · deq(W)[N, K] + g[M, r] · A[r, K]; the tile grid runs over K, the
    reduction over N; BLOCK_N here is the reduction tile and BLOCK_K the output-column tile."""
    pid_m, pid_k = grouped_tile(M, K, BLOCK_M, BLOCK_N, GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = pid_k * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    k_ok = rk < K
    dtype = dy_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_K):
        nn = n0 + rn
        n_ok = nn < N
        d = tl.load(dy_ptr + rm[:, None] * stride_dym + nn[None, :] * stride_dyn,
                    mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        if HAS_IA3:
            d = cast(d.to(tl.float32) * tl.load(ia3_ptr + nn, mask=n_ok, other=0.0).to(tl.float32)[None, :], dtype)
        w = _nf4_tile(packed_ptr, absmax_ptr, code_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset,
                      nn, n_ok, pid_k * BLOCK_N, K, row_bytes, BLOCK_N, BLOCKSIZE, DOUBLE_QUANT, PAIRED,
                      ALIGNED)
        acc = dot(d, cast(w, dtype), acc, IEEE)
    if HAS_LORA:
        rr = tl.arange(0, BLOCK_R)
        for r0 in range(0, R, BLOCK_R):
            r_ok = (r0 + rr) < R
            g = tl.load(g_ptr + rm[:, None] * stride_gm + (r0 + rr)[None, :] * stride_gr,
                        mask=m_ok[:, None] & r_ok[None, :], other=0.0)
            a = tl.load(a_ptr + (r0 + rr)[:, None] * stride_ar + rk[None, :] * stride_ak,
                        mask=r_ok[:, None] & k_ok[None, :], other=0.0)
            acc = dot(g, a, acc, IEEE)
    tl.store(dx_ptr + rm[:, None] * stride_dxm + rk[None, :] * stride_dxk,
             cast(acc, dx_ptr.dtype.element_ty), mask=m_ok[:, None] & k_ok[None, :])


def _m_bucket(m: int) -> int:
    """Autotuning key for the token count: a power of two, so varying batch shapes reuse tunings."""
    return max(16, triton.next_power_of_2(m))


def _block_r(r: int) -> int:
    return min(64, max(16, triton.next_power_of_2(max(r, 1))))


class NF4LoRALinearFunction(torch.autograd.Function):
    """Triton path; the NF4 base is frozen (no grad), bias gets one only if it requires it.

    ``lora_x`` (None: x itself) is the LoRA branch's input when it differs from the base's, e.g.
    dropout(x): the LoRA term is then folded into the forward GEMM as usual, while dx leaves the
    fused kernel without the LoRA tail and d lora_x is returned separately for autograd to route."""

    @staticmethod
    def forward(ctx, x, lora_x, lora_A, lora_B, bias, ia3, source: WeightSource, scaling: float):
        qweight = resolve_weight(source)
        lead, k = x.shape[:-1], x.shape[-1]
        check_weight_shape(qweight, k)
        x2 = x.reshape(-1, k)
        m, n = x2.shape[0], int(qweight.shape[0])
        has_lora = lora_A is not None
        lx2 = x2 if lora_x is None else lora_x.reshape(-1, k)
        xa = None
        r = 0
        if has_lora:
            r = lora_A.shape[0]
            xa = lx2 @ lora_A.to(x.dtype).t()
            b_cast = lora_B.to(x.dtype)
        store_pre = ia3 is not None and ia3.requires_grad
        y = empty_output((m, n), x.dtype, x.device)
        ypre = empty_output((m, n), x.dtype, x.device) if store_pre else y
        qargs = quant_kernel_args(qweight, x.device)
        if m > 0 and split_k_applies(m, k, qweight.blocksize):
            launch_split_k(x2, xa, b_cast if has_lora else None, y, ypre, bias, ia3, qargs, scaling, m, n, k, r,
                           qweight.double_quant, qweight.blocksize, has_lora, store_pre, _block_r(r))
        elif m > 0:
            grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
            nf4_lora_fwd_kernel[grid](
                x2, xa if has_lora else x2, b_cast if has_lora else x2, y, ypre,
                bias if bias is not None else y, ia3 if ia3 is not None else y, *qargs,
                scaling, m, n, k, r, _m_bucket(m), k // 2,
                x2.stride(0), x2.stride(1),
                xa.stride(0) if has_lora else 0, xa.stride(1) if has_lora else 0,
                b_cast.stride(0) if has_lora else 0, b_cast.stride(1) if has_lora else 0,
                y.stride(0), y.stride(1),
                HAS_LORA=has_lora, HAS_BIAS=bias is not None, HAS_IA3=ia3 is not None,
                STORE_PRE=store_pre, DOUBLE_QUANT=qweight.double_quant, BLOCKSIZE=qweight.blocksize,
                PAIRED=k % 2 == 0, ALIGNED=k % qweight.blocksize == 0,
                IEEE=x.dtype == torch.float32, BLOCK_R=_block_r(r),
            )
        ctx.source, ctx.scaling, ctx.lead, ctx.has_lora = source, scaling, lead, has_lora
        ctx.n, ctx.k = n, k
        ctx.separate_lora_x = lora_x is not None
        ctx.dtypes = (lora_A.dtype if has_lora else None, lora_B.dtype if has_lora else None,
                      bias.dtype if bias is not None else None, ia3.dtype if ia3 is not None else None)
        need_a, need_b = ctx.needs_input_grad[2:4]
        ctx.save_for_backward(lx2 if has_lora and need_a else None, xa if need_b else None, lora_A, lora_B, ia3,
                              ypre if store_pre else None)
        return as_output(y, (*lead, n))  # not a view: the model may add into it in place

    @staticmethod
    def backward(ctx, dy):
        lx2, xa, lora_A, lora_B, ia3, ypre = ctx.saved_tensors
        s, n, k = ctx.scaling, ctx.n, ctx.k
        dy2 = dy.reshape(-1, n)  # any strides: the kernel takes them
        m = dy2.shape[0]
        dtype = dy2.dtype
        need_x, need_lx, need_a, need_b, need_bias, need_ia3 = ctx.needs_input_grad[:6]
        dx = d_lx = d_a = d_b = d_bias = d_ia3 = None
        g_scaled = a_cast = None
        r = 0
        if ctx.has_lora:
            r = lora_A.shape[0]
            b_eff = lora_B.to(dtype) if ia3 is None else (lora_B.float() * ia3.float()[:, None]).to(dtype)
            g_scaled = (dy2 @ b_eff) * s
            a_cast = lora_A.to(dtype)
            if need_a:
                d_a = (g_scaled.t() @ lx2).to(ctx.dtypes[0])
            if need_b:
                dyt_xa = dy2.t() @ xa
                if ia3 is not None:
                    dyt_xa = dyt_xa.float() * ia3.float()[:, None]
                d_b = (dyt_xa * s).to(ctx.dtypes[1])
            if need_lx:
                d_lx = (g_scaled @ a_cast).reshape(*ctx.lead, k)
        if need_bias:
            d_bias = (dy2.float().sum(0) * (ia3.float() if ia3 is not None else 1.0)).to(ctx.dtypes[2])
        if need_ia3:
            d_ia3 = (dy2.float() * ypre.float()).sum(0).to(ctx.dtypes[3])
        if need_x:
            lora_tail = ctx.has_lora and not ctx.separate_lora_x
            dx = empty_output((m, k), dtype, dy2.device)
            if m > 0:
                q = resolve_weight(ctx.source)  # only dx reads the weight
                qargs = quant_kernel_args(q, dy2.device)
                grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_N"]),)
                nf4_lora_dx_kernel[grid](
                    dy2, g_scaled if lora_tail else dy2, a_cast if lora_tail else dy2, dx,
                    ia3 if ia3 is not None else dy2, *qargs,
                    m, n, k, r, _m_bucket(m), k // 2,
                    dy2.stride(0), dy2.stride(1),
                    g_scaled.stride(0) if lora_tail else 0, g_scaled.stride(1) if lora_tail else 0,
                    a_cast.stride(0) if lora_tail else 0, a_cast.stride(1) if lora_tail else 0,
                    dx.stride(0), dx.stride(1),
                    HAS_LORA=lora_tail, HAS_IA3=ia3 is not None, DOUBLE_QUANT=q.double_quant,
                    BLOCKSIZE=q.blocksize, PAIRED=k % 2 == 0, ALIGNED=k % q.blocksize == 0,
                    IEEE=dtype == torch.float32, BLOCK_R=_block_r(r),
                )
            dx = dx.reshape(*ctx.lead, k)
        return dx, d_lx, d_a, d_b, d_bias, d_ia3, None, None


def nf4_lora_linear(
    x: torch.Tensor,
    qweight: WeightSource,
    lora_A: Optional[torch.Tensor],
    lora_B: Optional[torch.Tensor],
    scaling: float,
    bias: Optional[torch.Tensor] = None,
    ia3: Optional[torch.Tensor] = None,
    lora_x: Optional[torch.Tensor] = None,
    lora_dropout: Optional[KeyedMask] = None,
) -> torch.Tensor:
    """``(x·deq(W)ᵀ + scaling·(lora_x·Aᵀ)·Bᵀ + bias) * ia3`` with W frozen NF4; lora_x defaults to x.

    x ``[..., K]``; qweight of shape ``[N, K]``, or a zero-argument callable returning it (e.g. a
    QuantLinear's ``quant_weight``; asked again in backward, see ``resolve_weight``); lora_A
    ``[r, K]`` and lora_B ``[N, r]`` (both None for an IA3-only or frozen layer); bias and ia3
    ``[N]``; lora_x like x, for LoRA dropout: pass
    ``dropout(x)`` and autograd carries its gradient back through the dropout. Or, for mtpeft's keyed
    dropout, ``lora_dropout`` (a ``KeyedMask``: the rows' keys, the site, p) instead of lora_x: the
    same result as ``lora_x = keyed_dropout(x, ...)``, and on the dequant path the mask is drawn
    inside the rank-r kernels (x' never stored). Gradients flow to
    x, lora_x, lora_A, lora_B, ia3 and (if it requires one) bias. Triton on CUDA, the torch
    reference on CPU (see backend); on Triton, the fused kernels below up to
    ``backend.fused_max_m()`` rows, dequantization + cuBLAS (``nf4_lora_linear_dequant``) above.
    """
    if (lora_A is None) != (lora_B is None):
        raise ValueError("nf4_lora_linear: pass both lora_A and lora_B, or neither")
    if lora_x is not None and lora_x.shape != x.shape:
        raise ValueError(f"nf4_lora_linear: lora_x has shape {tuple(lora_x.shape)}, x {tuple(x.shape)}")
    if lora_x is not None and lora_dropout is not None:
        raise ValueError("nf4_lora_linear: pass lora_x or lora_dropout, not both")
    triton_path = None
    if use_triton(x.device):
        triton_path = nf4_path(x.numel() // max(1, x.shape[-1]), x.dtype)
    if lora_dropout is not None and lora_A is not None and triton_path != "dequant":
        lora_x = keyed_dropout(x, lora_dropout.row_keys, lora_dropout.site, lora_dropout.p)
    if triton_path == "dequant":
        keyed = lora_dropout if lora_A is not None else None
        return DequantNF4LoRALinearFunction.apply(x, lora_x, lora_A, lora_B, bias, ia3, qweight, float(scaling), keyed)
    if triton_path == "fused":
        return NF4LoRALinearFunction.apply(x, lora_x, lora_A, lora_B, bias, ia3, qweight, float(scaling))
    return nf4_lora_linear_reference(x, qweight, lora_A, lora_B, scaling, bias, ia3, lora_x)
