"""Conversion between :class:`NF4Weight` and bitsandbytes' ``Params4bit`` / ``QuantState``.

Nothing is re-quantized: the packed bytes and constants move over as they are, so a checkpoint
quantized by bitsandbytes (e.g. a QLoRA base saved by transformers) loads bit for bit. The
state-dict reader parses bitsandbytes' serialized layout itself, so loading needs no bitsandbytes
import (slow, and noisy on machines without its native library).
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import torch

from mtpeft.errors import CheckpointError
from mtpeft.quant.nf4 import NESTED_BLOCKSIZE, nf4_code
from mtpeft.quant.nf4_format import NF4Weight

QUANT_STATE_KEY = "quant_state.bitsandbytes__nf4"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def to_bnb(q: NF4Weight) -> tuple[torch.Tensor, Any]:
    """(packed uint8 ``[ceil(n/2), 1]``, ``QuantState``) sharing ``q``'s tensors where possible."""
    from bitsandbytes.functional import QuantState

    device = q.packed.device
    common = dict(shape=torch.Size(q.shape), code=nf4_code(device), blocksize=q.blocksize, quant_type="nf4", dtype=q.dtype)
    if q.double_quant:
        nested = QuantState(absmax=q.absmax_scale, code=q.absmax_code, blocksize=NESTED_BLOCKSIZE, dtype=torch.float32)
        offset = torch.tensor(q.absmax_offset, dtype=torch.float32, device=device)
        state = QuantState(absmax=q.absmax, offset=offset, state2=nested, **common)
    else:
        state = QuantState(absmax=q.absmax, **common)
    return q.packed.reshape(-1, 1), state


def to_params4bit(q: NF4Weight) -> Any:
    """A ready (already quantized) ``bitsandbytes.nn.Params4bit`` holding ``q``."""
    from bitsandbytes.nn import Params4bit

    packed, state = to_bnb(q)
    return Params4bit(
        data=packed,
        requires_grad=False,
        quant_state=state,
        blocksize=q.blocksize,
        compress_statistics=q.double_quant,
        quant_type="nf4",
        quant_storage=torch.uint8,
        bnb_quantized=True,
    )


def from_bnb(packed: torch.Tensor, quant_state: Any) -> NF4Weight:
    """NF4Weight from bitsandbytes' packed tensor (any ``quant_storage`` dtype) and its QuantState."""
    if quant_state.quant_type != "nf4":
        raise CheckpointError(f"bitsandbytes weight is quant_type={quant_state.quant_type!r}; mtpeft loads only 'nf4' (re-quantize with quant_type='nf4')")
    if not torch.equal(quant_state.code.float().cpu(), nf4_code()):
        raise CheckpointError("bitsandbytes weight has a non-standard NF4 code table; re-quantize it with bitsandbytes' default 'nf4'")
    packed = packed.detach().contiguous().view(torch.uint8).reshape(-1)
    q = NF4Weight(
        packed=packed,
        absmax=quant_state.absmax,
        shape=torch.Size(quant_state.shape),
        dtype=quant_state.dtype,
        blocksize=int(quant_state.blocksize),
    )
    if quant_state.nested:
        if int(quant_state.state2.blocksize) != NESTED_BLOCKSIZE:
            raise CheckpointError(f"bitsandbytes nested blocksize is {quant_state.state2.blocksize}; mtpeft expects {NESTED_BLOCKSIZE}")
        q.absmax_scale = quant_state.state2.absmax.float()
        q.absmax_code = quant_state.state2.code.float()
        q.absmax_offset = float(quant_state.offset)
    _check_sizes(q, "bitsandbytes weight")
    return q


def from_params4bit(param: Any) -> NF4Weight:
    """NF4Weight from a quantized ``Params4bit`` (e.g. ``Linear4bit.weight``)."""
    if getattr(param, "quant_state", None) is None:
        raise CheckpointError("Params4bit has no quant_state: it is not quantized yet (move it to its device first)")
    return from_bnb(param.data, param.quant_state)


def to_bnb_state_dict(q: NF4Weight, prefix: str = "weight") -> dict[str, torch.Tensor]:
    """The tensors ``Linear4bit.state_dict()`` writes for its weight, under ``prefix``."""
    meta: dict[str, Any] = {
        "quant_type": "nf4",
        "blocksize": q.blocksize,
        "dtype": _dtype_name(q.dtype),
        "shape": list(q.shape),
    }
    out = {prefix: q.packed.reshape(-1, 1), f"{prefix}.absmax": q.absmax, f"{prefix}.quant_map": nf4_code(q.packed.device)}
    if q.double_quant:
        out[f"{prefix}.nested_absmax"] = q.absmax_scale
        out[f"{prefix}.nested_quant_map"] = q.absmax_code.clone()
        meta.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=q.absmax_offset)
    out[f"{prefix}.{QUANT_STATE_KEY}"] = torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)
    return out


def from_bnb_state_dict(state_dict: Mapping[str, torch.Tensor], prefix: str = "weight", source: str = "state dict") -> NF4Weight:
    """NF4Weight from a bitsandbytes-serialized weight (``prefix``, ``prefix.absmax``, ...), no re-quantize."""
    def need(key: str) -> torch.Tensor:
        if key not in state_dict:
            raise CheckpointError(f"{source}: missing key '{key}' of a bitsandbytes 4-bit weight; save the model with bitsandbytes >= 0.41 serialization")
        return state_dict[key]

    meta_key = f"{prefix}.{QUANT_STATE_KEY}"
    if meta_key not in state_dict and any(k.startswith(f"{prefix}.quant_state.bitsandbytes__") for k in state_dict):
        raise CheckpointError(f"{source}: '{prefix}' is not NF4 (found a non-nf4 quant_state); re-quantize with quant_type='nf4'")
    try:
        meta = json.loads(bytes(need(meta_key).cpu().tolist()).decode("utf-8"))
        dtype = getattr(torch, meta["dtype"])
        q = NF4Weight(
            packed=need(prefix).detach().contiguous().view(torch.uint8).reshape(-1),
            absmax=need(f"{prefix}.absmax"),
            shape=torch.Size(meta["shape"]),
            dtype=dtype,
            blocksize=int(meta["blocksize"]),
        )
        if meta.get("quant_type") != "nf4":
            raise CheckpointError(f"{source}: '{meta_key}' says quant_type={meta.get('quant_type')!r}; mtpeft loads only 'nf4'")
        if not torch.equal(need(f"{prefix}.quant_map").float().cpu(), nf4_code()):
            raise CheckpointError(f"{source}: '{prefix}.quant_map' is not the standard NF4 table")
        if "nested_offset" in meta:
            if int(meta["nested_blocksize"]) != NESTED_BLOCKSIZE:
                raise CheckpointError(f"{source}: '{meta_key}' nested_blocksize={meta['nested_blocksize']}; mtpeft expects {NESTED_BLOCKSIZE}")
            q.absmax_scale = need(f"{prefix}.nested_absmax").float()
            q.absmax_code = need(f"{prefix}.nested_quant_map").float()
            q.absmax_offset = float(meta["nested_offset"])
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{source}: unreadable '{meta_key}' ({exc}); the checkpoint is not a bitsandbytes 4-bit save") from None
    _check_sizes(q, f"{source}: '{prefix}'")
    return q


def _check_sizes(q: NF4Weight, where: str) -> None:
    n = q.numel
    nblocks = -(-n // q.blocksize)
    if q.packed.numel() != (n + 1) // 2 or q.absmax.numel() != nblocks:
        raise CheckpointError(
            f"{where}: {q.packed.numel()} packed bytes / {q.absmax.numel()} absmax for shape {tuple(q.shape)} "
            f"(expected {(n + 1) // 2} / {nblocks}); the file is truncated or mismatched"
        )
    if q.double_quant and q.absmax_scale.numel() != -(-nblocks // NESTED_BLOCKSIZE):
        raise CheckpointError(f"{where}: {q.absmax_scale.numel()} nested absmax values, expected {-(-nblocks // NESTED_BLOCKSIZE)}")
