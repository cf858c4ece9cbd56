"""The 16-entry NF4 code table, one fp32 copy per device, shared by every NF4 kernel's launcher."""

from __future__ import annotations

import torch

from mtpeft.quant.nf4 import nf4_code

_CODE: dict[torch.device, torch.Tensor] = {}


def nf4_code_on(device: torch.device) -> torch.Tensor:
    device = torch.device(device)
    if device not in _CODE:
        _CODE[device] = nf4_code(device)
    return _CODE[device]
