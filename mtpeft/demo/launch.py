"""``mtpeft demo``: the demo config trained through the real ``deepspeed`` launcher.

The launcher starts ``--ranks`` processes (gloo on CPU, NCCL on GPUs) that each run
``python -m mtpeft train``; training ends with evaluation and export, and the demo then prints
the metrics table and the wall time.
"""

from __future__ import annotations

import json
import shutil
import socket
import sys
import time
from pathlib import Path

from mtpeft.errors import ConfigError, LaunchError
from mtpeft.launch.process_group import run_in_group


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_command(config: Path, ranks: int, port: int, overrides: list[str]) -> list[str]:
    launcher = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
    if not Path(launcher).exists():
        raise LaunchError("the `deepspeed` launcher is not on PATH; install the project (pip install -e .)")
    cmd = [launcher, "--num_gpus", str(ranks), "--master_port", str(port or _free_port()),
           "--module", "mtpeft", "train", str(config)]
    for item in overrides:
        cmd += ["--set", item]
    return cmd


def run_demo(config: Path, out: Path, ranks: int, overrides: list[str], port: int = 0, force: bool = False) -> int:
    if not config.is_file():
        raise ConfigError(f"{config}: demo config not found")
    if ranks < 1:
        raise ConfigError(f"--ranks must be at least 1, got {ranks}")
    from mtpeft.output_folder import RUN_FOLDER_NAMES, check_folder_is_ours, check_output_folder

    out = out.resolve()
    check_output_folder(out, "--out")
    check_folder_is_ours(out, "--out", RUN_FOLDER_NAMES, force)
    overrides = [f"output.dir={out}", *overrides]
    from mtpeft.config import load_config

    load_config(config, overrides)  # a config error is one line here, not one per rank
    from mtpeft.launch.extension_lock import check_extension_locks

    check_extension_locks()
    cmd = launcher_command(config, ranks, port, overrides) + (["--force"] if force else [])
    print("launching:", " ".join(cmd), flush=True)
    start = time.time()
    code = run_in_group(cmd)  # a signal to the demo reaches the launcher and every rank
    wall = time.time() - start
    if code != 0:
        if code != 2:  # status 2: a rank printed its own error line already
            print(f"error: the deepspeed launcher exited with status {code}; see the rank output above",
                  file=sys.stderr)
        return 2 if code == 2 else 1
    if not (out / "metrics.json").is_file():  # stopped by a signal once its checkpoint was saved (said above)
        return 0
    metrics = json.loads((out / "metrics.json").read_text())
    beats = all(m["value"] > m["chance"] for m in metrics.values())
    print(f"demo finished in {wall:.0f} s on {ranks} rank(s); every task beats chance: {beats}")
    print(f"adapter (HF peft format) and heads: {out / 'export'}")
    return 0
