"""DeepSpeed's CPU backend gives every rank of a one-node run a shared-memory allreduce workspace: a
POSIX shared-memory object ``deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>``
of about 66 MiB (``/dev/shm`` on Linux). DeepSpeed 0.19.8 never removes it (its ``shared_close`` is
never called), and ``/dev/shm`` is memory: each run left 66 MiB per rank allocated until reboot,
and a few hundred runs filled a 24 GiB machine until it thrashed.

The name is only needed while the ranks find each other: DeepSpeed's ``init_distributed`` returns
on a rank only after that rank has mapped every other rank's workspace. So once all ranks have passed
a barrier after it, each rank unlinks its own name. The mappings stay valid, and the kernel frees the
memory when the last rank exits, however it exits (kill -9 included)."""

from __future__ import annotations

import os
from pathlib import Path

SHM_ROOT = Path("/dev/shm")
WORKSPACE_PREFIX = "deepspeed_allreduce_buffer"


def workspace_name(rank: int, env: dict | None = None) -> str:
    """The shared-memory name DeepSpeed's ``shm_initialize`` gives ``rank``'s workspace."""
    env = os.environ if env is None else env
    return f"{WORKSPACE_PREFIX}_{os.getuid()}_{env.get('MASTER_ADDR', '')}_{env.get('MASTER_PORT', '')}_{rank}"


def release_workspace_name(rank: int, root: Path = SHM_ROOT) -> bool:
    """Unlink ``rank``'s workspace name (True when there was one). Call it only after a barrier that
    every rank reached after ``deepspeed.init_distributed``: a rank still starting looks the name up."""
    try:
        (root / workspace_name(rank)).unlink()
    except FileNotFoundError:
        return False
    return True
