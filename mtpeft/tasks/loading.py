"""Load a task split through HF ``datasets`` (arrow-backed, memory-mapped), validating it row by row.

Local files are read by our own reader, one record at a time, and streamed into an arrow dataset:
``datasets``' JSON reader reports a malformed row without its line number, and refuses a column whose
type varies between rows (a label that is ``1`` in one line and ``"1"`` in the next) before we could
say which line. So every error names ``file:line`` (JSONL, the CodeXGLUE pair list), ``file row i``
(the i-th item of a JSON list, 0-based; the i-th parquet row, 0-based) or ``hub-id row i``.

The arrow cache is keyed by the file's path, size and modification time and by the source of
``formats.py``, so an edited file or a changed normaliser is never served stale; set
``MTPEFT_NO_DATA_CACHE=1`` to rebuild every time.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Iterator

import datasets

from mtpeft.errors import DataError
from mtpeft.tasks import formats
from mtpeft.tasks.formats import FORMATS, RecordFormat, iter_json_records, normalise_record, utf8_lines

datasets.disable_progress_bars()
datasets.logging.set_verbosity_error()

CODEXGLUE_FUNCTIONS = "data.jsonl"  # the CodeXGLUE clone-detection layout keeps the functions here


def load_split(path: str, format_name: str, max_examples: int = 0) -> datasets.Dataset:
    """Return the normalised examples of one split (see ``formats`` for the columns of each kind).

    ``path`` is a local .jsonl / .json / .parquet file (a .txt pair list for ``bigclonebench_codexglue``)
    or a hub id ``owner/name[:split]``; ``max_examples`` > 0 keeps (and validates) only the first ones.
    """
    fmt = FORMATS[format_name]
    local = Path(path)
    if fmt.layout == "codexglue_pairs":
        if local.suffix != ".txt":
            raise DataError(f"{path}: format {format_name} reads the CodeXGLUE pair list (train.txt / valid.txt / "
                            f"test.txt, lines idx1<TAB>idx2<TAB>label) with {CODEXGLUE_FUNCTIONS} beside it; "
                            "for JSON records with func1/func2 use format bigclonebench")
        _require_file(local)
        functions = local.parent / CODEXGLUE_FUNCTIONS
        _require_file(functions, f"; format {format_name} needs the functions file {CODEXGLUE_FUNCTIONS} "
                                 f"in the same folder as {local.name}")
        records = _codexglue_pairs(str(local), str(functions))
        stamp = _stamp(local) + _stamp(functions)
    elif local.suffix in (".json", ".jsonl"):
        _require_file(local)
        records = iter_json_records(str(local))
        stamp = _stamp(local)
    elif local.suffix == ".parquet":
        _require_file(local)
        records = _parquet_records(str(local))
        stamp = _stamp(local)
    elif local.is_dir():
        raise DataError(f"{path} is a folder; name a .json, .jsonl or .parquet file in it")
    elif local.exists():
        raise DataError(f"{path}: unsupported file type {local.suffix!r}; use .json, .jsonl or .parquet")
    else:
        raw = _hub_dataset(path)
        records = ((f"{path} row {i}", row) for i, row in enumerate(raw))
        stamp = f"hub:{path}:{getattr(raw, '_fingerprint', '')}"  # a new hub revision is a new fingerprint
    ds = _materialise(records, fmt, path, max_examples, stamp)
    if fmt.kind == "cluster":
        ds = add_positive_partners(ds)
    return ds


def _require_file(p: Path, hint: str = "") -> None:
    if not p.is_file():
        raise DataError(f"{p}: dataset file not found{hint}")


def _stamp(p: Path) -> str:
    st = p.stat()
    return f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns};"


def _materialise(records: Iterator, fmt: RecordFormat, path: str, max_examples: int, stamp: str) -> datasets.Dataset:
    count = [0]

    def generate(records=records):
        for where, row in records:
            if max_examples and count[0] >= max_examples:
                return
            yield normalise_record(fmt, row, where)
            count[0] += 1

    key = f"{formats.__file__}:{_source_hash()}:{fmt.name}:{max_examples}:{stamp}"
    if os.environ.get("MTPEFT_NO_DATA_CACHE"):
        key += f":{time.time_ns()}"
    try:
        return datasets.Dataset.from_generator(generate, fingerprint=hashlib.sha256(key.encode()).hexdigest()[:32])
    except datasets.exceptions.DatasetGenerationError as exc:
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, DataError):
            raise cause from None
        if count[0] == 0:
            raise DataError(f"{path}: dataset is empty; it needs at least one {fmt.name} record") from None
        raise


def _source_hash() -> str:
    return hashlib.sha256(Path(formats.__file__).read_bytes()).hexdigest()[:16]


def _parquet_records(path: str):
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise DataError(f"{path}: not a readable parquet file ({type(exc).__name__}: {exc})") from None
    i = 0
    for batch in table.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            yield f"{path} row {i}", row
            i += 1


def _hub_dataset(path: str) -> datasets.Dataset:
    repo, _, split = path.partition(":")
    try:
        return datasets.load_dataset(repo, split=split or "train")
    except Exception as exc:  # the hub client raises many types; the user needs one line
        raise DataError(f"{path}: could not load hub dataset {repo!r} ({type(exc).__name__}); "
                        "check the id, or download it and point to the local file") from None


def _codexglue_pairs(pairs_path: str, functions_path: str):
    """CodeXGLUE clone detection: ``data.jsonl`` maps idx → func; each pair line names two idx and a label."""
    functions: dict[str, str] = {}
    for where, row in iter_json_records(functions_path):
        if not isinstance(row, dict) or "idx" not in row or "func" not in row:
            raise DataError(f"{where}: expected a JSON object with fields func and idx")
        idx = row["idx"]
        if isinstance(idx, bool) or not isinstance(idx, (str, int)):
            raise DataError(f"{where}: field 'idx' must be a string or an integer, got {idx!r}")
        if not isinstance(row["func"], str):
            raise DataError(f"{where}: field 'func' must be a string, got {type(row['func']).__name__}")
        functions[str(idx).strip()] = row["func"]
    for lineno, line in utf8_lines(pairs_path):
        if not line.strip():
            continue
        where = f"{pairs_path}:{lineno}"
        parts = line.split()
        if len(parts) != 3:
            raise DataError(f"{where}: expected 'idx1<TAB>idx2<TAB>label', got {len(parts)} fields")
        for idx in parts[:2]:
            if idx not in functions:
                raise DataError(f"{where}: idx {idx!r} is not in {functions_path}; "
                                "use the data.jsonl that ships with this pair list")
        yield where, {"func1": functions[parts[0]], "func2": functions[parts[1]], "label": parts[2]}


def add_positive_partners(ds: datasets.Dataset) -> datasets.Dataset:
    """Give every cluster example a ``positive``: the text of the next example with its label (cyclic).

    A random micro-batch of POJ-104 (104 classes) rarely holds two programs of one class, leaving the
    contrastive loss nothing to pull together; pairing each anchor with a same-class program (as
    CodeXGLUE's POJ-104 trainer does) guarantees one positive per anchor. A class with a single
    example is its own partner (two dropout views, as in SimCSE). Deterministic, so every rank and
    every world size see the same pairs.
    """
    labels = ds["label"]
    texts = ds["text"]
    by_label: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_label.setdefault(y, []).append(i)
    partner = [0] * len(labels)
    for members in by_label.values():
        for j, i in enumerate(members):
            partner[i] = members[(j + 1) % len(members)]
    return ds.add_column("positive", [texts[p] for p in partner])
