"""``mtpeft compare CONFIG``: the multitask run against one single-task run per task, same budget."""

from __future__ import annotations

import argparse
from pathlib import Path

from mtpeft.command_parser import whole_number
from mtpeft.errors import UserError


# what compare writes into --out: the runs and the report
COMPARE_FOLDER_NAMES = frozenset({"multitask", "single", "report.md", "compare.json", "compare_metrics.png",
                                  "compare_cost.png"})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="a RunConfig YAML with two or more tasks (e.g. configs/demo.yaml)")
    parser.add_argument("--out", default="runs/compare", help="folder for the runs and the table (default runs/compare)")
    parser.add_argument("--steps", type=whole_number(0, "0: the config's train.max_steps"), default=0,
                        help="multitask steps (default: the config's train.max_steps); single-task runs get "
                             "the steps their task got in the multitask run")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--force", action="store_true",
                        help="write into a folder holding files mtpeft did not write, beside them (never over them)")


def run(args: argparse.Namespace) -> int:
    from mtpeft.config import load_config
    from mtpeft.output_folder import check_folder_is_ours, check_output_folder
    from mtpeft.profile.compare import run_compare

    cfg = load_config(args.config, list(args.set))
    if len(cfg.tasks) < 2:
        raise UserError(f"{args.config}: compare needs at least two tasks, the config has {len(cfg.tasks)}")
    out = Path(args.out).resolve()
    check_output_folder(out, "--out")
    check_folder_is_ours(out, "--out", COMPARE_FOLDER_NAMES, args.force)
    result = run_compare(cfg, out, steps=args.steps or None)
    print(result["table"], flush=True)
    print(f"compare report: {out / 'report.md'}", flush=True)
    return 0
