"""Running the deepspeed launcher from Python (``mtpeft demo``, ``mtpeft profile --ranks N``) as the
shell scripts in ``launch/`` do (``launch/process_group.sh``): in a process group of its own, with
TERM, INT and HUP forwarded to the whole group, so that a signal to mtpeft reaches the per-node
launcher and every rank instead of leaving them as orphans.

The exit status is the launcher's, except after a forwarded signal when the run saved its
checkpoint: then 0. DeepSpeed's per-node launcher exits 1 after any SIGTERM whatever its ranks
returned, so each node's local rank 0 writes the checkpoint tag to the file named by
``MTPEFT_PREEMPTED_FILE`` instead (``trainer.faults.Preemption.report_saved``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PREEMPTED_FILE_ENV = "MTPEFT_PREEMPTED_FILE"
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
DRAIN_S = 60.0  # DeepSpeed's per-node launcher SIGKILLs ranks 30 s after its SIGTERM


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def run_in_group(cmd: list[str]) -> int:
    """Run ``cmd`` in a new process group, forwarding TERM/INT/HUP to all of it; its exit status, or 0
    when a forwarded signal ended a run that saved its checkpoint."""
    fd, marker = tempfile.mkstemp(prefix="mtpeft-preempted.")
    os.close(fd)
    received: list[int] = []
    proc = subprocess.Popen(cmd, env={**os.environ, PREEMPTED_FILE_ENV: marker}, start_new_session=True)

    def forward(signum, frame) -> None:
        received.append(signum)
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass

    previous = {s: signal.signal(s, forward) for s in FORWARDED}
    try:
        code = proc.wait()
        deadline = time.time() + DRAIN_S
        while received and _group_alive(proc.pid) and time.time() < deadline:
            time.sleep(0.2)  # the launcher may end before its ranks have saved and exited
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        saved = Path(marker).read_text().strip() if Path(marker).is_file() else ""
        Path(marker).unlink(missing_ok=True)
    if received and saved:
        print(f"mtpeft: {signal.Signals(received[0]).name}: checkpoint {saved} saved; rerun the same command to "
              "resume", file=sys.stderr, flush=True)
        return 0
    return code
