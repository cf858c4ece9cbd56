"""Bytes all-gathered and reduce-scattered per ZeRO-3 step: NF4 base vs bf16 base (issue 5, part 7).

The same seeded Llama, once with its frozen linears in bf16 and once as ``QuantLinear`` (NF4,
double quant, via ``mtpeft.quant.quantize_model``), both with the shared LoRA
(``mtpeft.tuners.lora.inject_lora``) on every projection, trained for a few steps under ZeRO-3
(``ds_configs/zero3.json``: every tensor partitioned, bf16) with DeepSpeed's communication logger on
(``comms_logger.prof_all``). The logger records each collective's input tensor bytes (a rank's
shard for an all-gather); "gathered" multiplies by the world size, i.e. the bytes each rank
receives as full parameters. One warm-up step is not counted.

The model's proportions follow CodeLlama-34B (GQA with 1/8 of the heads for k/v, MLP 2.69x hidden,
embeddings + head a few percent of the parameters), so the ratio says what it would for the real
model; the per-module breakdown shows where the remaining bytes come from.

  python bench/comm_volume.py                       # 2 ranks on CPU (gloo) or 2 GPUs
  python bench/comm_volume.py --ranks 4 --steps 5 --json runs/comm_volume.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET = 0.3  # issue 5 acceptance: NF4 all-gathered bytes per step <= 0.3 x bf16


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--steps", type=int, default=2, help="measured steps after one warm-up step")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--json", dest="json_out", default=None, help="write the results here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # set by the launcher call
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def build_model(args, base: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from mtpeft.quant import quantize_model
    from mtpeft.tuners.lora import LoraSettings, inject_lora

    torch.manual_seed(0)
    heads = args.hidden // 64
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.6875),
                         num_hidden_layers=args.layers, num_attention_heads=heads,
                         num_key_value_heads=max(1, heads // 8), max_position_embeddings=args.seq)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    if base == "nf4":
        quantize_model(model, skip=("lm_head",))
    model.requires_grad_(False)
    inject_lora(model, LoraSettings(r=args.r, alpha=2.0 * args.r, dropout=0.0))
    return model


def ds_config(args) -> dict:
    ds = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    ds.update(train_micro_batch_size_per_gpu=args.micro_batch, gradient_accumulation_steps=1,
              train_batch_size=args.micro_batch * args.ranks, bf16={"enabled": True}, fp16={"enabled": False})
    ds["comms_logger"] = {"enabled": True, "verbose": False, "prof_all": True, "debug": False}
    return ds


def _family(op: str) -> str:
    for family in ("all_gather", "reduce_scatter", "all_reduce", "broadcast"):
        if family in op:
            return family
    return "other"


def measure(args, base: str) -> dict:
    """One variant on the running process group: bytes per step by collective family (rank-local log)."""
    import deepspeed
    import torch
    from deepspeed.comm import comms_logger

    model = build_model(args, base)
    frozen = {"quantized_linear": 0, "other_frozen": 0}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if not p.requires_grad:
                kind = "quantized_linear" if type(module).__name__ == "QuantLinear" or (
                    base == "bf16" and isinstance(module, torch.nn.Linear) and module is not model.lm_head) else "other_frozen"
                frozen[kind] += p.numel() * p.element_size()
    trainable = [p for p in model.parameters() if p.requires_grad]
    trainable_params = sum(p.numel() for p in trainable)  # before ZeRO-3 empties them
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(trainable, lr=1e-4),
                                      config=ds_config(args))
    gen = torch.Generator().manual_seed(1)
    for step in range(args.steps + 1):
        if step == 1:
            comms_logger.reset_data()
        ids = torch.randint(0, args.vocab, (args.micro_batch, args.seq), generator=gen).to(engine.device)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
    per_op = {}
    for op, sizes in comms_logger.comms_dict.items():
        per_op[op] = {"calls": sum(v[0] for v in sizes.values()),
                      "bytes": sum(int(size) * v[0] for size, v in sizes.items())}
    comms_logger.reset_data()
    families = {}
    for op, v in per_op.items():
        f = families.setdefault(_family(op), {"calls": 0, "bytes": 0})
        f["calls"] += v["calls"]
        f["bytes"] += v["bytes"]
    per_step = {f: v["bytes"] / args.steps for f, v in families.items()}
    if hasattr(engine, "destroy"):
        engine.destroy()
    return {"base": base, "ops": per_op, "bytes_per_step": per_step,
            "gathered_bytes_per_step": per_step.get("all_gather", 0.0) * args.ranks,
            "frozen_param_bytes": frozen, "trainable_params": trainable_params,
            "loss_last_step": float(loss.detach().float())}


def worker(args) -> None:
    os.environ.setdefault("MTPEFT_KERNELS", "torch")
    import torch.distributed as dist

    from mtpeft.trainer.loop import init_distributed

    init_distributed()  # nccl on GPUs, else gloo (and DeepSpeed's shared-memory names released)
    results = [measure(args, base) for base in ("bf16", "nf4")]
    if dist.get_rank() == 0:
        Path(args.worker).write_text(json.dumps(results))
    dist.barrier()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _versions() -> dict:
    import deepspeed
    import torch
    import transformers

    return {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def _mib(b: float) -> str:
    return f"{b / 2**20:10.2f}"


def report(args, results: list[dict], command: str) -> dict:
    bf16, nf4 = results
    ratio = nf4["gathered_bytes_per_step"] / bf16["gathered_bytes_per_step"]
    print(f"ZeRO-3, {args.ranks} ranks, micro-batch {args.micro_batch} x seq {args.seq}, LoRA r={args.r} on all projections; "
          f"per step, MiB")
    print(f"{'base':6} {'all-gathered':>13} {'all-gather in':>14} {'reduce-scatter':>15} {'all-reduce':>11} "
          f"{'frozen linears':>15} {'other frozen':>13}")
    for r in results:
        s = r["bytes_per_step"]
        print(f"{r['base']:6} {_mib(r['gathered_bytes_per_step']):>13} {_mib(s.get('all_gather', 0)):>14} "
              f"{_mib(s.get('reduce_scatter', 0)):>15} {_mib(s.get('all_reduce', 0)):>11} "
              f"{_mib(r['frozen_param_bytes']['quantized_linear']):>15} {_mib(r['frozen_param_bytes']['other_frozen']):>13}")
    verdict = "PASS" if ratio <= TARGET else "MISS"
    print(f"all-gathered bytes per step, NF4 / bf16 = {ratio:.3f} (target <= {TARGET}: {verdict})")
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores, gloo"
    return {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "device": device, "versions": _versions(), "command": command, "settings": vars(args) | {"worker": None},
            "nf4_over_bf16_all_gathered": ratio, "target": TARGET, "pass": ratio <= TARGET, "results": results}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    launcher = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results.json"
        passthrough = list(argv if argv is not None else sys.argv[1:])
        cmd = [launcher, "--num_gpus", str(args.ranks), "--master_port", str(_free_port()), str(Path(__file__).resolve()),
               *passthrough, "--worker", str(out)]
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        proc = subprocess.run(cmd, env=env, cwd=str(REPO), capture_output=True, text=True)
        if proc.returncode != 0 or not out.is_file():
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
            print(f"error: the {args.ranks}-rank run failed (exit {proc.returncode}); output above", file=sys.stderr)
            return 1
        results = json.loads(out.read_text())
    command = "python bench/comm_volume.py " + " ".join(argv if argv is not None else sys.argv[1:])
    summary = report(args, results, command.strip())
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(summary, indent=2))
        print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    from mtpeft.launch.rank_exit import end_rank_process, leave_process_group

    status = main()
    leave_process_group()
    end_rank_process(status)  # no teardown abort after the results are written (launch.rank_exit)
