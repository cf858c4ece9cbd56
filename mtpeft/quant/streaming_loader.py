"""Load a frozen NF4 backbone shard by shard, partitioning it under ZeRO-3 as it arrives.

The usual transformers + bitsandbytes + ZeRO-3 path materializes the whole model on every rank
before DeepSpeed partitions it (about 18 GB per rank for a 4-bit 34B). Here the model skeleton is
built with its parameters on the ``meta`` device (no memory), then each module is materialized from
the checkpoint's safetensors one at a time: a linear weight is read, quantized to NF4 (or taken as
it is when bitsandbytes already quantized it), wrapped in a QuantLinear and handed to
``deepspeed.zero.Init(module=...)``, which keeps only this rank's slice. A rank's peak is therefore
about its own shard plus one full-size layer.

Each shard file is opened (memory-mapped) only for the tensors of the module being built and closed
again, so file pages read through the map do not stay resident in the process either.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

import torch
from torch import nn

from mtpeft.errors import CheckpointError
from mtpeft.quant.bnb_interop import _QS_KEY, from_bnb_state_dict
from mtpeft.quant.linear import QuantLinear, _is_skipped
from mtpeft.quant.nf4 import quantize_nf4

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class ShardedCheckpoint:
    """Which safetensors file holds which key, and reading a few keys at a time."""

    def __init__(self, path: Union[str, Path]):
        path = Path(path)
        if path.is_dir():
            if (path / INDEX_NAME).is_file():
                path = path / INDEX_NAME
            elif (path / SINGLE_NAME).is_file():
                path = path / SINGLE_NAME
            else:
                raise CheckpointError(f"{path}: no {INDEX_NAME} or {SINGLE_NAME}; save the model with "
                                      f"save_pretrained(..., safe_serialization=True)")
        if not path.is_file():
            raise CheckpointError(f"{path}: checkpoint not found; pass a model folder or a .safetensors file")
        self.source = path
        self.folder = path.parent
        self.key_to_file: dict[str, Path] = {}
        if path.name.endswith(".json"):
            self._read_index(path)
        else:
            for key in self._keys_of(path):
                self.key_to_file[key] = path

    def _read_index(self, path: Path) -> None:
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{path}: not a safetensors index (needs a 'weight_map' mapping; {exc})") from None
        for key, name in weight_map.items():
            shard = path.parent / name
            if not shard.is_file():
                raise CheckpointError(f"{path}: shard {shard} (holding '{key}') is missing; "
                                      f"copy the complete checkpoint folder")
            self.key_to_file[key] = shard

    @staticmethod
    def _keys_of(path: Path) -> list[str]:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return list(f.keys())
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{path}: unreadable safetensors file ({exc})") from None

    def __contains__(self, key: str) -> bool:
        return key in self.key_to_file

    def keys_with_prefix(self, prefix: str) -> list[str]:
        return [k for k in self.key_to_file if k.startswith(prefix)]

    def read(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """The tensors of ``keys``, each file opened once and closed before returning."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for key in keys:
            if key not in self.key_to_file:
                raise CheckpointError(f"{self.source}: missing key '{key}'; the checkpoint does not match "
                                      f"the model config in {self.folder}")
            by_file.setdefault(self.key_to_file[key], []).append(key)
        out = {}
        for shard, shard_keys in by_file.items():
            try:
                with safe_open(str(shard), framework="pt", device="cpu") as f:
                    present = set(f.keys())
                    for key in shard_keys:
                        if key not in present:
                            raise CheckpointError(f"{shard}: key '{key}' is listed in {self.source.name} "
                                                  f"but absent from the shard; the index is stale")
                        out[key] = f.get_tensor(key)
            except CheckpointError:
                raise
            except Exception as exc:
                raise CheckpointError(f"{shard}: cannot read '{shard_keys[0]}' ({exc})") from None
        return out

    def where(self, key: str) -> Path:
        return self.key_to_file.get(key, self.source)


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get ``meta`` parameters (no memory) but real buffers (rotary tables)."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: Optional[nn.Parameter]) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _heap_trimmer():
    """glibc's ``malloc_trim``, or a no-op. Small ZeRO-3 partitions allocated between a layer's large
    temporaries pin the heap, so freed temporaries would stay resident and add up layer after layer."""
    import ctypes
    import ctypes.util

    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    return lambda: trim(0)


def _zero3_config(ds_config: Union[dict, str, Path, None]) -> Union[dict, str, None]:
    if ds_config is None:
        return None
    raw = json.loads(Path(ds_config).read_text()) if isinstance(ds_config, (str, Path)) else ds_config
    return ds_config if raw.get("zero_optimization", {}).get("stage") == 3 else None


def _partitioner(ds_config):
    """A function that turns freshly loaded parameters into this rank's ZeRO-3 partitions (or nothing)."""
    if ds_config is None:
        return lambda params: None
    import deepspeed

    def partition(params: list[nn.Parameter]) -> None:
        holder = nn.Module()  # only these parameters, not a parent's still-meta children
        for i, p in enumerate(params):
            holder.register_parameter(f"p{i}", p)
        deepspeed.zero.Init(module=holder, config_dict_or_path=ds_config)

    return partition


def _checked(ckpt: ShardedCheckpoint, key: str, tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if tuple(tensor.shape) != tuple(shape):
        raise CheckpointError(f"{ckpt.where(key)}: '{key}' has shape {tuple(tensor.shape)} but the model config "
                              f"gives {tuple(shape)}; the checkpoint and config.json do not match")
    return tensor


def _quant_linear(ckpt: ShardedCheckpoint, name: str, meta: nn.Linear, dtype: torch.dtype,
                  double_quant: bool, blocksize: int) -> QuantLinear:
    wkey = f"{name}.weight"
    bias = None
    if meta.bias is not None:
        bkey = f"{name}.bias"
        bias = _checked(ckpt, bkey, ckpt.read([bkey])[bkey], meta.bias.shape).to(dtype)
    if f"{wkey}.{_QS_KEY}" in ckpt:  # already quantized by bitsandbytes: take the bytes as they are
        keys = [wkey] + ckpt.keys_with_prefix(wkey + ".")
        q = from_bnb_state_dict(ckpt.read(keys), wkey, source=str(ckpt.where(wkey)))
        if tuple(q.shape) != tuple(meta.weight.shape):
            raise CheckpointError(f"{ckpt.where(wkey)}: '{wkey}' is a 4-bit weight of shape {tuple(q.shape)} but the "
                                  f"model config gives {tuple(meta.weight.shape)}")
        return QuantLinear.from_nf4(q, bias)
    weight = _checked(ckpt, wkey, ckpt.read([wkey])[wkey], meta.weight.shape).to(dtype)
    return QuantLinear.from_nf4(quantize_nf4(weight, blocksize, double_quant), bias)


def build_skeleton(folder: Path, dtype: torch.dtype) -> nn.Module:
    """The causal LM of ``folder/config.json`` with meta parameters and real buffers."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder}: cannot read config.json ({str(exc).splitlines()[0][:160]})") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the 4-bit layers are built here, not by transformers
    with parameters_on_meta():
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def load_quantized_backbone(path_or_dir: Union[str, Path], ds_config: Union[dict, str, Path, None],
                            dtype: torch.dtype = torch.float32, skip: Iterable[str] = ("lm_head",),
                            double_quant: bool = True, blocksize: int = 64) -> nn.Module:
    """A frozen causal LM whose ``nn.Linear`` layers (except ``skip``) are QuantLinear, loaded by streaming.

    With a ZeRO-3 ``ds_config`` (dict or JSON path) every parameter is partitioned as soon as it is
    loaded (call after ``deepspeed.init_distributed``; all ranks must call it). Without one (or with
    stage < 3) the same streaming builds an ordinary in-memory model. Linear weights are cast to
    ``dtype`` and then quantized, exactly as ``from_pretrained(dtype=...)`` + ``quantize_model``
    would; a module stored 4-bit by bitsandbytes is loaded as stored (never re-quantized, even if
    ``skip`` names it). Missing shards or keys and shape mismatches raise CheckpointError.
    """
    ckpt = ShardedCheckpoint(path_or_dir)
    model = build_skeleton(ckpt.folder, dtype)
    partition = _partitioner(_zero3_config(ds_config))
    skip = tuple(skip)
    trim = _heap_trimmer()
    loaded: dict[int, nn.Parameter] = {}  # meta param id -> real one, so tied weights stay tied
    for name, module in list(model.named_modules()):
        own = list(module.named_parameters(recurse=False))
        if not own:
            continue
        if isinstance(module, nn.Linear) and not _is_skipped(name, skip) or _stored_4bit(ckpt, name, module):
            new = _quant_linear(ckpt, name, module, dtype, double_quant, blocksize)
            partition(list(new.parameters()))
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)
            trim()
            continue
        fresh = {}
        needed = [(p_name, p) for p_name, p in own if id(p) not in loaded]
        tensors = ckpt.read([f"{name}.{p_name}" for p_name, _ in needed])
        for p_name, p in needed:
            key = f"{name}.{p_name}"
            value = _checked(ckpt, key, tensors.pop(key), p.shape)
            fresh[p_name] = loaded[id(p)] = nn.Parameter(value.to(dtype), requires_grad=False)
        partition(list(fresh.values()))
        for p_name, p in own:
            setattr(module, p_name, fresh.get(p_name, loaded.get(id(p))))
        trim()
    model.requires_grad_(False)
    return model.eval()


def _stored_4bit(ckpt: ShardedCheckpoint, name: str, module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and f"{name}.weight.{_QS_KEY}" in ckpt
