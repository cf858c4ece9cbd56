"""``mtpeft plan``: parse the flags, run the planner (and its searches), print a table or JSON."""

from __future__ import annotations

import argparse
import json
from typing import Any, Dict

from mtpeft.command_parser import number, whole_number
from mtpeft.errors import UserError
from mtpeft.profile.architecture import load_architecture
from mtpeft.profile.planner import GIB, PlanSettings, parse_peft, plan, search
from mtpeft.tasks.chunked_lm_loss import resolve_chunk


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="architecture short name or a config.json path")
    parser.add_argument("--gpus", type=whole_number(1), default=1, help="GPUs per node")
    parser.add_argument("--nodes", type=whole_number(1), default=1)
    parser.add_argument("--gpu-mem", type=number(0), default=24.0, help="GiB per GPU")
    parser.add_argument("--seq", default="2048", help="sequence length or 'auto'")
    parser.add_argument("--micro-batch", default="1", help="micro-batch per GPU or 'auto'")
    parser.add_argument("--peft", default="lora", help="METHOD[:k=v,...], e.g. lora:r=16,alpha=32")
    parser.add_argument("--quant", choices=("nf4", "none"), default="nf4")
    parser.add_argument("--double-quant", choices=("on", "off"), default="on")
    parser.add_argument("--offload", choices=("none", "cpu", "nvme", "auto"), default="none")
    parser.add_argument("--checkpointing", choices=("on", "off"), default="on")
    parser.add_argument("--attention", choices=("sdpa", "eager"), default="sdpa")
    parser.add_argument("--logits-chunk", type=whole_number(-1, "-1: full logits, 0: automatic"), default=0,
                        help="tokens per LM-loss chunk, as train.logits_chunk: 0 automatic (the trainer's default), "
                             "-1 full logits")
    parser.add_argument("--trainable-dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--engine", choices=("auto", "torch", "deepspeed"), default="auto",
                        help="auto: plain PyTorch on one GPU without offload, DeepSpeed ZeRO-3 otherwise")
    parser.add_argument("--reduce-bucket-size", type=whole_number(1), default=50_000_000, help="reduce_bucket_size")
    parser.add_argument("--prefetch-bucket-size", type=whole_number(0), default=50_000_000, help="stage3_prefetch_bucket_size")
    parser.add_argument("--max-live-parameters", type=whole_number(1), default=1_000_000_000, help="stage3_max_live_parameters")
    parser.add_argument("--persistence-threshold", type=whole_number(0), default=0,
                        help="stage3_param_persistence_threshold")
    parser.add_argument("--margin", type=number(0, inclusive=True), default=0.10, help="allocator margin, fraction of dynamic memory")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _positive_or_auto(flag: str, value: str) -> int:
    if value == "auto":
        return 0
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise UserError(f"{flag} {value!r}: expected a positive integer or 'auto'")
    return number


def _table(result: Dict[str, Any], notes: Dict[str, Any]) -> str:
    s = result["settings"]
    lines = [
        f"{result['model']}: {result['total_params']:,} parameters, {result['trainable_params']:,} trainable "
        f"({s['peft']}), world {result['world_size']}, seq {s['seq']}, micro-batch {s['micro_batch']}, "
        f"quant {s['quant']}, offload {s['offload']}, checkpointing {'on' if s['checkpointing'] else 'off'}, "
        f"engine {s['engine']}",
        f"{'per GPU':<26}{'GiB':>10}",
    ]
    lines += [f"  {k:<24}{v / GIB:>10.3f}" for k, v in result["breakdown"].items()]
    master = " + fp32 master copy" if result["breakdown"]["master_weights"] else ""
    trained = (f"fp32 params + fp32 grads + fp32 Adam{master}" if s["trainable_dtype"] == "fp32"
               else "bf16 params + fp32 master + bf16 grads + fp32 Adam")
    lines.append(f"  {'total (with margin)':<24}{result['per_gpu_bytes'] / GIB:>10.3f}")
    lines.append(f"  {'predicted peak allocated':<24}{result['predicted_peak_gib']:>10.3f}")
    lines.append(f"trainable: {trained}, partitioned over {result['world_size']} rank(s)")
    if s["saves_dequantized_weight"]:
        lines.append("note: off the fused NF4+LoRA path (LoRA dropout > 0 or another method), "
                     "QuantLinear keeps each dequantized bf16 weight for backward (counted in activations)")
    lines.append(
        f"activations: {result['activations_checkpointing_bytes'] / GIB:.3f} GiB with checkpointing, "
        f"{result['activations_no_checkpointing_bytes'] / GIB:.3f} GiB without"
    )
    for key in ("cpu_bytes_per_node", "nvme_bytes_per_node"):
        if result[key]:
            lines.append(f"{key.replace('_', ' ')}: {result[key] / GIB:.3f} GiB")
    for key, value in notes.items():
        if key == "offload":
            lines.append(f"search: least offload that fits = {value}")
        else:
            lines.append(f"search: largest {key} that fits = {value if value else 'none (even the smallest does not)'}")
    lines.append(f"fits in {s['gpu_mem_gib']:g} GiB: {'yes' if result['fits'] else 'no'}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    seq = _positive_or_auto("--seq", str(args.seq))
    micro = _positive_or_auto("--micro-batch", str(args.micro_batch))
    arch = load_architecture(args.model)
    settings = PlanSettings(
        world_size=args.gpus * args.nodes, gpus_per_node=args.gpus, gpu_mem_gib=args.gpu_mem,
        seq=seq or 2048, micro_batch=micro or 1, peft=parse_peft(args.peft), quant=args.quant,
        double_quant=args.double_quant == "on", offload="none" if args.offload == "auto" else args.offload,
        checkpointing=args.checkpointing == "on", attention=args.attention,
        logits_chunk=resolve_chunk(args.logits_chunk, (micro or 1) * (seq or 2048), arch.vocab_size),
        trainable_dtype=args.trainable_dtype, allocator_margin=args.margin,
        prefetch_bucket_size=args.prefetch_bucket_size, max_live_parameters=args.max_live_parameters,
        persistence_threshold=args.persistence_threshold, reduce_bucket_size=args.reduce_bucket_size,
        engine=args.engine,
    )
    settings, notes = search(arch, settings, micro_batch_auto=not micro, seq_auto=not seq,
                             offload_auto=args.offload == "auto")
    result = plan(arch, settings)
    result["search"] = notes
    print(json.dumps(result, indent=2) if args.json else _table(result, notes))
    return 0
