"""Large-M path of the 4-bit linear layer: NF4 → bf16 into a reused buffer, then cuBLAS.

At training batch sizes the GEMMs are compute-bound, so the best a 4-bit layer can do is the bf16
GEMM plus the cost of producing its weight. This path dequantizes with the bandwidth-bound kernel
(``nf4_dequant``, ~40 MB of traffic for a 4096×4096 weight) into ``dequant_workspace`` and calls
cuBLAS; the fused kernels (``nf4_lora_linear``) decode each weight tile once per row tile, which
only pays at small M. Same contract and gradients as the fused op:

- forward: the buffer holds ``[deq(W); A]`` ([N + r, K]), so ONE GEMM gives ``x·deq(W)ᵀ`` and
  ``x·Aᵀ`` (x is read once); the LoRA term is added in place with ``addmm_``, then bias and IA3.
  With a separate LoRA input ``x·Aᵀ`` reads ``lora_x`` instead; with keyed LoRA dropout
  (``dropout``) the kernels of ``lora_keyed_dropout`` draw the mask on x in registers: ``x'·Aᵀ``,
  ``dx += dropout'(g·A)`` in place, ``dA = gᵀ·x'`` — x' is never stored.
- backward: ``g = s·dy·B`` and ``dB = s·dyᵀ·(x·Aᵀ)`` in one pass over dy (``lora_dy_pass``), which
  also writes ``[dy, g]``; the buffer holds ``[W'; A]`` (W dequantized again with IA3's scale folded
  into its rows), so ``dx = [dy, g]·[W'; A]`` is ONE cuBLAS GEMM with the LoRA tail folded in;
  ``dA = gᵀ·x``.
"""

from __future__ import annotations

import torch

from mtpeft.kernels.backend import as_output
from mtpeft.kernels.dequant_workspace import dequant_workspace
from mtpeft.kernels.lora_keyed_dropout import dropout_da, dropout_tail_, dropout_xa
from mtpeft.kernels.lora_dy_pass import lora_dy_pass_triton
from mtpeft.kernels.nf4_dequant import nf4_dequant_triton
from mtpeft.kernels.nf4_lora_linear_reference import check_weight_shape, resolve_weight


class DequantNF4LoRALinearFunction(torch.autograd.Function):
    """Arguments as ``NF4LoRALinearFunction`` (x, lora_x, lora_A, lora_B, bias, ia3, source, scaling),
    plus ``dropout``: a ``KeyedMask`` for LoRA dropout drawn inside the rank-r kernels (lora_x None)."""

    @staticmethod
    def forward(ctx, x, lora_x, lora_A, lora_B, bias, ia3, source, scaling: float, dropout=None):
        q = resolve_weight(source)
        lead, k = x.shape[:-1], x.shape[-1]
        check_weight_shape(q, k)
        n = int(q.shape[0])
        x2 = x.reshape(-1, k)
        has_lora = lora_A is not None
        keyed = dropout is not None and has_lora
        fold_a = has_lora and lora_x is None and not keyed
        r = lora_A.shape[0] if has_lora else 0
        w = dequant_workspace(n + (r if fold_a else 0), k, x.dtype, x.device)
        nf4_dequant_triton(q, x.dtype, out=w[:n])
        a_c = lora_A.to(x.dtype) if has_lora else None
        if fold_a:
            w[n:].copy_(a_c)
        out = x2 @ w.t()
        y = out[:, :n]
        xa = lx2 = keys = None
        rows_per_example = x2.shape[0] // max(1, x.shape[0]) if x.dim() > 1 else 1
        if keyed:  # x' = dropout(x) never stored: the kernels redraw its mask from the keys
            lx2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
            keys = dropout.mixed_keys(x.device)
            xa = dropout_xa(lx2, a_c, dropout, keys, rows_per_example)
        elif has_lora:
            lx2 = x2 if lora_x is None else lora_x.reshape(-1, k)
            xa = out[:, n:].contiguous() if fold_a else lx2 @ a_c.t()
        if has_lora:
            y.addmm_(xa, lora_B.to(x.dtype).t(), alpha=scaling)
        if bias is not None:
            y.add_(bias)
        store_pre = ia3 is not None and ia3.requires_grad
        ypre = y if store_pre else None
        if ia3 is not None:
            y = y * ia3.to(y.dtype) if store_pre else y.mul_(ia3.to(y.dtype))
        ctx.source, ctx.scaling, ctx.lead, ctx.n, ctx.k = source, scaling, lead, n, k
        ctx.has_lora, ctx.separate_lora_x = has_lora, lora_x is not None
        ctx.dropout, ctx.rows_per_example = (dropout if keyed else None), rows_per_example
        ctx.dtypes = tuple(t.dtype if t is not None else None for t in (lora_A, lora_B, bias, ia3))
        need_a, need_b = ctx.needs_input_grad[2:4]
        ctx.save_for_backward(lx2 if has_lora and need_a else None, xa, lora_A, lora_B, ia3, ypre, keys)
        return as_output(y, (*lead, n))  # not a view of `out`: the model may add into it in place

    @staticmethod
    def backward(ctx, dy):
        lx2, xa, lora_A, lora_B, ia3, ypre, keys = ctx.saved_tensors
        n, k = ctx.n, ctx.k
        dy2 = dy.reshape(-1, n)
        m, dtype = dy2.shape[0], dy2.dtype
        need_x, need_lx, need_a, need_b, need_bias, need_ia3 = ctx.needs_input_grad[:6]
        dx = d_lx = d_a = d_b = d_bias = d_ia3 = None
        # LoRA tail folded into the dx GEMM: dx = [dy, g]·[W'; A], with [dy, g] written by the dy pass
        fold_tail = need_x and ctx.has_lora and not ctx.separate_lora_x and ctx.dropout is None
        r = lora_A.shape[0] if ctx.has_lora else 0
        dy_ext = torch.empty(m, n + r, dtype=dtype, device=dy2.device) if fold_tail else None
        if ctx.has_lora:
            b_eff = lora_B if ia3 is None else lora_B.float() * ia3.float()[:, None]
            g, db = lora_dy_pass_triton(dy2, b_eff.to(dtype), xa, ctx.scaling, dy_ext=dy_ext)
            a_c = lora_A.to(dtype)
            if need_b:
                d_b = (db if ia3 is None else db * ia3.float()[:, None]).to(ctx.dtypes[1])
            if need_a and ctx.dropout is not None:
                d_a = dropout_da(lx2, g, ctx.dropout, keys, ctx.rows_per_example).to(ctx.dtypes[0])
            elif need_a:
                d_a = (g.t() @ lx2).to(ctx.dtypes[0])
            if need_lx:
                d_lx = (g @ a_c).reshape(*ctx.lead, k)
        if need_bias:
            d_bias = (dy2.float().sum(0) * (ia3.float() if ia3 is not None else 1.0)).to(ctx.dtypes[2])
        if need_ia3:
            d_ia3 = (dy2.float() * ypre.float()).sum(0).to(ctx.dtypes[3])
        if need_x:
            w = dequant_workspace(n + (r if fold_tail else 0), k, dtype, dy2.device)
            nf4_dequant_triton(resolve_weight(ctx.source), dtype, out=w[:n], row_scale=ia3)
            if fold_tail:
                w[n:].copy_(a_c)
                dx = dy_ext @ w
            else:
                dx = dy2 @ w
            if ctx.dropout is not None:
                dropout_tail_(dx, g, a_c, ctx.dropout, keys, ctx.rows_per_example)
            dx = dx.reshape(*ctx.lead, k)
        return dx, d_lx, d_a, d_b, d_bias, d_ia3, None, None, None
