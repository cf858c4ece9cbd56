"""QuantLinear: a frozen NF4 ``nn.Linear`` replacement whose bytes ZeRO-3 partitions like any weight.

Every byte of the quantized weight (packed nibbles and all constants) lives in a frozen
``nn.Parameter`` whose raw bytes are reinterpreted as bf16 (bitsandbytes' ``quant_storage``
trick). DeepSpeed then shards, gathers and moves them like any frozen bf16 tensor, and
:meth:`QuantLinear.quant_weight` views the gathered bytes back as an :class:`NF4Weight`. Casts
(``model.half()``, DeepSpeed's ``module.bfloat16()``) must not touch them, hence ``_apply``.

ZeRO-3 keeps tensors below ``stage3_param_persistence_threshold`` (default 1e5 elements) whole on
every rank: the 256-entry absmax code tables, offsets and small layers' constants among them. Set
it low to shard everything (tests/quant/test_quant_zero3.py uses 0).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from mtpeft.conv1d import as_linear
from mtpeft.quant.bnb_interop import from_bnb_state_dict, from_params4bit
from mtpeft.quant.nf4 import quantize_nf4
from mtpeft.quant.nf4_format import NF4Weight

STORAGE_DTYPE = torch.bfloat16
_CONSTANTS = ("absmax", "absmax_scale", "absmax_code", "absmax_offset")


def bytes_as_storage(t: torch.Tensor) -> torch.Tensor:
    """Any contiguous tensor's bytes as a flat bf16 tensor (one zero byte appended if odd)."""
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
    if raw.numel() % 2:
        raw = torch.cat([raw, raw.new_zeros(1)])
    return raw.view(STORAGE_DTYPE).clone()


def storage_as(t: torch.Tensor, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """Inverse of :func:`bytes_as_storage`: the first ``numel`` ``dtype`` values held in ``t``."""
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    raw = t.reshape(-1).view(torch.uint8)[:nbytes]
    return raw if dtype == torch.uint8 else raw.view(dtype)


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class QuantLinear(nn.Module):
    """``y = x @ dequantize(W).T + bias`` with W stored as NF4 (frozen, bias frozen too)."""

    def __init__(self, q: NF4Weight, bias: Optional[torch.Tensor] = None):
        super().__init__()
        if len(q.shape) != 2:
            raise ValueError(f"QuantLinear needs a 2-D [out, in] weight, got shape {tuple(q.shape)}")
        self.out_features, self.in_features = (int(s) for s in q.shape)
        self.weight_shape = torch.Size(q.shape)
        self.weight_dtype = q.dtype
        self.blocksize = q.blocksize
        self.double_quant = q.double_quant
        self._layout: dict[str, tuple[torch.dtype, int]] = {}
        self._store("packed", q.packed.reshape(-1))
        self._store("absmax", q.absmax.reshape(-1))
        if q.double_quant:
            self._store("absmax_scale", q.absmax_scale.float().reshape(-1))
            self._store("absmax_code", q.absmax_code.float().reshape(-1))
            self._store("absmax_offset", torch.tensor([q.absmax_offset], dtype=torch.float32, device=q.packed.device))
        # A plain float, so forward never syncs a GPU to read it; kept equal to the parameter.
        self._offset = q.absmax_offset
        if bias is not None:
            self.bias = _frozen(bias.detach().clone())
        else:
            self.register_parameter("bias", None)

    def _store(self, name: str, t: torch.Tensor) -> None:
        self._layout[name] = (t.dtype, t.numel())
        self.register_parameter(name, _frozen(bytes_as_storage(t)))

    @classmethod
    def from_linear(cls, linear: nn.Linear, double_quant: bool = True, blocksize: int = 64) -> "QuantLinear":
        """Quantize an ``nn.Linear`` (its weight dtype is the one dequantization restores)."""
        return cls(quantize_nf4(linear.weight.data, blocksize, double_quant), linear.bias)

    @classmethod
    def from_nf4(cls, q: NF4Weight, bias: Optional[torch.Tensor] = None) -> "QuantLinear":
        return cls(q, bias)

    @classmethod
    def from_bnb_state_dict(cls, state_dict: Mapping[str, torch.Tensor], prefix: str = "", source: str = "state dict") -> "QuantLinear":
        """From the keys ``Linear4bit.state_dict()`` wrote under ``prefix`` (e.g. ``"model.layers.0.mlp.up_proj."``)."""
        q = from_bnb_state_dict(state_dict, prefix + "weight", source)
        return cls(q, state_dict.get(prefix + "bias"))

    @classmethod
    def from_linear4bit(cls, module: Any) -> "QuantLinear":
        """From a quantized ``bitsandbytes.nn.Linear4bit``, sharing nothing and re-quantizing nothing."""
        return cls(from_params4bit(module.weight), module.bias)

    def quant_weight(self) -> NF4Weight:
        """The NF4 view of the (gathered) parameters; no copy."""
        if self.packed.numel() == 0:
            raise RuntimeError(
                "QuantLinear.quant_weight: parameters are partitioned (ZeRO-3); call it inside forward "
                "or within deepspeed.zero.GatheredParameters(module.parameters())"
            )
        q = NF4Weight(
            packed=self._read("packed"),
            absmax=self._read("absmax"),
            shape=self.weight_shape,
            dtype=self.weight_dtype,
            blocksize=self.blocksize,
        )
        if self.double_quant:
            q.absmax_scale = self._read("absmax_scale")
            q.absmax_code = self._read("absmax_code")
            q.absmax_offset = self._offset
        return q

    def _read(self, name: str) -> torch.Tensor:
        dtype, numel = self._layout[name]
        return storage_as(getattr(self, name), dtype, numel)

    @property
    def weight(self) -> torch.Tensor:
        """An empty tensor of the compute dtype. There is no dense weight, but transformers reads
        ``.weight.dtype`` of some projections to cast activations (T5's feed-forward ``wo``), as it
        does on bitsandbytes' 4-bit layers; anything that needs the values calls ``quant_weight``."""
        return torch.empty(0, dtype=self.weight_dtype, device=self.packed.device)

    def quant_parameters(self) -> Iterable[nn.Parameter]:
        """The parameters holding quantized bytes (not the bias)."""
        return [getattr(self, name) for name in self._layout]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from mtpeft.kernels.backend import use_triton

        bias = self.bias.to(x.dtype) if self.bias is not None else None
        if use_triton(x.device) or (torch.is_grad_enabled() and x.requires_grad):
            # On a GPU always through the op: it picks the fused kernel for few rows (decoding,
            # evaluation) and dequantization + cuBLAS for many.
            # through the op that dequantizes again in backward: autograd would otherwise keep
            # every layer's dequantized bf16 weight alive until backward (4x the 4-bit base).
            # The weight goes in as a callable, re-read in backward, where ZeRO-3 has gathered
            # the parameters again, so forward's gathered bytes are not kept alive either.
            from mtpeft.kernels.nf4_lora_linear import nf4_lora_linear

            return nf4_lora_linear(x, self.quant_weight, None, None, 1.0, bias)
        from mtpeft.kernels.nf4_dequant import nf4_dequant

        return F.linear(x, nf4_dequant(self.quant_weight(), x.dtype), bias)

    def fused(self, x: torch.Tensor, lora_A: Optional[torch.Tensor] = None, lora_B: Optional[torch.Tensor] = None,
              scaling: float = 1.0, lora_x: Optional[torch.Tensor] = None,
              ia3: Optional[torch.Tensor] = None, lora_dropout: Any = None) -> torch.Tensor:
        """The one entry point tuners call on a 4-bit base: the base GEMM with a LoRA term (its
        branch reading ``lora_x``, e.g. ``dropout(x)``, when given) or an IA3 output scale, in one
        fused NF4 op (``kernels.nf4_lora_linear``), while ZeRO-3 has the parameters gathered.
        ``lora_dropout`` (a ``kernels.lora_keyed_dropout.KeyedMask``) instead of ``lora_x``: keyed
        dropout on the LoRA branch, drawn by the kernels."""
        from mtpeft.kernels.nf4_lora_linear import nf4_lora_linear

        bias = self.bias.to(x.dtype) if self.bias is not None else None
        a = lora_A.to(x.dtype) if lora_A is not None else None
        b = lora_B.to(x.dtype) if lora_B is not None else None
        return nf4_lora_linear(x, self.quant_weight, a, b, scaling, bias, ia3=ia3, lora_x=lora_x,
                               lora_dropout=lora_dropout)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> "QuantLinear":
        storage = {id(p) for p in self.quant_parameters()}

        def move_only(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            if id(t) in storage and out.dtype != t.dtype:
                out = t.to(device=out.device)
            return out

        return super()._apply(move_only, recurse)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if self.double_quant and self.absmax_offset.numel() > 0:
            self._offset = float(self._read("absmax_offset").item())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nf4 blocksize={self.blocksize}, double_quant={self.double_quant}, dtype={self.weight_dtype}")


def is_skipped(name: str, skip: Iterable[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in skip)


def quantize_model(model: nn.Module, skip: Iterable[str] = ("lm_head",), double_quant: bool = True,
                   blocksize: int = 64) -> nn.Module:
    """Replace every ``nn.Linear`` in ``model`` by a QuantLinear, in place, except names in ``skip``;
    GPT-2-style ``Conv1D`` layers are turned into ``nn.Linear`` first (``mtpeft.conv1d``).

    A skip entry matches a module's full dotted name or its last components (``"lm_head"`` matches
    ``"lm_head"`` and ``"model.lm_head"``).
    """
    skip = tuple(skip)
    as_linear(model)
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and not is_skipped(name, skip)]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantLinear.from_linear(linear, double_quant=double_quant, blocksize=blocksize))
    return model
