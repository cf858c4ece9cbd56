"""The 4-bit NF4 frozen base: bitsandbytes-compatible format, QuantLinear, model conversion."""

from mtpeft.quant.bnb_interop import (
    from_bnb,
    from_bnb_state_dict,
    from_params4bit,
    to_bnb,
    to_bnb_state_dict,
    to_params4bit,
)
from mtpeft.quant.linear import QuantLinear, quantize_model
from mtpeft.quant.nf4 import dequantize_nf4, quantize_nf4
from mtpeft.quant.nf4_format import NF4Weight

__all__ = [
    "NF4Weight",
    "QuantLinear",
    "dequantize_nf4",
    "from_bnb",
    "from_bnb_state_dict",
    "from_params4bit",
    "quantize_model",
    "quantize_nf4",
    "to_bnb",
    "to_bnb_state_dict",
    "to_params4bit",
]
