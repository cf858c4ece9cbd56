"""Analytic FLOPs of a run's real steps: every rank's micro-batches re-collated from the schedule and
the shard (pure functions of seed and step), each backbone pass counted by ``flops.step_flops``.
Used by ``mtpeft profile``, the savings study and ``mtpeft compare``."""

from __future__ import annotations

from typing import Any, Dict, List

from mtpeft.profile import measure


def step_flops_of_run(cfg, tasks, tok, world: int, steps: int, arch) -> List[Dict[str, Any]]:
    """Analytic FLOPs of every step, summed over every rank's micro-batches (re-collated: the
    schedule and shard are pure functions of seed and step)."""
    from mtpeft.data.dist import DistContext
    from mtpeft.trainer.loop import micro_batch
    from mtpeft.trainer.multitask_state import MultitaskState

    mt = MultitaskState(cfg, [t.name for t in tasks], [len(t.train_set) for t in tasks])
    args = measure.peft_flop_args(cfg.peft)
    out = []
    for step in range(steps):
        slot = mt.schedule.slot(step)
        task = tasks[slot.task]
        lm = task.kind.uses_lm_head
        total, attention, passes = 0, 0, []
        for rank in range(world):
            for micro in range(cfg.train.grad_accum):
                batch = micro_batch(task, slot, micro, DistContext(rank, world), tok, cfg.train)
                for rows, length in task.kind.backbone_passes(batch):
                    passes.append([rows, length])
                    terms = measure.pass_flops(arch, rows, length, lm, cfg.model.gradient_checkpointing, args)
                    total += terms["total"]
                    attention += terms["forward_attention"] + terms["backward_attention"]
                    if cfg.model.gradient_checkpointing:
                        attention += terms["forward_attention"]
        out.append({"step": step + 1, "task": task.name, "lm_head": lm, "flops": total,
                    "flops_no_attention": total - attention, "passes": passes})
    return out
