"""One training step of a DeepSeek-Coder-1.3B-shaped decoder, three ways (issue 11, part c).

The kernel benchmark (``bench/kernels.py``) times one linear; what a user feels is the whole step,
where attention, norms, the LM head and the optimizer dilute (or not) what the kernels gain. So the
same random model (``mtpeft/profile/archs/deepseek-coder-1.3b.json``, built from a transformers
``LlamaConfig`` on the GPU, seeded, bf16) is trained for a few steps as
  mtpeft-qlora    ``mtpeft.quant.quantize_model`` (NF4, double quant) + ``mtpeft.tuners.lora``,
  bf16-lora       the bf16 model + ``mtpeft.tuners.lora`` (the floor a 4-bit base pays against),
  peft-bnb-qlora  bitsandbytes ``Linear4bit`` (nf4, double quant, bf16 compute) + HF peft LoRA,
each with LoRA r=16, alpha=32, no dropout on q/k/v/o/gate/up/down, fp32 LoRA weights, bf16
autocast, fused AdamW, one process and no DeepSpeed, so the difference is the frozen base's code.
peft's ``prepare_model_for_kbit_training`` is not called: it would upcast norms and embeddings to
fp32 and measure that instead.

Per variant: tokens/s and step time over the timed steps (after untimed warm-up steps, where Triton
autotunes), the CUDA allocator's peak (model included) and the model's own bytes, the first and
last loss (the three start from the same weights, so the first losses should agree within the
quantization error), and MFU on frozen-base FLOPs (``mtpeft.profile.flops.step_flops``, no
recomputation counted) against the device's bf16 dense peak.

    python bench/e2e_step.py --json runs/e2e_step.json
    python bench/e2e_step.py --cpu-smoke                  # tiny shape on CPU: checks the script only
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict

import torch
from torch import nn

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = ("mtpeft-qlora", "peft-bnb-qlora", "bf16-lora")
SMOKE_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 4, "vocab_size": 256, "bos_token_id": 1, "eos_token_id": 2}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="deepseek-coder-1.3b", help="architecture name or config.json")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps (allocation, Triton autotuning)")
    p.add_argument("--steps", type=int, default=8, help="timed steps")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--checkpointing", choices=("on", "off"), default="off")
    p.add_argument("--peak-tflops", type=float, default=None, help="device bf16 peak (default: known GPUs)")
    p.add_argument("--json", dest="json_out", help="write the results here")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="a tiny model, 1 warm-up + 1 step on CPU: checks the script, figures mean nothing")
    return p.parse_args(argv)


def build_base(config_dict: Dict[str, Any], device: torch.device) -> nn.Module:
    """The seeded random bf16 model, built on ``device`` directly (same weights for every variant)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_dict(config_dict)
    config.use_cache = False
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    return model.requires_grad_(False)


def mtpeft_lora(model: nn.Module, args: argparse.Namespace, quantize: bool) -> nn.Module:
    from mtpeft.quant import quantize_model
    from mtpeft.tuners.lora import LoraSettings, inject_lora

    if quantize:
        quantize_model(model, skip=("lm_head",), double_quant=True)
    inject_lora(model, LoraSettings(r=args.r, alpha=args.alpha, dropout=0.0, target_modules=TARGETS))
    return model


def peft_bnb_lora(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    device = model.get_input_embeddings().weight.device
    for name, linear in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]:
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                              device="meta")
        q.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, compress_statistics=True,
                                     quant_type="nf4", blocksize=64)
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.data, requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, q.to(device))  # .to quantizes the weight
    cfg = LoraConfig(r=args.r, lora_alpha=int(args.alpha), lora_dropout=0.0, target_modules=TARGETS,
                     bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def measure(model: nn.Module, args: argparse.Namespace, device: torch.device, vocab: int) -> Dict[str, Any]:
    cuda = device.type == "cuda"
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in lora:  # mtpeft's LoRA factors are created on the CPU, peft's beside their layer
        p.data = p.data.to(device=device, dtype=torch.float32)
        p.requires_grad_(True)
    if args.checkpointing == "on":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = torch.optim.AdamW(lora, lr=1e-4, fused=cuda)
    gen = torch.Generator(device=device).manual_seed(1)  # the same tokens for every variant
    ids = torch.randint(0, vocab, (args.micro_batch, args.seq), device=device, generator=gen)

    def step() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        return float(loss.detach())

    model_bytes = torch.cuda.memory_allocated() if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats()  # the step's peak, not the fp32 construction's
    losses = [step() for _ in range(args.warmup)]
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    losses += [step() for _ in range(args.steps)]
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {
        "trainable_params": sum(p.numel() for p in lora),
        "step_s": elapsed / args.steps,
        "tokens_per_s": args.micro_batch * args.seq * args.steps / elapsed,
        "model_bytes": model_bytes,
        "peak_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "first_loss": losses[0], "last_loss": losses[-1],
    }


def run_variant(name: str, config_dict: Dict[str, Any], args: argparse.Namespace, device: torch.device) -> Dict[str, Any]:
    builders: Dict[str, Callable[[nn.Module], nn.Module]] = {
        "mtpeft-qlora": lambda m: mtpeft_lora(m, args, quantize=True),
        "bf16-lora": lambda m: mtpeft_lora(m, args, quantize=False),
        "peft-bnb-qlora": lambda m: peft_bnb_lora(m, args),
    }
    if device.type == "cuda":
        torch.cuda.empty_cache()
    model = builders[name](build_base(config_dict, device))
    try:
        return measure(model, args, device, config_dict["vocab_size"])
    finally:
        del model
        gc.collect()


def describe(row: Dict[str, Any]) -> str:
    peak = f"{row['peak_bytes'] / 2**30:.2f} GiB" if row["peak_bytes"] else "n/a"
    mfu_text = f"{row['mfu']:.3f}" if row["mfu"] is not None else "n/a"
    return (f"{row['tokens_per_s']:.0f} tokens/s, step {row['step_s'] * 1e3:.1f} ms, peak {peak}, MFU {mfu_text}, "
            f"loss {row['first_loss']:.4f} -> {row['last_loss']:.4f}")


def main(argv=None) -> int:
    args = parse_args(argv)
    from mtpeft.profile.architecture import load_config_dict
    from mtpeft.profile.flops import step_flops
    from mtpeft.profile.measure import detect_peak_tflops, mfu

    if args.cpu_smoke:
        args.seq, args.warmup, args.steps = 32, 1, 1
    elif not torch.cuda.is_available():
        print("bench/e2e_step.py needs a CUDA GPU (none found); --cpu-smoke checks the script on CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    name, config_dict = load_config_dict(args.model)
    if args.cpu_smoke:
        config_dict = dict(config_dict, **SMOKE_SHAPE)
    flops = step_flops(config_dict, args.seq, args.micro_batch, "lora", r=args.r, checkpointing=False)["total"]
    peak = detect_peak_tflops(args.peak_tflops)
    result: Dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke run, figures meaningless)",
        "torch": torch.__version__, "model": name, "seq": args.seq, "micro_batch": args.micro_batch,
        "steps": args.steps, "lora_r": args.r, "checkpointing": args.checkpointing,
        "model_flops_per_step": flops, "peak_tflops": peak, "variants": {},
    }
    for variant in args.variants:
        try:
            row = run_variant(variant, config_dict, args, device)
            row["mfu"] = mfu(flops, row["step_s"], peak)
        except Exception as err:  # one variant failing (say bitsandbytes missing) must not hide the others
            row = {"error": f"{type(err).__name__}: {err}"}
        result["variants"][variant] = row
        print(f"{variant:>15}: " + (row.get("error") or describe(row)), flush=True)
    ok = {k: v for k, v in result["variants"].items() if "error" not in v}
    if "mtpeft-qlora" in ok:
        ours = ok["mtpeft-qlora"]
        for other in ("peft-bnb-qlora", "bf16-lora"):
            if other in ok:
                result[f"speedup_vs_{other}"] = ours["tokens_per_s"] / ok[other]["tokens_per_s"]
                if ours["peak_bytes"]:
                    result[f"peak_ratio_vs_{other}"] = ours["peak_bytes"] / ok[other]["peak_bytes"]
                print(f"mtpeft-qlora vs {other}: tokens/s x{result[f'speedup_vs_{other}']:.2f}"
                      + (f", peak memory x{result[f'peak_ratio_vs_{other}']:.2f}" if ours["peak_bytes"] else ""))
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if len(ok) == len(args.variants) else 1


if __name__ == "__main__":
    sys.exit(main())
