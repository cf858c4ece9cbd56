"""Dataset record formats: each public benchmark's own field names, mapped to one example shape per task kind.

A format declares the fields it needs and how a record becomes a normalised example:
  classify           {text, label}                 label 0/1
  pair_classify      {text_a, text_b, label}       label 0/1
  cluster            {text, label}                 label: the problem class (any integer)
  retrieve           {query, code}
  generate           {prompt, target}
  program_synthesis  {prompt, target, problem_id, input_output, starter_code, difficulty}
Records are validated here, at the edge, so a bad row is one ``error:`` line naming file and line;
each field is type-checked, because ``str()`` of a misplaced object would train silently on garbage.
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
    # each entry is a tuple of alternative field names; one of them must be present (and not null)
    required: tuple
    normalise: Callable[[dict], dict]
    # "records": one record per JSON line / list item / parquet row; "codexglue_pairs": a .txt of
    # ``idx1<TAB>idx2<TAB>label`` lines whose functions live in ``data.jsonl`` beside it
    layout: str = "records"


def _first(row: dict, names: tuple):
    for n in names:
        if n in row and row[n] is not None:
            return row[n]
    return None


def _first_name(row: dict, names: tuple) -> str:
    return next((n for n in names if n in row and row[n] is not None), names[0])


def _text(value, field: str) -> str:
    """A string, or a list of token strings (CodeSearchNet's ``*_tokens``) joined by spaces."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return " ".join(value)
    raise ValueError(f"field {field!r} must be a string (or a list of token strings), "
                     f"got {type(value).__name__}")


def _field_text(row: dict, names: tuple) -> str:
    return _text(_first(row, names), _first_name(row, names))


def _label(value, field: str = "label") -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return int(value)
    if isinstance(value, str) and value.strip().lower() in ("0", "1", "true", "false"):
        return int(value.strip().lower() in ("1", "true"))
    raise ValueError(f"field {field!r} must be 0/1 or true/false, got {value!r}")


def _class_label(value, field: str = "label") -> int:
    """POJ-104 labels are problem numbers, stored as ints or as digit strings ("1".."104")."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    raise ValueError(f"field {field!r} must be an integer class id (e.g. 7 or \"7\"), got {value!r}")


def _devign(row):
    return {"text": _text(row["func"], "func"), "label": _label(row["target"], "target")}


def _flaky(row):
    return {"text": _text(row["code"], "code"), "label": _label(row["label"])}


def _poj104(row):
    return {"text": _text(row["code"], "code"), "label": _class_label(row["label"])}


def _bigclonebench(row):
    return {"text_a": _text(row["func1"], "func1"), "text_b": _text(row["func2"], "func2"),
            "label": _label(row["label"])}


_CODE = ("code", "original_string", "code_tokens")
_DOC = ("docstring", "docstring_tokens")


def _advtest(row):
    return {"query": _field_text(row, _DOC), "code": _field_text(row, _CODE)}


def _code_to_text(row):
    """Summarise code into its docstring, as CodeXGLUE code-to-text scores it.

    The target prefers ``docstring_tokens`` (the first paragraph, the benchmark's reference) over the
    full ``docstring``; the source prefers ``code_tokens``, from which CodeSearchNet removed the
    docstring. ``code`` / ``original_string`` contain the docstring itself, so it is cut out of them:
    otherwise the model learns to copy its target from its input.
    """
    target = _field_text(row, ("docstring_tokens", "docstring"))
    if _first(row, ("code_tokens",)) is not None:
        return {"prompt": _text(row["code_tokens"], "code_tokens"), "target": target}
    code = _field_text(row, ("code", "original_string"))
    doc = row.get("docstring")
    if isinstance(doc, str) and doc.strip() and doc in code:
        code = code.replace(doc, "", 1)
    return {"prompt": code, "target": target}


def _conala(row):
    return {"prompt": _field_text(row, ("rewritten_intent", "intent", "nl")),
            "target": _field_text(row, ("snippet", "cmd"))}


def _codealpaca(row):
    """Both published layouts: ``{instruction, input, output}`` and the Python subset's ``{nl, cmd}``."""
    nl = _field_text(row, ("instruction", "nl"))
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise ValueError(f"field 'input' must be a string, got {type(extra).__name__}")
    if extra:
        nl = f"{nl}\n{extra}"
    return {"prompt": nl, "target": _field_text(row, ("output", "cmd"))}


def _json_field(value, field: str):
    """APPS stores lists and dicts as JSON strings; the HF copy sometimes as parsed objects."""
    if not isinstance(value, str):
        return value
    if not value.strip():
        return None
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise ValueError(f"field {field!r} is not valid JSON ({exc.msg} at char {exc.pos}); "
                         "store it as a JSON-encoded string") from None


def _apps_tests(value) -> str:
    spec = _json_field(value, "input_output")
    if spec is None:
        return ""  # no tests: the problem trains, but pass@k skips it
    if not isinstance(spec, dict) or not isinstance(spec.get("inputs"), list) \
            or not isinstance(spec.get("outputs"), list):
        raise ValueError("field 'input_output' must be a JSON object with 'inputs' and 'outputs' lists")
    if len(spec["inputs"]) != len(spec["outputs"]):
        raise ValueError(f"field 'input_output' has {len(spec['inputs'])} inputs but {len(spec['outputs'])} "
                         "outputs; they must pair up")
    fn_name = spec.get("fn_name")
    if fn_name is not None and not isinstance(fn_name, str):
        raise ValueError(f"field 'input_output'.fn_name must be a string, got {type(fn_name).__name__}")
    return value if isinstance(value, str) else json.dumps(value)


def apps_prompt(question: str, starter_code: str, call_based: bool) -> str:
    """APPS's own prompt body (Hendrycks et al.): the format hint says how the tests call the program."""
    body = question.rstrip()
    if starter_code.strip():
        body += "\n" + starter_code.rstrip()
    return body + ("\nUse Call-Based format" if call_based else "\nUse Standard Input format")


def _apps(row):
    pid = _first(row, ("problem_id", "id"))  # the HF copy says problem_id, the raw jsonl id
    if isinstance(pid, bool) or not isinstance(pid, (int, str)):
        raise ValueError(f"field 'problem_id' must be an integer or a string, got {pid!r}")
    question = _text(row["question"], "question")
    solutions = _json_field(row["solutions"], "solutions")
    solutions = [] if solutions is None else solutions
    if not isinstance(solutions, list) or not all(isinstance(s, str) for s in solutions):
        raise ValueError("field 'solutions' must be a JSON list of program strings")
    tests = _apps_tests(row["input_output"])
    starter = row.get("starter_code") or ""
    if not isinstance(starter, str):
        raise ValueError(f"field 'starter_code' must be a string, got {type(starter).__name__}")
    difficulty = row.get("difficulty") or ""
    if not isinstance(difficulty, str):
        raise ValueError(f"field 'difficulty' must be a string, got {type(difficulty).__name__}")
    call_based = bool(tests) and bool(json.loads(tests).get("fn_name"))
    return {"prompt": apps_prompt(question, starter, call_based), "target": solutions[0] if solutions else "",
            "problem_id": str(pid), "input_output": tests, "starter_code": starter, "difficulty": difficulty}


def _codexglue_pair(row):
    # the loader resolves idx1/idx2 in data.jsonl first and hands over this shape
    return _bigclonebench(row)


FORMATS: dict[str, RecordFormat] = {
    f.name: f
    for f in (
        RecordFormat("devign", "classify", (("func",), ("target",)), _devign),
        RecordFormat("flaky", "classify", (("code",), ("label",)), _flaky),
        RecordFormat("bigclonebench", "pair_classify", (("func1",), ("func2",), ("label",)), _bigclonebench),
        RecordFormat("bigclonebench_codexglue", "pair_classify", (("func1",), ("func2",), ("label",)),
                     _codexglue_pair, layout="codexglue_pairs"),
        RecordFormat("poj104", "cluster", (("code",), ("label",)), _poj104),
        RecordFormat("advtest", "retrieve", (_CODE, _DOC), _advtest),
        RecordFormat("codesearchnet", "retrieve", (_CODE, _DOC), _advtest),
        RecordFormat("code_to_text", "generate", (_CODE, _DOC), _code_to_text),
        RecordFormat("conala", "generate", (("rewritten_intent", "intent", "nl"), ("snippet", "cmd")), _conala),
        RecordFormat("codealpaca", "generate", (("instruction", "nl"), ("output", "cmd")), _codealpaca),
        RecordFormat("apps", "program_synthesis",
                     (("problem_id", "id"), ("question",), ("solutions",), ("input_output",)), _apps),
    )
}


def normalise_record(fmt: RecordFormat, row, where: str) -> dict:
    """Check one raw record against its format; ``where`` is ``file:line`` (or ``file row i``) for the error."""
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
    except (ValueError, TypeError, KeyError) as exc:
        msg = f"missing required field {exc.args[0]!r}" if isinstance(exc, KeyError) else str(exc)
        raise DataError(f"{where}: {msg} (format {fmt.name})") from None


def utf8_lines(path: str):
    """Yield ``(line number, text)`` of a UTF-8 file, naming the line of a byte that is not UTF-8
    (a Latin-1 export, a binary file) instead of failing somewhere in a reader's buffer. A byte-order
    mark at the start (what some Windows editors write) is dropped."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                yield lineno, raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                                f"{exc.start + 1}); save the file as UTF-8") from None


def iter_json_records(path: str):
    """Yield ``(where, record)`` from a .jsonl or .json file; ``where`` names the line (or list index)."""
    if path.endswith(".jsonl"):
        for lineno, line in utf8_lines(path):
            if not line.strip():
                continue
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: malformed JSON ({exc.msg.removesuffix(' at')} at column {exc.colno}); "
                                "each line must be one JSON object") from None
        return
    text = "".join(line for _, line in utf8_lines(path))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg}); expected a list of records") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    for i, row in enumerate(data):
        yield f"{path} row {i}", row
