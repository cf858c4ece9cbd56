"""What a real run costs, measured: memory (allocator or resident), the exact bytes of every
ZeRO-3 partition, FLOPs per step for a frozen base, MFU, and communication bytes.

Why partitions are read tensor by tensor: resident memory on CPU mixes the model states with
libraries, allocator caches and activations, so the planner's model-state prediction can only be
checked against the tensors DeepSpeed actually holds: ``param.ds_tensor`` of every parameter, the
fp32 master partitions (``fp32_partitioned_groups_flat``), the contiguous gradient partitions and
the wrapped torch optimizer's ``state``. Quantized modules are split as the planner splits them:
their largest frozen tensor is the packed weight, the others are quantization constants.
"""

from __future__ import annotations

import os
import resource
from typing import Any, Dict, Iterable, List, Optional

import torch
from torch import nn

from mtpeft.profile.planner import is_quantized_module

STATE_KEYS = ("packed_weights", "quant_constants", "bf16_weights", "trainable_params", "master_weights",
              "gradients", "optimizer_states")

STATE_LABELS = {"packed_weights": "packed NF4 weights", "quant_constants": "quantization constants",
                "bf16_weights": "non-quantized frozen weights", "trainable_params": "trainable parameters",
                "master_weights": "fp32 master partitions", "gradients": "gradient partitions",
                "optimizer_states": "Adam states", "total": "total"}

# Dense bf16 Tensor Core peaks (TFLOPS) from the vendors' data sheets; matched against the device name.
GPU_PEAK_TFLOPS = (
    ("H200", 989.4), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.4), ("A100", 312.0),
    ("L40S", 362.1), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0), ("V100", 125.0),
)


def _proc_status_bytes(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    """Resident memory now (VmRSS), falling back to the peak where /proc is missing."""
    now = _proc_status_bytes("VmRSS")
    return now if now is not None else peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Resident high-water mark: VmHWM (resettable), else ``ru_maxrss`` (KiB on Linux)."""
    hwm = _proc_status_bytes("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_memory() -> bool:
    """Restart the high-water marks: CUDA allocator stats, and VmHWM through ``clear_refs`` (Linux ≥ 4.0).
    Returns whether the resident peak could be reset (else it is the process's lifetime peak)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        with open(f"/proc/{os.getpid()}/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_memory() -> Dict[str, Any]:
    """``device_peak_bytes`` is the CUDA allocator's peak (None on CPU); resident bytes always."""
    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "device_peak_bytes": int(torch.cuda.max_memory_allocated()) if cuda else None,
        "rss_peak_bytes": peak_rss_bytes(),
        "rss_bytes": rss_bytes(),
    }


def detect_peak_tflops(given: Optional[float] = None) -> Optional[float]:
    """``given`` if set, else the bf16 dense peak of a known GPU; None on CPU (no honest default)."""
    if given:
        return float(given)
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, tflops in GPU_PEAK_TFLOPS:
        if key in name:
            return tflops
    return None


def _nbytes(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _local(p: nn.Parameter) -> torch.Tensor:
    return p.ds_tensor if hasattr(p, "ds_tensor") else p


def _unique_storage_bytes(tensors: Iterable[torch.Tensor], seen: set) -> int:
    total = 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if t.numel() and key not in seen:
            seen.add(key)
            total += _nbytes(t)
    return total


def parameter_partition_bytes(model: nn.Module) -> Dict[str, int]:
    """This rank's bytes of every parameter partition (``ds_tensor``; the whole tensor outside ZeRO-3)."""
    out = {k: 0 for k in ("packed_weights", "quant_constants", "bf16_weights", "trainable_params")}
    seen = set()
    for module in model.modules():
        own = [p for _, p in module.named_parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for p in own)
        frozen = [p for p in own if not p.requires_grad]
        full = lambda p: getattr(p, "ds_numel", p.numel()) * p.element_size()  # noqa: E731
        packed = max(frozen, key=full, default=None)
        for p in own:
            nbytes = _nbytes(_local(p))
            if p.requires_grad:
                out["trainable_params"] += nbytes
            elif is_quantized_module(module):
                out["packed_weights" if p is packed else "quant_constants"] += nbytes
            else:
                out["bf16_weights"] += nbytes
    return out


def _optimizer_state_bytes(optimizer: Any) -> int:
    seen: set = set()
    tensors = [v for state in getattr(optimizer, "state", {}).values() for v in state.values()
               if isinstance(v, torch.Tensor)]
    return _unique_storage_bytes(tensors, seen)


def engine_partition_bytes(engine: Any) -> Dict[str, int]:
    """Per-rank bytes of the model states a DeepSpeed ZeRO-3 engine holds (call after a step, when
    the optimizer states exist). ``bf16_weights`` is every frozen non-quantized tensor, in its dtype."""
    out = parameter_partition_bytes(engine.module)
    zero = engine.optimizer
    lp_ptrs = {t.untyped_storage().data_ptr() for t in getattr(zero, "fp16_partitioned_groups_flat", [])
               if t is not None and t.numel()}
    masters = [t for t in getattr(zero, "fp32_partitioned_groups_flat", []) if t is not None]
    out["master_weights"] = sum(_nbytes(t) for t in masters if t.untyped_storage().data_ptr() not in lp_ptrs)
    flat = getattr(zero, "grad_partitions_flat_buffer", None)
    if flat is not None:
        out["gradients"] = _nbytes(flat)
    else:
        grads = [g for group in getattr(zero, "averaged_gradients", {}).values() for g in (group or [])]
        out["gradients"] = _unique_storage_bytes(grads, set())
    out["optimizer_states"] = _optimizer_state_bytes(getattr(zero, "optimizer", zero))
    out["total"] = sum(out[k] for k in STATE_KEYS)
    return out


def plain_state_bytes(model: nn.Module, optimizer: Any) -> Dict[str, int]:
    """The same breakdown for a model trained without DeepSpeed (gradients in ``.grad``)."""
    out = parameter_partition_bytes(model)
    out.update(bitsandbytes_bytes(model))
    out["master_weights"] = 0
    out["gradients"] = _unique_storage_bytes([p.grad for p in model.parameters() if p.grad is not None], set())
    out["optimizer_states"] = _optimizer_state_bytes(optimizer)
    out["total"] = sum(out[k] for k in STATE_KEYS)
    return out


def bitsandbytes_bytes(model: nn.Module) -> Dict[str, int]:
    """Packed bytes and quant-state tensors of bitsandbytes ``Linear4bit`` layers (their constants live
    in ``weight.quant_state``, not in parameters); an empty dict when there are none."""
    packed = consts = 0
    found, seen = False, set()
    for module in model.modules():
        weight = getattr(module, "weight", None)  # peft's LoRA wrapper forwards .weight to its base
        qs = getattr(weight, "quant_state", None)
        if qs is None or id(weight) in seen:
            continue
        seen.add(id(weight))
        found = True
        packed += _nbytes(module.weight)
        consts += _nbytes(qs.absmax) + _nbytes(qs.code) + _nbytes(getattr(qs, "offset", None))
        if getattr(qs, "state2", None) is not None:
            consts += _nbytes(qs.state2.absmax) + _nbytes(qs.state2.code)
    if not found:
        return {}
    frozen = sum(_nbytes(p) for p in model.parameters() if not p.requires_grad)
    return {"packed_weights": packed, "quant_constants": consts, "bf16_weights": frozen - packed}


def meta_copy(model: nn.Module) -> nn.Module:
    """A meta-device twin of ``model`` with every parameter at its FULL shape (``ds_shape`` under
    ZeRO-3), module class names kept, so the planner's ``plan_model_states`` can count a model whose
    parameters are partitioned, without gathering anything."""
    made: Dict[int, nn.Parameter] = {}

    def twin(module: nn.Module) -> nn.Module:
        cls = type(type(module).__name__, (nn.Module,), {})
        out = cls()
        for name, p in module.named_parameters(recurse=False):
            if id(p) not in made:
                shape = tuple(getattr(p, "ds_shape", p.shape))
                made[id(p)] = nn.Parameter(torch.empty(shape, dtype=p.dtype, device="meta"),
                                           requires_grad=p.requires_grad)
            out.register_parameter(name, made[id(p)])
        for name, child in module.named_children():
            out.add_module(name, twin(child))
        return out

    return twin(model)


def comm_bytes(reset: bool = False) -> Optional[Dict[str, int]]:
    """Bytes moved per collective since the last reset, from DeepSpeed's comms logger
    (``"comms_logger": {"enabled": true, "prof_all": true}``); None when the logger is off."""
    try:
        from deepspeed import comm
    except ImportError:
        return None
    logger = getattr(comm, "comms_logger", None)
    if logger is None or not getattr(logger, "enabled", False):
        return None
    totals: Dict[str, int] = {}
    for op, sizes in logger.comms_dict.items():
        totals[op] = int(sum(int(size) * int(vals[0]) for size, vals in sizes.items()))
    if reset:
        logger.comms_dict.clear()
    return totals


def disable_comm_logger() -> None:
    from deepspeed import comm

    logger = getattr(comm, "comms_logger", None)
    if logger is not None:
        logger.enabled = False
        logger.comms_dict.clear()


def mfu(flops_per_step: Optional[float], step_seconds: Optional[float], peak_tflops: Optional[float],
        world_size: int = 1) -> Optional[float]:
    """Model FLOPs utilization: achieved FLOP/s per device over the device peak."""
    if not flops_per_step or not step_seconds or not peak_tflops:
        return None
    return flops_per_step / step_seconds / world_size / (peak_tflops * 1e12)


def step_timing(records: List[dict], warmup: int = 1) -> Dict[str, float]:
    """Step time and tokens/s over ``log.jsonl`` records after ``warmup`` steps (all if too few)."""
    kept = [r for r in records if not r.get("skipped")]
    measured = kept[warmup:] if len(kept) > warmup else kept
    seconds = sum(r["seconds"] for r in measured)
    tokens = sum(r["tokens"] for r in measured)
    times = sorted(r["seconds"] for r in measured)
    return {
        "steps_measured": len(measured),
        "warmup_steps": len(kept) - len(measured),
        "step_seconds_mean": seconds / max(len(measured), 1),
        "step_seconds_median": times[len(times) // 2] if times else 0.0,
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
    }


def peft_flop_args(peft: Any) -> Dict[str, Any]:
    """``flops.step_flops`` keywords for a RunConfig ``peft`` section (mtl_lora counted as its LoRA)."""
    from mtpeft.tuners.registry import planned_as

    method = planned_as(peft.method)
    return {"peft": method, "r": peft.r, "targets": list(peft.target_modules), "bottleneck": peft.bottleneck,
            "virtual_tokens": peft.num_virtual_tokens if method in ("prompt", "prefix") else 0}


def pass_flops(arch: Any, rows: int, length: int, lm_head: bool, checkpointing: bool,
               peft_args: Dict[str, Any]) -> Dict[str, int]:
    """``step_flops`` of one backbone pass; classification / retrieval heads read the pooled hidden
    states, so their passes drop the LM head terms (the small task heads are not counted)."""
    from mtpeft.profile.flops import step_flops

    terms = step_flops(arch, seq=length, micro_batch=rows, checkpointing=checkpointing, **peft_args)
    if not lm_head:
        terms["total"] -= terms["forward_lm_head"] + terms["backward_lm_head_input_grad"]
        terms["forward_lm_head"] = terms["backward_lm_head_input_grad"] = 0
    return terms


def count_flops(fn) -> int:
    """FLOPs torch's ``FlopCounterMode`` counts while ``fn()`` runs (matmuls, convolutions, SDPA)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())
