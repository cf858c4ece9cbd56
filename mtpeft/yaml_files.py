"""Reading a YAML file a person wrote: a byte that is not UTF-8, YAML that does not parse and a key
given twice in one mapping (PyYAML keeps the last one silently, so a second ``max_steps:`` would
quietly win) all become one ``YamlFileProblem`` naming the file and line; each caller turns it into
its own error line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

MERGE_TAG = "tag:yaml.org,2002:merge"


class YamlFileProblem(Exception):
    """``where`` (``path:line``, or the path) and ``problem`` (what is wrong there)."""

    def __init__(self, where: str, problem: str):
        super().__init__(f"{where}: {problem}")
        self.where, self.problem = where, problem


class _UniqueKeyLoader(yaml.SafeLoader):
    def construct_mapping(self, node, deep=False):
        first_line: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == MERGE_TAG:  # ``<<: *defaults``: keys written after it override, as YAML says
                continue
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                if key in first_line:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice (lines {first_line[key]} and {line}); keep one",
                        key_node.start_mark)
                first_line[key] = line
            except TypeError:  # an unhashable key: SafeLoader's own error follows
                pass
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path | str) -> Any:
    """The parsed contents of the YAML file ``path`` (``{}`` for an empty file)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise YamlFileProblem(str(path), f"cannot be read ({exc.strerror or exc})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise YamlFileProblem(f"{path}:{line}", f"not UTF-8 text (byte 0x{data[exc.start]:02x}); save the file "
                                                f"as UTF-8") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise YamlFileProblem(where, f"not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
