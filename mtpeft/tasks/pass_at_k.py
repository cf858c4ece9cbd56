"""pass@k for APPS-style problems: run every sample against the problem's tests in the sandbox.

A sample passes when every test passes. Samples run in parallel threads, each test in its own
sandboxed process, and a sample that crashes, hangs or exhausts memory only fails itself.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from mtpeft.errors import DataError
from mtpeft.tasks.metrics import pass_at_k
from mtpeft.tasks.sandbox import run_program

__all__ = ["ProblemResult", "TestCase", "evaluate_problems", "load_tests", "outputs_match", "pass_at_k"]

_RESULT_MARK = "__MTPEFT_CALL_RESULT__"

# Appended to call-based samples: call fn_name (a function, or a method of LeetCode's Solution)
# on the JSON arguments from stdin and print the JSON result on a marked line.
_CALL_HARNESS = """

import json as _mtpeft_json, sys as _mtpeft_sys
_mtpeft_args = _mtpeft_json.loads(_mtpeft_sys.stdin.read())
_mtpeft_fn = globals().get({name!r}) or getattr(globals()["Solution"](), {name!r})
_mtpeft_out = _mtpeft_fn(*_mtpeft_args)
if isinstance(_mtpeft_out, tuple):
    _mtpeft_out = list(_mtpeft_out)
print()
print({mark!r} + _mtpeft_json.dumps(_mtpeft_out, default=repr))
"""


@dataclass(frozen=True)
class TestCase:
    stdin: str
    expected: Any
    fn_name: str | None = None


@dataclass
class ProblemResult:
    problem_id: str
    n: int
    c: int
    pass_at: dict[int, float]
    statuses: list[str] = field(default_factory=list)  # per sample: "pass" or the first failure


def load_tests(problem: Mapping[str, Any]) -> list[TestCase]:
    """Parse an APPS record's ``input_output`` (a JSON string or a dict) into test cases."""
    pid = problem.get("problem_id", "?")
    raw = problem.get("input_output")
    try:
        spec = json.loads(raw) if isinstance(raw, (str, bytes)) else raw
    except ValueError as exc:
        raise DataError(f"APPS problem {pid}: input_output is not valid JSON ({exc}); store it as a JSON string") from None
    if not isinstance(spec, Mapping) or "inputs" not in spec or "outputs" not in spec:
        raise DataError(f"APPS problem {pid}: input_output needs 'inputs' and 'outputs' lists")
    inputs, outputs, fn_name = spec["inputs"], spec["outputs"], spec.get("fn_name")
    if len(inputs) != len(outputs) or not inputs:
        raise DataError(f"APPS problem {pid}: {len(inputs)} inputs but {len(outputs)} outputs; need equal non-zero counts")
    if fn_name:
        return [TestCase(json.dumps(args), out, fn_name) for args, out in zip(inputs, outputs)]
    return [TestCase(_as_text(i), _as_text(o)) for i, o in zip(inputs, outputs)]


def _as_text(x: Any) -> str:
    return "\n".join(map(str, x)) if isinstance(x, list) else str(x)


def _normalized_lines(text: str) -> list[str]:
    lines = [" ".join(line.split()) for line in text.strip().splitlines()]
    return [line for line in lines if line]


def outputs_match(got: str, expected: str) -> bool:
    """Standard-output comparison: equal after normalising whitespace in and between lines."""
    return _normalized_lines(got) == _normalized_lines(expected)


def _call_result_matches(stdout: str, expected: Any) -> bool:
    marked = [line for line in stdout.splitlines() if line.startswith(_RESULT_MARK)]
    if not marked:
        return False
    try:
        got = json.loads(marked[-1][len(_RESULT_MARK):])
    except ValueError:
        return False
    # APPS stores call-based outputs either bare or wrapped in a one-element list.
    return got == expected or (isinstance(expected, list) and len(expected) == 1 and got == expected[0])


def _run_sample(code: str, tests: Sequence[TestCase], limits: Mapping[str, Any]) -> str:
    for test in tests:
        program = code + _CALL_HARNESS.format(name=test.fn_name, mark=_RESULT_MARK) if test.fn_name else code
        result = run_program(program, stdin=test.stdin, **limits)
        if result.status != "ok":
            return result.status
        passed = _call_result_matches(result.stdout, test.expected) if test.fn_name else outputs_match(result.stdout, test.expected)
        if not passed:
            return "wrong"
    return "pass"


def evaluate_problems(
    problems: Sequence[Mapping[str, Any]],
    samples_per_problem: Sequence[Sequence[str]],
    ks: Sequence[int] = (1, 5, 10),
    timeout_s: float = 4.0,
    memory_mb: int = 512,
    max_workers: int | None = None,
    max_tests: int | None = None,
) -> dict:
    """Per-problem n, c and pass@k (for k ≤ n), and their means over the problems.

    Returns ``{"problems": [ProblemResult, ...], "pass@k": {k: mean over the problems}}``, where a k
    is reported only if every problem has at least k samples (HumanEval's rule: a mean over the
    problems with n ≥ k alone would compare different problem sets across k).
    A sample stops at its first failing test; ``max_tests`` caps the tests run per problem.
    """
    if len(problems) != len(samples_per_problem):
        raise ValueError(f"evaluate_problems: {len(problems)} problems but {len(samples_per_problem)} sample lists")
    limits = {"timeout_s": timeout_s, "memory_mb": memory_mb}
    tests = [load_tests(p)[:max_tests] if max_tests else load_tests(p) for p in problems]
    jobs = [(i, code) for i, samples in enumerate(samples_per_problem) for code in samples]
    workers = max_workers or max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        outcomes = list(pool.map(lambda job: _run_sample(job[1], tests[job[0]], limits), jobs))
    per_problem: list[ProblemResult] = []
    cursor = 0
    for problem, samples in zip(problems, samples_per_problem):
        statuses = outcomes[cursor : cursor + len(samples)]
        cursor += len(samples)
        n, c = len(statuses), statuses.count("pass")
        per_problem.append(
            ProblemResult(
                problem_id=str(problem.get("problem_id", len(per_problem))),
                n=n,
                c=c,
                pass_at={k: pass_at_k(n, c, k) for k in ks if 1 <= k <= n},
                statuses=statuses,
            )
        )
    summary = {}
    for k in ks:
        if per_problem and all(k in r.pass_at for r in per_problem):
            summary[k] = sum(r.pass_at[k] for r in per_problem) / len(per_problem)
    return {"problems": per_problem, "pass@k": summary}
