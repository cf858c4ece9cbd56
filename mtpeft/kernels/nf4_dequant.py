"""NF4 dequantization as a Triton kernel (with and without double quantization), and its dispatch.

No autograd.Function: the NF4 base is frozen, so nothing flows back into it, and ``F.linear`` on
the dequantized weight already gives the input and bias gradients. The kernel does the same fp32
operations in the same order as bitsandbytes (``code[q] * scale``, then ``+ offset``, then
``nf4[nibble] * absmax``, one rounding to the output dtype) and is compiled without FMA
contraction, so its output matches bitsandbytes' dequantization bit for bit.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from mtpeft.kernels.backend import empty_output, use_triton
from mtpeft.kernels.nf4_dequant_reference import nf4_dequant_reference
from mtpeft.quant.nf4 import NESTED_BLOCKSIZE, nf4_code
from mtpeft.quant.nf4_format import NF4Weight

_TILE = 1024


@triton.jit
def _nf4_dequant_kernel(packed_ptr, absmax_ptr, code_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset,
                        out_ptr, numel, BLOCKSIZE: tl.constexpr, NESTED_BLOCK: tl.constexpr,
                        DOUBLE_QUANT: tl.constexpr, OUT_BF16: tl.constexpr, TILE: tl.constexpr):
    flat = tl.program_id(0) * TILE + tl.arange(0, TILE)
    mask = flat < numel
    byte = tl.load(packed_ptr + (flat >> 1), mask=mask, other=0).to(tl.int32)
    nibble = tl.where((flat & 1) == 0, byte >> 4, byte & 15)
    value = tl.load(code_ptr + nibble, mask=mask, other=0.0)
    block = flat // BLOCKSIZE
    if DOUBLE_QUANT:
        absmax_q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(absmax_scale_ptr + block // NESTED_BLOCK, mask=mask, other=0.0)
        absmax = tl.load(absmax_code_ptr + absmax_q, mask=mask, other=0.0) * scale
        absmax = absmax + absmax_offset
    else:
        absmax = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    result = value * absmax
    if OUT_BF16:
        # Round to nearest even by hand: Triton's interpreter truncates fp32 -> bf16 casts.
        bits = result.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        tl.store(out_ptr + flat, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(out_ptr + flat, result.to(out_ptr.dtype.element_ty), mask=mask)


_CODE_CACHE: dict[torch.device, torch.Tensor] = {}


def _code_on(device: torch.device) -> torch.Tensor:
    if device not in _CODE_CACHE:
        _CODE_CACHE[device] = nf4_code(device)
    return _CODE_CACHE[device]


def nf4_dequant_triton(q: NF4Weight, dtype: torch.dtype = torch.bfloat16, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Launch the kernel: ``q`` -> ``dtype`` tensor of ``q.shape`` (written into ``out`` if given)."""
    n = q.numel
    if n >= 2**31 - _TILE:
        raise ValueError(f"nf4_dequant: {n} elements; weights of 2**31 or more elements are not supported")
    device = q.packed.device
    packed = q.packed.reshape(-1)
    packed = packed if packed.dtype == torch.uint8 else packed.view(torch.uint8)
    code = _code_on(device)
    if q.double_quant:
        args = (q.absmax.reshape(-1), code, q.absmax_code.float().reshape(-1), q.absmax_scale.float().reshape(-1),
                float(q.absmax_offset))
    else:
        args = (q.absmax.float().reshape(-1), code, code, code, 0.0)
    if out is None:
        out = empty_output(tuple(q.shape), dtype, device)
    elif out.numel() != n or not out.is_contiguous():
        raise ValueError(f"nf4_dequant: out must be contiguous with {n} elements, got {tuple(out.shape)}")
    grid = (triton.cdiv(n, _TILE),)
    _nf4_dequant_kernel[grid](packed, *args, out, n, BLOCKSIZE=q.blocksize, NESTED_BLOCK=NESTED_BLOCKSIZE,
                              DOUBLE_QUANT=q.double_quant, OUT_BF16=dtype == torch.bfloat16, TILE=_TILE,
                              enable_fp_fusion=False)
    return out


def nf4_dequant(q: NF4Weight, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Dequantize through the Triton kernel or the torch reference, as ``MTPEFT_KERNELS`` selects."""
    if use_triton(q.packed.device):
        return nf4_dequant_triton(q, dtype)
    return nf4_dequant_reference(q, dtype)
