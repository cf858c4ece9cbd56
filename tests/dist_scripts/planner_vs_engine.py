"""Run under ``deepspeed --num_gpus 2`` on CPU: the demo MultitaskModel with an NF4 base under ZeRO-3.

Each rank builds the model through ``build_model`` (``model.quant: nf4``), wraps it with
``deepspeed.initialize``, runs one optimizer step of the demo's first task, and writes
``rank<k>.json`` into argv[1]: the bytes this rank holds, read from the engine's partitioned tensors
(``mtpeft.profile.measure``), an independent plain sum of every ``ds_tensor``, and the planner's
``plan_model_states`` of the same module (counted on a meta twin at full shape).
"""

import argparse
import json
import os

import torch

from mtpeft.launch.rank_exit import end_rank_process, leave_process_group


def main(config: str, out_dir: str) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    from mtpeft.config import load_config
    from mtpeft.profile.measure import engine_partition_bytes, meta_copy
    from mtpeft.profile.planner import plan_model_states
    from mtpeft.trainer import loop
    from mtpeft.trainer.build import build_model, load_tokenizer
    from mtpeft.trainer.ds_config import build_ds_config

    cfg = load_config(config, ["model.quant=nf4", "peft.dropout=0.0"])
    tasks = loop.prepare_tasks(cfg)
    ctx = loop.init_distributed(120)
    ds_config = build_ds_config(cfg, ctx.world)
    model = build_model(cfg, ds_config)
    planned = plan_model_states(meta_copy(model), ctx.world)
    optimizer, scheduler = loop.build_optimizer(model, cfg)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
                                      dist_init_required=False)
    tok = load_tokenizer(cfg.model.name_or_path)
    task = tasks[0]
    rows = [task.train_set[i] for i in range(ctx.rank, 2 * cfg.train.micro_batch_size, ctx.world)]
    batch = task.kind.collate([task.kind.encode(r, tok, cfg.train.max_seq_len) for r in rows], tok.pad_token_id)
    engine.backward(engine(task.kind, task.name, batch, ctx))
    engine.step()
    measured = engine_partition_bytes(engine)
    raw = {"frozen": sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in engine.module.parameters()
                         if not p.requires_grad),
           "trainable": sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in engine.module.parameters()
                            if p.requires_grad),
           "trainable_full_numel": sum(p.ds_numel for p in engine.module.parameters() if p.requires_grad)}
    with open(os.path.join(out_dir, f"rank{ctx.rank}.json"), "w") as f:
        json.dump({"rank": ctx.rank, "world": ctx.world, "measured": measured, "planned": planned, "raw": raw}, f)
    torch.distributed.barrier()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("out_dir")
    parser.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    args = parser.parse_args()
    main(args.config, args.out_dir)
    leave_process_group()
    end_rank_process()  # no teardown abort after the results are written (launch.rank_exit)
