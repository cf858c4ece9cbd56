"""Every folder mtpeft writes into (``output.dir``, ``--out`` of profile, compare, demo, export) is
checked before any work: a path that is a file, lies under a file, or cannot be written is one
error line naming the option, not a traceback minutes later.

A folder that already holds files mtpeft did not write (names outside the command's own) is refused
unless ``--force``; with ``--force`` mtpeft writes beside them, and still never deletes or replaces a
file it did not write: in such a folder, a file under one of mtpeft's own names is refused too,
since nothing says who wrote it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from mtpeft.errors import ConfigError

# what a run writes into output.dir (trainer/recipe.py, checkpoint.py, run_log.py, evaluate.py, export.py,
# transfer.py), with the temporary name of an interrupted log rewrite; NAME.tmp, what an interrupted
# write through failed_writes.replacing leaves, counts as mtpeft's wherever NAME does
RUN_FOLDER_NAMES = frozenset({
    "config.yaml", "log.jsonl", "log.tmp", "checkpoints", "tensorboard", "export",
    "metrics.json", "partition.json", "transfer.jsonl", "transfer.png"})
TEMPORARY_PREFIXES = (".export.tmp-", ".export.old-")


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


def check_output_file(path: Path, option: str) -> None:
    """Raise ConfigError unless ``path`` names a new file in a writable folder: mtpeft does not
    replace a file it cannot tell it wrote."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{option} {path} is a folder; name a file (e.g. {path / 'metrics.json'})")
    if path.exists():
        raise ConfigError(f"{option} {path} already exists and mtpeft does not replace a file it did not write; "
                          f"name a new file or remove it")
    check_output_folder(path.parent, option)


def foreign_entries(path: Path, ours: Iterable[str]) -> list[str]:
    """Names in folder ``path`` that the command writing there would not have written."""
    ours = set(ours)
    if not Path(path).is_dir():
        return []
    return sorted(p.name for p in Path(path).iterdir()
                  if p.name not in ours and p.name.removesuffix(".tmp") not in ours
                  and not p.name.startswith(TEMPORARY_PREFIXES))


def check_folder_is_ours(path: Path, option: str, ours: Iterable[str], force: bool) -> list[str]:
    """Refuse a folder holding files the command did not write, unless ``force``; with ``force``, refuse
    one where a file under the command's own names (``ours``) would replace a stranger's. Returns the
    foreign names (empty: the folder is new, empty, or the command's own)."""
    path, ours = Path(path), set(ours)
    foreign = foreign_entries(path, ours)
    if not foreign:
        return []
    listed = repr(foreign[0]) + (f" and {len(foreign) - 1} more" if len(foreign) > 1 else "")
    if not force:
        raise ConfigError(f"{option} {path} holds {listed}, which mtpeft did not write; name a new or empty folder, "
                          f"or add --force to write beside them (mtpeft never deletes a file it did not write)")
    taken = sorted(name for name in ours if (path / name).exists() and not name.endswith(".tmp"))
    if taken:
        raise ConfigError(f"{option} {path} holds {taken[0]!r} beside files mtpeft did not write, so nothing says "
                          f"mtpeft wrote it and --force would replace it; move it away or name another folder")
    return foreign
