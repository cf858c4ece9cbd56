"""Streaming load vs. full load: peak memory growth and logits, written as JSON into OUT_DIR.

``streaming_load.py reference CKPT OUT_DIR`` (one process): ``from_pretrained`` + ``quantize_model``,
the way a model is loaded without mtpeft's loader; writes reference.json and reference_logits.pt.
``deepspeed --num_gpus 2 streaming_load.py zero3 CKPT OUT_DIR [BROKEN_CKPT]``: each rank streams the
checkpoint under ZeRO-3 and writes rank<k>.json; rank 0 also saves the ZeRO-3 forward's logits. With
BROKEN_CKPT (a key missing halfway), each rank also records the error it got loading that.
Peak growth is VmHWM (reset through /proc/self/clear_refs) minus VmRSS just before the load.
"""

import argparse
import json
import os
import time

import torch

from mtpeft.launch.rank_exit import end_rank_process, leave_process_group

MICRO_BATCH = 1


def input_ids() -> torch.Tensor:
    return torch.randint(0, 1024, (1, 12), generator=torch.Generator().manual_seed(1))


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> int:
    """Reset the high-water mark and return the current RSS (kB)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kb("VmRSS")


def _warm_imports(ckpt: str) -> None:
    """Import the model's code before measuring: first imports alone cost ~200 MB of RSS."""
    from pathlib import Path

    from mtpeft.quant.streaming_loader import build_skeleton

    build_skeleton(Path(ckpt), torch.float32)


def reference(ckpt: str, out: str) -> None:
    from transformers import AutoModelForCausalLM

    from mtpeft.quant import quantize_model

    _warm_imports(ckpt)
    before = _reset_peak()
    model = quantize_model(AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32), skip=("lm_head",)).eval()
    growth = _status_kb("VmHWM") - before
    with torch.no_grad():
        logits = model(input_ids=input_ids()).logits
    torch.save(logits, os.path.join(out, "reference_logits.pt"))
    with open(os.path.join(out, "reference.json"), "w") as f:
        json.dump({"peak_growth_kb": growth}, f)


def zero3(ckpt: str, out: str, broken: str = "") -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch.distributed as dist

    from mtpeft.errors import CheckpointError
    from mtpeft.quant import QuantLinear
    from mtpeft.quant.streaming_loader import load_quantized_backbone
    from mtpeft.trainer.loop import init_distributed

    init_distributed()  # gloo on CPU, and DeepSpeed's shared-memory names released
    rank = dist.get_rank()
    ds_config = {"train_micro_batch_size_per_gpu": MICRO_BATCH,
                 "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                       "stage3_model_persistence_threshold": 0}}
    _warm_imports(ckpt)
    dist.barrier()
    before, start = _reset_peak(), time.time()
    model = load_quantized_backbone(ckpt, ds_config, torch.float32, skip=("lm_head",))
    growth = _status_kb("VmHWM") - before
    load_seconds = time.time() - start
    quant = [p for m in model.modules() if isinstance(m, QuantLinear) for p in m.quant_parameters()]
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    with torch.no_grad():
        logits = engine(input_ids=input_ids()).logits
    if rank == 0:
        torch.save(logits, os.path.join(out, "zero3_logits.pt"))
    result = {
        "rank": rank,
        "world_size": dist.get_world_size(),
        "peak_growth_kb": growth,
        "load_seconds": load_seconds,
        "quant_linears": sum(isinstance(m, QuantLinear) for m in model.modules()),
        "local_quant_elements": sum(p.ds_tensor.numel() for p in quant),
        "total_quant_elements": sum(p.ds_numel for p in quant),
        "all_partitioned": all(p.numel() == 0 for p in model.parameters()),
    }
    if broken:
        try:
            load_quantized_backbone(broken, ds_config, torch.float32)
            result["broken_error"] = None
        except CheckpointError as exc:
            result["broken_error"] = str(exc)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("reference", "zero3"))
    parser.add_argument("ckpt")
    parser.add_argument("out")
    parser.add_argument("broken", nargs="?", default="")
    parser.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    args = parser.parse_args()
    if args.mode == "reference":
        reference(args.ckpt, args.out)
    else:
        zero3(args.ckpt, args.out, args.broken)
    leave_process_group()
    end_rank_process()  # no teardown abort after the results are written (launch.rank_exit)
