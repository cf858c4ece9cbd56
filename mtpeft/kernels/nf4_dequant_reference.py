"""Torch reference of the NF4 dequantization kernel: the CPU path and the tests' oracle.

It is :func:`mtpeft.quant.nf4.dequantize_nf4`, which is itself checked bit for bit against
bitsandbytes; re-exported here so the kernel and its reference sit side by side.
"""

from mtpeft.quant.nf4 import dequantize_nf4 as nf4_dequant_reference

__all__ = ["nf4_dequant_reference"]
