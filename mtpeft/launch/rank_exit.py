"""How a rank of a finished multi-rank run ends: it waits for its peers, leaves the process group, and
exits without the interpreter's teardown.

A rank that exits while a peer still holds gloo connections to it can abort in gloo's teardown, and
the C++ threads of the communication backends (gloo's transport, DeepSpeed's shared-memory op) run
static destructors that can abort a finished rank too: "terminate called without an active
exception", status -6, after every result was written. Seen about once per full test suite on a
loaded 2-core machine, in ``mtpeft train`` and in the test suite's own multi-rank scripts alike."""

from __future__ import annotations

import os
import sys

import torch.distributed as dist


def leave_process_group() -> None:
    """Every rank waits for the others, then leaves the process group (nothing to do alone)."""
    if dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def end_rank_process(status: int = 0) -> None:
    """End this process now with ``status``, after flushing what Python still buffers; call it only
    when everything the rank writes is closed. ``os._exit`` skips the backends' static destructors."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
