"""The public recipe of a run (in the manner of torchtune's recipes): one object that sets up the
tasks, the process group, the model, the DeepSpeed engine and the multitask state from a RunConfig,
runs the steps, evaluates and exports, and calls ``Hooks`` at each stage. ``mtpeft train``,
``mtpeft profile``, ``mtpeft compare`` and the tests all run through it; nothing outside
``trainer/`` needs a private piece of it.

Every global step trains one task (the schedule), with the same examples whatever the world size
(the shard). The logged loss is the mean over the whole global batch, reduced over ranks.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from mtpeft.config import RunConfig, dump_config
from mtpeft.failed_writes import replacing, writing
from mtpeft.launch.extension_lock import check_extension_locks
from mtpeft.kernels.backend import kernel_mode
from mtpeft.launch.nvme import fill_nvme_paths
from mtpeft.launch.rank_exit import leave_process_group
from mtpeft.trainer import checkpoint
from mtpeft.trainer.build import build_model, load_tokenizer
from mtpeft.trainer.ds_config import build_ds_config
from mtpeft.trainer.evaluate import evaluate, format_table, write_metrics
from mtpeft.trainer.export import export
from mtpeft.trainer.faults import NonFiniteGuard, Preemption, StepVote, collective_failure
from mtpeft.trainer.loop import (build_optimizer, freeze_inactive_heads, init_distributed, is_collective_error,
                                 micro_batch, prepare_tasks, truncate_log, write_partition_report)
from mtpeft.trainer.multitask_state import MultitaskState
from mtpeft.trainer.resolved_targets import record_resolved_targets
from mtpeft.trainer.resume_guard import check_same_run
from mtpeft.trainer.run_log import RunLog
from mtpeft.tuners.registry import unread_settings


class Hooks:
    """What a caller adds to a run without copying it; every method is a no-op here."""

    def before_model(self, recipe: "Recipe") -> None:
        """Tasks, process group, DeepSpeed config and tokenizer are ready; the model is not built yet."""

    def after_model(self, recipe: "Recipe") -> None:
        """The model is built (``recipe.model``), the engine not yet."""

    def after_setup(self, recipe: "Recipe") -> None:
        """Engine, multitask state and log are ready; ``recipe.first_step`` is where the run resumes."""

    def after_step(self, recipe: "Recipe", record: dict) -> None:
        """One global step is done; ``record`` is its log.jsonl line."""

    def on_eval(self, recipe: "Recipe", metrics: dict, step: int) -> None:
        """Evaluation at ``step`` (``train.eval_every`` or the end of the run)."""

    def on_save(self, recipe: "Recipe", tag: str) -> None:
        """A checkpoint ``tag`` is complete."""


class Recipe:
    def __init__(self, cfg: RunConfig, hooks: Sequence[Hooks] = (), resume: bool = True,
                 partition_report: bool = True):
        self.cfg, self.hooks = cfg, list(hooks)
        self.resume, self.partition_report = resume, partition_report
        self.run_dir = Path(cfg.output.dir)
        self.first_step = 0
        self.engine = self.model = self.optimizer = self.log = None
        self.preemption: Optional[Preemption] = None

    def _call(self, hook: str, *args) -> None:
        for h in self.hooks:
            getattr(h, hook)(self, *args)

    def setup(self) -> "Recipe":
        import deepspeed

        cfg = self.cfg
        if self.resume:
            check_same_run(cfg, self.run_dir)  # before config.yaml is rewritten; every rank reads the same files
        if int(os.environ.get("LOCAL_RANK", "0") or 0) == 0:
            check_extension_locks()  # a lock left by a killed op build would hang the process group silently
        kernel_mode()  # MTPEFT_KERNELS / MTPEFT_NF4_FUSED_MAX_M named now, not at the first step after loading
        self.tasks = prepare_tasks(cfg)  # bad data fails here, before any process group exists
        self.ctx = ctx = init_distributed(cfg.train.collective_timeout_s)
        self.ds_config = fill_nvme_paths(build_ds_config(cfg, ctx.world), cfg.deepspeed.config)  # node-local disk
        self.tok = load_tokenizer(cfg.model.name_or_path)
        self._call("before_model")
        self.model = build_model(cfg, self.ds_config)
        # the run folder is written once the settings have proved buildable: a bad value leaves no folder
        ckpt_dir = self.run_dir / "checkpoints"
        if ctx.is_main:
            with writing(self.run_dir / "config.yaml"):
                ckpt_dir.mkdir(parents=True, exist_ok=True)
                if not self.resume:
                    (self.run_dir / "log.jsonl").unlink(missing_ok=True)
            # through a temporary name: a failed write never leaves a cut config.yaml for the resume check
            with replacing(self.run_dir / "config.yaml") as tmp:
                dump_config(cfg, tmp)
        if ctx.world > 1 and not self.resume:
            dist.barrier()  # nobody logs into the folder before rank 0 has cleared it
        if ctx.is_main:
            record_resolved_targets(self.run_dir / "config.yaml", self.model.tuner, self.model.backbone.config.model_type)
            for key, readers in unread_settings(cfg.peft).items():
                print(f"notice: peft.{key} has no effect with peft.method {cfg.peft.method} "
                      f"(read by {', '.join(readers)})", flush=True)
        self._call("after_model")
        optimizer, scheduler = build_optimizer(self.model, cfg)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config,
            dist_init_required=False)
        if self.partition_report:
            with writing(self.run_dir / "partition.json"):
                write_partition_report(self.engine.module, ctx, self.run_dir / "partition.json")
        torch.manual_seed(cfg.train.seed * 1000 + ctx.rank + 7)  # only what is not keyed by example differs per rank
        self.mt = MultitaskState(cfg, [t.name for t in self.tasks], [len(t.train_set) for t in self.tasks])
        if self.resume:
            self.first_step = self._resume(ckpt_dir)
        self.log = RunLog(self.run_dir, ctx.is_main, purge_step=self.first_step + 1 if self.first_step else None)
        self.preemption = Preemption()
        self._call("after_setup")
        return self

    def _resume(self, ckpt_dir: Path) -> int:
        """Continue from ``checkpoints/latest`` if there is one; returns the first step to run."""
        state = checkpoint.load(self.engine, ckpt_dir, self.ctx)
        if state is None:
            return 0
        self.mt.load_state_dict(state["multitask"])
        if self.ctx.is_main:
            with writing(self.run_dir / "log.jsonl"):
                truncate_log(self.run_dir / "log.jsonl", state["step"])
            print(f"resumed from {ckpt_dir / ('step%d' % state['step'])}", flush=True)
        return state["step"]

    def run_steps(self) -> None:
        """Train from ``first_step`` to ``train.max_steps`` (or until SIGTERM, after a checkpoint)."""
        from tqdm import tqdm

        t, ctx, tasks, mt = self.cfg.train, self.ctx, self.tasks, self.mt
        vote, guard = StepVote(ctx), NonFiniteGuard(t.max_bad_steps)
        bar = tqdm(range(self.first_step, t.max_steps), desc="train", disable=not ctx.is_main, dynamic_ncols=True,
                   initial=self.first_step, total=t.max_steps)
        for step in bar:
            slot = mt.schedule.slot(step)
            task = tasks[slot.task]
            lr = self.optimizer.param_groups[0]["lr"]
            start, loss_sum, tokens, bad, stop = time.perf_counter(), 0.0, 0, False, False
            try:
                for micro in range(t.grad_accum):
                    batch = micro_batch(task, slot, micro, ctx, self.tok, t)
                    loss = self.engine(task.kind, task.name, batch, ctx)
                    bad_micro, stop = vote(NonFiniteGuard.is_bad(loss), self.preemption.requested)
                    tokens += task.kind.token_count(batch)
                    if bad_micro:  # every rank skips together: no rank waits in a collective alone
                        bad = True
                        continue
                    self.engine.backward(mt.weighting.weight(slot.task, loss, step))
                    if micro == t.grad_accum - 1:
                        freeze_inactive_heads(self.engine, self.optimizer, task.name)
                        if mt.probing(step):
                            mt.record_gradients(slot.task, self.engine.module)
                    self.engine.step()
                    loss_sum += float(loss.detach())
                loss_global = ctx.mean(loss_sum / t.grad_accum) if not bad else float("nan")
                tokens_global = int(ctx.sum(tokens))
            except (RuntimeError, dist.DistError) as exc:
                if ctx.world > 1 and is_collective_error(exc):
                    raise collective_failure(step + 1, exc, t.collective_timeout_s) from None
                raise
            if bad:
                guard.skipped()
            else:
                guard.ok()
                norm = self.engine.get_global_grad_norm()
                if norm is not None:
                    mt.weighting.observe_grad_norm(slot.task, float(norm))
                mt.weighting.observe(slot.task, loss_global, step)
            record = {"step": step + 1, "task": task.name, "loss": loss_global, "lr": lr, "tokens": tokens_global,
                      "seconds": time.perf_counter() - start, "weights": mt.weights()}
            if bad:
                record.update({"skipped": True, "skipped_total": guard.total})
            self.log.step(record)
            self._call("after_step", record)
            guard.check(step + 1, task.name)
            bar.set_postfix(task=task.name, loss=f"{loss_global:.3f}")
            if mt.transfer_every and (step + 1) % mt.transfer_every == 0:
                mt.finish_probe(step + 1, ctx, self.run_dir)
            if t.eval_every and (step + 1) % t.eval_every == 0 and step + 1 < t.max_steps:
                self.log.metrics(self.evaluate(step + 1), step + 1)
            if stop or (t.save_every and (step + 1) % t.save_every == 0):
                tag = checkpoint.save(self.engine, self.run_dir / "checkpoints", step + 1,
                                      {"multitask": mt.state_dict()}, ctx, t.keep_checkpoints)
                self._call("on_save", tag)
                if stop:
                    self.preemption.requested = True
                    self.preemption.report_saved(tag)
                    if ctx.is_main:
                        print(f"SIGTERM: saved {self.run_dir / 'checkpoints' / tag}; rerun the same command to resume",
                              flush=True)
                    break
        bar.close()

    def evaluate(self, step: int) -> dict:
        t = self.cfg.train
        metrics = evaluate(self.engine.module, self.tasks, self.tok, self.ctx, t.max_seq_len,
                           max(t.micro_batch_size, 16))
        self._call("on_eval", metrics, step)
        return metrics

    def export(self) -> Optional[Path]:
        return export(self.engine.module, self.cfg, self.run_dir / "export", self.ctx)

    def close(self) -> None:
        if self.preemption is not None:
            self.preemption.restore()
        if self.log is not None:
            self.log.close()

    def run(self, leave_group: bool = False) -> Path:
        """The whole run, as ``mtpeft train`` does it: steps, final evaluation, export, metrics.json;
        ``leave_group`` when the process ends with the run (``finish``)."""
        self.setup()
        try:
            self.run_steps()
            if self.preemption.requested:  # every rank stopped at the same step (StepVote)
                if leave_group:
                    self.finish()
                return self.run_dir
            metrics = self.evaluate(self.cfg.train.max_steps)
            self.log.metrics(metrics, self.cfg.train.max_steps)
            self.export()
            if self.ctx.is_main:
                write_metrics(metrics, self.run_dir)
                print(format_table(metrics), flush=True)
                print(f"run directory: {self.run_dir}", flush=True)
            if leave_group:
                self.finish()
        finally:
            self.close()
        return self.run_dir

    def finish(self) -> None:
        """Every rank waits for the others, then leaves the process group (``launch.rank_exit``)."""
        if self.ctx.world > 1:
            leave_process_group()


def train(cfg: RunConfig, hooks: Sequence[Hooks] = (), leave_group: bool = False) -> Path:
    """Train, evaluate and export one RunConfig (resuming from its run folder's checkpoint);
    ``leave_group`` when nothing runs in this process after it (the ``mtpeft train`` command)."""
    return Recipe(cfg, hooks).run(leave_group=leave_group)
