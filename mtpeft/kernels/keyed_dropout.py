"""Keyed dropout as one Triton pass: the mask hashed in registers, never stored.

``keyed_dropout_reference`` builds the mask with about twenty int64 elementwise ops over the whole
tensor (a hash on 32-bit lanes held in int64) and autograd keeps it for backward: at M=8192 tokens ×
4096 features that is several GB of traffic per dropout site, more than the layer's GEMM. Here each
program hashes (row key, index) in uint32 registers for a BLOCK of one row, reads x once and writes
the result once; backward runs the same kernel on the gradient (dropout is linear: the same mask,
regenerated from the keys). Bit-identical to the reference: the same hash, ``x·keep`` then one
IEEE division by ``1 - p`` in fp32, one rounding to x's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mtpeft.kernels.backend import empty_output, use_triton
from mtpeft.kernels.keyed_dropout_reference import keyed_dropout_reference, mix
from mtpeft.kernels.triton_compat import cast

BLOCK = 2048
NUM_WARPS = 4


@triton.jit
def lowbias32(x):
    """Chris Wellons' lowbias32 on uint32 lanes (multiplications wrap mod 2**32)."""
    x = x ^ (x >> 16)
    x = x * tl.full((), 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full((), 0x846CA68B, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def keyed_dropout_kernel(x_ptr, key_ptr, out_ptr, inner, threshold_signed, keep_prob, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    index = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = index < inner
    key = tl.load(key_ptr + row).to(tl.uint32)
    salt = key * tl.full((), 0x9E37, tl.uint32)
    bits = lowbias32(lowbias32(index.to(tl.uint32) ^ key) ^ salt)
    # unsigned bits >= threshold, as a signed compare of both shifted by 2**31 (no 64-bit compare)
    keep = ((bits ^ tl.full((), 0x80000000, tl.uint32)).to(tl.int32, bitcast=True) >= threshold_signed).to(tl.float32)
    offset = row * inner + index  # int32: the launcher sends tensors of 2**31 or more elements to the reference
    x = tl.load(x_ptr + offset, mask=ok, other=0.0).to(tl.float32)
    y = tl.div_rn(x * keep, tl.full((), keep_prob, tl.float32))
    tl.store(out_ptr + offset, cast(y, out_ptr.dtype.element_ty), mask=ok)


def _launch(x: torch.Tensor, keys: torch.Tensor, p: float) -> torch.Tensor:
    rows = x.shape[0]
    inner = x.numel() // max(rows, 1)
    x2 = x.contiguous()
    out = empty_output(x.shape, x.dtype, x.device)
    if x.numel():
        keyed_dropout_kernel[(rows, triton.cdiv(inner, BLOCK))](x2, keys, out, inner, int(p * 2**32) - 2**31,
                                                               1.0 - p, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out


class KeyedDropoutFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, keys, p: float):
        ctx.p = p
        ctx.save_for_backward(keys)
        return _launch(x, keys, p)

    @staticmethod
    def backward(ctx, dy):
        (keys,) = ctx.saved_tensors
        return _launch(dy, keys, ctx.p), None, None


def keyed_dropout(x: torch.Tensor, row_keys: torch.Tensor, site: int, p: float) -> torch.Tensor:
    """Dropout of ``x`` (rows first) whose mask is a hash of ``mix(row_keys, site)`` and the flat
    index within each row; Triton on CUDA, ``keyed_dropout_reference`` on CPU (see backend)."""
    if x.dim() == 0 or x.shape[0] != row_keys.shape[0]:
        raise ValueError(f"keyed_dropout: {row_keys.shape[0]} row keys for a tensor of shape {tuple(x.shape)}")
    if use_triton(x.device) and x.numel() < 2**31 - BLOCK:
        keys = mix(row_keys.to(x.device), site)
        return KeyedDropoutFunction.apply(x, keys, float(p))
    return keyed_dropout_reference(x, row_keys, site, p)
