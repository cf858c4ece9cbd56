"""Checkpoints a run can resume from exactly, and that a crash mid-write cannot corrupt.

DeepSpeed writes the engine, optimizer and scheduler partitions into ``checkpoints/<tag>/``; each
rank adds its RNG states, and rank 0 the run state (step, sampler, loss weighting). Only when
every rank has finished does rank 0 point ``checkpoints/latest`` at the new tag (written to a
temporary name, then renamed), so an interrupted save leaves the previous checkpoint in charge.
Older tags beyond ``keep`` are deleted only after the pointer moved.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from mtpeft.data.dist import DistContext
from mtpeft.errors import CheckpointError
from mtpeft.failed_writes import FREE_SPACE, writing
from mtpeft.trainer.damaged import POINTER, complete_tags, pointer_tag, reading


def _barrier(ctx: DistContext) -> None:
    if ctx.world > 1:
        dist.barrier()


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def latest_tag(ckpt_dir: Path) -> str | None:
    pointer = ckpt_dir / POINTER
    tag = pointer_tag(ckpt_dir)
    if tag is None:
        return None
    if not tag or not (ckpt_dir / tag / "run_state.pt").is_file():
        raise CheckpointError(f"{pointer}: points at {tag!r}, which is not a complete checkpoint; "
                              f"remove {pointer} to start over or point it at an older tag")
    return tag


def save(engine, ckpt_dir: Path, step: int, run_state: dict, ctx: DistContext, keep: int) -> str:
    tag = f"step{step}"
    previous = pointer_tag(ckpt_dir)
    in_charge = (f"{ckpt_dir / POINTER} still points at {previous}, which a rerun resumes from" if previous else
                 "no checkpoint was completed, so a rerun starts over")
    then = f"{in_charge} (the partial {tag} is never read and the next save removes it): {FREE_SPACE} the same command"
    with writing(ckpt_dir / tag, then):
        engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False)
        torch.save(rng_state(), ckpt_dir / tag / f"rng_rank{ctx.rank}.pt")
        if ctx.is_main:
            torch.save({**run_state, "step": step, "world_size": ctx.world}, ckpt_dir / tag / "run_state.pt.tmp")
            os.replace(ckpt_dir / tag / "run_state.pt.tmp", ckpt_dir / tag / "run_state.pt")
    _barrier(ctx)  # every rank's partition is on disk before the pointer moves
    if ctx.is_main:
        tmp = ckpt_dir / (POINTER + ".tmp")
        with writing(tmp, then):
            tmp.write_text(tag)
        os.replace(tmp, ckpt_dir / POINTER)
        _prune(ckpt_dir, keep, tag)
    _barrier(ctx)
    return tag


def _prune(ckpt_dir: Path, keep: int, current: str) -> None:
    tags = sorted((p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step")),
                  key=lambda p: int(p.name[4:]) if p.name[4:].isdigit() else -1)
    complete = [p for p in tags if (p / "run_state.pt").is_file() and int(p.name[4:]) <= int(current[4:])]
    for old in complete[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for partial in tags:  # leftovers of interrupted saves newer than nothing we point at
        if not (partial / "run_state.pt").is_file() and partial.name != current:
            shutil.rmtree(partial, ignore_errors=True)


def load(engine, ckpt_dir: Path, ctx: DistContext) -> dict | None:
    """Restore engine/optimizer/scheduler and this rank's RNG; returns the run state, or None."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    others = complete_tags(ckpt_dir, but=tag)
    instead = (f"point {ckpt_dir / POINTER} at {others[0]} (the newest other complete checkpoint) and rerun"
               if others else f"remove {ckpt_dir / POINTER} to start over")
    with reading(ckpt_dir / tag / "run_state.pt", instead):
        run_state = torch.load(ckpt_dir / tag / "run_state.pt", weights_only=False)
    if run_state["world_size"] != ctx.world:
        # DeepSpeed's ZeRO partitions are per rank; the data order would survive, the partitions not
        raise CheckpointError(f"{ckpt_dir / tag}: saved with {run_state['world_size']} ranks, resuming with "
                              f"{ctx.world}; resume with the same world size")
    with reading(ckpt_dir / tag, instead):
        path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
    if path is None:
        raise CheckpointError(f"{ckpt_dir / tag}: DeepSpeed could not load this checkpoint")
    rng_file = ckpt_dir / tag / f"rng_rank{ctx.rank}.pt"
    if rng_file.is_file():
        with reading(rng_file, instead):
            set_rng_state(torch.load(rng_file, weights_only=False))
    return run_state
