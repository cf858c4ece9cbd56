"""Reading back what a run wrote (exports, checkpoints, its config) can meet a damaged file: a copy
cut short, a disk that filled, a shard from another run. Those errors become one CheckpointError
that names the file and says what to do instead; anything else (a bug) keeps its traceback."""

from __future__ import annotations

import contextlib
import pickle
import zipfile
from pathlib import Path

from mtpeft.errors import CheckpointError

POINTER = "latest"  # checkpoints/latest: the tag of the newest complete checkpoint

try:
    from safetensors import SafetensorError
except ImportError:  # pragma: no cover - safetensors always ships it
    SafetensorError = OSError

DAMAGED_FILE_ERRORS = (SafetensorError, OSError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile,
                       UnicodeDecodeError, ValueError)
# torch.load reports a truncated zip archive as RuntimeError("PytorchStreamReader failed ...")
_TORCH_READ_MARKERS = ("PytorchStreamReader", "failed finding central directory", "unexpected EOF", "storage")


@contextlib.contextmanager
def reading(path: Path, instead: str):
    """Turn a damaged-file error raised while reading ``path`` into one CheckpointError; ``instead``
    is what the user can do about it."""
    try:
        yield
    except CheckpointError:
        raise
    except DAMAGED_FILE_ERRORS as exc:
        raise CheckpointError(f"{path}: cannot be read, the file is damaged or incomplete "
                              f"({type(exc).__name__}: {str(exc)[:120]}); {instead}") from None
    except RuntimeError as exc:
        if not any(m in str(exc) for m in _TORCH_READ_MARKERS):
            raise
        raise CheckpointError(f"{path}: cannot be read, the file is damaged or incomplete "
                              f"({str(exc)[:120]}); {instead}") from None


def complete_tags(ckpt_dir: Path, but: str = "") -> list[str]:
    """Checkpoint tags with a complete run state, newest first, except ``but``: what to fall back to."""
    tags = [p.name for p in ckpt_dir.iterdir() if p.is_dir() and (p / "run_state.pt").is_file() and p.name != but]
    return sorted(tags, key=lambda t: int("".join(c for c in t if c.isdigit()) or 0), reverse=True)


def pointer_tag(ckpt_dir: Path) -> str | None:
    """The tag ``ckpt_dir/latest`` names (None without the file), read whatever bytes it holds: a
    damaged pointer gives a tag that names no checkpoint, which its readers then report."""
    pointer = Path(ckpt_dir) / POINTER
    if not pointer.is_file():
        return None
    return pointer.read_bytes().decode("utf-8", errors="replace").strip()
