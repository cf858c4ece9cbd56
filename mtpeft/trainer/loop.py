"""The training run: DeepSpeed ZeRO-3 engine, the multitask step loop, evaluation and export.

Every global step trains one task (the schedule), with the same examples whatever the world size
(the shard). The logged loss is the mean over the whole global batch, reduced over ranks.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from mtpeft.config import RunConfig, TaskConfig, dump_config
from mtpeft.data.dist import DistContext
from mtpeft.launch.nvme import fill_nvme_paths
from mtpeft.data.shard import TaskStream, micro_batch_indices, micro_batch_positions
from mtpeft.tasks.kinds import make_kind
from mtpeft.tasks.task_kind import TaskKind
from mtpeft.tasks.loading import load_split
from mtpeft.trainer import checkpoint
from mtpeft.trainer.build import build_model, load_tokenizer, trainable_parameters
from mtpeft.trainer.ds_config import build_ds_config
from mtpeft.trainer.evaluate import evaluate, format_table, write_metrics
from mtpeft.trainer.export import export
from mtpeft.trainer.multitask_state import MultitaskState
from mtpeft.trainer.faults import NonFiniteGuard, Preemption, StepVote, collective_failure
from mtpeft.trainer.resume_guard import check_same_run
from mtpeft.trainer.run_log import RunLog


@dataclass
class TaskRuntime:
    name: str
    config: TaskConfig
    kind: TaskKind
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


def init_distributed(timeout_s: float = 1800.0) -> DistContext:
    """Join the launcher's process group, or make a one-process group when run without a launcher."""
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*is deprecated.*", category=FutureWarning)
    if "RANK" not in os.environ:
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())})
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                               timeout=datetime.timedelta(seconds=timeout_s))
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
    """AdamW with one group for the shared module and one per task head (see ``_freeze_inactive_heads``)."""
    head_lr = cfg.train.head_lr or cfg.train.lr
    trainable = trainable_parameters(model)
    groups = [{"params": [p for n, p in trainable if not n.startswith("heads.")], "lr": cfg.train.lr}]
    for task in model.heads:
        groups.append({"params": [p for n, p in trainable if n.startswith(f"heads.{task}.")], "lr": head_lr,
                       "task": task})
    groups = [g for g in groups if g["params"]]
    opt = torch.optim.AdamW(groups, weight_decay=cfg.train.weight_decay)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))


def _freeze_inactive_heads(engine, optimizer, active: str) -> None:
    """Other tasks' heads must not move at this step.

    ZeRO-3 keeps a parameter's last reduced gradient until that parameter is used again, so without
    this a head would be pushed by its stale gradient at every step of every other task (and a
    resumed run, which starts with empty buffers, would diverge from an uninterrupted one). Their
    gradient partitions are zeroed and their group's lr is 0 for this step; the scheduler restores it.
    """
    from deepspeed.utils import safe_set_local_grad

    for task, head in engine.module.heads.items():
        if task == active:
            continue
        for p in head.parameters():
            if hasattr(p, "ds_tensor"):
                safe_set_local_grad(p, torch.zeros_like(p.ds_tensor, dtype=torch.float32))
    for group in optimizer.param_groups:
        if group.get("task") not in (None, active):
            group["lr"] = 0.0


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


def _resume(engine, ckpt_dir: Path, ctx: DistContext, mt: MultitaskState, run_dir: Path) -> int:
    """Continue from ``checkpoints/latest`` if there is one; returns the first step to run."""
    state = checkpoint.load(engine, ckpt_dir, ctx)
    if state is None:
        return 0
    mt.load_state_dict(state["multitask"])
    if ctx.is_main:
        truncate_log(run_dir / "log.jsonl", state["step"])
        print(f"resumed from {ckpt_dir / ('step%d' % state['step'])}", flush=True)
    return state["step"]


def truncate_log(path: Path, last_step: int) -> None:
    """Drop log lines of steps a killed run ran past its last checkpoint (they will run again)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= last_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)


def micro_batch(task: TaskRuntime, slot, micro: int, ctx: DistContext, tok, t) -> dict:
    """This rank's collated micro-batch ``micro`` of the step ``slot`` (a pure function of seed and
    step: the profiler re-collates any rank's batches with it), with ``row_keys``: each row's task and
    stream position, which key its dropout masks."""
    where = (slot.occurrence, micro, ctx.rank, t.micro_batch_size, t.grad_accum, ctx.world)
    rows = [task.train_set[i] for i in micro_batch_indices(task.stream, *where)]
    batch = task.kind.collate([task.kind.encode(r, tok, t.max_seq_len) for r in rows], tok.pad_token_id)
    run_task = ((t.seed * 1_000_003 + task.stream.task_index) & 0x3FFFFFFF) << 32
    batch["row_keys"] = torch.tensor([run_task | (pos & 0xFFFFFFFF) for pos in micro_batch_positions(*where)],
                                     dtype=torch.int64)
    return batch


def train(cfg: RunConfig) -> Path:
    import deepspeed

    run_dir = Path(cfg.output.dir)
    check_same_run(cfg, run_dir)  # before config.yaml is rewritten; every rank reads the same files
    tasks = prepare_tasks(cfg)  # bad data fails here, before any process group exists
    ctx = init_distributed(cfg.train.collective_timeout_s)
    ckpt_dir = run_dir / "checkpoints"
    if ctx.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run_dir / "config.yaml")
    ds_config = fill_nvme_paths(build_ds_config(cfg, ctx.world), cfg.deepspeed.config)  # node-local disk
    tok = load_tokenizer(cfg.model.name_or_path)
    model = build_model(cfg, ds_config)
    optimizer, scheduler = _optimizer(model, cfg)
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                           config=ds_config, dist_init_required=False)
    write_partition_report(engine.module, ctx, run_dir / "partition.json")
    torch.manual_seed(cfg.train.seed * 1000 + ctx.rank + 7)  # dropout differs per rank, init did not
    mt = MultitaskState(cfg, [t.name for t in tasks], [len(t.train_set) for t in tasks])
    first_step = _resume(engine, ckpt_dir, ctx, mt, run_dir)
    log = RunLog(run_dir, ctx.is_main, purge_step=first_step + 1 if first_step else None)
    preemption = Preemption()
    try:
        _loop(engine, optimizer, tasks, mt, tok, cfg, ctx, log, first_step, preemption, run_dir)
        if preemption.requested:
            return run_dir
        t = cfg.train
        metrics = evaluate(engine.module, tasks, tok, ctx, t.max_seq_len, max(t.micro_batch_size, 16))
        log.metrics(metrics, t.max_steps)
        export(engine.module, cfg, run_dir / "export", ctx)
        if ctx.is_main:
            write_metrics(metrics, run_dir)
            print(format_table(metrics), flush=True)
            print(f"run directory: {run_dir}", flush=True)
    finally:
        preemption.restore()
        log.close()
    return run_dir


def _loop(engine, optimizer, tasks, mt: MultitaskState, tok, cfg: RunConfig, ctx: DistContext, log: RunLog,
          first_step: int, preemption: Preemption, run_dir: Path) -> None:
    from tqdm import tqdm

    t = cfg.train
    vote, guard = StepVote(ctx), NonFiniteGuard(t.max_bad_steps)
    eval_batch = max(t.micro_batch_size, 16)
    bar = tqdm(range(first_step, t.max_steps), desc="train", disable=not ctx.is_main, dynamic_ncols=True,
               initial=first_step, total=t.max_steps)
    for step in bar:
        slot = mt.schedule.slot(step)
        task = tasks[slot.task]
        lr = optimizer.param_groups[0]["lr"]
        start, loss_sum, tokens, bad, stop = time.perf_counter(), 0.0, 0, False, False
        try:
            for micro in range(t.grad_accum):
                batch = micro_batch(task, slot, micro, ctx, tok, t)
                loss = engine(task.kind, task.name, batch, ctx)
                bad_micro, stop = vote(NonFiniteGuard.is_bad(loss), preemption.requested)
                tokens += task.kind.token_count(batch)
                if bad_micro:  # every rank skips together: no rank waits in a collective alone
                    bad = True
                    continue
                engine.backward(mt.weighting.weight(slot.task, loss, step))
                if micro == t.grad_accum - 1:
                    _freeze_inactive_heads(engine, optimizer, task.name)
                    if mt.probing(step):
                        mt.record_gradients(slot.task, engine.module)
                engine.step()
                loss_sum += float(loss.detach())
            loss_global = ctx.mean(loss_sum / t.grad_accum) if not bad else float("nan")
            tokens_global = int(ctx.sum(tokens))
        except (RuntimeError, dist.DistError) as exc:
            if ctx.world > 1 and _is_collective_error(exc):
                raise collective_failure(step + 1, exc, t.collective_timeout_s) from None
            raise
        if bad:
            guard.skipped()
        else:
            guard.ok()
            norm = engine.get_global_grad_norm()
            if norm is not None:
                mt.weighting.observe_grad_norm(slot.task, float(norm))
            mt.weighting.observe(slot.task, loss_global, step)
        record = {"step": step + 1, "task": task.name, "loss": loss_global, "lr": lr, "tokens": tokens_global,
                  "seconds": time.perf_counter() - start, "weights": mt.weights()}
        if bad:
            record.update({"skipped": True, "skipped_total": guard.total})
        log.step(record)
        guard.check(step + 1, task.name)
        bar.set_postfix(task=task.name, loss=f"{loss_global:.3f}")
        if mt.transfer_every and (step + 1) % mt.transfer_every == 0:
            mt.finish_probe(step + 1, ctx, run_dir)
        if t.eval_every and (step + 1) % t.eval_every == 0 and step + 1 < t.max_steps:
            log.metrics(evaluate(engine.module, tasks, tok, ctx, t.max_seq_len, eval_batch), step + 1)
        if stop or (t.save_every and (step + 1) % t.save_every == 0):
            tag = checkpoint.save(engine, run_dir / "checkpoints", step + 1, {"multitask": mt.state_dict()}, ctx,
                                  t.keep_checkpoints)
            if stop:
                preemption.requested = True
                if ctx.is_main:
                    print(f"SIGTERM: saved {run_dir / 'checkpoints' / tag}; rerun the same command to resume", flush=True)
                break
    bar.close()


def _is_collective_error(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, dist.DistError) or any(
        w in text for w in ("gloo", "nccl", "timed out", "timeout", "connection", "peer", "socket"))
