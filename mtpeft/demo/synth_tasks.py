"""Deterministic synthetic code tasks, written in the real benchmarks' record formats.

They stand in for Devign, BigCloneBench, AdvTest and CoNaLa in the offline demo and the tests. Each
task has a learnable rule hidden among distractors (renamed identifiers, filler statements, several
implementations of one algorithm), so a model beats chance only by reading the code.

    python -m mtpeft.demo.synth_tasks OUT_DIR
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

NOUNS = ["price", "score", "weight", "count", "item", "value", "node", "token", "line", "word", "user",
         "order", "record", "sample", "file", "page", "cell", "entry", "point", "task", "event",
         "packet", "frame", "block", "key", "row", "col", "byte", "char", "amount"]
C_NAMES = ["buf", "dst", "src", "data", "out", "tmp", "msg", "pkt", "hdr", "str", "arr", "tbl"]
PROJECTS = ["qemu", "ffmpeg", "linux", "openssl", "curl"]


def _c_filler(rng: random.Random) -> list[str]:
    pool = [
        "    int flags = 0;",
        "    unsigned int crc = 0;",
        "    log_debug(\"enter\");",
        "    stats->calls++;",
        "    flags |= FLAG_SEEN;",
        "    int ret = 0;",
        "    assert(ctx != NULL);",
        "    ctx->state = STATE_BUSY;",
    ]
    return rng.sample(pool, rng.randint(1, 3))


def _devign_function(rng: random.Random, buggy: bool) -> str:
    name = f"{rng.choice(['read', 'copy', 'parse', 'fill', 'decode', 'load'])}_{rng.choice(NOUNS)}"
    a, b = rng.sample(C_NAMES, 2)
    pattern = rng.randrange(4)
    body = _c_filler(rng)
    if pattern == 0:
        op = "<=" if buggy else "<"
        sig = f"int {name}(char *{a}, const char *{b}, int n)"
        body += [f"    for (int i = 0; i {op} n; i++) {{", f"        {a}[i] = {b}[i];", "    }"]
    elif pattern == 1:
        sig = f"int {name}(struct ctx *{a})"
        if not buggy:
            body += [f"    if ({a} == NULL) {{", "        return -1;", "    }"]
        body += [f"    {a}->len = 0;"]
    elif pattern == 2:
        sig = f"int {name}(char *{a}, const char *{b}, size_t len)"
        if not buggy:
            body += [f"    if (len > MAX_SIZE) {{", "        return -1;", "    }"]
        body += [f"    memcpy({a}, {b}, len);"]
    else:
        sig = f"int {name}(struct ctx *{a})"
        if buggy:
            body += [f"    free({a});", f"    return {a}->len;"]
        else:
            body += [f"    int len = {a}->len;", f"    free({a});", "    return len;"]
    return "\n".join([sig, "{"] + body + ["    return 0;", "}"]) + "\n"


_JAVA_ALGOS = {
    "sum": [
        "int {f}(int[] {a}) {{\n    int {t} = 0;\n    for (int i = 0; i < {a}.length; i++) {{\n        {t} += {a}[i];\n    }}\n    return {t};\n}}",
        "int {f}(int[] {a}) {{\n    int {t} = 0;\n    for (int x : {a}) {{\n        {t} = {t} + x;\n    }}\n    return {t};\n}}",
    ],
    "max": [
        "int {f}(int[] {a}) {{\n    int {t} = {a}[0];\n    for (int i = 1; i < {a}.length; i++) {{\n        if ({a}[i] > {t}) {t} = {a}[i];\n    }}\n    return {t};\n}}",
        "int {f}(int[] {a}) {{\n    int {t} = Integer.MIN_VALUE;\n    for (int x : {a}) {{\n        {t} = Math.max({t}, x);\n    }}\n    return {t};\n}}",
    ],
    "count": [
        "int {f}(int[] {a}) {{\n    int {t} = 0;\n    for (int x : {a}) {{\n        if (x > 0) {t}++;\n    }}\n    return {t};\n}}",
        "int {f}(int[] {a}) {{\n    int {t} = 0;\n    int i = 0;\n    while (i < {a}.length) {{\n        if ({a}[i] > 0) {{\n            {t} += 1;\n        }}\n        i++;\n    }}\n    return {t};\n}}",
    ],
    "reverse": [
        "String {f}(String {a}) {{\n    return new StringBuilder({a}).reverse().toString();\n}}",
        "String {f}(String {a}) {{\n    String {t} = \"\";\n    for (int i = {a}.length() - 1; i >= 0; i--) {{\n        {t} += {a}.charAt(i);\n    }}\n    return {t};\n}}",
    ],
    "factorial": [
        "long {f}(int {a}) {{\n    long {t} = 1;\n    for (int i = 2; i <= {a}; i++) {{\n        {t} *= i;\n    }}\n    return {t};\n}}",
        "long {f}(int {a}) {{\n    if ({a} <= 1) return 1;\n    return {a} * {f}({a} - 1);\n}}",
    ],
    "contains": [
        "boolean {f}(int[] {a}, int {t}) {{\n    for (int x : {a}) {{\n        if (x == {t}) return true;\n    }}\n    return false;\n}}",
        "boolean {f}(int[] {a}, int {t}) {{\n    int i = 0;\n    while (i < {a}.length) {{\n        if ({a}[i] == {t}) {{\n            return true;\n        }}\n        i++;\n    }}\n    return false;\n}}",
    ],
    "isprime": [
        "boolean {f}(int {a}) {{\n    if ({a} < 2) return false;\n    for (int i = 2; i * i <= {a}; i++) {{\n        if ({a} % i == 0) return false;\n    }}\n    return true;\n}}",
        "boolean {f}(int {a}) {{\n    int {t} = 0;\n    for (int i = 1; i <= {a}; i++) {{\n        if ({a} % i == 0) {t}++;\n    }}\n    return {t} == 2;\n}}",
    ],
    "copyfile": [
        "void {f}(File {a}, File {t}) throws IOException {{\n    Files.copy({a}.toPath(), {t}.toPath());\n}}",
        "void {f}(File {a}, File {t}) throws IOException {{\n    InputStream in = new FileInputStream({a});\n    OutputStream out = new FileOutputStream({t});\n    byte[] b = new byte[4096];\n    int n;\n    while ((n = in.read(b)) > 0) {{\n        out.write(b, 0, n);\n    }}\n    in.close();\n    out.close();\n}}",
    ],
}


def _java(rng: random.Random, algo: str) -> str:
    template = rng.choice(_JAVA_ALGOS[algo])
    a, t = rng.sample(NOUNS, 2)
    f = f"{rng.choice(['get', 'compute', 'calc', 'do', 'find'])}{rng.choice(NOUNS).title()}"
    return template.format(f=f, a=a + "s" if "[]" in template.split("(")[1] else a, t=t)


_PY_DOCS = [
    ("Return the sum of all {n}s.", "def total_{n}s({n}s):\n    result = 0\n    for {n} in {n}s:\n        result += {n}\n    return result"),
    ("Return the largest {n}.", "def max_{n}({n}s):\n    best = None\n    for {n} in {n}s:\n        if best is None or {n} > best:\n            best = {n}\n    return best"),
    ("Count the {n}s that are positive.", "def count_{n}s({n}s):\n    return sum(1 for {n} in {n}s if {n} > 0)"),
    ("Sort the {n}s in descending order.", "def sort_{n}s({n}s):\n    return sorted({n}s, reverse=True)"),
    ("Remove duplicate {n}s keeping order.", "def unique_{n}s({n}s):\n    seen = set()\n    out = []\n    for {n} in {n}s:\n        if {n} not in seen:\n            seen.add({n})\n            out.append({n})\n    return out"),
    ("Read the {n}s from a file, one per line.", "def read_{n}s(path):\n    with open(path) as fh:\n        return [line.strip() for line in fh]"),
    ("Group the {n}s by their key.", "def group_{n}s({n}s, key):\n    groups = {{}}\n    for {n} in {n}s:\n        groups.setdefault(key({n}), []).append({n})\n    return groups"),
    ("Return the average {n}.", "def mean_{n}({n}s):\n    return sum({n}s) / len({n}s)"),
    ("Check whether the {n} is empty.", "def is_empty_{n}({n}):\n    return len({n}) == 0"),
    ("Write the {n}s to a JSON file.", "def save_{n}s({n}s, path):\n    with open(path, 'w') as fh:\n        json.dump({n}s, fh)"),
]


def _advtest(rng: random.Random, idx: int) -> dict:
    doc_t, code_t = rng.choice(_PY_DOCS)
    n = rng.choice(NOUNS)
    doc, code = doc_t.format(n=n), code_t.format(n=n)
    func_name = code.split("(")[0][4:]
    return {"url": f"https://example.invalid/repo/{idx}", "func_name": func_name, "original_string": code,
            "code": code, "code_tokens": code.split(), "docstring": doc, "docstring_tokens": doc.split()}


_CONALA = [
    ("sort list `{a}` in descending order", "{a}.sort(reverse=True)"),
    ("get the length of list `{a}`", "len({a})"),
    ("convert string `{a}` to an integer", "int({a})"),
    ("join the strings in list `{a}` with a comma", "','.join({a})"),
    ("check if key `{a}` is in dictionary `{b}`", "{a} in {b}"),
    ("append `{a}` to list `{b}`", "{b}.append({a})"),
    ("reverse list `{a}`", "{a}[::-1]"),
    ("get the last element of list `{a}`", "{a}[-1]"),
    ("convert `{a}` to lower case", "{a}.lower()"),
    ("split string `{a}` on spaces", "{a}.split()"),
    ("get the maximum value in list `{a}`", "max({a})"),
    ("remove the key `{a}` from dictionary `{b}`", "{b}.pop({a})"),
]


def _conala(rng: random.Random, idx: int) -> dict:
    intent_t, snippet_t = rng.choice(_CONALA)
    a, b = rng.sample(NOUNS, 2)
    intent = intent_t.format(a=a, b=b)
    return {"question_id": 1000 + idx, "intent": intent.replace("`", ""), "rewritten_intent": intent,
            "snippet": snippet_t.format(a=a, b=b)}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, sort_keys=True) + "\n")


def build_tasks(out_dir: str | Path, seed: int = 1234, n_train: int = 640, n_eval: int = 128) -> dict:
    """Write train/eval JSONL for the four demo tasks; returns ``{task: {split: path}}``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict = {}
    for task, make in (("devign", _make_devign), ("bigclonebench", _make_clone),
                       ("advtest", _make_advtest), ("conala", _make_conala)):
        paths[task] = {}
        for split, n, salt in (("train", n_train, 0), ("eval", n_eval, 1)):
            rng = random.Random(f"{seed}-{task}-{salt}")
            path = out / f"{task}_{split}.jsonl"
            _write_jsonl(path, [make(rng, i) for i in range(n)])
            paths[task][split] = str(path)
    return paths


def _make_devign(rng: random.Random, i: int) -> dict:
    buggy = i % 2 == 1
    return {"func": _devign_function(rng, buggy), "target": int(buggy), "project": rng.choice(PROJECTS),
            "commit_id": f"{rng.getrandbits(40):010x}"}


def _make_clone(rng: random.Random, i: int) -> dict:
    algos = sorted(_JAVA_ALGOS)
    a1 = rng.choice(algos)
    clone = i % 2 == 0
    a2 = a1 if clone else rng.choice([a for a in algos if a != a1])
    return {"id1": 2 * i, "id2": 2 * i + 1, "func1": _java(rng, a1), "func2": _java(rng, a2), "label": int(clone)}


def _make_advtest(rng: random.Random, i: int) -> dict:
    return _advtest(rng, i)


def _make_conala(rng: random.Random, i: int) -> dict:
    return _conala(rng, i)


def code_corpus(seed: int = 99, n: int = 3000) -> list[str]:
    """Unlabelled code in the tasks' languages, for pretraining the demo base model (no task labels)."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        pick = i % 4
        if pick == 0:
            docs.append(_devign_function(rng, rng.random() < 0.5))
        elif pick == 1:
            docs.append(_java(rng, rng.choice(sorted(_JAVA_ALGOS))))
        elif pick == 2:
            row = _advtest(rng, i)
            docs.append(f'{row["code"]}\n    """{row["docstring"]}"""\n')
        else:
            row = _conala(rng, i)
            docs.append(f"# {row['rewritten_intent']}\nresult = {row['snippet']}\n")
    return docs


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else "mtpeft/assets/demo/tasks"
    for name, splits in build_tasks(target).items():
        print(name, splits)
