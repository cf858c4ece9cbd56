"""The Python half of ``bench/gpu_check.sh``: issue 11's whole GPU path in one call, within a deadline.

A GPU is lent rarely, for 15 minutes of device time in all, so one prepared call must check and
measure everything, and one broken part must not cost the others: each part runs as its own
process group with its own timeout (never past the shared deadline), its output goes to
``$OUT/<part>.log``, and ``$OUT/results.json`` is rewritten after every part, so what finished comes
back even if the call is cut off. Only 8 files come back from ``$OUT``: setup.log, versions.json,
results.json and a.log … e.log; bulky outputs (the demo's run folder, kernels' results) stay in a
work folder and their JSON is folded into results.json.

    python bench/gpu_check.py run --out OUT [--dry-run]   # every part (gpu_check.sh calls this)
    python bench/gpu_check.py versions --out OUT/versions.json
    python bench/gpu_check.py demo-check RUN_DIR --json FILE

It is also the pytest plugin (``-p bench.gpu_check``) that runs the CPU-written kernel tests on the
GPU, compiled: see :class:`TensorsOnCuda`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
DEADLINE_S = 540  # issue 11: the whole check in 9 minutes, installation included
CARRY_LIMIT = 64 * 2**20
# test_kernel_static_gate.py is left out: it compiles for sm_90a without a GPU, which CI already does.
TEST_FILES = ["tests/kernels/test_kernel_backend.py", "tests/kernels/test_kernel_bottleneck_adapter.py",
              "tests/kernels/test_kernel_nf4_lora_linear.py", "tests/kernels/test_kernel_lora_dy_pass.py",
              "tests/kernels/test_kernel_keyed_dropout.py",
              "tests/quant/test_nf4_format.py", "tests/quant/test_quant_linear.py"]
WHEEL_PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
                   "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"]


@dataclass
class Part:
    key: str
    title: str
    log: str
    budget_s: int
    minutes: float  # expected wall time on an H200: an estimate until a GPU run replaces it
    gpu: list
    dry: list
    env: dict = field(default_factory=dict)


def parts(work: Path) -> list[Part]:
    w = str(work)
    tests = [PY, "-m", "pytest", "-q", "-p", "bench.gpu_check", *TEST_FILES]
    xdist = ["-n", "8"] if _importable("xdist") else []  # Triton compiles in 8 processes at once
    xdist += ["--timeout", "60"] if _importable("pytest_timeout") else []  # a hung kernel costs one test
    demo = [PY, "-m", "mtpeft", "demo", "--config", "demo_nf4", "--ranks", "1", "--out", f"{w}/demo",
            "--set", "train.max_steps=60", "--set", "model.dtype=bfloat16"]
    check = [PY, "bench/gpu_check.py", "demo-check", f"{w}/demo", "--json", f"{w}/demo_check.json"]
    fit = [PY, "bench/fit_34b.py"]
    return [
        Part("a", "kernel + NF4 tests, compiled, on the GPU", "a.log", 80, 1.0,
             [tests + xdist + ["--junitxml", f"{w}/a_junit.xml"]], [tests + ["--collect-only"]],
             {"TRITON_INTERPRET": "0"}),
        Part("b", "bench/kernels.py: fused vs cuBLAS bf16 vs bnb+peft", "b.log", 160, 2.5,
             [[PY, "bench/kernels.py", "--out", f"{w}/kernels"]],
             [[PY, "bench/kernels.py", "--help"], [PY, "-c", "import bitsandbytes, peft, triton"]]),
        Part("c", "e2e step, DeepSeek-Coder-1.3B shape, seq 2048", "c.log", 80, 1.0,
             [[PY, "bench/e2e_step.py", "--json", f"{w}/e2e.json"]],
             [[PY, "bench/e2e_step.py", "--cpu-smoke", "--json", f"{w}/e2e.json"]]),
        Part("d", "demo_nf4, deepspeed --num_gpus 1, 60 steps", "d.log", 100, 1.5, [demo, check],
             [[PY, "-m", "mtpeft", "demo", "--help"], [PY, "-c", "import deepspeed, datasets, peft"],
              [PY, "bench/gpu_check.py", "demo-check", "--help"]]),
        Part("e1", "fit_34b: CodeLlama-34B, seq 2048", "e.log", 60, 1.0,
             [fit + ["--steps", "3", "--json", f"{w}/fit34b.json"]],
             [fit + ["--allow-cpu", "--model", "deepseek-coder-1.3b", "--layers", "1", "--seq", "16",
                     "--steps", "1", "--json", f"{w}/fit34b.json"]]),
        Part("e2", "fit_34b --shape 1b: activation check", "e.log", 25, 0.5,
             [fit + ["--shape", "1b", "--checkpointing", "off", "--steps", "2", "--json", f"{w}/fit1b.json"]],
             [fit + ["--help"]]),
    ]


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def run_command(cmd: list, log, timeout: float, env: dict) -> str:
    """Run ``cmd`` in its own process group (the demo's ranks and pytest's workers die with it)."""
    log.write(f"\n$ {' '.join(cmd)}\n")
    log.flush()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env},
                            start_new_session=True)
    try:
        return "ok" if proc.wait(timeout=timeout) == 0 else f"failed (exit {proc.returncode})"
    except subprocess.TimeoutExpired:
        # SIGINT first: pytest then still writes its junit XML, the deepspeed launcher stops its ranks
        for sig, grace in ((signal.SIGINT, 8), (signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=grace)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue
        log.write(f"\n[gpu_check] stopped after {timeout:.0f} s\n")
        return "timeout"


# --- what each part found, read from the files it wrote ---------------------------------------------

def junit_summary(path: Path, log: Path) -> dict:
    if not path.is_file():  # cut off hard, or pytest did not start: count its progress characters
        text = log.read_text(errors="replace") if log.is_file() else ""
        marks = "".join(re.findall(r"^([.FEsx]+)\s+\[\s*\d+%\]\s*$", text, re.M))
        return {"summary": f"no junit XML (see a.log); progress lines: {marks.count('.')} passed, "
                           f"{marks.count('F') + marks.count('E')} failed"}
    root = ET.parse(path).getroot()
    cases = list(root.iter("testcase"))
    bad = {"failure", "error"}
    failed = [f"{c.get('classname')}::{c.get('name')}: " + next(
        ((x.get("message") or "")[:200] for x in c if x.tag in bad), "") for c in cases if any(x.tag in bad for x in c)]
    skipped = sum(1 for c in cases if any(x.tag == "skipped" for x in c))
    text = f"{len(cases) - len(failed) - skipped} passed, {len(failed)} failed, {skipped} skipped"
    return {"summary": text, "failed": failed[:40], "details": failed[:10]}


def kernels_summary(folder: Path, log: Path) -> dict:
    if (folder / "results.json").is_file():
        data = json.loads((folder / "results.json").read_text())
        data["markdown"] = (folder / "results.md").read_text() if (folder / "results.md").is_file() else ""
        targets = data["targets"]
    else:  # cut off before it wrote its JSON: the rows it printed still count
        rows = [{"M": int(m), "K": int(k), "N": int(n), "mode": mode, "c_over_a": float(ca), "b_over_c": float(bc)}
                for m, k, n, mode, ca, bc in re.findall(
                    r"^\s*(\d+)\s+(\d+)\s+(\d+)\s+(fwd\+bwd|fwd)\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+([\d.]+)\s+([\d.]+)",
                    log.read_text(errors="replace") if log.is_file() else "", re.M)]
        sys.path.insert(0, str(REPO))
        from bench.kernels import target_lines

        targets = target_lines(rows)
        data = {"rows_from_log": rows, "targets": targets, "correctness_failures": None}
    passed = sum(t.startswith("PASS") for t in targets)
    check = {None: "correctness ?", 0: "correctness PASS"}.get(
        None if data["correctness_failures"] is None else len(data["correctness_failures"]), "correctness FAIL")
    return {"summary": f"{check}, targets {passed}/{len(targets)} PASS", "details": targets, "data": data}


def e2e_summary(path: Path) -> dict:
    data = json.loads(path.read_text())
    cells = []
    for name, row in data["variants"].items():
        peak = f", {row['peak_bytes'] / 2**30:.1f} GiB" if row.get("peak_bytes") else ""
        cells.append(f"{name} " + ("ERROR" if "error" in row else f"{row['tokens_per_s']:.0f} tok/s{peak}"))
    details = [f"mtpeft-qlora vs {o}: tokens/s x{data[f'speedup_vs_{o}']:.2f}"
               + (f", peak x{data[f'peak_ratio_vs_{o}']:.2f}" if f"peak_ratio_vs_{o}" in data else "")
               for o in ("peft-bnb-qlora", "bf16-lora") if f"speedup_vs_{o}" in data]
    return {"summary": "; ".join(cells), "details": details, "data": data}


def fit_summary(path: Path) -> dict:
    data = json.loads(path.read_text())
    text = f"{data['tokens_per_s']:.0f} tok/s"
    if "measured_peak_bytes" in data:
        text += (f", peak {data['measured_peak_bytes'] / 2**30:.2f} GiB vs plan "
                 f"{data['predicted_peak_bytes'] / 2**30:.2f} (x{data['peak_ratio_measured_over_predicted']:.2f}), "
                 f"activations x{data['activation_ratio_measured_over_predicted']:.2f}")
    return {"summary": text, "data": data}


def demo_summary(path: Path) -> dict:
    data = json.loads(path.read_text())
    text = (f"{data['steps']} steps, loss {data['loss_first']:.3f} -> {data['loss_last']:.3f} "
            f"({'falls' if data['loss_falls'] else 'does NOT fall'}; {data['tasks_falling']}/{len(data['per_task'])} "
            f"tasks), HF peft load "
            f"{'ok' if data.get('peft_load_ok') else 'FAILED'}")
    return {"summary": text, "data": data}


def found(part: Part, work: Path, out: Path) -> dict:
    readers = {"a": lambda: junit_summary(work / "a_junit.xml", out / part.log),
               "b": lambda: kernels_summary(work / "kernels", out / part.log),
               "c": lambda: e2e_summary(work / "e2e.json"),
               "d": lambda: demo_summary(work / "demo_check.json"),
               "e1": lambda: fit_summary(work / "fit34b.json"),
               "e2": lambda: fit_summary(work / "fit1b.json")}
    try:
        return readers[part.key]()
    except (OSError, KeyError, TypeError, ValueError, ET.ParseError, ImportError) as err:
        return {"summary": f"no result ({type(err).__name__}: {err})"[:120]}


def dry_found(part: Part, out: Path) -> dict:
    """A dry run's figures come from CPU smoke runs and mean nothing: say only what started."""
    text = (out / part.log).read_text(errors="replace") if (out / part.log).is_file() else ""
    collected = re.findall(r"^(\d+) tests? collected", text, re.M)
    return {"summary": f"{len(part.dry)} command(s) exited 0" + (f", {collected[-1]} tests collected" if collected else "")}


# --- the carried wheels --------------------------------------------------------------------------------

def travelling_bytes() -> int:
    """Tracked + untracked-not-ignored files: what the device tool copies besides the carried paths."""
    listed = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True).stdout.split("\0")
    return sum((REPO / f).stat().st_size for f in listed if f and (REPO / f).is_file())


def check_wheels(log) -> dict:
    """Present, under the carry limit together with the tree, and installable for CPython 3.12 x86_64."""
    wheels = sorted((REPO / ".whl").glob("*.whl"))
    size, tree = sum(w.stat().st_size for w in wheels), travelling_bytes()
    result = {"wheels": {w.name: w.stat().st_size for w in wheels}, "wheel_bytes": size, "tree_bytes": tree,
              "carried_total_bytes": size + tree, "limit_bytes": CARRY_LIMIT}
    names = " ".join(w.name for w in wheels)
    problems = [f"no {n} wheel in .whl (run `make gpu-wheels`)" for n in ("deepspeed", "bitsandbytes", "datasets")
                if f"{n}-" not in names]
    if size + tree > CARRY_LIMIT:
        problems.append(f"wheels + tree = {(size + tree) / 2**20:.1f} MiB, over the 64 MiB carry limit")
    if wheels:
        with tempfile.TemporaryDirectory() as target:
            cmd = [PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--only-binary=:all:",
                   "--python-version", "3.12", "--implementation", "cp", "--target", target,
                   *[a for p in WHEEL_PLATFORMS for a in ("--platform", p)], *map(str, wheels)]
            if run_command(cmd, log, 300, {}) != "ok":
                problems.append("the wheels do not install together for CPython 3.12 (see setup.log)")
    result["problems"] = problems
    return result


# --- run ------------------------------------------------------------------------------------------------

def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    tmp.replace(path)


def table(results: dict) -> str:
    v = results.get("versions") or {}
    lines = [f"install: {results['install']}"]
    if v:
        lines.append(f"{v.get('gpu', 'no GPU')}, driver/CUDA {v.get('nvidia_smi', '?')} / {v.get('torch_cuda', '?')}; "
                     + ", ".join(f"{k} {(v.get(k) or {}).get('version', 'MISSING')}" for k in
                                 ("torch", "triton", "transformers", "peft", "deepspeed", "bitsandbytes", "datasets")))
    lines += [f"{'part':<4} {'status':<18} {'s / budget':>11}  result", "-" * 100]
    details = []
    for key, r in results["parts"].items():
        lines.append(f"{key:<4} {r['status']:<18} {r['seconds']:>5.0f}/{r['budget_s']:<5}  {r.get('summary', '')}")
        details += [f"  {key}: {d}" for d in r.get("details", [])]
    wheels = results.get("wheels") or {}
    if wheels:
        lines.append(f"carried: wheels {wheels['wheel_bytes'] / 2**20:.1f} MiB + tree {wheels['tree_bytes'] / 2**20:.1f}"
                     f" MiB = {wheels['carried_total_bytes'] / 2**20:.1f} MiB (limit 64)"
                     + "".join(f"\n  PROBLEM: {p}" for p in wheels["problems"]))
    return "\n".join(lines + details)


def run(args) -> int:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu_check_")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    deadline = (args.started or time.time()) + args.deadline_s
    results = {"dry_run": args.dry_run, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "work": str(work),
               "install": args.install_status, "parts": {}}
    with open(out / "setup.log", "a") as log:
        if args.dry_run:
            results["wheels"] = check_wheels(log)
            results["install"] = "dry run: " + ("; ".join(results["wheels"]["problems"]) or
                                                "the wheels install together for CPython 3.12 (temporary target)")
        else:
            run_command([PY, "bench/gpu_check.py", "versions", "--out", str(out / "versions.json")], log, 90, {})
            try:
                results["versions"] = json.loads((out / "versions.json").read_text())
            except (OSError, ValueError):
                results["versions"] = {}
    chosen = [p for p in parts(work) if not args.only or p.key in args.only or p.key.rstrip("12") in args.only]
    print(f"{'part':<4} {'expected':>8} {'budget':>7}  title  ({'dry run on CPU' if args.dry_run else 'GPU'})")
    for part in chosen:
        print(f"{part.key:<4} {part.minutes:>6.1f} m {part.budget_s:>5} s  {part.title}")
    print(f"total expected {sum(p.minutes for p in chosen) + 0.75:.1f} min with installation (an estimate until a "
          f"GPU run replaces it); deadline {args.deadline_s / 60:.0f} min", flush=True)
    for part in chosen:
        start = time.time()
        # the dry run has no deadline: a loaded CPU is slow, and it only checks that each part starts
        limit = part.budget_s if args.dry_run else min(part.budget_s, deadline - start - 25)
        status = "ok" if limit >= 15 else "skipped (no time)"
        with open(out / part.log, "a") as log:
            for cmd in (part.dry if args.dry_run else part.gpu) if status == "ok" else []:
                left = limit - (time.time() - start)
                got = run_command(cmd, log, left, part.env) if left >= 5 else "skipped (no time)"
                status = got if status == "ok" else status
        entry = {"title": part.title, "status": status, "seconds": time.time() - start, "budget_s": part.budget_s,
                 "log": part.log, **(dry_found(part, out) if args.dry_run else found(part, work, out))}
        results["parts"][part.key] = entry
        write_json(out / "results.json", results)
        print(f"[gpu_check] {part.key}: {status} in {entry['seconds']:.0f} s: {entry.get('summary', '')}", flush=True)
    print("\n" + table(results))
    bad = [k for k, r in results["parts"].items() if r["status"] != "ok"]
    return 1 if bad or (results.get("wheels") or {}).get("problems") else 0


# --- versions -------------------------------------------------------------------------------------------

def versions(args) -> int:
    import importlib
    import importlib.metadata
    import platform

    info = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "python": platform.python_version(),
            "executable": sys.executable}
    for name in ("torch", "triton", "transformers", "peft", "deepspeed", "bitsandbytes", "datasets", "accelerate",
                 "tokenizers", "safetensors", "huggingface_hub", "pyarrow", "fsspec", "pydantic", "typing_extensions",
                 "numpy", "mtpeft"):
        try:
            module = importlib.import_module(name)
            version = getattr(module, "__version__", None) or importlib.metadata.version(name)
            info[name] = {"version": version, "file": getattr(module, "__file__", "?")}
        except Exception as err:  # a missing or broken package is a finding, not a reason to stop
            info[name] = {"error": f"{type(err).__name__}: {err}"[:300]}
    import torch

    info["cuda_available"] = torch.cuda.is_available()
    if info["cuda_available"]:
        info.update(gpu=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
                    torch_cuda=torch.version.cuda, nccl=".".join(map(str, torch.cuda.nccl.version())),
                    gpu_memory_bytes=torch.cuda.get_device_properties(0).total_memory)
    for key, cmd in (("nvidia_smi", ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]),
                     ("nvcc", ["nvcc", "--version"]), ("git_commit", ["git", "rev-parse", "HEAD"])):
        try:
            info[key] = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()[-300:]
        except (OSError, subprocess.TimeoutExpired) as err:
            info[key] = f"unavailable: {err}"
    write_json(Path(args.out), info)
    print(json.dumps({k: (v.get("version") if isinstance(v, dict) else v) for k, v in info.items()}, default=str))
    return 0


# --- the demo's run: loss falls, export loads in HF peft -------------------------------------------

def demo_check(args) -> int:
    run_dir = Path(args.run_dir)
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    tasks = sorted({r["task"] for r in records})
    window = max(1, len(records) // 3 // max(len(tasks), 1))
    per_task = {}
    for t in tasks:
        losses = [r["loss"] for r in records if r["task"] == t]
        per_task[t] = {"first": mean(losses[:window]), "last": mean(losses[-window:])}
    result = {"steps": len(records), "per_task": per_task,
              "loss_first": mean(v["first"] for v in per_task.values()),
              "loss_last": mean(v["last"] for v in per_task.values())}
    result["loss_falls"] = result["loss_last"] < result["loss_first"]
    result["tasks_falling"] = sum(v["last"] < v["first"] for v in per_task.values())
    try:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        export = run_dir / "export"
        base_path = json.loads((export / "tasks.json").read_text())["base_model_name_or_path"]
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).eval()
        ids = torch.arange(1, 33).view(1, -1)
        with torch.no_grad():
            plain = base(input_ids=ids).logits
            model = PeftModel.from_pretrained(base, str(export)).eval()
            adapted = model(input_ids=ids).logits
        lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
        result.update(peft_lora_modules=len(lora_b), peft_lora_b_nonzero=sum(bool(p.abs().sum() > 0) for p in lora_b),
                      peft_logits_change=float((adapted - plain).abs().max()),
                      peft_load_ok=bool(lora_b) and bool(torch.isfinite(adapted).all()))
    except Exception as err:  # reported in the JSON and the table, the loss check stands on its own
        result.update(peft_load_ok=False, peft_error=f"{type(err).__name__}: {err}"[:400])
    if args.json_out:
        write_json(Path(args.json_out), result)
    print(json.dumps(result, indent=1))
    return 0 if result["loss_falls"] and result["peft_load_ok"] else 1


# --- pytest plugin ---------------------------------------------------------------------------------

class TensorsOnCuda:
    """Every tensor a test creates on the CPU (no device, or ``cpu``) is created exactly as asked, with
    the test's CPU generator, then moved to the GPU: the kernel tests, written for Triton's interpreter,
    then launch the compiled kernels on the same seeded data. A test that moves a tensor to the CPU
    itself keeps it there. Built lazily: torch is imported only when the plugin is used."""

    FACTORIES = ("empty", "zeros", "ones", "full", "rand", "randn", "randint", "randperm", "arange", "linspace",
                 "logspace", "eye", "tensor", "as_tensor")

    def __new__(cls):
        import torch
        from torch.overrides import TorchFunctionMode

        factories = {getattr(torch, name) for name in cls.FACTORIES}

        class Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = dict(kwargs or {})
                device = kwargs.get("device")
                if func in factories and "out" not in kwargs and (device is None or torch.device(device).type == "cpu"):
                    grad = kwargs.pop("requires_grad", False)
                    made = func(*args, **kwargs).to("cuda")
                    return made.requires_grad_(True) if grad else made
                return func(*args, **kwargs)

        return Mode()


_mode = None


def pytest_configure(config):
    global _mode
    if config.option.collectonly:
        return
    import pytest
    import torch

    if not torch.cuda.is_available():
        raise pytest.UsageError("-p bench.gpu_check runs the kernel tests on a GPU and found none")
    os.environ["TRITON_INTERPRET"] = "0"
    import mtpeft.kernels  # noqa: F401  (every kernel decorated compiled before a test module asks otherwise)

    _mode = TensorsOnCuda()
    _mode.__enter__()


def pytest_collection_finish(session):
    # test_quant_linear.py sets TRITON_INTERPRET=1 at import; with 0 its fixture reloads the dequant
    # kernel compiled instead of interpreted.
    os.environ["TRITON_INTERPRET"] = "0"


def pytest_unconfigure(config):
    global _mode
    if _mode is not None:
        _mode.__exit__(None, None, None)
        _mode = None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="every part; results under --out")
    r.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "gpu_out"))
    r.add_argument("--work", help="folder for the parts' bulky outputs (default: a new temporary one)")
    r.add_argument("--dry-run", action="store_true", help="on CPU: check the wheels and that every part starts")
    r.add_argument("--started", type=float, help="epoch seconds the call began (the deadline counts from it)")
    r.add_argument("--deadline-s", type=float, default=DEADLINE_S)
    r.add_argument("--install-status", default="not run")
    r.add_argument("--only", type=lambda text: text.split(","), default=None,
                   help="comma-separated parts to run (a,b,c,d,e or e1,e2), e.g. to rerun one on a warm machine")
    v = sub.add_parser("versions", help="versions, GPU, driver and CUDA to a JSON file")
    v.add_argument("--out", required=True)
    d = sub.add_parser("demo-check", help="the demo's loss falls and its export loads in HF peft")
    d.add_argument("run_dir")
    d.add_argument("--json", dest="json_out")
    args = p.parse_args(argv)
    return {"run": run, "versions": versions, "demo-check": demo_check}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
