"""DeepSpeed compiles some ops on first use (on CPU its shared-memory communication op, minutes on a
busy machine) through torch's extension builder, which guards each build folder with an empty
``lock`` file and waits, silently and forever, while one exists. A run killed during that build
leaves the lock behind, and every later run hangs at start-up without a word.

So before a run builds anything, local rank 0 looks for lock files in the torch-extensions cache
(``TORCH_EXTENSIONS_DIR``, else ``~/.cache/torch_extensions/<python>_<accelerator>``). A lock that a
process on this machine holds open is a build in progress (torch keeps the file open from the moment
it creates it until the build ends), and so is one that goes away or changes hands while it is looked
at: every process that loads an op already built takes the lock for a moment. On a local file system
nobody else can hold it, so an unheld lock older than a few seconds was left by a killed build: one
error line names the file to remove.
On a shared one (NFS, Lustre, ...) another node may be building: the lock counts as stale once its
folder has not changed for ``STALE_AFTER_S``, and before that a note says what is waited on.
Building the op at install time would not help: a torch or DeepSpeed upgrade rebuilds it at the
next run, and a killed install leaves the same lock."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from mtpeft.errors import LaunchError

STALE_AFTER_S = 300.0  # on a shared file system
LOCAL_GRACE_S = 10.0  # a lock created while /proc was being read
RELEASE_WINDOW_S = 0.5  # between torch closing its lock and removing it
SHARED_FILE_SYSTEMS = ("nfs", "nfs4", "lustre", "gpfs", "cifs", "smb3", "smbfs", "beegfs", "ceph", "glusterfs",
                       "fuse.sshfs", "fuse.glusterfs", "fuse.ceph", "panfs", "wekafs", "9p", "afs", "orangefs")


def extensions_root() -> Path:
    """Where torch's extension builder keeps its build folders (``<root>/<op>/``)."""
    explicit = os.environ.get("TORCH_EXTENSIONS_DIR")
    if explicit:
        return Path(explicit)
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    accelerator = (f"rocm{torch.version.hip.replace('.', '')}" if torch.version.hip else
                   f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu")
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(get_default_build_root()) / f"{python}_{accelerator}"


def holders(lock: Path) -> list[int]:
    """Processes on this machine that hold ``lock`` open (those we may look at)."""
    target = os.path.realpath(lock)
    found = []
    for pid in (p for p in os.listdir("/proc") if p.isdigit()) if os.path.isdir("/proc") else ():
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    found.append(int(pid))
                    break
            except OSError:
                continue
    return found


def filesystem_type(path: Path) -> str:
    """The type of the file system holding ``path`` (from /proc/mounts; "" when unknown)."""
    target, best, kind = os.path.realpath(path), "", ""
    try:
        with open("/proc/mounts", encoding="utf-8") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) >= 3:
                    point = parts[1].replace("\\040", " ")
                    if (target == point or target.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
                        best, kind = point, parts[2]
    except OSError:
        return ""
    return kind


def _last_write(folder: Path) -> float:
    times = []
    for p in folder.iterdir():
        try:
            times.append(p.stat().st_mtime)
        except OSError:
            continue
    return max(times, default=0.0)


def _identity(lock: Path) -> tuple[int, int] | None:
    """(inode, creation time) of a lock, None once it is gone. torch never writes to its lock, so the
    mtime is when it was taken; a new inode is a new build that took it."""
    try:
        st = lock.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def _released_soon(lock: Path, taken: tuple[int, int], within_s: float = RELEASE_WINDOW_S) -> bool:
    """Whether a lock nobody holds goes away (or is taken again) within ``within_s``: torch closes its lock
    before it removes it, so a lock seen between the two is a build that just ended."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if _identity(lock) != taken:
            return True
        time.sleep(0.02)
    return _identity(lock) != taken


def check_extension_locks(root: Path | None = None, now: float | None = None,
                          stale_after_s: float = STALE_AFTER_S) -> list[Path]:
    """Raise LaunchError for a stale build lock; return the locks that are waited on (a note is printed).

    Every process that loads a built op takes the lock for a moment (torch re-runs ninja, which finds
    nothing to do), so a lock that appears, is released or changes hands while it is being looked at
    belongs to a live process and is left alone."""
    root = extensions_root() if root is None else Path(root)
    if not root.is_dir():
        return []
    shared = filesystem_type(root) in SHARED_FILE_SYSTEMS
    waiting = []
    for lock in sorted(root.glob("*/lock")):
        taken = _identity(lock)
        if taken is None or holders(lock) or _identity(lock) != taken:
            continue  # released since it was listed, or held: a build (or a load) in progress here
        idle = (time.time() if now is None else now) - max(taken[1] / 1e9, _last_write(lock.parent))
        if not shared and idle <= LOCAL_GRACE_S and _released_soon(lock, taken):
            continue
        if idle > (stale_after_s if shared else LOCAL_GRACE_S):
            since = f"{idle / 60:.0f} min" if idle >= 60 else f"{idle:.0f} s"
            raise LaunchError(f"{lock}: a DeepSpeed op build was interrupted (no process on this machine holds this "
                              f"lock and {lock.parent} has not changed for {since}), and every run would wait on it "
                              f"forever; remove the file (rm {lock}) and rerun")
        print(f"note: waiting for {lock} (a DeepSpeed op build); no process on this machine holds it: if no other "
              f"node is building, remove it", file=sys.stderr, flush=True)
        waiting.append(lock)
    return waiting
