"""NF4 quantize / dequantize in plain torch, bit-identical to bitsandbytes 0.50 on CPU.

Runs on any device. The arithmetic follows bitsandbytes' CPU path operation by operation (the
4-bit step is its torch "default" kernel, the 8-bit absmax step its C++ lookup-table kernel),
because a different but equally reasonable rounding (e.g. exact nearest-code search for the 8-bit
absmax codes) flips some codes and the packed bytes stop matching a bitsandbytes checkpoint.
"""

from __future__ import annotations

import torch

from mtpeft.quant.nf4_format import NF4Weight

# The 16 NF4 levels (QLoRA, Dettmers et al. 2023): quantiles of N(0, 1) scaled to [-1, 1].
NF4_LEVELS = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

NESTED_BLOCKSIZE = 256
VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_LUT_SIZE = 65536  # resolution of bitsandbytes' CPU 8-bit quantizer lookup table


def nf4_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16-entry NF4 table as fp32 on ``device``."""
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


def dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """The signed 8-bit dynamic-exponent map (Dettmers 2015) used to double-quantize absmax.

    Exponent i (0..6) contributes 2**i linearly spaced fractions in (0.1, 1] times 10**(i-6), with
    both signs; plus 0 and 1: 256 values, sorted. fp32 throughout, as in bitsandbytes.
    """
    values: list[float] = []
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        values += (10 ** (i - 6) * mids).tolist()
        values += (-(10 ** (i - 6)) * mids).tolist()
    values += [0.0, 1.0]
    values.sort()
    return torch.tensor(values, dtype=torch.float32, device=device)


def _nf4_midpoints(device: torch.device) -> torch.Tensor:
    code = nf4_code(device)
    return (code[:-1] + code[1:]) / 2


def _quantize_4bit_codes(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 flat weight -> (uint8 NF4 indices, padded to even length; fp32 absmax per block)."""
    n = flat.numel()
    rem = n % blocksize
    full = n - rem
    blocks = flat[:full].reshape(full // blocksize, blocksize)
    absmax = blocks.abs().max(dim=-1)[0]
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if rem:
        # bitsandbytes divides (not multiplies by the reciprocal) in the tail block and stores the
        # clamped absmax: both change bits, both are reproduced.
        tail_max = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_max, -1, 1)])
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    idx = torch.bucketize(scaled, _nf4_midpoints(flat.device), out_int32=True)
    return idx.to(torch.uint8), absmax


def _dynamic_lut(code: torch.Tensor) -> torch.Tensor:
    """For each of 65536 evenly spaced points in [-1, 1], the code index whose bin holds it."""
    mids = 0.5 * (code[:-1] + code[1:])
    grid = torch.arange(_LUT_SIZE, dtype=torch.float32, device=code.device)
    points = (2.0 * grid) / (_LUT_SIZE - 1) + -1.0
    return torch.searchsorted(mids.contiguous(), points, right=False).to(torch.uint8)


def quantize_blockwise_8bit(
    x: torch.Tensor, code: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 vector -> (uint8 indices into ``code``, fp32 absmax per block).

    Rounds through bitsandbytes' 65536-bin lookup table, not to the exact nearest code: the two
    disagree on small normalized values, and matching checkpoints bit for bit needs the table.
    """
    x = x.reshape(-1).float()
    n = x.numel()
    nblocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(x, (0, nblocks * blocksize - n)).view(nblocks, blocksize)
    absmax = padded.abs().max(dim=-1)[0]
    inv = torch.where(absmax == 0, torch.zeros_like(absmax), 1.0 / absmax)
    normed = torch.clamp(padded * inv.view(-1, 1), -1.0, 1.0)
    lut_index = (((normed + 1.0) * 0.5) * float(_LUT_SIZE - 1) + 0.5).to(torch.int64)
    q = _dynamic_lut(code.float())[lut_index]
    q = torch.where((absmax == 0).view(-1, 1), torch.zeros_like(q), q)
    return q.reshape(-1)[:n], absmax


def dequantize_blockwise_8bit(
    q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE
) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise_8bit`: fp32 ``code[q] * absmax[block]``."""
    n = q.numel()
    nblocks = absmax.numel()
    vals = code.float()[q.reshape(-1).long()]
    vals = torch.nn.functional.pad(vals, (0, nblocks * blocksize - n)).view(nblocks, blocksize)
    return (vals * absmax.float().view(-1, 1)).reshape(-1)[:n]


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize a float weight to NF4 exactly as ``bitsandbytes.functional.quantize_4bit`` does."""
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"quantize_nf4 needs an fp32/fp16/bf16 tensor, got {weight.dtype}")
    if blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {VALID_BLOCKSIZES}, got {blocksize}")
    if weight.numel() == 0:
        raise ValueError("quantize_nf4 got an empty tensor")
    flat = weight.detach().reshape(-1).float()
    idx, absmax = _quantize_4bit_codes(flat, blocksize)
    packed = (idx[0::2] << 4) | idx[1::2]
    q = NF4Weight(packed=packed, absmax=absmax, shape=weight.shape, dtype=weight.dtype, blocksize=blocksize)
    if double_quant:
        offset = absmax.mean()
        code = dynamic_map(weight.device)
        q.absmax, q.absmax_scale = quantize_blockwise_8bit(absmax - offset, code, NESTED_BLOCKSIZE)
        q.absmax_code = code
        q.absmax_offset = float(offset.item())
    return q


def real_absmax(q: NF4Weight) -> torch.Tensor:
    """fp32 per-block absmax, undoing the double quantization when there is one."""
    if not q.double_quant:
        return q.absmax.float()
    absmax = dequantize_blockwise_8bit(q.absmax, q.absmax_scale, q.absmax_code, NESTED_BLOCKSIZE)
    return absmax + torch.tensor(q.absmax_offset, dtype=torch.float32, device=absmax.device)


def unpack_nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """uint8 bytes -> int64 NF4 indices, even element from the high nibble."""
    packed = packed.reshape(-1)
    idx = torch.empty(packed.numel() * 2, dtype=torch.int64, device=packed.device)
    idx[0::2] = (packed >> 4).long()
    idx[1::2] = (packed & 0xF).long()
    return idx[:numel]


def dequantize_nf4(q: NF4Weight, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """NF4 -> ``dtype`` tensor of the original shape; fp32 product then one rounding, as bitsandbytes."""
    n = q.numel
    absmax = real_absmax(q)
    vals = nf4_code(q.packed.device)[unpack_nibbles(q.packed, n)]
    nblocks = absmax.numel()
    vals = torch.nn.functional.pad(vals, (0, nblocks * q.blocksize - n)).view(nblocks, q.blocksize)
    return (vals * absmax.view(-1, 1)).reshape(-1)[:n].reshape(q.shape).to(dtype)
