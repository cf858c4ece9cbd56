"""The ``mtpeft`` command: parse, call, print. Bad input is one ``error:`` line and exit status 2."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mtpeft.errors import UserError
from mtpeft.trainer.faults import RunAborted

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"


def _cmd_train(args) -> int:
    from mtpeft.config import load_config
    from mtpeft.trainer.loop import train

    train(load_config(args.config, args.set))
    return 0


def _cmd_demo(args) -> int:
    from mtpeft.demo.launch import run_demo

    config = Path(args.config) if args.config else DEMO_CONFIG
    return run_demo(config, Path(args.out), args.ranks, args.set, args.port)


def _cmd_eval(args) -> int:
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
    from mtpeft.trainer.export import export

    cfg, model = load_trained_model(Path(args.run_dir), args.source)
    out = export(model, cfg, Path(args.out), DistContext())
    print(f"exported to {out}")
    return 0


def _cmd_plan(args) -> int:
    from mtpeft.profile.plan_cli import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtpeft", description=__doc__.splitlines()[0])
    # the deepspeed launcher prepends --local_rank=N; LOCAL_RANK in the environment says the same
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a RunConfig (alone, or under the deepspeed launcher)")
    p.add_argument("config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("demo", help="train, evaluate and export the built-in demo through the deepspeed launcher")
    p.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    p.add_argument("--ranks", type=int, default=2, help="processes to launch (default: 2, CPU/gloo or GPUs)")
    p.add_argument("--config", default=None, help="another config instead of configs/demo.yaml")
    p.add_argument("--port", type=int, default=0, help="master port (default: a free one)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("eval", help="recompute RUN_DIR/metrics.json from a run's exported weights")
    p.add_argument("run_dir")
    p.add_argument("--source", choices=("export", "checkpoint"), default="export")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("export", help="export a run's adapter (HF peft format) and task heads")
    p.add_argument("run_dir")
    p.add_argument("--out", required=True)
    p.add_argument("--source", choices=("export", "checkpoint"), default="checkpoint")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("plan", help="predict per-GPU memory of a QLoRA/PEFT fine-tune and search what fits")
    try:
        from mtpeft.profile.plan_cli import add_arguments

        add_arguments(p)
    except ImportError:
        pass
    p.set_defaults(func=_cmd_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.func(args)
    except UserError as exc:
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
