"""``mtpeft profile CONFIG``: run real steps of a config and put every measured figure beside the
planner's prediction.

The steps are the training loop's own (``trainer.loop`` pieces: same engine setup, same schedule,
same ``log.jsonl``), without evaluation or export, so what is timed is what ``mtpeft train`` runs.
Step time and tokens/s come from ``log.jsonl`` (first step left out as warm-up); FLOPs per step are
``flops.step_flops`` on the real padded shapes of every rank's micro-batches (frozen base: input
gradients only, PEFT weight gradients, recomputation), and one step is also counted with torch's
``FlopCounterMode`` as a check; model states are read tensor by tensor from the engine.
With ``--savings`` the side-by-side savings study (``profile.savings``) runs instead.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from mtpeft.command_parser import CommandParser, number, whole_number
from mtpeft.errors import UserError
from mtpeft.launch.rank_exit import end_rank_process, leave_process_group
from mtpeft.output_folder import check_folder_is_ours, check_output_folder
from mtpeft.profile import measure, report
from mtpeft.profile.run_flops import step_flops_of_run


# what profile and profile --savings write into --out (the run itself goes to --out/run)
REPORT_FOLDER_NAMES = frozenset({"run", "report.md", "report.json", "memory_breakdown.png", "throughput.png",
                                 "loss_curves.png", "tensorboard", "multitask_adapter", "per_task_adapters"})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="a RunConfig YAML (e.g. configs/demo.yaml)")
    parser.add_argument("--steps", type=whole_number(1), default=8, help="optimizer steps to run (default 8)")
    parser.add_argument("--out", default="runs/profile", help="report folder (default runs/profile)")
    parser.add_argument("--ranks", type=whole_number(1), default=1, help="processes under the deepspeed launcher (default 1)")
    parser.add_argument("--peak-tflops", type=number(0), default=None,
                        help="device peak for MFU (default: detected for known GPUs, none on CPU)")
    parser.add_argument("--comm", choices=("on", "off"), default="on",
                        help="DeepSpeed comms logger for bytes per step (default on)")
    parser.add_argument("--savings", action="store_true",
                        help="run the side-by-side savings study (full FT, LoRA, bnb+peft QLoRA, mtpeft QLoRA)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--force", action="store_true",
                        help="write into a folder holding files mtpeft did not write, beside them (never over them)")


def _launch(args: argparse.Namespace) -> int:
    """Re-run this command under the deepspeed launcher with ``--ranks`` processes."""
    from mtpeft.demo.launch import launcher_command
    from mtpeft.launch.process_group import run_in_group

    base = launcher_command(Path(args.config), args.ranks, 0, [])
    cmd = base[:base.index("--module") + 1] + [
        "mtpeft.profile.profile_cli", str(args.config), "--steps", str(args.steps), "--out",
        str(Path(args.out).resolve()), "--comm", args.comm, "--ranks", str(args.ranks)]
    if args.peak_tflops:
        cmd += ["--peak-tflops", str(args.peak_tflops)]
    for item in args.set:
        cmd += ["--set", item]
    return run_in_group(cmd + (["--force"] if args.force else []))


def run(args: argparse.Namespace) -> int:
    from mtpeft.config import load_config

    out = Path(args.out).resolve()
    check_output_folder(out, "--out")
    if int(os.environ.get("RANK", "0") or 0) == 0:  # once, before any rank writes there
        check_folder_is_ours(out, "--out", REPORT_FOLDER_NAMES, args.force)
    cfg = load_config(args.config, list(args.set))
    if args.savings:
        from mtpeft.profile.savings import run_savings

        result = run_savings(cfg, out, steps=args.steps)
        print(result["table"], flush=True)
        print(f"savings report: {out / 'report.md'}", flush=True)
        return 0
    if args.ranks > 1 and "RANK" not in os.environ:
        return _launch(args)
    result = profile(cfg, args.steps, out, peak_tflops=args.peak_tflops, comm=args.comm == "on")
    if result is not None:
        print(result["table"], flush=True)
        print(f"profile report: {out / 'report.md'}", flush=True)
    return 0


def _plan_settings(cfg, world: int, vocab: int = 0):
    from mtpeft.profile.planner import PeftSpec, PlanSettings
    from mtpeft.tasks.chunked_lm_loss import resolve_chunk
    from mtpeft.tuners.registry import planned_as

    p = cfg.peft
    method = planned_as(p.method)
    options = {"lora": {"r": p.r, "alpha": p.alpha, "dropout": p.dropout, "targets": "+".join(p.target_modules)},
               "prompt": {"n": p.num_virtual_tokens}, "prefix": {"n": p.num_virtual_tokens},
               "serial_adapter": {"bottleneck": p.bottleneck},
               "parallel_adapter": {"bottleneck": p.bottleneck}}.get(method, {})
    return PlanSettings(world_size=world, seq=cfg.train.max_seq_len, micro_batch=cfg.train.micro_batch_size,
                        peft=PeftSpec(method, options), quant=cfg.model.quant, engine="deepspeed",
                        checkpointing=cfg.model.gradient_checkpointing,
                        logits_chunk=resolve_chunk(cfg.train.logits_chunk,
                                                   cfg.train.micro_batch_size * cfg.train.max_seq_len, vocab),
                        trainable_dtype="fp32" if cfg.model.dtype == "float32" else "bf16")


def _architecture_plan(cfg, world: int) -> Optional[Dict[str, Any]]:
    """The architecture planner's prediction, or None where it cannot read the model (encoders)."""
    from mtpeft.profile.architecture import load_architecture
    from mtpeft.profile.planner import plan

    try:
        arch = load_architecture(cfg.model.name_or_path)
        return {"arch": arch, "plan": plan(arch, _plan_settings(cfg, world, arch.vocab_size))}
    except (UserError, ValueError, KeyError, AttributeError):
        return None


def _counted_first_step(engine, tasks, cfg, tok, ctx) -> int:
    """One extra forward + backward of step 1's micro-batch under FlopCounterMode (no optimizer
    step; run after measuring, so it changes nothing that is reported), summed over ranks."""
    from mtpeft.trainer.loop import micro_batch
    from mtpeft.trainer.multitask_state import MultitaskState

    mt = MultitaskState(cfg, [t.name for t in tasks], [len(t.train_set) for t in tasks])
    slot = mt.schedule.slot(0)
    task = tasks[slot.task]
    total = 0
    for micro in range(cfg.train.grad_accum):
        batch = micro_batch(task, slot, micro, ctx, tok, cfg.train)

        def fwd_bwd():
            engine.backward(engine(task.kind, task.name, batch, ctx))

        total += measure.count_flops(fwd_bwd)
    return int(ctx.sum(total))


def profile(cfg, steps: int, out: Path, peak_tflops: Optional[float] = None, comm: bool = True) -> Optional[dict]:
    """Run ``steps`` training steps of ``cfg`` through the training recipe, measure, and write
    ``out/report.{md,json}`` + plots (rank 0). Returns the report dict on rank 0, None on other ranks."""
    from mtpeft.profile.planner import plan_model_states
    from mtpeft.trainer.recipe import Hooks, Recipe

    class MemoryProbe(Hooks):
        """Resident memory before the model and once the engine is ready; peak memory and the
        communication counters start from there."""

        def before_model(self, recipe) -> None:
            self.rss_start = measure.rss_bytes()

        def after_setup(self, recipe) -> None:
            self.rss_ready = measure.rss_bytes()
            self.peak_reset = measure.reset_peak_memory()
            measure.comm_bytes(reset=True)

    out = Path(out)
    run_dir = out / "run"
    cfg = copy.deepcopy(cfg)
    t = cfg.train
    t.max_steps, t.eval_every, t.save_every, t.transfer_every = steps, 0, 0, 0
    cfg.output.dir = str(run_dir)
    if comm:
        cfg.deepspeed.overrides = {**(cfg.deepspeed.overrides or {}),
                                   "comms_logger": {"enabled": True, "prof_all": True, "verbose": False}}
    probe = MemoryProbe()
    recipe = Recipe(cfg, hooks=[probe], resume=False, partition_report=False).setup()
    try:
        recipe.run_steps()
    finally:
        recipe.close()
    engine, tasks, tok, ctx = recipe.engine, recipe.tasks, recipe.tok, recipe.ctx
    memory = measure.peak_memory()
    memory.update({"rss_start_bytes": probe.rss_start, "rss_ready_bytes": probe.rss_ready,
                   "peak_reset": probe.peak_reset})
    comm_total = measure.comm_bytes(reset=True)
    if comm:
        measure.disable_comm_logger()  # later engines in this process (compare, tests) run unlogged
    states = measure.engine_partition_bytes(engine)
    planned_states = plan_model_states(measure.meta_copy(engine.module), ctx.world)
    counted = _counted_first_step(engine, tasks, cfg, tok, ctx)
    per_rank = ctx.gather_objects({"rank": ctx.rank, "states": states, "memory": memory, "comm": comm_total})
    if not ctx.is_main:
        return None
    planned = _architecture_plan(cfg, ctx.world)
    arch = planned["arch"] if planned else None
    records = report.read_log(run_dir / "log.jsonl")
    flops = step_flops_of_run(cfg, tasks, tok, ctx.world, steps, arch) if arch is not None else []
    result = _summarize(cfg, ctx.world, steps, records, per_rank, planned_states, planned, flops, counted,
                        measure.detect_peak_tflops(peak_tflops))
    write_profile_report(out, result, records)
    return result


def _summarize(cfg, world, steps, records, per_rank, planned_states, planned, flops, counted, peak_tflops) -> dict:
    timing = measure.step_timing(records)
    measured_steps = {r["step"] for r in records[timing["warmup_steps"]:]}
    flops_measured = [f["flops"] for f in flops if f["step"] in measured_steps]
    flops_mean = sum(flops_measured) / len(flops_measured) if flops_measured else None
    flops_per_s = sum(flops_measured) / timing["seconds"] if flops_measured and timing["seconds"] else None
    source = "flops.step_flops on every step's shapes"
    if flops_mean is None and counted:  # not a model step_flops reads: the counted step stands for all
        flops_mean, source = counted, "FlopCounterMode on step 1"
    states = max((r["states"] for r in per_rank), key=lambda s: s["total"])
    rank0 = per_rank[0]["memory"]
    comm = per_rank[0]["comm"]
    comm_step = {op: b / steps for op, b in comm.items()} if comm is not None else None
    plan = planned["plan"] if planned else None
    measured_peak = rank0["device_peak_bytes"] if rank0["device_peak_bytes"] is not None else rank0["rss_peak_bytes"]
    return {
        "config": cfg.source, "world_size": world, "steps": steps, "device": rank0["device"],
        "timing": timing,
        "flops_per_step_mean": flops_mean, "flops_source": source, "flops_per_step": flops, "flops_counted_step1": counted,
        "flops_per_s": flops_per_s,
        "peak_tflops": peak_tflops,
        "mfu": measure.mfu(flops_mean, timing["step_seconds_mean"], peak_tflops, world),
        "ideal_step_seconds": flops_mean / (world * peak_tflops * 1e12) if flops_mean and peak_tflops else None,
        "model_states_measured": states, "model_states_per_rank": [r["states"] for r in per_rank],
        "model_states_planned": planned_states,
        "memory": rank0, "measured_peak_bytes": measured_peak,
        "memory_per_rank": [r["memory"] for r in per_rank],
        "comm_bytes_per_step": comm_step,
        "comm_bytes_per_step_total": sum(comm_step.values()) if comm_step is not None else None,
        "plan": plan,
    }


def _rows(r: dict) -> List[List[str]]:
    f = report.fmt
    rows = []
    for key in measure.STATE_KEYS + ("total",):
        rows.append([f"model states: {measure.STATE_LABELS[key]} (per rank)", f(r["model_states_measured"].get(key), "bytes"),
                     f(r["model_states_planned"].get(key), "bytes"), "engine partitions vs plan_model_states"])
    plan = r["plan"] or {}
    cpu = r["memory"]["device_peak_bytes"] is None
    rows.append(["peak memory (rank 0)", f(r["measured_peak_bytes"], "bytes"), f(plan.get("predicted_peak_bytes"), "bytes"),
                 "resident peak (VmHWM) incl. runtime; plan is the GPU allocator peak" if cpu
                 else "torch.cuda.max_memory_allocated vs predicted peak"])
    rows.append(["step time (s)", f(r["timing"]["step_seconds_mean"]), f(r["ideal_step_seconds"]),
                 "plan: FLOPs / peak (MFU 100 %)"])
    ideal_tps = None
    if r["ideal_step_seconds"] and r["timing"]["steps_measured"]:
        ideal_tps = r["timing"]["tokens"] / r["timing"]["steps_measured"] / r["ideal_step_seconds"]
    rows.append(["tokens/s", f(r["timing"]["tokens_per_s"]), f(ideal_tps), "tokens / seconds of log.jsonl; "
                 "plan: tokens per step at MFU 100 %"])
    rows.append(["FLOPs per step", f(r["flops_per_step_mean"], "flops"), "—", r["flops_source"]])
    first = r["flops_per_step"][0] if r["flops_per_step"] else {}
    rows.append(["FLOPs of step 1", f(r["flops_counted_step1"], "flops"),
                 f(first.get("flops_no_attention" if cpu else "flops"), "flops"),
                 "FlopCounterMode (incl. task heads) vs step_flops" + (" without attention*" if cpu else "")])
    rows.append(["MFU", f(r["mfu"], "%"), "—", f"peak {r['peak_tflops']} TFLOPS" if r["peak_tflops"]
                 else "no peak known (pass --peak-tflops)"])
    rows.append(["communication per step", f(r["comm_bytes_per_step_total"], "bytes"), "—",
                 "DeepSpeed comms logger" if r["comm_bytes_per_step_total"] is not None else "comms logger off"])
    return rows


HEADERS = ("quantity", "measured", "planned", "how")


def write_profile_report(out: Path, r: dict, records: List[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rows = _rows(r)
    notes = []
    if r["memory"]["device_peak_bytes"] is None:
        notes.append("* on CPU torch's FlopCounterMode has no rule for the fused CPU attention kernel, so the "
                     "counted step leaves attention out and is compared with step_flops minus its attention terms.")
    else:
        notes.append("FlopCounterMode counts aten matmuls only: work inside custom (Triton) kernels, such as the "
                     "fused NF4·LoRA op, is not in the counted step.")
    if not r["flops_per_step"]:
        notes.append("FLOPs: flops.step_flops cannot read this model (profile.architecture could not build it); the counted "
                     "step (FlopCounterMode) is the only FLOP figure.")
    r["table"] = "\n".join([report.text_table(HEADERS, rows), *notes])
    measured = {k: r["model_states_measured"].get(k, 0) for k in measure.STATE_KEYS}
    planned = {k: r["model_states_planned"].get(k, 0) for k in measure.STATE_KEYS}
    report.grouped_bars(out / "memory_breakdown.png", "model states per rank: measured vs planned",
                        {"measured (engine)": measured, "planned": planned}, "MiB", scale=report.MIB)
    by_task: Dict[str, List[float]] = {}
    for rec in records[r["timing"]["warmup_steps"]:]:
        by_task.setdefault(rec["task"], [0, 0])
        by_task[rec["task"]][0] += rec["tokens"]
        by_task[rec["task"]][1] += rec["seconds"]
    throughput = {task: tok / sec for task, (tok, sec) in by_task.items() if sec > 0}
    report.grouped_bars(out / "throughput.png", "tokens/s by task", {"measured": throughput}, "tokens/s")
    curves = report.task_curves(records)
    report.loss_curves(out / "loss_curves.png", "per-task training loss", {"profile": curves})
    scalars = {"profile/step_seconds": r["timing"]["step_seconds_mean"], "profile/tokens_per_s": r["timing"]["tokens_per_s"],
               "profile/flops_per_step": r["flops_per_step_mean"], "profile/mfu": r["mfu"],
               "profile/peak_bytes": r["measured_peak_bytes"],
               "profile/comm_bytes_per_step": r["comm_bytes_per_step_total"]}
    scalars.update({f"profile/states_measured/{k}": v for k, v in measured.items()})
    scalars.update({f"profile/states_planned/{k}": v for k, v in planned.items()})
    report.tensorboard_scalars(out / "tensorboard", scalars,
                               curves={f"profile/loss/{k}": v for k, v in curves.items()})
    md = [f"# mtpeft profile: {r['config']}", "",
          f"{r['steps']} steps, world size {r['world_size']}, device {r['device']}; "
          f"timing over {r['timing']['steps_measured']} steps after {r['timing']['warmup_steps']} warm-up.", "",
          report.markdown_table(HEADERS, rows), "", *notes, "",
          "FLOPs count a frozen base: forward, input-gradient backward (no weight gradients of the base), "
          "recomputation under gradient checkpointing, PEFT terms and attention (`mtpeft.profile.flops`).",
          "", "![memory](memory_breakdown.png)", "![throughput](throughput.png)", "![loss](loss_curves.png)", ""]
    report.write_text(out / "report.md", "\n".join(md))
    report.write_json(out / "report.json", r)


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point under the deepspeed launcher (``--module mtpeft.profile.profile_cli``)."""
    parser = CommandParser(prog="mtpeft profile")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        status = run(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    if status == 0 and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:  # a rank, every report written
        leave_process_group()
        end_rank_process()
    return status


if __name__ == "__main__":
    sys.exit(main())
