"""The training run: DeepSpeed ZeRO-3 engine, the multitask step loop, evaluation and export.

Every global step trains one task (the schedule), with the same examples whatever the world size
(the shard). The logged loss is the mean over the whole global batch, reduced over ranks.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from mtpeft.config import RunConfig, TaskConfig, dump_config
from mtpeft.data.dist import DistContext
from mtpeft.data.schedule import make_schedule
from mtpeft.data.shard import TaskStream, micro_batch_indices
from mtpeft.tasks.kinds import make_kind
from mtpeft.tasks.loading import load_split
from mtpeft.trainer.build import build_model, load_tokenizer, trainable_parameters
from mtpeft.trainer.ds_config import build_ds_config
from mtpeft.trainer.evaluate import evaluate, format_table, write_metrics
from mtpeft.trainer.export import export
from mtpeft.trainer.run_log import RunLog


@dataclass
class TaskRuntime:
    name: str
    config: TaskConfig
    kind: object
    train_set: object
    eval_set: object
    stream: TaskStream


def prepare_tasks(cfg: RunConfig) -> list[TaskRuntime]:
    out = []
    for i, t in enumerate(cfg.tasks):
        train_set = load_split(t.train, t.format)
        eval_set = load_split(t.eval, t.format, max_examples=t.max_eval_examples)
        out.append(TaskRuntime(t.name, t, make_kind(t, cfg.train), train_set, eval_set,
                               TaskStream(len(train_set), cfg.train.seed, i)))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> DistContext:
    """Join the launcher's process group, or make a one-process group when run without a launcher."""
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*is deprecated.*", category=FutureWarning)
    if "RANK" not in os.environ:
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())})
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return DistContext.current()


def _lr_lambda(cfg: RunConfig):
    warmup, total = cfg.train.warmup_steps, cfg.train.max_steps

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.1, 1.0 - 0.9 * (step - warmup) / max(1, total - warmup))

    return factor


def _optimizer(model, cfg: RunConfig):
    head_lr = cfg.train.head_lr or cfg.train.lr
    groups = [
        {"params": [p for n, p in trainable_parameters(model) if not n.startswith("heads.")], "lr": cfg.train.lr},
        {"params": [p for n, p in trainable_parameters(model) if n.startswith("heads.")], "lr": head_lr},
    ]
    groups = [g for g in groups if g["params"]]
    opt = torch.optim.AdamW(groups, weight_decay=cfg.train.weight_decay)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))


def _tokens(batch: dict) -> int:
    return int(sum(v.sum() for k, v in batch.items() if k.endswith("mask")))


def write_partition_report(model, ctx: DistContext, path: Path) -> None:
    """Per-rank element counts of the frozen and trainable partitions ZeRO-3 holds (``ds_tensor``)."""
    local = {"frozen": 0, "trainable": 0, "frozen_total": 0, "trainable_total": 0}
    for p in model.parameters():
        kind = "trainable" if p.requires_grad else "frozen"
        local[kind] += p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
        local[kind + "_total"] += p.ds_numel if hasattr(p, "ds_numel") else p.numel()
    ranks = ctx.gather_objects(local)
    if ctx.is_main:
        path.write_text(json.dumps({"world_size": ctx.world, "ranks": ranks}, indent=2))


def train(cfg: RunConfig) -> Path:
    import deepspeed
    from tqdm import tqdm

    tasks = prepare_tasks(cfg)  # bad data fails here, before any process group exists
    ctx = init_distributed()
    run_dir = Path(cfg.output.dir)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run_dir / "config.yaml")
    ds_config = build_ds_config(cfg, ctx.world)
    tok = load_tokenizer(cfg.model.name_or_path)
    model = build_model(cfg, ds_config)
    optimizer, scheduler = _optimizer(model, cfg)
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                           config=ds_config, dist_init_required=False)
    write_partition_report(engine.module, ctx, run_dir / "partition.json")
    torch.manual_seed(cfg.train.seed * 1000 + ctx.rank + 7)  # dropout differs per rank, init did not
    schedule = make_schedule(cfg.sampler.kind, [len(t.train_set) for t in tasks], cfg.train.seed)
    log = RunLog(run_dir, ctx.is_main)
    t = cfg.train
    eval_batch = max(t.micro_batch_size, 16)
    bar = tqdm(range(t.max_steps), desc="train", disable=not ctx.is_main, dynamic_ncols=True)
    for step in bar:
        slot = schedule.slot(step)
        task = tasks[slot.task]
        lr = optimizer.param_groups[0]["lr"]
        start, loss_sum, tokens = time.perf_counter(), 0.0, 0
        for micro in range(t.grad_accum):
            idx = micro_batch_indices(task.stream, slot.occurrence, micro, ctx.rank, t.micro_batch_size,
                                      t.grad_accum, ctx.world)
            rows = [task.train_set[i] for i in idx]
            batch = task.kind.collate([task.kind.encode(r, tok, t.max_seq_len) for r in rows], tok.pad_token_id)
            loss = engine(task.kind, task.name, batch, ctx)
            engine.backward(loss)
            engine.step()
            loss_sum += float(loss.detach())
            tokens += _tokens(batch)
        loss_global = ctx.mean(loss_sum / t.grad_accum)
        tokens_global = int(ctx.sum(tokens))
        seconds = time.perf_counter() - start
        log.step({"step": step + 1, "task": task.name, "loss": loss_global, "lr": lr,
                  "tokens": tokens_global, "seconds": seconds})
        bar.set_postfix(task=task.name, loss=f"{loss_global:.3f}")
        if t.eval_every and (step + 1) % t.eval_every == 0 and step + 1 < t.max_steps:
            log.metrics(evaluate(engine.module, tasks, tok, ctx, t.max_seq_len, eval_batch), step + 1)
        if t.save_every and (step + 1) % t.save_every == 0:
            engine.save_checkpoint(str(run_dir / "checkpoints"), tag=f"step{step + 1}")
    bar.close()
    metrics = evaluate(engine.module, tasks, tok, ctx, t.max_seq_len, eval_batch)
    log.metrics(metrics, t.max_steps)
    export(engine.module, cfg, run_dir / "export", ctx)
    if ctx.is_main:
        write_metrics(metrics, run_dir)
        print(format_table(metrics), flush=True)
        print(f"run directory: {run_dir}", flush=True)
    log.close()
    return run_dir
