"""Writing what a run produces (checkpoints, exports, logs, metrics, reports) can meet a full disk,
a quota, a file-size limit or a read-only place. Those become one WriteError that names the file
and the fix; anything else (a bug) keeps its traceback. The counterpart of ``trainer/damaged.py``
for reads: every write it guards goes to a temporary name first, so what is left behind is never in
charge (the previous checkpoint, export or metrics file stays the one that is read)."""

from __future__ import annotations

import contextlib
import errno
from pathlib import Path
from typing import Iterator

from mtpeft.errors import WriteError

NO_SPACE = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
            errno.EFBIG: "the file-size limit (ulimit -f) was reached"}
NOT_WRITABLE = {errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                errno.EPERM: "permission denied"}
# torch.save reports a failed write of its zip archive as RuntimeError without an errno
_TORCH_WRITE_MARKERS = ("PytorchStreamWriter", "inline_container", "file write failed")
FREE_SPACE = "free space on that disk (or point output.dir / --out at one with room) and rerun"


def reason(exc: BaseException) -> str | None:
    """Why a write failed, in words, or None when ``exc`` is not a failed write."""
    if isinstance(exc, OSError):
        code = exc.errno
        if code is None and exc.args and isinstance(exc.args[0], int):
            code = exc.args[0]
        return NO_SPACE.get(code) or NOT_WRITABLE.get(code)
    text = str(exc)
    if isinstance(exc, RuntimeError) and any(m in text for m in _TORCH_WRITE_MARKERS):
        return "the disk is full or a file-size limit was reached"
    if "os error 28" in text or "No space left" in text:  # safetensors' Rust I/O errors
        return NO_SPACE[errno.ENOSPC]
    if "os error 27" in text or "File too large" in text:
        return NO_SPACE[errno.EFBIG]
    if "os error 122" in text or "quota exceeded" in text.lower():
        return NO_SPACE[errno.EDQUOT]
    return None


@contextlib.contextmanager
def writing(path: Path, then: str = FREE_SPACE):
    """Turn a failed write under ``path`` into one WriteError; ``then`` says what is left in charge
    and what to do."""
    try:
        yield
    except WriteError:
        raise
    except Exception as exc:
        why = reason(exc)
        if why is None:
            raise
        raise WriteError(f"{path}: cannot be written, {why}; {then}") from None


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yield a temporary name beside ``path`` to write; it becomes ``path`` once written. A write that
    fails is one WriteError naming ``path``, the previous file stays, and the temporary one is removed."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with writing(path, f"the previous {path.name} (if any) is unchanged; {FREE_SPACE}"):
            yield tmp
            tmp.replace(path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
