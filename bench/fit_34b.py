"""Does a CodeLlama-34B QLoRA step fit, and does the planner say so? Measured beside the plan.

Builds the model layer by layer with random NF4 weights, never holding the bf16 model: the module
tree is created on the meta device, each block linear becomes an ``mtpeft.quant.QuantLinear``
whose packed bytes and double-quant constants are drawn directly on the GPU, and only the
embeddings, norms and LM head are materialized (bf16). LoRA (``mtpeft.tuners.lora``) on all
projections, gradient checkpointing, AdamW on the fp32 LoRA parameters under bf16 autocast,
single GPU without DeepSpeed (the planner's world-size-1 case).

Records ``torch.cuda.max_memory_allocated`` and tokens/s and prints them beside the planner's
``predicted_peak`` with the ratio. ``--shape 1b`` runs a 1B-shaped model (deepseek-coder-1.3b) and
compares the activation prediction with the measured step memory above the model states.

  python bench/fit_34b.py --steps 3 --json out.json            # 34B, seq 2048, micro-batch 1
  python bench/fit_34b.py --layers 8 --steps 3                  # truncated 34B
  python bench/fit_34b.py --shape 1b --checkpointing off        # activation check
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict

import torch
from torch import nn

SHAPES = {"34b": "codellama-34b", "1b": "deepseek-coder-1.3b"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="34b")
    p.add_argument("--model", help="architecture name or config.json (overrides --shape)")
    p.add_argument("--layers", type=int, default=0, help="keep only the first K blocks (0 = all)")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="measured steps after one warm-up step")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--checkpointing", choices=("on", "off"), default="on")
    p.add_argument("--base", choices=("quantlinear", "dequant-in-backward"), default="quantlinear",
                   help="off the fused path (LoRA dropout > 0): QuantLinear.forward as is, or a Function "
                        "that dequantizes again in backward instead of keeping the bf16 weight")
    p.add_argument("--gpu-mem", type=float, default=24.0, help="budget the plan is checked against (GiB)")
    p.add_argument("--json", dest="json_out", help="write the results here")
    p.add_argument("--allow-cpu", action="store_true", help="smoke-run the code path on CPU (no memory figures)")
    return p.parse_args(argv)


def random_nf4(out_features: int, in_features: int, device: torch.device):
    """Random packed nibbles and plausible double-quant absmax (about 0.05 for weights of std 0.02)."""
    from mtpeft.quant.nf4 import dynamic_map
    from mtpeft.quant.nf4_format import NF4Weight

    numel = out_features * in_features
    blocks = -(-numel // 64)
    return NF4Weight(
        packed=torch.randint(0, 256, (-(-numel // 2),), dtype=torch.uint8, device=device),
        absmax=torch.randint(0, 256, (blocks,), dtype=torch.uint8, device=device),
        shape=torch.Size((out_features, in_features)),
        dtype=torch.bfloat16,
        blocksize=64,
        absmax_scale=torch.full((-(-blocks // 256),), 0.01, dtype=torch.float32, device=device),
        absmax_code=dynamic_map(device),
        absmax_offset=0.05,
    )


class _DequantInBackward(torch.autograd.Function):
    """Frozen NF4 matmul that keeps no bf16 weight for backward (dequantizes it again)."""

    @staticmethod
    def forward(ctx, x, module):
        from mtpeft.kernels.nf4_dequant import nf4_dequant

        ctx.module = module
        return x @ nf4_dequant(module.quant_weight(), x.dtype).t()

    @staticmethod
    def backward(ctx, dy):
        from mtpeft.kernels.nf4_dequant import nf4_dequant

        return dy @ nf4_dequant(ctx.module.quant_weight(), dy.dtype), None


def _materialize(module: nn.Module, device: torch.device) -> None:
    """Give every meta parameter of ``module`` (norms, biases) a real, small tensor."""
    for sub in module.modules():
        for name, p in list(sub.named_parameters(recurse=False)):
            if p.device.type == "meta":
                fill = torch.ones if "norm" in type(sub).__name__.lower() and name == "weight" else torch.zeros
                setattr(sub, name, nn.Parameter(fill(p.shape, dtype=torch.bfloat16, device=device),
                                                requires_grad=False))


def build_model(config_dict: Dict[str, Any], layers: int, device: torch.device, base: str):
    """The model with random NF4 blocks, built one block at a time; returns (model, meta arch)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from mtpeft.profile.architecture import count_architecture
    from mtpeft.quant.linear import QuantLinear

    if layers:
        config_dict = dict(config_dict, num_hidden_layers=layers)
    config = AutoConfig.for_model(**config_dict)
    config.use_cache = False
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    arch = count_architecture(model, config_dict.get("model_type", "model"))
    for block in model.model.layers:
        for name, linear in [(n, m) for n, m in block.named_modules() if isinstance(m, nn.Linear)]:
            bias = torch.zeros(linear.out_features, dtype=torch.bfloat16, device=device) if linear.bias is not None else None
            q = QuantLinear.from_nf4(random_nf4(linear.out_features, linear.in_features, device), bias)
            if base == "dequant-in-backward":
                q.forward = (lambda m: lambda x: _DequantInBackward.apply(x, m))(q)
            parent, _, child = name.rpartition(".")
            setattr(block.get_submodule(parent) if parent else block, child, q)
        _materialize(block, device)
    embed = model.get_input_embeddings()
    embed.weight = nn.Parameter(torch.randn(embed.weight.shape, dtype=torch.bfloat16, device=device) * 0.02,
                                requires_grad=False)
    head = model.get_output_embeddings()
    if head is not None and arch.tied_lm_head:
        head.weight = embed.weight
    elif head is not None:
        head.weight = nn.Parameter(torch.randn(head.weight.shape, dtype=torch.bfloat16, device=device) * 0.02,
                                   requires_grad=False)
    _materialize(model, device)
    rotary = model.model.rotary_emb
    with torch.device(device):  # its inv_freq buffers were computed on the meta device
        model.model.rotary_emb = type(rotary)(config=model.config)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise RuntimeError(f"still on the meta device: {left[:5]}")
    return model, arch


def add_lora(model: nn.Module, args: argparse.Namespace, device: torch.device) -> list:
    from mtpeft.tuners.lora import LoraSettings, inject_lora

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "c_fc", "c_proj"]
    present = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "in_features")}
    inject_lora(model, LoraSettings(r=args.r, alpha=args.alpha, dropout=args.lora_dropout,
                                    target_modules=[t for t in targets if t in present]))
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.data = p.data.to(device=device, dtype=torch.float32)
        p.requires_grad_(True)
    return params


def enable_checkpointing(model: nn.Module) -> None:
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def predicted(arch, args: argparse.Namespace, fused: bool) -> Dict[str, Any]:
    from mtpeft.profile.planner import PeftSpec, PlanSettings, plan

    settings = PlanSettings(
        world_size=1, gpu_mem_gib=args.gpu_mem, seq=args.seq, micro_batch=args.micro_batch,
        peft=PeftSpec("lora", {"r": args.r, "alpha": int(args.alpha), "dropout": args.lora_dropout}),
        checkpointing=args.checkpointing == "on", attention="sdpa",
        saves_dequantized_weight=not fused and args.base == "quantlinear",
    )
    return plan(arch, settings)


def run(args: argparse.Namespace) -> Dict[str, Any]:
    from mtpeft.profile.architecture import load_config_dict
    from mtpeft.profile.flops import step_flops
    from mtpeft.quant.linear import QuantLinear

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    name, config_dict = load_config_dict(args.model or SHAPES[args.shape])
    model, arch = build_model(config_dict, args.layers, device, args.base)
    fused = args.lora_dropout == 0  # the path this bench models as fused (see --base)
    lora = add_lora(model, args, device)
    if args.checkpointing == "on":
        enable_checkpointing(model)
    model.train()
    optimizer = torch.optim.AdamW(lora, lr=1e-4, fused=cuda)  # fused: no foreach temporaries
    vocab = arch.vocab_size
    ids = torch.randint(0, vocab, (args.micro_batch, args.seq), device=device)

    def step() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        return float(out.loss.detach())

    step()  # warm-up: allocates Adam states and grads, compiles kernels
    if cuda:
        torch.cuda.synchronize()
        states = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    losses = [step() for _ in range(args.steps)]
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    plan = predicted(arch, args, fused)
    flops = step_flops(arch, args.seq, args.micro_batch, "lora", r=args.r,
                       checkpointing=args.checkpointing == "on", embedding_grad=args.checkpointing == "on")
    result: Dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "device": torch.cuda.get_device_name() if cuda else "cpu (smoke run, no memory figures)",
        "torch": torch.__version__,
        "model": name, "layers": arch.num_layers, "total_params": arch.total_params,
        "seq": args.seq, "micro_batch": args.micro_batch, "steps": args.steps,
        "lora_r": args.r, "lora_dropout": args.lora_dropout, "checkpointing": args.checkpointing,
        "base": args.base, "fused_lora_path": fused,
        "losses": losses,
        "step_time_s": elapsed / max(args.steps, 1),
        "tokens_per_s": args.micro_batch * args.seq * args.steps / elapsed,
        "flops_per_step": flops["total"],
        "achieved_tflops": flops["total"] * args.steps / elapsed / 1e12,
        "predicted_peak_bytes": plan["predicted_peak_bytes"],
        "predicted_breakdown": plan["breakdown"],
        "plan_fits": plan["fits"],
    }
    if cuda:
        peak = torch.cuda.max_memory_allocated()
        dynamic_pred = plan["breakdown"]["activations"] + plan["breakdown"]["logits_loss"]
        result.update({
            "measured_peak_bytes": peak,
            "peak_ratio_measured_over_predicted": peak / plan["predicted_peak_bytes"],
            "measured_model_state_bytes": states,
            "measured_activation_bytes": peak - states,
            "predicted_activation_bytes": dynamic_pred,
            "activation_ratio_measured_over_predicted": (peak - states) / dynamic_pred,
        })
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("bench/fit_34b.py needs a CUDA GPU (none found); --allow-cpu smoke-runs the code path "
              "on a small --model/--layers/--seq without memory figures", file=sys.stderr)
        return 2
    result = run(args)
    gib = 1024**3
    lines = [f"{result['device']}: {result['model']} ({result['layers']} blocks, {result['total_params']:,} params), "
             f"seq {result['seq']} x micro-batch {result['micro_batch']}, {result['steps']} steps",
             f"tokens/s {result['tokens_per_s']:.1f}, step {result['step_time_s']:.3f} s, "
             f"{result['achieved_tflops']:.1f} TFLOP/s (frozen-base count)",
             f"predicted peak {result['predicted_peak_bytes'] / gib:.3f} GiB (plan fits: {result['plan_fits']})"]
    if "measured_peak_bytes" in result:
        lines += [f"measured peak  {result['measured_peak_bytes'] / gib:.3f} GiB, "
                  f"ratio {result['peak_ratio_measured_over_predicted']:.3f}",
                  f"activations measured {result['measured_activation_bytes'] / gib:.3f} GiB vs predicted "
                  f"{result['predicted_activation_bytes'] / gib:.3f} GiB, "
                  f"ratio {result['activation_ratio_measured_over_predicted']:.3f}"]
    print("\n".join(lines))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
