"""The ``mtpeft`` command: parse, call, print. Bad input is one ``error:`` line and exit status 2."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from mtpeft.command_parser import CommandParser, port_number, whole_number
from mtpeft.errors import ConfigError, DataError, UserError, WriteError
from mtpeft.failed_writes import FREE_SPACE, reason
from mtpeft.launch.rank_exit import end_rank_process
from mtpeft.shipped_files import run_config
from mtpeft.trainer.faults import Preemption, RunAborted


def _cmd_train(args) -> int:
    from mtpeft.config import load_config
    from mtpeft.trainer.recipe import train

    if args.preempted_file:
        Preemption.report_to(args.preempted_file)
    cfg = load_config(args.config, args.set)
    if int(os.environ.get("RANK", "0") or 0) == 0:  # once, before any rank writes into the folder
        check_run_folder(Path(cfg.output.dir), f"{cfg.source}: output.dir", args.force)
    train(cfg, leave_group=True)
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        end_rank_process()  # the run has left the process group (leave_group)
    return 0


def check_run_folder(run_dir: Path, option: str, force: bool) -> None:
    """A run writes into a new, empty or earlier run's folder; beside a user's files only with --force,
    and its ``export/`` subfolder (replaced at the end of the run) never holds a user's files."""
    from mtpeft.output_folder import RUN_FOLDER_NAMES, check_folder_is_ours, foreign_entries
    from mtpeft.trainer.export import EXPORT_FILES

    check_folder_is_ours(run_dir, option, RUN_FOLDER_NAMES, force)
    export_dir = run_dir / "export"
    if export_dir.exists() and not export_dir.is_dir():
        raise ConfigError(f"{option} {run_dir}: {export_dir} is a file, and the run exports into that folder when it "
                          f"ends; move it away or name another output.dir")
    foreign = foreign_entries(export_dir, EXPORT_FILES)
    if foreign:
        raise ConfigError(f"{option} {run_dir}: {export_dir} holds {foreign[0]!r}, which an export did not write, and "
                          f"the run replaces that folder when it ends; move it away or name another output.dir")


def _cmd_demo(args) -> int:
    from mtpeft.demo.launch import run_demo

    config = run_config(args.config or "demo")
    return run_demo(config, Path(args.out), args.ranks, args.set, args.port, force=args.force)


def _cmd_eval(args) -> int:
    if args.zero_shot:
        from mtpeft.tasks.zero_shot import run as run_zero_shot

        if not args.tasks:
            raise UserError("--zero-shot needs --tasks CONFIG (a RunConfig YAML whose tasks are used)")
        return run_zero_shot(args)
    if not args.run_dir:
        raise UserError("eval needs RUN_DIR (a finished run's output.dir), or --zero-shot MODEL --tasks CONFIG")
    from mtpeft.data.dist import DistContext
    from mtpeft.run_dir import load_trained_model
    from mtpeft.trainer.build import load_tokenizer
    from mtpeft.trainer.evaluate import evaluate, format_table, write_metrics
    from mtpeft.trainer.loop import prepare_tasks

    run_dir = Path(args.run_dir)
    cfg, model = load_trained_model(run_dir, args.source)
    tok = load_tokenizer(cfg.model.name_or_path)
    metrics = evaluate(model, prepare_tasks(cfg), tok, DistContext(), cfg.train.max_seq_len,
                       max(cfg.train.micro_batch_size, 16))
    write_metrics(metrics, run_dir)
    print(format_table(metrics))
    return 0


def _cmd_export(args) -> int:
    from mtpeft.data.dist import DistContext
    from mtpeft.run_dir import load_trained_model
    from mtpeft.run_dir import latest_checkpoint
    from mtpeft.trainer.export import check_export_target, export

    check_export_target(Path(args.out), Path(args.run_dir), force=args.force)  # before minutes of loading
    source = args.source
    if source == "auto":
        source = "checkpoint" if latest_checkpoint(Path(args.run_dir)) is not None else "export"
    cfg, model = load_trained_model(Path(args.run_dir), source)
    out = export(model, cfg, Path(args.out), DistContext(), force=args.force)
    print(f"exported to {out}")
    return 0


def _delegate(module: str):
    """A subcommand whose arguments and body live in ``module`` (``add_arguments`` / ``run``)."""

    def call(args) -> int:
        import importlib

        return importlib.import_module(module).run(args)

    return call


def _add_delegated(sub, name: str, module: str, help_text: str) -> None:
    import importlib

    p = sub.add_parser(name, help=help_text)
    importlib.import_module(module).add_arguments(p)
    p.set_defaults(func=_delegate(module))


FORCE_HELP = ("write into a folder that holds files mtpeft did not write (or, for export, the run folder itself), "
              "beside them; mtpeft still never deletes or replaces a file it did not write")


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="mtpeft", description="Multitask parameter-efficient fine-tuning of code LLMs on "
                                                "DeepSpeed ZeRO-3, with a 4-bit NF4 base and fused Triton kernels.")
    # the deepspeed launcher prepends --local_rank=N; LOCAL_RANK in the environment says the same
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a RunConfig (alone, or under the deepspeed launcher)")
    p.add_argument("config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
    p.add_argument("--preempted-file", default=None, metavar="PATH",
                   help="after a SIGTERM, each node's local rank 0 writes the saved checkpoint's tag here (set by "
                        "launch/multi_node_pdsh.sh; MTPEFT_PREEMPTED_FILE does the same where the environment reaches the ranks)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("demo", help="train, evaluate and export the built-in demo through the deepspeed launcher")
    p.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    p.add_argument("--ranks", type=whole_number(1), default=2, help="processes to launch (default: 2, CPU/gloo or GPUs)")
    p.add_argument("--config", default=None, help="another config instead of the shipped demo: a path or a shipped name (demo_nf4)")
    p.add_argument("--port", type=port_number, default=0, help="master port (default: a free one)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("eval", help="recompute RUN_DIR/metrics.json from a run's exported weights, "
                                    "or prompt an untrained model zero-shot (--zero-shot MODEL --tasks CONFIG)")
    p.add_argument("run_dir", nargs="?")
    p.add_argument("--source", choices=("export", "checkpoint"), default="export")
    from mtpeft.tasks.zero_shot import add_arguments as zero_shot_arguments

    zero_shot_arguments(p)
    for action in p._actions:
        if action.dest in ("zero_shot", "tasks"):
            action.required = False
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("export", help="export a run's adapter (HF peft format) and task heads")
    p.add_argument("run_dir")
    p.add_argument("--out", required=True)
    p.add_argument("--source", choices=("auto", "export", "checkpoint"), default="auto",
                   help="auto (default): the latest checkpoint if the run saved one, else RUN_DIR/export")
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
    p.set_defaults(func=_cmd_export)

    _add_delegated(sub, "plan", "mtpeft.profile.plan_cli",
                   "predict per-GPU memory of a QLoRA/PEFT fine-tune and search what fits")
    _add_delegated(sub, "profile", "mtpeft.profile.profile_cli",
                   "run real steps; measured time, tokens/s, memory, FLOPs, MFU, comm bytes beside the plan")
    try:
        _add_delegated(sub, "compare", "mtpeft.profile.compare_cli",
                       "multitask run vs one single-task run per task with the same budget")
    except ImportError:
        pass
    return parser


REPEAT_EXIT_DELAY_S = 3.0


def _node_repeat(exc: UserError, args) -> bool:
    """A config or dataset error on a node's local rank > 0: its local rank 0 read the same files and
    prints the same line, so under the launcher the user sees it once per node, not once per rank."""
    return _local_rank(args) > 0 and isinstance(exc, (ConfigError, DataError))


def _local_rank(args) -> int:
    return args.local_rank if args.local_rank is not None else int(os.environ.get("LOCAL_RANK", "0") or 0)


def _unguarded_write(exc: Exception) -> UserError | None:
    """A failed write no ``failed_writes.writing`` named (a disk that filled under a library): still
    one line, naming the file when the error does."""
    why = reason(exc)
    if why is None:
        return None
    where = getattr(exc, "filename", None)
    if isinstance(exc, PermissionError):  # a read as much as a write
        return UserError(f"{where or 'a file mtpeft needs'}: permission denied; give this user access to it or "
                         "choose another path") if where else None
    return WriteError(f"{where or 'a file mtpeft was writing'}: cannot be written, {why}; {FREE_SPACE}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        try:
            return args.func(args)
        except (OSError, RuntimeError) as exc:
            user = _unguarded_write(exc)
            if user is None:
                raise
            raise user from None
    except UserError as exc:
        if _node_repeat(exc, args):
            time.sleep(REPEAT_EXIT_DELAY_S)  # the launcher stops every rank once one exits: let local rank 0 print
        else:
            if isinstance(exc, WriteError) and _local_rank(args) > 0:
                # a shared disk fills for every rank: local rank 0 prints first and the launcher stops the
                # others; a rank whose own write failed while rank 0 waits in a barrier still prints
                time.sleep(REPEAT_EXIT_DELAY_S)
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except RunAborted as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
