"""Fused Triton ops with torch references beside them; ``MTPEFT_KERNELS`` picks the path (backend).

Set ``TRITON_INTERPRET=1`` before importing this package to run the Triton kernels on CPU.
"""

from mtpeft.kernels.backend import use_triton
from mtpeft.kernels.bottleneck_adapter import bottleneck_adapter
from mtpeft.kernels.nf4_dequant import nf4_dequant
from mtpeft.kernels.nf4_lora_linear import nf4_lora_linear

__all__ = ["bottleneck_adapter", "nf4_dequant", "nf4_lora_linear", "use_triton"]
