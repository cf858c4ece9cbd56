"""Dataset record formats: each public benchmark's own field names, mapped to one example shape per task kind.

A format declares the fields it needs and how a record becomes a normalised example:
  classify       {text, label}
  pair_classify  {text_a, text_b, label}
  retrieve       {query, code}
  generate       {prompt, target}
Records are validated here, at the edge, so a bad row is one ``error:`` line naming file and line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable, Mapping

from mtpeft.errors import DataError


@dataclass(frozen=True)
class RecordFormat:
    name: str
    kind: str
    # each entry is a tuple of alternative field names; one of them must be present
    required: tuple
    normalise: Callable[[dict], dict]


def _first(row: dict, names: tuple):
    for n in names:
        if n in row and row[n] is not None:
            return row[n]
    return None


def _text(value) -> str:
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    return str(value)


def _label(value) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return int(value)
    if isinstance(value, str) and value.strip().lower() in ("0", "1", "true", "false"):
        return int(value.strip().lower() in ("1", "true"))
    raise ValueError(f"label must be 0/1 or true/false, got {value!r}")


def _devign(row):
    return {"text": _text(row["func"]), "label": _label(row["target"])}


def _flaky(row):
    return {"text": _text(row["code"]), "label": _label(row["label"])}


def _bigclonebench(row):
    return {"text_a": _text(row["func1"]), "text_b": _text(row["func2"]), "label": _label(row["label"])}


def _advtest(row):
    code = _first(row, ("code", "original_string", "code_tokens"))
    doc = _first(row, ("docstring", "docstring_tokens"))
    return {"query": _text(doc), "code": _text(code)}


def _conala(row):
    nl = _first(row, ("rewritten_intent", "intent", "nl"))
    return {"prompt": _text(nl), "target": _text(_first(row, ("snippet", "cmd")))}


def _codealpaca(row):
    if "instruction" in row:
        nl = _text(row["instruction"])
        if row.get("input"):
            nl = f"{nl}\n{_text(row['input'])}"
        return {"prompt": nl, "target": _text(row["output"])}
    return {"prompt": _text(row["nl"]), "target": _text(row["cmd"])}


FORMATS: dict[str, RecordFormat] = {
    f.name: f
    for f in (
        RecordFormat("devign", "classify", (("func",), ("target",)), _devign),
        RecordFormat("flaky", "classify", (("code",), ("label",)), _flaky),
        RecordFormat("bigclonebench", "pair_classify", (("func1",), ("func2",), ("label",)), _bigclonebench),
        RecordFormat("advtest", "retrieve", (("code", "original_string", "code_tokens"),
                                             ("docstring", "docstring_tokens")), _advtest),
        RecordFormat("codesearchnet", "retrieve", (("code", "original_string", "code_tokens"),
                                                   ("docstring", "docstring_tokens")), _advtest),
        RecordFormat("conala", "generate", (("rewritten_intent", "intent", "nl"), ("snippet", "cmd")), _conala),
        RecordFormat("codealpaca", "generate", (("instruction", "nl"), ("output", "cmd")), _codealpaca),
    )
}


def normalise_record(fmt: RecordFormat, row, where: str) -> dict:
    """Check one raw record against its format; ``where`` is ``file:line`` for the error line."""
    if isinstance(row, Mapping) and not isinstance(row, dict):
        row = dict(row)
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object with fields "
                        f"{', '.join('|'.join(r) for r in fmt.required)}, got {type(row).__name__}")
    for alternatives in fmt.required:
        if _first(row, alternatives) is None:
            raise DataError(f"{where}: missing required field {'|'.join(alternatives)!r} "
                            f"for format {fmt.name}")
    try:
        return fmt.normalise(row)
    except (ValueError, TypeError) as exc:
        raise DataError(f"{where}: {exc}") from None


def iter_json_records(path: str):
    """Yield ``(line_or_row_number, record)`` from a .jsonl or .json file, naming the bad line."""
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: malformed JSON ({exc.msg} at column {exc.colno}); "
                                    "each line must be one JSON object") from None
        return
    with open(path, encoding="utf-8") as fh:
        try:
            data = json.load(fh)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg}); "
                            "expected a list of records") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    for i, row in enumerate(data):
        yield i, row
