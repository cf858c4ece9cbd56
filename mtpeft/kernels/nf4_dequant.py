"""NF4 dequantization as a Triton kernel (with and without double quantization), and its dispatch.

The large-M path of the 4-bit linear layer (``nf4_lora_linear_dequant``) runs this once per layer
call into a reused buffer and hands the bf16 weight to cuBLAS, so the kernel is built to stream at
memory bandwidth (predicted, from the sm_90a SASS: one 16-byte load of packed bytes and four
16-byte stores per thread, ~8 instructions per element against the ~17 per element H200's
bandwidth leaves; ``bench/sass_report.py`` prints it):

- each program takes ``BYTES`` contiguous packed bytes (16 per thread), splits each byte into its
  two nibbles and interleaves them, so element ``2i`` is the high nibble as in bitsandbytes;
- the 16-entry code table is looked up with ``tl.gather`` on a register tensor, which the compiler
  stages once per program in 64 bytes of shared memory: 16 distinct words in 16 banks, so the
  lookup is conflict-free (a global gather per element would be a 4-byte load per element);
- absmax is one load per NF4 block, broadcast over the block (tiles are block-aligned).

No autograd.Function: the NF4 base is frozen. The kernel does the same fp32 operations in the same
order as bitsandbytes (``code[q] * scale + offset`` for a double-quantized absmax, then
``nf4[nibble] * absmax``, one rounding to the output dtype), compiled without FMA contraction, so
its output equals bitsandbytes' bit for bit. ``row_scale`` multiplies row n by ``row_scale[n]``
after that (IA3's output scale folded into the weight for dx), a second fp32 rounding step.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from mtpeft.kernels.backend import empty_output, use_triton
from mtpeft.kernels.nf4_code_cache import nf4_code_on
from mtpeft.kernels.nf4_dequant_reference import nf4_dequant_reference
from mtpeft.kernels.triton_compat import cast
from mtpeft.quant.nf4 import NESTED_BLOCKSIZE
from mtpeft.quant.nf4_format import NF4Weight

BYTES_PER_PROGRAM = 2048  # 16 bytes per thread at 4 warps: one 16-byte load, four 16-byte stores
NUM_WARPS = 4


@triton.jit
def nf4_dequant_kernel(packed_ptr, absmax_ptr, code_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset,
                       row_scale_ptr, out_ptr, numel, nbytes, row_len,
                       BLOCKSIZE: tl.constexpr, NESTED_BLOCK: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                       HAS_ROW_SCALE: tl.constexpr, ROWS_HOLD_BLOCKS: tl.constexpr, BYTES: tl.constexpr):
    pid = tl.program_id(0)  # int32 offsets: the launcher refuses weights of 2**31 elements
    # nbytes = ceil(numel / 2) is an argument, not computed here: the launcher marks it divisible by
    # 16 when it is, which is what lets the masked byte load compile to one 16-byte load per thread.
    offs = pid * BYTES + tl.arange(0, BYTES)
    byte = tl.load(packed_ptr + offs, mask=offs < nbytes, other=0).to(tl.int32)
    code = tl.load(code_ptr + tl.arange(0, 16))
    value = tl.interleave(tl.gather(code, byte >> 4, 0), tl.gather(code, byte & 15, 0))
    NB: tl.constexpr = 2 * BYTES // BLOCKSIZE
    blocks = pid * NB + tl.arange(0, NB)
    block_ok = blocks * BLOCKSIZE < numel
    if DOUBLE_QUANT:
        absmax_q = tl.load(absmax_ptr + blocks, mask=block_ok, other=0).to(tl.int32)
        scale = tl.load(absmax_scale_ptr + blocks // NESTED_BLOCK, mask=block_ok, other=0.0)
        absmax = tl.load(absmax_code_ptr + absmax_q, mask=block_ok, other=0.0) * scale
        absmax = absmax + absmax_offset
    else:
        absmax = tl.load(absmax_ptr + blocks, mask=block_ok, other=0.0)
    w = tl.reshape(value, (NB, BLOCKSIZE)) * absmax[:, None]
    if HAS_ROW_SCALE and ROWS_HOLD_BLOCKS:  # each NF4 block inside one row: one row index per block
        w = w * tl.load(row_scale_ptr + blocks * BLOCKSIZE // row_len, mask=block_ok, other=0.0)[:, None]
    w = tl.reshape(w, (2 * BYTES,))
    flat = pid * 2 * BYTES + tl.arange(0, 2 * BYTES)
    ok = flat < numel
    if HAS_ROW_SCALE and not ROWS_HOLD_BLOCKS:
        w = w * tl.load(row_scale_ptr + flat // row_len, mask=ok, other=0.0)
    tl.store(out_ptr + flat, cast(w, out_ptr.dtype.element_ty), mask=ok)


def bytes_per_program(blocksize: int) -> int:
    """Packed bytes per program: a whole number of NF4 blocks, at least 16 per thread."""
    return max(BYTES_PER_PROGRAM, blocksize // 2)


def quant_kernel_args(q: NF4Weight, device: torch.device) -> tuple:
    """(packed, absmax, code, absmax_code, absmax_scale, absmax_offset) as the NF4 kernels take them."""
    packed = q.packed.reshape(-1)
    packed = packed if packed.dtype == torch.uint8 else packed.view(torch.uint8)
    code = nf4_code_on(device)
    if q.double_quant:
        return (packed, q.absmax.reshape(-1), code, q.absmax_code.float().reshape(-1),
                q.absmax_scale.float().reshape(-1), float(q.absmax_offset))
    return (packed, q.absmax.float().reshape(-1), code, code, code, 0.0)


def nf4_dequant_triton(q: NF4Weight, dtype: torch.dtype = torch.bfloat16, out: Optional[torch.Tensor] = None,
                       row_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Launch the kernel: ``q`` -> ``dtype`` tensor of ``q.shape`` (written into ``out`` if given),
    rows scaled by ``row_scale`` (fp32 ``[shape[0]]``) if given."""
    n = q.numel
    if n >= 2**31 - 2 * bytes_per_program(q.blocksize):
        raise ValueError(f"nf4_dequant: {n} elements; weights of 2**31 or more elements are not supported")
    device = q.packed.device
    if out is None:
        out = empty_output(tuple(q.shape), dtype, device)
    elif out.numel() < n or not out.is_contiguous() or out.dtype != dtype:
        raise ValueError(f"nf4_dequant: out must be a contiguous {dtype} tensor of at least {n} elements, "
                         f"got {out.dtype} {tuple(out.shape)}")
    row_len = int(q.shape[-1]) if len(q.shape) > 1 else n
    scale = row_scale.float().contiguous() if row_scale is not None else out
    per_program = bytes_per_program(q.blocksize)
    grid = (triton.cdiv((n + 1) // 2, per_program),)
    nf4_dequant_kernel[grid](*quant_kernel_args(q, device), scale, out, n, (n + 1) // 2, row_len,
                             BLOCKSIZE=q.blocksize,
                             NESTED_BLOCK=NESTED_BLOCKSIZE, DOUBLE_QUANT=q.double_quant,
                             HAS_ROW_SCALE=row_scale is not None, ROWS_HOLD_BLOCKS=row_len % q.blocksize == 0,
                             BYTES=per_program,
                             num_warps=NUM_WARPS, enable_fp_fusion=False)
    return out


def nf4_dequant(q: NF4Weight, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Dequantize through the Triton kernel or the torch reference, as ``MTPEFT_KERNELS`` selects."""
    if use_triton(q.packed.device):
        return nf4_dequant_triton(q, dtype)
    return nf4_dequant_reference(q, dtype)
