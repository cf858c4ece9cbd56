"""Load a task split through HF ``datasets`` (arrow-backed, memory-mapped) after validating it row by row.

JSON/JSONL files are scanned once line by line first: ``datasets`` reports a malformed row without its
line number, and the user needs ``file:line``. Parquet and hub datasets are validated during the map.
"""

from __future__ import annotations

import os
from pathlib import Path

import datasets

from mtpeft.errors import DataError
from mtpeft.tasks.formats import FORMATS, iter_json_records, normalise_record

datasets.disable_progress_bars()
datasets.logging.set_verbosity_error()


def load_split(path: str, format_name: str, max_examples: int = 0) -> datasets.Dataset:
    """Return the normalised examples of one split (see ``formats`` for the columns of each kind)."""
    fmt = FORMATS[format_name]
    local = Path(path)
    if local.suffix in (".json", ".jsonl"):
        if not local.is_file():
            raise DataError(f"{path}: dataset file not found")
        count = 0
        for where, row in iter_json_records(path):
            label = f"{path}:{where}" if path.endswith(".jsonl") else f"{path} row {where}"
            normalise_record(fmt, row, label)
            count += 1
        if count == 0:
            raise DataError(f"{path}: dataset is empty; it needs at least one {format_name} record")
        raw = datasets.load_dataset("json", data_files=str(local), split="train")
    elif local.suffix == ".parquet":
        if not local.is_file():
            raise DataError(f"{path}: dataset file not found")
        raw = datasets.load_dataset("parquet", data_files=str(local), split="train")
    elif local.exists():
        raise DataError(f"{path}: unsupported file type {local.suffix!r}; use .json, .jsonl or .parquet")
    else:
        repo, _, split = path.partition(":")
        try:
            raw = datasets.load_dataset(repo, split=split or "train")
        except Exception as exc:  # the hub client raises many types; the user needs one line
            raise DataError(f"{path}: could not load hub dataset {repo!r} ({type(exc).__name__}); "
                            "check the id, or download it and point to the local file") from None
    if len(raw) == 0:
        raise DataError(f"{path}: dataset is empty; it needs at least one {format_name} record")
    if max_examples and len(raw) > max_examples:
        raw = raw.select(range(max_examples))

    def convert(row, idx):
        return normalise_record(fmt, row, f"{path} row {idx}")

    return raw.map(convert, with_indices=True, remove_columns=raw.column_names,
                   num_proc=None, load_from_cache_file=not os.environ.get("MTPEFT_NO_DATA_CACHE"))
