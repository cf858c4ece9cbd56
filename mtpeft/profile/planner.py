"""Per-GPU memory of a QLoRA-style fine-tune: frozen 4-bit base, small trainable PEFT, ZeRO-3.

DeepSpeed's estimators assume full fine-tuning (16 bytes per parameter); here only the PEFT
parameters carry gradients and Adam states, so the base costs its storage bytes and nothing else.
``predicted_peak`` is what ``torch.cuda.max_memory_allocated`` should read; ``per_gpu_bytes`` adds
an allocator margin and is what must fit in ``--gpu-mem``.

Model states (per rank; ZeRO-3 partitions every tensor separately, padding it to a multiple of
the world size, so a tensor of ``n`` elements costs ``ceil(n / world)`` elements on every rank):
  * packed NF4 weights: ``numel / 2`` bytes per decoder-block linear (stored viewed as bf16);
  * constants with double quant: 1 byte per 64-block + fp32 scale per 256 blocks + the 256-entry
    fp32 dynamic map and the fp32 offset (the 16 NF4 levels are a constant of the code, not
    stored); without: fp32 absmax per block. Each is its own bf16-viewed tensor, padded apart;
  * embeddings, norms, biases and an untied LM head in bf16;
  * PEFT parameters trained in fp32 under bf16 autocast: 4 B param + 4 B grad + 8 B Adam under
    plain PyTorch (one GPU); DeepSpeed ZeRO-3 adds a 4 B fp32 master partition even for fp32
    parameters (measured on deepspeed 0.19.8); ``bf16``: 2 B param + 4 B master + 2 B grad + 8 B Adam.

Activations (``T = b·L`` tokens, ``h`` hidden, ``q = heads·head_dim``, ``kv = kv_heads·head_dim``,
``I`` intermediate, bytes under bf16 autocast). A frozen 4-bit linear's backward needs only its
weight (dequantized again), so it saves no input; what autograd keeps for one Llama block is:
  * each RMSNorm: its fp32 upcast input ``4·T·h`` and ``rsqrt`` ``4·T`` (LayerNorm: ``+8·T``);
  * each LoRA'd linear: the input of ``A`` (``2·T·in``; with dropout a private dropped copy plus a
    mask, ``3·T·in`` on CUDA where the mask is bool, ``4·T·in`` on CPU where it is a bf16 noise
    tensor; each adapter draws its own mask; without dropout q/k/v share
    one saved input) and ``x·A`` for ``B`` (``2·T·r``);
  * attention: RoPE'd q ``2·T·q``; SDPA (flash / memory-efficient) saves k, v ``4·T·kv``, its
    output ``2·T·q`` (which the o_proj LoRA input shares: transpose + reshape of flash's
    [b, L, heads, d] output is a view) and the fp32 log-sum-exp ``4·b·heads·L``; eager attention
    saves k and v repeated to all heads ``4·T·q``, the fp32 softmax and its bf16 copy
    ``6·b·heads·L²``, and o_proj's input is a fresh contiguous copy;
  * gated MLP: gate output (SiLU input), SiLU output and up output, ``6·T·I``; plain MLP: the GELU
    input ``2·T·I``;
  * residual adds save nothing.
A linear that dequantizes and then calls ``F.linear`` (instead of an autograd Function that
dequantizes again in backward) makes autograd keep the bf16 weight: ``saves_dequantized_weight``
adds the block's linears at 2 bytes per element.
With gradient checkpointing each block keeps only its input ``2·T·h``; the block being
back-propagated is recomputed, so the peak holds all block inputs + one block's saved tensors +
the backward workspace (gradients in flight: two of the hidden size, two of the intermediate size,
``4·T·h + 4·T·I``, read off a live-storage trace of a CPU step).
Logits: bf16 logits ``2·T·V`` (returned to the caller, alive until the step ends), the saved fp32
log-softmax ``4·T·V``, and in the loss backward the nll gradient and the log-softmax gradient,
``4·T·V`` each: ``14·T·V`` at that moment (the fp32 upcast ``4·T·V`` of the forward is freed by
then); during the block backward only the bf16 logits remain. With ``logits_chunk = c`` tokens
the fp32 part is ``8·c·V`` and no logits are returned. The peak is the larger of the loss backward
and the first block backward.

4-bit base above ``kernels.backend.FUSED_MAX_M`` tokens per micro-batch: the dequant path's reused
bf16 buffer (the largest block linear plus r rows) and its backward's ``[dy, g]`` copy
(``dequant_path_bytes``).

Engine: ``auto`` plans plain PyTorch for one GPU without offload, DeepSpeed ZeRO-3 otherwise.
ZeRO-3 buffers (DeepSpeed engine only): the largest module gathered whole (a block's
packed weights, constants, biases, norms and PEFT params, or the embedding / LM head), plus the
prefetch bucket (``stage3_prefetch_bucket_size`` elements of 2 B, at most one more block), capped
by ``stage3_max_live_parameters``; plus the gradient bucket ``contiguous_gradients`` allocates in
full (``reduce_bucket_size`` elements); plus the tensors under
``stage3_param_persistence_threshold`` that every rank keeps whole (norms, small constants).

Offload ``cpu`` / ``nvme``: the partitioned base and the PEFT states (param, grad, Adam) leave the
GPU; the GPU keeps the gather buffers and activations. Host bytes are per node.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Tuple

from torch import nn

from mtpeft.errors import UserError
from mtpeft.profile.architecture import Architecture

GIB = 1024**3
NF4_BLOCK = 64
DQ_BLOCK = 256
DQ_CODE_BYTES = 256 * 4
DQ_OFFSET_BYTES = 4


@functools.cache
def peft_defaults() -> Dict[str, Dict[str, Any]]:
    """The ``--peft`` options of each method the plan models (the others plan as one of them,
    ``registry.planned_as``), with the trainer's own defaults: each method's settings dataclass is
    the one source, so ``plan --peft prefix`` plans the virtual tokens ``mtpeft train`` would use.
    LoRA's dropout stays unset (``lora_dropout`` decides) and its targets are every block linear."""
    from mtpeft.tuners.registry import METHODS

    lora, adapter = METHODS["lora"].settings(), METHODS["serial_adapter"].settings()
    return {
        "lora": {"r": lora.r, "alpha": lora.alpha, "dropout": None, "targets": "all"},
        "ia3": {},
        "prompt": {"n": METHODS["prompt"].settings().num_virtual_tokens},
        "prefix": {"n": METHODS["prefix"].settings().num_virtual_tokens},
        "serial_adapter": {"bottleneck": adapter.bottleneck},
        "parallel_adapter": {"bottleneck": METHODS["parallel_adapter"].settings().bottleneck},
    }


@dataclass(frozen=True)
class PeftSpec:
    method: str
    options: Dict[str, Any]

    def get(self, key: str) -> Any:
        return self.options.get(key, peft_defaults()[self.method].get(key))


def parse_peft(spec: str) -> PeftSpec:
    """``lora``, ``lora:r=8,alpha=16,dropout=0,targets=q_proj+v_proj``, ``prompt:20``, ``prefix:n=10``."""
    from mtpeft.tuners.registry import METHODS, planned_as

    method, _, rest = spec.partition(":")
    method = method.strip().lower()
    if method not in METHODS:
        raise UserError(f"--peft {spec!r}: unknown method {method!r}; use one of {', '.join(METHODS)}")
    method = planned_as(method)
    options: Dict[str, Any] = {}
    for item in filter(None, (x.strip() for x in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            key, value = ("n" if method in ("prompt", "prefix") else "bottleneck"), key
        key = key.strip()
        if key not in peft_defaults()[method]:
            known = ", ".join(peft_defaults()[method]) or "none"
            raise UserError(f"--peft {spec!r}: unknown option {key!r} for {method}; known: {known}")
        if key == "targets":
            options[key] = value.strip()
            continue
        try:
            number = float(value)
        except ValueError:
            raise UserError(f"--peft {spec!r}: {key}={value!r} is not a number") from None
        if number < 0 or (key != "dropout" and (number != int(number) or number < 1)):
            raise UserError(f"--peft {spec!r}: {key}={value} must be a positive integer")
        options[key] = number if key == "dropout" else int(number)
    return PeftSpec(method, options)


def _lora_targets(arch: Architecture, peft: PeftSpec) -> list:
    targets = peft.get("targets")
    if targets in (None, "all"):
        return list(arch.block_linears)
    wanted = set(targets.split("+"))
    chosen = [s for s in arch.block_linears if s.name.rsplit(".", 1)[-1] in wanted]
    if not chosen:
        names = ", ".join(s.name.rsplit(".", 1)[-1] for s in arch.block_linears)
        raise UserError(f"--peft targets={targets!r}: none match this model's linears ({names})")
    return chosen


def _ia3_targets(arch: Architecture) -> List[Tuple[int, bool]]:
    """(vector length, scales the input) per block for the trainer's defaults: k, v outputs and the MLP
    down input, under each family's names (``Architecture.ia3_vectors``)."""
    return list(arch.ia3_vectors)


def peft_tensors(arch: Architecture, peft: PeftSpec) -> List[int]:
    """Numel of every trainable tensor the method adds (each is partitioned separately)."""
    h, layers = arch.hidden_size, arch.num_layers
    if peft.method == "lora":
        r = peft.get("r")
        one = [n for s in _lora_targets(arch, peft) for n in (r * s.in_features, s.out_features * r)]
        return one * layers
    if peft.method == "ia3":
        return [n for n, _ in _ia3_targets(arch)] * layers
    if peft.method == "prompt":
        return [peft.get("n") * h]
    if peft.method == "prefix":
        return [2 * layers * peft.get("n") * arch.num_kv_heads * arch.head_dim]
    b = peft.get("bottleneck")
    adapter = [h * b, b, b * h, h]
    return adapter * layers * (2 if peft.method == "serial_adapter" else 1)


@dataclass
class PlanSettings:
    world_size: int = 1
    gpus_per_node: int = 1
    gpu_mem_gib: float = 24.0
    seq: int = 2048
    micro_batch: int = 1
    peft: PeftSpec = field(default_factory=lambda: PeftSpec("lora", {}))
    quant: str = "nf4"
    double_quant: bool = True
    offload: str = "none"
    checkpointing: bool = True
    attention: str = "sdpa"
    logits_chunk: int = 0
    trainable_dtype: str = "fp32"
    prefetch_bucket_size: int = 50_000_000
    max_live_parameters: int = 1_000_000_000
    reduce_bucket_size: int = 50_000_000
    persistence_threshold: int = 0
    engine: str = "auto"
    allocator_margin: float = 0.10
    dropout_mask_bytes: int = 1
    saves_dequantized_weight: Optional[bool] = None


def lora_dropout(s: PlanSettings) -> float:
    """Unset: 0 on an NF4 base (the QLoRA planning default), 0.05 otherwise; the fused kernel takes either."""
    value = s.peft.get("dropout")
    return float(value) if value is not None else (0.0 if s.quant == "nf4" else 0.05)


def dequantized_weight_saved(s: PlanSettings) -> bool:
    """Unset: never for mtpeft, whose ``QuantLinear`` trains through an op that dequantizes again
    in backward; set it to model a base that calls ``F.linear`` on the dequantized weight."""
    if s.saves_dequantized_weight is not None:
        return s.saves_dequantized_weight
    return False


def per_rank(nbytes: int, world: int, element: int = 2) -> int:
    """Bytes one rank holds of a tensor of ``nbytes`` stored as ``element``-byte items under ZeRO-3."""
    items = -(-nbytes // element)
    return -(-items // world) * element


def nf4_tensor_bytes(numel: int, double_quant: bool) -> Tuple[int, List[int]]:
    """(packed bytes, [constant tensors' bytes]) of one quantized weight."""
    blocks = -(-numel // NF4_BLOCK)
    if double_quant:
        consts = [blocks, 4 * -(-blocks // DQ_BLOCK), DQ_CODE_BYTES, DQ_OFFSET_BYTES]
    else:
        consts = [4 * blocks]
    return -(-numel // 2), consts


def engine_of(s: PlanSettings) -> str:
    """``auto``: plain PyTorch on one GPU without offload, DeepSpeed ZeRO-3 otherwise."""
    if s.engine != "auto":
        return s.engine
    return "deepspeed" if s.world_size > 1 or s.offload != "none" else "torch"


def trainable_bytes_per_element(dtype: str, engine: str) -> Dict[str, int]:
    """Bytes per trainable element. DeepSpeed ZeRO-3 keeps an fp32 master partition even for fp32
    parameters (stage3's alias branch compares a torch.device with a device-name string, which is
    never equal), so fp32 PEFT costs 20 B there and 16 B under plain PyTorch."""
    master = 4 if dtype != "fp32" or engine == "deepspeed" else 0
    param = 4 if dtype == "fp32" else 2
    return {"trainable_params": param, "master_weights": master, "gradients": param, "optimizer_states": 8}


def model_state_bytes(arch: Architecture, s: PlanSettings) -> Dict[str, int]:
    """Per-rank bytes of the base and the PEFT states, each tensor padded as ZeRO-3 does."""
    world = s.world_size
    out = dict(packed_weights=0, quant_constants=0, bf16_weights=0)
    for kind, numel, _ in arch.tensors:
        if kind == "quant" and s.quant == "nf4":
            packed, consts = nf4_tensor_bytes(numel, s.double_quant)
            out["packed_weights"] += per_rank(packed, world)
            out["quant_constants"] += sum(per_rank(c, world) for c in consts)
        else:
            out["bf16_weights"] += per_rank(2 * numel, world)
    sizes = trainable_bytes_per_element(s.trainable_dtype, engine_of(s))
    for key, size in sizes.items():
        out[key] = sum(size * -(-n // world) for n in peft_tensors(arch, s.peft))
    return out


def _layer_saved_bytes(arch: Architecture, s: PlanSettings, b: int, L: int) -> int:
    """Bytes autograd keeps for one block's backward (see the module docstring)."""
    T, h, I = b * L, arch.hidden_size, arch.intermediate_size
    heads, q, kv = arch.num_heads, arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    layernorm = arch.block_norm_params > 2 * h
    norm = 4 * T * h + (12 if layernorm else 4) * T
    total = 2 * norm + 2 * T * q
    keys = L + (s.peft.get("n") if s.peft.method == "prefix" else 0)
    if s.attention == "eager":
        total += 2 * 2 * T * (q if kv != q else kv) + 6 * b * heads * L * keys
    else:
        total += 2 * 2 * T * kv + 2 * T * q + 4 * b * heads * L
    total += (6 if arch.gated_mlp else 2) * T * I
    if dequantized_weight_saved(s):
        total += 2 * arch.block_linear_params
    m = s.peft.method
    if m == "lora":
        r, dropout = s.peft.get("r"), lora_dropout(s) > 0
        targets = _lora_targets(arch, s.peft)
        if dropout:
            total += sum((2 + s.dropout_mask_bytes) * T * t.in_features for t in targets)
        else:
            # one saved input per tensor read (q/k/v share theirs); with a fused attention kernel the output
            # projection reads the attention's output, which that kernel keeps for its own backward
            inputs = {arch.input_reader.get(t.name, t.name): t.in_features for t in targets}
            if s.attention != "eager":
                inputs.pop(arch.input_reader.get(arch.attention_output, arch.attention_output), None)
            total += sum(2 * T * width for width in inputs.values())
        total += 2 * T * r * len(targets)
    elif m == "ia3":
        total += sum(2 * T * n for n, _ in _ia3_targets(arch))
    elif m in ("serial_adapter", "parallel_adapter"):
        count = 2 if m == "serial_adapter" else 1
        total += count * (2 * T * h + 4 * T * s.peft.get("bottleneck"))
    return total


def dequant_path_bytes(arch: Architecture, s: PlanSettings) -> int:
    """GPU memory of the 4-bit layer's large-M path (``kernels.nf4_lora_linear_dequant``), used when a
    micro-batch has more tokens than ``FUSED_MAX_M``: the reused per-device buffer the weights are
    dequantized into (the largest block linear plus LoRA's r rows of A, bf16, kept for the whole run)
    and, in that linear's backward, the ``[dy, g]`` copy (``2·T·(out + r)``). Nothing for bf16 bases or
    fewer tokens (the fused kernels hold no buffer)."""
    from mtpeft.kernels.backend import FUSED_MAX_M

    T = s.micro_batch * s.seq
    if s.quant != "nf4" or T <= FUSED_MAX_M or not arch.block_linears:
        return 0
    r = s.peft.get("r") if s.peft.method == "lora" else 0
    buffer = max((t.out_features + r) * t.in_features for t in arch.block_linears)
    dy_copy = max(T * (t.out_features + r) for t in arch.block_linears)
    return 2 * buffer + 2 * dy_copy


def activation_bytes(arch: Architecture, s: PlanSettings) -> Dict[str, int]:
    """Peak activation and logits bytes, and both checkpointing variants for the report."""
    b = s.micro_batch
    L = s.seq + (s.peft.get("n") if s.peft.method == "prompt" else 0)
    T, h, I, V = b * L, arch.hidden_size, arch.intermediate_size, arch.vocab_size
    layer = _layer_saved_bytes(arch, s, b, L)
    workspace = 4 * T * h + 4 * T * I
    final_norm = 4 * T * h + 4 * T
    stored_ckpt = arch.num_layers * 2 * T * h + layer
    stored_full = arch.num_layers * layer
    if arch.encoder:  # pooled heads only: no vocabulary logits
        logits_loss = logits_bwd = 0
    elif s.logits_chunk:
        c = min(s.logits_chunk, T)
        logits_loss, logits_bwd = 8 * c * V, 8 * c * V
    else:
        logits_loss, logits_bwd = 14 * T * V, 2 * T * V
    stored = stored_ckpt if s.checkpointing else stored_full
    ckpt_inputs = arch.num_layers * 2 * T * h if s.checkpointing else stored_full
    loss_bwd = ckpt_inputs + final_norm + logits_loss
    bwd = stored + workspace + final_norm + logits_bwd
    if loss_bwd >= bwd:
        acts, logits = ckpt_inputs + final_norm, logits_loss
    else:
        acts, logits = stored + workspace + final_norm, logits_bwd
    return {
        "activations": acts,
        "logits_loss": logits,
        "activations_checkpointing": stored_ckpt + workspace + final_norm,
        "activations_no_checkpointing": stored_full + workspace + final_norm,
        "layer_saved": layer,
    }


def _largest_gathered_bytes(arch: Architecture, s: PlanSettings) -> Tuple[int, int]:
    """(largest module gathered whole, one block) in bytes, PEFT params included."""
    blocks: Dict[int, int] = {}
    other = 0
    for kind, numel, layer in arch.tensors:
        if kind == "quant" and s.quant == "nf4":
            packed, consts = nf4_tensor_bytes(numel, s.double_quant)
            nbytes = packed + sum(consts)
        else:
            nbytes = 2 * numel
        if layer >= 0:
            blocks[layer] = blocks.get(layer, 0) + nbytes
        else:
            other = max(other, nbytes)
    peft = sum(peft_tensors(arch, s.peft)) * (4 if s.trainable_dtype == "fp32" else 2)
    block = max(blocks.values()) + peft // max(arch.num_layers, 1)
    return max(block, other), block


def persistent_bytes(arch: Architecture, s: PlanSettings) -> int:
    """Tensors at or under ``stage3_param_persistence_threshold`` stay gathered whole on every rank
    (on top of their partition, which ``model_state_bytes`` counts)."""
    if engine_of(s) != "deepspeed" or s.offload != "none":
        return 0
    total = 0
    for kind, numel, _ in arch.tensors:
        if kind == "quant" and s.quant == "nf4":
            packed, consts = nf4_tensor_bytes(numel, s.double_quant)
            sizes = [packed, *consts]
        else:
            sizes = [2 * numel]
        total += sum(2 * -(-n // 2) for n in sizes if -(-n // 2) <= s.persistence_threshold)
    size = 4 if s.trainable_dtype == "fp32" else 2
    return total + sum(n * size for n in peft_tensors(arch, s.peft) if n <= s.persistence_threshold)


def zero3_buffer_bytes(arch: Architecture, s: PlanSettings) -> int:
    """Gathered + prefetched parameters, and the gradient bucket that ``contiguous_gradients``
    allocates in full (``reduce_bucket_size`` elements of the gradient dtype) at engine start."""
    if engine_of(s) != "deepspeed":
        return 0
    largest, block = _largest_gathered_bytes(arch, s)
    prefetch = min(2 * s.prefetch_bucket_size, block)
    live = min(largest + prefetch, max(largest, 2 * s.max_live_parameters))
    reduce = (4 if s.trainable_dtype == "fp32" else 2) * s.reduce_bucket_size
    return live + reduce


def plan(arch: Architecture, s: PlanSettings) -> Dict[str, Any]:
    """One configuration → the breakdown, the peak and whether it fits."""
    if engine_of(s) == "torch" and (s.world_size > 1 or s.offload != "none"):
        raise UserError("--engine torch runs one GPU without offload; use --engine deepspeed (ZeRO-3) "
                        "for several GPUs or offloading")
    states = model_state_bytes(arch, s)
    host = {"cpu_bytes_per_node": 0, "nvme_bytes_per_node": 0}
    if s.offload != "none":
        moved = sum(states.values()) * s.gpus_per_node
        states = {k: 0 for k in states}
        if s.offload == "cpu":
            host["cpu_bytes_per_node"] = moved
        else:
            host["nvme_bytes_per_node"] = moved
            host["cpu_bytes_per_node"] = s.gpus_per_node * 5 * 100_000_000 * 2
    acts = activation_bytes(arch, s)
    breakdown = dict(states)
    breakdown["activations"] = acts["activations"]
    breakdown["logits_loss"] = acts["logits_loss"]
    breakdown["zero3_buffers"] = zero3_buffer_bytes(arch, s)
    breakdown["zero3_persistent"] = persistent_bytes(arch, s)
    breakdown["nf4_dequant_buffer"] = dequant_path_bytes(arch, s)
    peak = sum(breakdown.values())
    dynamic = acts["activations"] + acts["logits_loss"] + breakdown["zero3_buffers"]
    breakdown["allocator_margin"] = int(s.allocator_margin * dynamic)
    per_gpu = peak + breakdown["allocator_margin"]
    return {
        "model": arch.name,
        "total_params": arch.total_params,
        "trainable_params": sum(peft_tensors(arch, s.peft)),
        "world_size": s.world_size,
        "settings": {
            "gpu_mem_gib": s.gpu_mem_gib, "seq": s.seq, "micro_batch": s.micro_batch,
            "peft": s.peft.method,
            "peft_options": {k: (lora_dropout(s) if k == "dropout" else s.peft.get(k))
                             for k in peft_defaults()[s.peft.method]},
            "saves_dequantized_weight": dequantized_weight_saved(s),
            "quant": s.quant, "double_quant": s.double_quant, "offload": s.offload,
            "checkpointing": s.checkpointing, "attention": s.attention, "logits_chunk": s.logits_chunk,
            "trainable_dtype": s.trainable_dtype, "allocator_margin": s.allocator_margin,
            "engine": engine_of(s),
        },
        "breakdown": breakdown,
        "per_gpu_bytes": per_gpu,
        "predicted_peak_bytes": peak,
        "predicted_peak_gib": peak / GIB,
        "fits": per_gpu <= s.gpu_mem_gib * GIB,
        "activations_checkpointing_bytes": acts["activations_checkpointing"],
        "activations_no_checkpointing_bytes": acts["activations_no_checkpointing"],
        **host,
    }


def _largest_fitting(arch: Architecture, s: PlanSettings, key: str, lo: int, hi: int, step: int) -> Optional[int]:
    def fits(v: int) -> bool:
        return plan(arch, replace(s, **{key: v * step}))["fits"]

    lo_i, hi_i = lo // step, hi // step
    if not fits(lo_i):
        return None
    while lo_i < hi_i:
        mid = (lo_i + hi_i + 1) // 2
        lo_i, hi_i = (mid, hi_i) if fits(mid) else (lo_i, mid - 1)
    return lo_i * step


def search(arch: Architecture, s: PlanSettings, micro_batch_auto: bool = False,
           seq_auto: bool = False, offload_auto: bool = False) -> Tuple[PlanSettings, Dict[str, Any]]:
    """Least offload that fits, then the largest micro-batch or sequence (multiple of 64) that fits."""
    notes: Dict[str, Any] = {}
    if offload_auto:
        probe = replace(s, micro_batch=1 if micro_batch_auto else s.micro_batch, seq=64 if seq_auto else s.seq)
        s = replace(s, offload="nvme")
        for level in ("none", "cpu"):
            if plan(arch, replace(probe, offload=level))["fits"]:
                s = replace(s, offload=level)
                break
        notes["offload"] = s.offload
    if micro_batch_auto:
        best = _largest_fitting(arch, s, "micro_batch", 1, 4096, 1)
        s = replace(s, micro_batch=best or 1)
        notes["micro_batch"] = best
    if seq_auto:
        top = arch.max_positions or 1 << 20
        best = _largest_fitting(arch, s, "seq", 64, max(64, top - top % 64), 64)
        s = replace(s, seq=best or 64)
        notes["seq"] = best
    return s, notes


def is_quantized_module(module: nn.Module) -> bool:
    return "quant" in type(module).__name__.lower() or hasattr(module, "quant_state")


def plan_model_states(model: nn.Module, world_size: int, engine: str = "deepspeed",
                      optimizer_bytes_per_element: int = 8) -> Dict[str, int]:
    """Per-rank bytes of an ACTUAL module's states under ZeRO-3, counted like ``model_state_bytes``.

    Inside a quantized module (class name containing ``Quant`` or holding ``quant_state``) the
    largest frozen tensor is the packed weight and the rest are quantization constants; every
    tensor is padded to a multiple of ``world_size`` elements, as ZeRO-3 partitions it. Trainable
    tensors get gradients in their own dtype, Adam states in fp32 and an fp32 master copy (always
    under DeepSpeed, see ``trainable_bytes_per_element``; under plain PyTorch only when not fp32).
    """
    out = dict(packed_weights=0, quant_constants=0, bf16_weights=0, trainable_params=0,
               master_weights=0, gradients=0, optimizer_states=0)
    seen = set()
    for module in model.modules():
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for _, p in own)
        frozen = [p for _, p in own if not p.requires_grad]
        packed = max(frozen, key=lambda p: p.numel() * p.element_size(), default=None)
        for _, p in own:
            size = p.element_size()
            part = -(-p.numel() // world_size)
            if p.requires_grad:
                out["trainable_params"] += part * size
                out["master_weights"] += part * 4 if (engine == "deepspeed" or size != 4) else 0
                out["gradients"] += part * size
                out["optimizer_states"] += part * optimizer_bytes_per_element
            elif is_quantized_module(module):
                out["packed_weights" if p is packed else "quant_constants"] += part * size
            else:
                out["bf16_weights"] += part * size
    out["total"] = sum(out.values())
    return out
