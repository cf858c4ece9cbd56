"""Torch reference of the fused NF4 + LoRA (+ IA3) linear layer (CPU path and test oracle).

Same math and gradients as the Triton op. It is an autograd.Function rather than plain autograd so
the dequantized weight is not kept alive between forward and backward: it is rebuilt in backward,
which is what keeps a 4-bit base 4-bit in memory during training.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Union

import torch

from mtpeft.quant.nf4_format import NF4Weight


WeightSource = Union[NF4Weight, Callable[[], NF4Weight]]


def resolve_weight(source: WeightSource) -> NF4Weight:
    """The NF4 weight now. A callable source is asked again in backward, so under ZeRO-3 backward
    reads the re-gathered parameters instead of keeping forward's gathered bytes alive until then."""
    return source() if callable(source) else source


def check_weight_shape(q: NF4Weight, k: int) -> None:
    """The Triton paths' checks on the weight: [N, K] matching x's K, under 2**31 elements."""
    if len(q.shape) != 2 or int(q.shape[1]) != k:
        raise ValueError(f"nf4_lora_linear: x has {k} features but the weight has shape {tuple(q.shape)}")
    if q.numel >= 2**31:
        raise ValueError("nf4_lora_linear: weights with 2**31 or more elements are not supported")


def _dequantize(q: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    from mtpeft.quant.nf4 import dequantize_nf4

    if q.packed.dtype != torch.uint8:  # bytes stored viewed as bf16 (quant_storage) for ZeRO-3
        q = dataclasses.replace(q, packed=q.packed.view(torch.uint8))
    return dequantize_nf4(q, dtype)


class NF4LoRALinearReference(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lora_x, lora_A, lora_B, bias, ia3, qweight: WeightSource, scaling: float):
        w = _dequantize(resolve_weight(qweight), x.dtype)
        y = x @ w.t()
        lx = x if lora_x is None else lora_x
        xa = None
        if lora_A is not None:
            xa = lx @ lora_A.to(x.dtype).t()
            y = y + (xa * scaling) @ lora_B.to(x.dtype).t()
        if bias is not None:
            y = y + bias.to(x.dtype)
        ypre = y if ia3 is not None and ia3.requires_grad else None
        if ia3 is not None:
            y = y * ia3.to(x.dtype)
        ctx.qweight, ctx.scaling, ctx.separate_lora_x = qweight, scaling, lora_x is not None
        ctx.save_for_backward(lx, xa, lora_A, lora_B, bias, ia3, ypre)
        return y

    @staticmethod
    def backward(ctx, dy):
        lx, xa, lora_A, lora_B, bias, ia3, ypre = ctx.saved_tensors
        s = ctx.scaling
        need_x, need_lx, need_a, need_b, need_bias, need_ia3 = ctx.needs_input_grad[:6]
        dx = d_lx = d_a = d_b = d_bias = d_ia3 = None
        if need_ia3:
            d_ia3 = (dy * ypre).reshape(-1, dy.shape[-1]).sum(0).to(ia3.dtype)
        if ia3 is not None:
            dy = dy * ia3.to(dy.dtype)
        dy2 = dy.reshape(-1, dy.shape[-1])
        if need_bias:
            d_bias = dy2.sum(0).to(bias.dtype)
        d_lora_in = None
        if lora_A is not None:
            g = (dy2 @ lora_B.to(dy.dtype)) * s
            if need_a:
                d_a = (g.t() @ lx.reshape(-1, lx.shape[-1])).to(lora_A.dtype)
            if need_b:
                d_b = ((dy2.t() @ xa.reshape(-1, xa.shape[-1])) * s).to(lora_B.dtype)
            d_lora_in = (g @ lora_A.to(dy.dtype)).reshape(lx.shape)
        if need_x:
            dx = dy @ _dequantize(resolve_weight(ctx.qweight), dy.dtype)
            if d_lora_in is not None and not ctx.separate_lora_x:
                dx = dx + d_lora_in
        if need_lx:
            d_lx = d_lora_in
        return dx, d_lx, d_a, d_b, d_bias, d_ia3, None, None


def nf4_lora_linear_reference(
    x: torch.Tensor,
    qweight: WeightSource,
    lora_A: Optional[torch.Tensor],
    lora_B: Optional[torch.Tensor],
    scaling: float,
    bias: Optional[torch.Tensor] = None,
    ia3: Optional[torch.Tensor] = None,
    lora_x: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Same contract as :func:`mtpeft.kernels.nf4_lora_linear`, in plain torch."""
    return NF4LoRALinearReference.apply(x, lora_x, lora_A, lora_B, bias, ia3, qweight, float(scaling))
