"""Every folder mtpeft writes into (``output.dir``, ``--out`` of profile, compare, demo, export) is
checked before any work: a path that is a file, lies under a file, or cannot be written is one
error line naming the option, not a traceback minutes later."""

from __future__ import annotations

import os
from pathlib import Path

from mtpeft.errors import ConfigError


def check_output_folder(path: Path, option: str) -> None:
    """Raise ConfigError unless ``path`` is (or can be created as) a writable folder."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{option} {path} is an existing file; name a folder")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"{option} {path} lies under {existing}, which is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {path}: {existing} is not writable; choose another folder")
