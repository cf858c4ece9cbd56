"""The pass@k sandbox contains what generated code might do: hang, fork, write, connect, allocate."""

import json
import os
import shutil
import socket
import tempfile
import textwrap

import pytest

from mtpeft.tasks.sandbox import run_program


def _procs_of_uid(uid: int) -> list[str]:
    """Every process of uid, zombies included (an independent /proc scan)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/status") as f:
                    lines = f.read().splitlines()
            except OSError:
                continue
            uid_line = next((line for line in lines if line.startswith("Uid:")), "")
            if uid_line.split()[1:2] == [str(uid)]:
                found.append(entry)
    return found


def test_stdin_stdout_and_exit_statuses():
    r = run_program("a, b = map(int, input().split())\nprint(a + b)\n", stdin="2 40\n")
    assert (r.status, r.stdout, r.returncode) == ("ok", "42\n", 0)
    r = run_program("raise ValueError('boom')\n")
    assert r.status == "error" and r.returncode == 1 and "ValueError: boom" in r.stderr
    r = run_program("import ctypes\nctypes.string_at(0)\n")
    assert r.status == "killed" and r.returncode < 0


def test_idle_program_is_killed_at_wall_clock_limit():
    # Sleeping uses no CPU, so only the wall-clock limit can end it, never before 1 s.
    r = run_program("import time\nwhile True:\n    time.sleep(0.01)\n", timeout_s=1.0)
    assert r.status == "timeout"
    assert 1.0 <= r.seconds < 5.0  # the upper bound allows for a loaded machine


def test_busy_loop_is_ended_by_whichever_limit_comes_first():
    # The CPU limit defaults to the wall limit; the kernel's CPU accounting can end a busy
    # loop a few milliseconds before the wall clock does, so only the upper bound is fixed.
    r = run_program("while True:\n    pass\n", timeout_s=1.0)
    assert r.status == "timeout"
    assert 0.5 <= r.seconds < 5.0


def test_cpu_limit_applies_before_wall_clock():
    r = run_program("while True:\n    pass\n", timeout_s=20.0, cpu_s=1)
    assert r.status == "timeout"
    assert r.seconds < 15.0  # ended by the 1 s CPU limit, well before the 20 s wall limit


def test_memory_over_limit_fails_and_under_limit_works():
    r = run_program("x = bytearray(1 << 30)\nprint(len(x))\n", memory_mb=256)
    assert r.status == "memory" and r.stdout == ""
    r = run_program("x = bytearray(100 << 20)\nprint(len(x))\n", memory_mb=256)
    assert r.status == "ok" and r.stdout.strip() == str(100 << 20)


def test_fork_bomb_is_contained_and_nothing_survives():
    code = textwrap.dedent(
        """
        import os, time
        print(os.getuid(), flush=True)
        n = 0
        while True:
            try:
                pid = os.fork()
            except OSError:
                break
            if pid == 0:
                time.sleep(600)
                os._exit(0)
            n += 1
        print(n, flush=True)
        while True:
            try:
                os.fork()
            except OSError:
                pass
        """
    )
    r = run_program(code, timeout_s=1.5, max_processes=20)
    assert r.status == "timeout"
    uid, forked = (int(x) for x in r.stdout.split())
    if "uid" in r.isolation:
        assert 1 <= forked <= 19  # the program itself is one of the 20 processes
        assert _procs_of_uid(uid) == []  # killed and reaped, not even zombies left
    else:
        assert forked <= 19


def test_write_outside_the_work_dir_fails(tmp_path):
    # A world-writable directory the test owns under /tmp: only the read-only view stops writes
    # there; tmp_path (under pytest's 0700 directory) is also out of the sandbox uid's reach.
    open_dir = tempfile.mkdtemp(prefix="mtpeft-test-outside-")
    os.chmod(open_dir, 0o777)
    targets = [os.path.join(open_dir, "pwned.txt"), str(tmp_path / "pwned.txt"), "/tmp/mtpeft_sandbox_escape.txt"]
    code = textwrap.dedent(
        f"""
        import os
        for path in {targets!r} + ["inside.txt"]:
            try:
                with open(path, "w") as f:
                    f.write("x")
                print("wrote", path)
            except OSError as exc:
                print("blocked", path, type(exc).__name__)
        print("cwd", os.getcwd())
        """
    )
    try:
        r = run_program(code)
        assert r.status == "ok", r.stderr
        lines = r.stdout.splitlines()
        assert "ro" in r.isolation or os.geteuid() != 0  # as root the read-only view is always set up
        assert "landlock" in r.isolation  # and as any user Landlock refuses writes outside the work directory
        for line, target in zip(lines, targets):
            assert line.startswith(f"blocked {target}")
            assert not os.path.exists(target)
        assert lines[3] == "wrote inside.txt"
        work = lines[4].split(" ", 1)[1]
        assert not os.path.exists(work)  # the private work directory is removed afterwards
    finally:
        shutil.rmtree(open_dir, ignore_errors=True)


def test_reads_outside_its_own_folder_fail_and_normal_programs_still_run():
    # World-readable file in a world-traversable folder: any uid could read it without Landlock
    outside = tempfile.mkdtemp(prefix="mtpeft-test-secret-")
    os.chmod(outside, 0o755)
    secret = os.path.join(outside, "secret.txt")
    with open(secret, "w") as f:
        f.write("the test's secret")
    os.chmod(secret, 0o644)
    code = textwrap.dedent(
        f"""
        import decimal, json, os, sqlite3, subprocess, sys
        for path in [{secret!r}, "/etc/passwd", {os.path.abspath(__file__)!r}]:
            try:
                print("read", path, open(path).read()[:5])
            except OSError as exc:
                print("blocked", path, type(exc).__name__)
        try:
            print("listed", os.listdir({outside!r}))
        except OSError as exc:
            print("blocked listing", type(exc).__name__)
        with open("own.txt", "w") as f:
            f.write("mine")
        print("own", open("own.txt").read(), open(sys.argv[0]).read().strip()[:6])
        print(json.dumps([str(decimal.Decimal(1) / 8), sqlite3.sqlite_version_info[0]]))
        print(subprocess.run(["cat", {secret!r}], capture_output=True).returncode != 0)
        """
    )
    try:
        r = run_program(code)
        assert r.status == "ok", r.stderr
        assert "landlock" in r.isolation
        lines = r.stdout.splitlines()
        assert lines[0] == f"blocked {secret} PermissionError"
        assert lines[1] == "blocked /etc/passwd PermissionError"
        assert lines[2].startswith("blocked ") and lines[3] == "blocked listing PermissionError"
        assert lines[4] == "own mine import"
        assert lines[5] == '["0.125", 3]' and lines[6] == "True"  # extension modules load; a child is confined too
    finally:
        shutil.rmtree(outside, ignore_errors=True)


def test_without_landlock_the_sandbox_refuses_to_start(monkeypatch):
    from mtpeft.tasks import landlock

    monkeypatch.setattr(landlock, "abi_version", lambda: 0)
    with pytest.raises(OSError, match="Landlock is not available"):
        landlock.Ruleset()


def test_network_connection_fails():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass  # the server is reachable from outside the sandbox
        code = textwrap.dedent(
            f"""
            import socket, subprocess
            try:
                socket.create_connection(("127.0.0.1", {port}), timeout=2)
                print("python connected")
            except OSError as exc:
                print("python blocked", type(exc).__name__)
            # bash's /dev/tcp bypasses any Python-level hook: only a network namespace stops it
            rc = subprocess.run(["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/{port}"], capture_output=True).returncode
            print("bash", "connected" if rc == 0 else "blocked")
            """
        )
        r = run_program(code)
        assert r.status == "ok", r.stderr
        lines = r.stdout.splitlines()
        assert lines[0].startswith("python blocked")
        if "netns" in r.isolation:
            assert lines[1] == "bash blocked"
    finally:
        server.close()


@pytest.mark.parametrize("bad", [dict(timeout_s=0), dict(memory_mb=0), dict(max_processes=0)])
def test_bad_limits_raise(bad):
    with pytest.raises(ValueError):
        run_program("print(1)", **bad)


def test_evaluation_carries_on_past_failing_samples():
    from mtpeft.tasks.pass_at_k import evaluate_problems, outputs_match

    stdio = {
        "problem_id": "sum",
        "input_output": json.dumps({"inputs": ["1 2\n", "10 -3\n"], "outputs": ["3\n", "7\n"]}),
    }
    call = {"problem_id": "add", "input_output": {"fn_name": "add", "inputs": [[1, 2], [5, 5]], "outputs": [[3], [10]]}}
    sum_samples = [
        "a, b = map(int, input().split())\nprint(a + b)\n",  # pass
        "a, b = map(int, input().split())\nprint(a - b)\n",  # wrong answer
        "raise SystemExit(3)\n",  # crash
        "while True:\n    pass\n",  # hang, killed at the limit
        "a, b = map(int, input().split())\nprint('  ', a + b, '  ')\nprint()\n",  # pass (whitespace)
    ]
    call_samples = [
        "class Solution:\n    def add(self, a, b):\n        return a + b\n",  # pass (LeetCode style)
        "def add(a, b):\n    return a * b\n",  # wrong on [1, 2]
    ]
    out = evaluate_problems([stdio, call], [sum_samples, call_samples], timeout_s=1.0, max_workers=2)
    s, a = out["problems"]
    assert s.statuses == ["pass", "wrong", "error", "timeout", "pass"]
    assert (s.n, s.c, a.n, a.c) == (5, 2, 2, 1)
    # pass@1 = c/n; pass@5 with n=5, c=2 is 1 - C(3,5)/C(5,5) = 1; k=10 > n is not reported
    assert s.pass_at == pytest.approx({1: 0.4, 5: 1.0})
    assert a.pass_at == pytest.approx({1: 0.5})
    # HumanEval's rule: a k is reported only if every problem has n >= k ("add" has 2 samples)
    assert out["pass@k"] == pytest.approx({1: 0.45})
    assert outputs_match("1  2\n\n3 \n", "1 2\n3") and not outputs_match("1 2", "12")


def test_bad_apps_records_name_the_problem():
    from mtpeft.errors import DataError
    from mtpeft.tasks.pass_at_k import load_tests

    with pytest.raises(DataError, match="problem 7"):
        load_tests({"problem_id": 7, "input_output": "{not json"})
    with pytest.raises(DataError, match="2 inputs but 1 outputs"):
        load_tests({"problem_id": 8, "input_output": {"inputs": ["1", "2"], "outputs": ["1"]}})
    tests = load_tests({"problem_id": 9, "input_output": {"inputs": [["1", "2"]], "outputs": [["3", "4"]]}})
    assert (tests[0].stdin, tests[0].expected) == ("1\n2", "3\n4")


def _as_nobody(*argv: str):
    import subprocess

    return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *argv],
                          capture_output=True, text=True, timeout=120, cwd="/")


SYSTEM_PYTHON = next((p for p in ("/usr/bin/python3", "/usr/local/bin/python3") if os.path.exists(p)), None)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv") or SYSTEM_PYTHON is None,
                    reason="needs root to become another user (setpriv) and an interpreter outside /root")
def test_a_non_root_user_is_confined_too(tmp_path_factory):
    """The sandbox run by an unprivileged user (uid 65534 through setpriv; no uid switch, no mount
    namespace then): the same user reads a world-readable file and writes a world-writable folder
    outside, while the program it runs in the sandbox can do neither. The sandbox is stdlib-only, so
    the system interpreter runs a copy of it from a folder that user can read."""
    from pathlib import Path

    import mtpeft.tasks.sandbox as sandbox

    shared = Path(tempfile.mkdtemp(prefix="mtpeft-test-nonroot-"))
    try:
        shared.chmod(0o777)
        for name in ("sandbox.py", "landlock.py"):
            shutil.copy(Path(sandbox.__file__).with_name(name), shared / name)
            (shared / name).chmod(0o644)
        secret, drop = shared / "secret.txt", shared / "dropped.txt"
        secret.write_text("the test's secret")
        secret.chmod(0o644)
        program = (f"try:\n    print(open({str(secret)!r}).read())\nexcept OSError as exc:\n    print(type(exc).__name__)\n"
                   f"try:\n    open({str(drop)!r}, 'w').write('x')\nexcept OSError as exc:\n    print(type(exc).__name__)\n"
                   "open('own.txt', 'w').write('mine')\nprint(open('own.txt').read())\n")
        driver = shared / "driver.py"
        driver.write_text(
            "import importlib.util, json, os, sys\n"
            f"spec = importlib.util.spec_from_file_location('sandbox', {str(shared / 'sandbox.py')!r})\n"
            "sb = importlib.util.module_from_spec(spec); sys.modules['sandbox'] = sb; spec.loader.exec_module(sb)\n"
            f"r = sb.run_program({program!r}, timeout_s=20)\n"
            "print(json.dumps({'uid': os.geteuid(), 'status': r.status, 'stdout': r.stdout,"
            " 'stderr': r.stderr[-2000:], 'isolation': list(r.isolation)}))\n")
        driver.chmod(0o644)
        control = _as_nobody(SYSTEM_PYTHON, "-I", "-c", f"print(open({str(secret)!r}).read()); "
                                                        f"open({str(drop)!r}, 'w').write('x')")
        assert control.returncode == 0 and "the test's secret" in control.stdout, control.stderr
        drop.unlink()
        proc = _as_nobody(SYSTEM_PYTHON, "-I", str(driver))
        assert proc.returncode == 0, proc.stderr[-3000:]
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        assert r["uid"] == 65534 and r["status"] == "ok" and "landlock" in r["isolation"], r
        assert "uid" not in r["isolation"] and "ro" not in r["isolation"], r  # the root-only layers
        assert r["stdout"].split() == ["PermissionError", "PermissionError", "mine"], r
        assert not drop.exists()
    finally:
        shutil.rmtree(shared, ignore_errors=True)
