"""The pieces a run is made of, below the recipe (``trainer/recipe.py``): the tasks of a config, the
process group, the optimizer and its per-head groups, a rank's micro-batch, the partition report."""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from mtpeft.config import RunConfig, TaskConfig
from mtpeft.data.dist import DistContext
from mtpeft.data.shard import TaskStream, micro_batch_indices, micro_batch_positions
from mtpeft.launch.deepspeed_shm import release_workspace_name
from mtpeft.tasks.kinds import make_kind
from mtpeft.tasks.task_kind import TaskKind
from mtpeft.tasks.loading import load_split
from mtpeft.trainer.build import trainable_parameters


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
    if backend == "gloo":  # DeepSpeed's CPU shared-memory workspace: every rank has mapped it by now
        if dist.get_world_size() > 1:
            dist.barrier()
        release_workspace_name(dist.get_rank())
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


def build_optimizer(model, cfg: RunConfig):
    """AdamW with one group for the shared module and one per task head (see ``freeze_inactive_heads``)."""
    head_lr = cfg.train.head_lr or cfg.train.lr
    trainable = trainable_parameters(model)
    groups = [{"params": [p for n, p in trainable if not n.startswith("heads.")], "lr": cfg.train.lr}]
    for task in model.heads:
        groups.append({"params": [p for n, p in trainable if n.startswith(f"heads.{task}.")], "lr": head_lr,
                       "task": task})
    groups = [g for g in groups if g["params"]]
    opt = torch.optim.AdamW(groups, weight_decay=cfg.train.weight_decay)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))


def freeze_inactive_heads(engine, optimizer, active: str) -> None:
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


def truncate_log(path: Path, last_step: int) -> None:
    """Drop log lines of steps a killed run ran past its last checkpoint (they will run again), and
    lines that cannot be read (cut short by a crash, or the NUL bytes a file system can leave after a
    power loss), named in one notice: the log is a record, the checkpoint is what resumes."""
    if not path.is_file():
        return
    keep, unreadable = [], []
    for number, raw in enumerate(path.read_bytes().split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
            step = json.loads(line)["step"]
            if isinstance(step, bool) or not isinstance(step, int):
                raise TypeError(step)
        except (UnicodeDecodeError, ValueError, KeyError, TypeError):
            unreadable.append(number)
            continue
        if step <= last_step:
            keep.append(line)
    if unreadable:
        print(f"notice: {path}: dropped {len(unreadable)} line(s) that cannot be read (line "
              f"{', '.join(map(str, unreadable[:3]))}{', ...' if len(unreadable) > 3 else ''})", flush=True)
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


# gloo's C++ errors reach Python as a plain RuntimeError (torch 2.13), e.g. "[.../third_party/gloo/gloo/
# transport/tcp/pair.cc:537] Read error ...: Connection reset by peer" or "[.../gloo/transport/tcp/
# unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation to complete": only there is the
# message read, and only for gloo's own source path followed by a transport failure.
GLOO_TRANSPORT_FAILURE = re.compile(r"gloo/.*(timed out|connection|peer|socket)", re.IGNORECASE | re.DOTALL)


def is_collective_error(exc: BaseException) -> bool:
    """A failure of a collective (a peer died or hung), told apart from a bug by its type: torch's
    ``DistError`` family (``DistBackendError`` from NCCL's watchdog and backends, ``DistNetworkError``,
    ``DistStoreError``). The fallback for gloo, which raises plain ``RuntimeError``, is
    ``GLOO_TRANSPORT_FAILURE`` on the message; a subclass of RuntimeError (out of memory, ...) never is."""
    if isinstance(exc, dist.DistError):
        return True
    return type(exc) is RuntimeError and GLOO_TRANSPORT_FAILURE.search(str(exc)) is not None
