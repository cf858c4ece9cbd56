"""Helpers for tests that start real multi-process DeepSpeed runs on CPU (gloo)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_config(tmp: Path, name: str = "tiny.yaml", keep_dropout: bool = False, **train) -> Path:
    """The demo config cut down for tests: tiny eval, and no dropout unless ``keep_dropout`` (the
    demo's LoRA dropout 0.05 and head dropout 0.1)."""
    raw = yaml.safe_load((REPO / "configs/demo.yaml").read_text())
    raw["model"]["name_or_path"] = str(REPO / "mtpeft/assets/demo/base_model")
    if not keep_dropout:
        raw["peft"]["dropout"] = 0.0
    for t in raw["tasks"]:
        for split in ("train", "eval"):
            t[split] = str((REPO / "configs" / t[split]).resolve())
        if not keep_dropout:
            t["head_dropout"] = 0.0
        t["max_eval_examples"] = 12
        t["max_new_tokens"] = 6
    raw["train"].update({"max_steps": 8, "micro_batch_size": 2, "max_seq_len": 96, "warmup_steps": 0})
    raw["train"].update(train)
    path = tmp / name
    path.write_text(yaml.safe_dump(raw))
    return path


def env() -> dict:
    e = dict(os.environ)
    e.update({"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def run(cmd: list[str], log: Path, timeout: int = 600) -> None:
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env(), cwd=str(REPO), timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{log.read_text()[-4000:]}")


def deepspeed_cmd(ranks: int, *args: str, port: int | None = None) -> list[str]:
    launcher = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
    return [launcher, "--num_gpus", str(ranks), "--master_port", str(port or free_port()), *args]
