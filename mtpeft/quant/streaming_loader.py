"""Load a frozen NF4 backbone shard by shard, partitioning it under ZeRO-3 as it arrives.

The usual transformers + bitsandbytes + ZeRO-3 path materializes the whole model on every rank
before DeepSpeed partitions it (about 18 GB per rank for a 4-bit 34B). Here the model skeleton is
built with its parameters on the ``meta`` device (no memory), then materialized one module at a
time: rank 0 reads the module's tensors from the safetensors shards, quantizes a linear weight to
NF4 (or takes it as it is when bitsandbytes already quantized it) and wraps it in a QuantLinear;
``deepspeed.zero.Init(module=...)`` broadcasts the bytes and every rank keeps only its slice. A
rank's peak is therefore about its own shard plus one full-size layer.

Each shard file is opened (memory-mapped) only for the tensors of the module being built and closed
again, so file pages read through the map do not stay resident in the process either.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import torch
from torch import nn

from mtpeft.conv1d import as_linear, from_checkpoint
from mtpeft.errors import CheckpointError, UserError
from mtpeft.model_load_errors import MODEL_LOAD_ERRORS, one_line
from mtpeft.quant.bnb_interop import QUANT_STATE_KEY, from_bnb_state_dict
from mtpeft.quant.linear import QuantLinear, is_skipped
from mtpeft.quant.nf4 import quantize_nf4
from mtpeft.quant.nf4_format import NF4Weight

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
        self._add, self._strip = "", ""
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

    def align_to(self, model_keys: list[str], base_prefix: str) -> None:
        """Let a base model (``AutoModel``: ``layers.0...``) read a checkpoint saved with its head
        (``model.layers.0...``), and the reverse, as ``from_pretrained`` does."""
        if not base_prefix or any(k in self.key_to_file for k in model_keys):
            return
        head = base_prefix + "."
        if any(head + k in self.key_to_file for k in model_keys):
            self._add = head
        elif any(k.startswith(head) and k[len(head):] in self.key_to_file for k in model_keys):
            self._strip = head

    def _stored(self, key: str) -> str:
        if self._strip and key.startswith(self._strip):
            return key[len(self._strip):]
        return self._add + key

    def __contains__(self, key: str) -> bool:
        return self._stored(key) in self.key_to_file

    def keys_with_prefix(self, prefix: str) -> list[str]:
        stored = self._stored(prefix)
        return [prefix + k[len(stored):] for k in self.key_to_file if k.startswith(stored)]

    def read(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """The tensors of ``keys``, each file opened once and closed before returning."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for key in keys:
            if key not in self:
                raise CheckpointError(f"{self.source}: missing key '{self._stored(key)}'; the checkpoint does not "
                                      f"match the model config in {self.folder}")
            by_file.setdefault(self.key_to_file[self._stored(key)], []).append(key)
        out = {}
        for shard, shard_keys in by_file.items():
            try:
                with safe_open(str(shard), framework="pt", device="cpu") as f:
                    present = set(f.keys())
                    for key in shard_keys:
                        if self._stored(key) not in present:
                            raise CheckpointError(f"{shard}: key '{self._stored(key)}' is listed in {self.source.name} "
                                                  f"but absent from the shard; the index is stale")
                        out[key] = f.get_tensor(self._stored(key))
            except CheckpointError:
                raise
            except Exception as exc:
                raise CheckpointError(f"{shard}: cannot read '{shard_keys[0]}' ({exc})") from None
        return out

    def where(self, key: str) -> Path:
        return self.key_to_file.get(self._stored(key), self.source)


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get ``meta`` parameters (no memory) but real buffers (rotary tables).

    The one patch of a torch class in mtpeft (accelerate's ``init_empty_weights`` makes the same):
    ``nn.Module.register_parameter`` is swapped only for the ``with`` block and put back in
    ``finally``, whatever is raised inside; the skeleton is built in one thread, inside it."""
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
                  double_quant: bool, blocksize: int, device: Union[str, torch.device],
                  transposed: bool = False) -> QuantLinear:
    wkey = f"{name}.weight"
    bias = None
    if meta.bias is not None:
        bkey = f"{name}.bias"
        bias = _checked(ckpt, bkey, ckpt.read([bkey])[bkey], meta.bias.shape).to(dtype)
    if f"{wkey}.{QUANT_STATE_KEY}" in ckpt:  # already quantized by bitsandbytes: take the bytes as they are
        if transposed:
            raise CheckpointError(f"{ckpt.where(wkey)}: '{wkey}' is a 4-bit Conv1D weight (stored transposed); load "
                                  f"the bf16 checkpoint instead and let mtpeft quantize it")
        keys = [wkey] + ckpt.keys_with_prefix(wkey + ".")
        q = from_bnb_state_dict(ckpt.read(keys), wkey, source=str(ckpt.where(wkey)))
        if tuple(q.shape) != tuple(meta.weight.shape):
            raise CheckpointError(f"{ckpt.where(wkey)}: '{wkey}' is a 4-bit weight of shape {tuple(q.shape)} but the "
                                  f"model config gives {tuple(meta.weight.shape)}")
        return QuantLinear.from_nf4(q, bias)
    weight = ckpt.read([wkey])[wkey]
    weight = _checked(ckpt, wkey, from_checkpoint(weight) if transposed else weight, meta.weight.shape).to(dtype)
    q = quantize_nf4(weight.to(device), blocksize, double_quant)
    del weight
    return QuantLinear.from_nf4(q, bias).to("cpu")


def build_skeleton(folder: Path, dtype: torch.dtype, model_class: Any = None) -> nn.Module:
    """``model_class`` (default ``AutoModelForCausalLM``) of ``folder/config.json`` with meta
    parameters and real buffers."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(folder))
    except MODEL_LOAD_ERRORS as exc:
        raise CheckpointError(f"{folder}: cannot read config.json ({one_line(exc)})") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the 4-bit layers are built here, not by transformers
    with parameters_on_meta():
        return (model_class or AutoModelForCausalLM).from_config(config, dtype=dtype)


class _RankZeroReads:
    """Under ZeRO-3 only global rank 0 opens the files and quantizes.

    Every other rank learns each module's storage layout (or rank 0's error) from one small object
    broadcast, allocates empty tensors of that layout, and receives the bytes in the broadcast that
    ``zero.Init`` performs anyway before partitioning. A shared file system then serves one read of
    the checkpoint instead of one per rank, and NF4 bytes (4x fewer than bf16) cross the network.
    """

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.reader = True
        if enabled:
            import torch.distributed as dist

            self.dist = dist
            self.reader = dist.get_rank() == 0

    def agree(self, read: Callable[[], Any], describe: Callable[[Any], Any], empty: Callable[[Any], Any]) -> Any:
        if not self.enabled:
            return read()
        box: list = [None]
        obj, failure = None, None
        if self.reader:
            try:
                obj = read()
                box[0] = ("ok", describe(obj))
            except Exception as exc:  # every rank must leave the broadcast, then all raise
                failure = exc
                box[0] = ("error", str(exc) if isinstance(exc, UserError) else f"rank 0: {exc!r}")
        self.dist.broadcast_object_list(box, src=0)
        status, payload = box[0]
        if failure is not None:
            raise failure
        if status == "error":
            raise CheckpointError(payload)
        return obj if self.reader else empty(payload)


def _quant_layout(module: QuantLinear) -> dict:
    bias = module.bias
    return {"shape": list(module.weight_shape), "dtype": str(module.weight_dtype), "blocksize": module.blocksize,
            "stored": {name: (str(dt), n) for name, (dt, n) in module._layout.items()},
            "offset": module._offset, "bias": None if bias is None else (list(bias.shape), str(bias.dtype))}


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.replace("torch.", ""))


def _empty_quant_linear(layout: dict) -> QuantLinear:
    """A QuantLinear with rank 0's layout and uninitialized bytes (zero.Init's broadcast fills them)."""
    stored = {name: torch.empty(n, dtype=_dtype(dt)) for name, (dt, n) in layout["stored"].items()}
    q = NF4Weight(packed=stored["packed"], absmax=stored["absmax"], shape=torch.Size(layout["shape"]),
                  dtype=_dtype(layout["dtype"]), blocksize=layout["blocksize"],
                  absmax_scale=stored.get("absmax_scale"), absmax_code=stored.get("absmax_code"),
                  absmax_offset=layout["offset"] if "absmax_scale" in stored else None)
    bias = None if layout["bias"] is None else torch.empty(layout["bias"][0], dtype=_dtype(layout["bias"][1]))
    return QuantLinear.from_nf4(q, bias)


def load_quantized_backbone(path_or_dir: Union[str, Path], ds_config: Union[dict, str, Path, None],
                            dtype: torch.dtype = torch.float32, skip: Iterable[str] = ("lm_head",),
                            double_quant: bool = True, blocksize: int = 64,
                            quantize_device: Union[str, torch.device] = "cpu", model_class: Any = None) -> nn.Module:
    """A frozen causal LM whose ``nn.Linear`` layers (except ``skip``) are QuantLinear, loaded by streaming.

    With a ZeRO-3 ``ds_config`` (dict or JSON path) every parameter is partitioned as soon as it is
    loaded; call it on all ranks after ``deepspeed.init_distributed``. Rank 0 reads the checkpoint;
    the other ranks need only ``config.json``. Without ZeRO-3 (None, or stage < 3) the same
    streaming builds an ordinary CPU model. Linear weights are cast to ``dtype`` and quantized
    exactly as ``from_pretrained(dtype=...)`` + ``quantize_model`` would on CPU; ``quantize_device=
    "cuda"`` is much faster for large models (its double-quant offset, a mean, may round
    differently). A module stored 4-bit by bitsandbytes is loaded as stored, never re-quantized,
    even if ``skip`` names it. Missing shards or keys and shape mismatches raise CheckpointError
    on every rank. ``model_class`` is a transformers auto class (default ``AutoModelForCausalLM``;
    ``AutoModel`` or ``T5EncoderModel`` for encoder backbones).
    """
    zero3 = _zero3_config(ds_config)
    ranks = _RankZeroReads(zero3 is not None)
    path = Path(path_or_dir)
    ckpt = ranks.agree(lambda: ShardedCheckpoint(path), lambda c: None, lambda _: None)
    model = build_skeleton(ckpt.folder if ckpt is not None else _config_folder(path), dtype, model_class)
    transposed = set(as_linear(model))  # GPT-2's Conv1D: nn.Linear here, its weight turned on read
    if ckpt is not None:
        ckpt.align_to([n for n, _ in model.named_parameters()], getattr(model, "base_model_prefix", ""))
    partition = _partitioner(zero3)
    skip = tuple(skip)
    trim = _heap_trimmer()
    loaded: dict[int, nn.Parameter] = {}  # meta param id -> real one, so tied weights stay tied
    for name, module in list(model.named_modules()):
        own = list(module.named_parameters(recurse=False))
        if not own:
            continue
        needed = [(p_name, p) for p_name, p in own if id(p) not in loaded]

        def read(name=name, module=module, needed=needed):
            turned = name in transposed
            if isinstance(module, nn.Linear) and (not is_skipped(name, skip) or _stored_4bit(ckpt, name)):
                return _quant_linear(ckpt, name, module, dtype, double_quant, blocksize, quantize_device, turned)
            return _read_params(ckpt, name, needed, dtype, turned)

        def empty(layout, needed=needed):
            if layout is not None:
                return _empty_quant_linear(layout)
            return {p_name: torch.empty(p.shape, dtype=dtype) for p_name, p in needed}

        new = ranks.agree(read, lambda obj: _quant_layout(obj) if isinstance(obj, QuantLinear) else None, empty)
        if isinstance(new, QuantLinear):
            partition(list(new.parameters()))
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)
        else:
            fresh = {p_name: nn.Parameter(t, requires_grad=False) for p_name, t in new.items()}
            loaded.update({id(p): fresh[p_name] for p_name, p in needed})
            partition(list(fresh.values()))
            for p_name, p in own:
                setattr(module, p_name, loaded[id(p)])
        del new
        trim()
    model.requires_grad_(False)
    return model.eval()


def _config_folder(path: Path) -> Path:
    return path if path.is_dir() else path.parent


def _read_params(ckpt: ShardedCheckpoint, name: str, needed: list, dtype: torch.dtype,
                 transposed: bool = False) -> dict[str, torch.Tensor]:
    tensors = ckpt.read([f"{name}.{p_name}" for p_name, _ in needed])
    if transposed and f"{name}.weight" in tensors:
        tensors[f"{name}.weight"] = from_checkpoint(tensors[f"{name}.weight"])
    return {p_name: _checked(ckpt, f"{name}.{p_name}", tensors[f"{name}.{p_name}"], p.shape).to(dtype)
            for p_name, p in needed}


def _stored_4bit(ckpt: ShardedCheckpoint, name: str) -> bool:
    return f"{name}.weight.{QUANT_STATE_KEY}" in ckpt
