"""Run under ``deepspeed --num_gpus 2`` on CPU: a QuantLinear Llama under ZeRO-3 vs. single process.

Each rank builds the same seeded model, computes the plain single-process forward, then wraps the
model in a ZeRO-3 engine and runs the same forward again. It writes ``rank<k>.json`` into the
directory given as argv[1]: whether the logits are identical, and how many quantized bf16 storage
elements this rank holds versus the whole model; rank 0 also saves the ZeRO-3 logits. Importing
this file has no side effects (the test imports build_model and input_ids to recompute the reference).
"""

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

from mtpeft.launch.rank_exit import end_rank_process, leave_process_group
from mtpeft.quant import QuantLinear, quantize_model


def build_model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = quantize_model(LlamaForCausalLM(config), skip=("lm_head",))
    return model.eval()


def input_ids() -> torch.Tensor:
    return torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(1))


def main(out_dir: str) -> None:
    start = time.time()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    from mtpeft.trainer.loop import init_distributed

    init_distributed()  # gloo on CPU, and DeepSpeed's shared-memory names released
    rank = dist.get_rank()
    model = build_model()
    with torch.no_grad():
        expected = model(input_ids=input_ids()).logits.clone()
    quant_params = [p for m in model.modules() if isinstance(m, QuantLinear) for p in m.quant_parameters()]
    total = sum(p.numel() for p in quant_params)

    ds_config = {
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": {
            "stage": 3,
            # Partition every tensor, however small: the constants must not be replicated.
            "stage3_param_persistence_threshold": 0,
            "stage3_model_persistence_threshold": 0,
        },
    }
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(trainable, lr=0.0), config=ds_config)
    local = sum(p.ds_tensor.numel() for p in quant_params)
    partitioned = all(p.numel() == 0 for p in quant_params)
    with torch.no_grad():
        got = engine(input_ids=input_ids()).logits
    if rank == 0:
        torch.save(got, os.path.join(out_dir, "logits_rank0.pt"))
    result = {
        "rank": rank,
        "world_size": dist.get_world_size(),
        "logits_equal": bool(torch.equal(got, expected)),
        "max_abs_diff": float((got - expected).abs().max()),
        "local_quant_elements": local,
        "total_quant_elements": total,
        "partitioned_outside_forward": partitioned,
        "quant_dtypes": sorted({str(p.dtype) for p in quant_params}),
        "seconds": time.time() - start,
    }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    main(parser.parse_args().out_dir)
    leave_process_group()
    end_rank_process()  # no teardown abort after the results are written (launch.rank_exit)
