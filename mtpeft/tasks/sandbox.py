"""Run one untrusted generated program (a pass@k sample) in a contained child process.

The caller's process never runs generated code. It starts this file as a small supervisor
(``python -I -S sandbox.py CONFIG``, a fresh single-threaded process, so no fork-after-threads
hazards in the trainer), which sets up the containment, forks the program and enforces the
wall-clock limit. Layers, each applied where the kernel allows (``RunResult.isolation`` lists
which were in force):

- ``uid``: as root, the program runs as a fresh unprivileged uid (one per run), so RLIMIT_NPROC
  binds (it never binds root), it cannot signal or write anything of another user, and every
  process of that uid is killed at the end wherever it went.
- ``netns``: a new network namespace with no interface up: no connection, not even 127.0.0.1.
- ``pidns``: the program is PID 1 of a new PID namespace; when it dies the kernel kills all
  its descendants, and the supervisor (a child subreaper) reaps them, so nothing is left behind,
  not even zombies.
- ``ro``: a private mount namespace where every mount is read-only except the work directory.
- ``landlock``: the program and its children may read only their own folder (the program file
  and the work directory), the interpreter's install and the system program and library folders,
  and write only the work directory; on Landlock ABI ≥ 4 TCP bind/connect is refused too, on
  ABI ≥ 6 signals and abstract sockets stay inside. Required: without Landlock the sandbox refuses
  to start (``SandboxError``) rather than run code that could read the machine's files.
- ``audit``: a Python audit hook refuses non-Unix sockets before user code runs (a second
  layer where there is no network namespace).
- rlimits: CPU seconds, address space, processes, file size, open files, no core dumps.

Only the standard library is imported here: the supervisor runs with ``-I -S`` (``landlock.py``
beside this file, stdlib-only too, is loaded by its path).
"""

from __future__ import annotations

import ctypes
import importlib.util
import itertools
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

STATUSES = ("ok", "timeout", "memory", "error", "killed")
# Readable (and executable) besides the program's own folder and the interpreter's install: what
# the interpreter, its extension modules and a subprocess need to load.
SYSTEM_DIRS = ("/bin", "/usr/bin", "/lib", "/lib64", "/usr/lib", "/usr/lib64")
SYSTEM_FILES = ("/etc/ld.so.cache",)
DEVICES = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random")
DEFAULT_MAX_PROCESSES = 20
_UID_BASE = 1_000_000_000  # + up to 1e9: below 2**31, clear of the usual subuid ranges
_uid_counter = itertools.count()

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND = 32, 1024, 2048, 4096
MS_REC, MS_PRIVATE, MS_RELATIME, MS_STRICTATIME = 16384, 1 << 18, 1 << 21, 1 << 24
PR_SET_CHILD_SUBREAPER = 36
_MOUNT_OPTION_FLAGS = {
    "nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME, "strictatime": MS_STRICTATIME,
}

# Runs as the program's interpreter entry: installs the network audit hook, then the program.
_BOOTSTRAP = """\
import sys
def _mtpeft_no_network(event, args):
    if event == "socket.__new__" and args[1] != 1:
        raise PermissionError("network access is disabled in the mtpeft sandbox")
sys.addaudithook(_mtpeft_no_network)
del _mtpeft_no_network
import runpy
_path = sys.argv[1]
sys.argv = [_path]
runpy.run_path(_path, run_name="__main__")
"""


class SandboxError(RuntimeError):
    """The sandbox itself could not start (an environment problem, not a failing sample)."""


@dataclass(frozen=True)
class RunResult:
    status: str
    stdout: str
    stderr: str
    returncode: int | None
    seconds: float
    isolation: tuple[str, ...] = field(default=())


def run_program(
    code: str,
    stdin: str = "",
    timeout_s: float = 4.0,
    memory_mb: int = 512,
    max_processes: int = DEFAULT_MAX_PROCESSES,
    cpu_s: float | None = None,
    output_mb: int = 16,
) -> RunResult:
    """Run ``code`` as a Python program on ``stdin`` under the limits; never raises for bad code.

    status: ok (exit 0), timeout (wall clock or CPU limit), memory (MemoryError under the
    address-space limit), error (any other non-zero exit), killed (ended by another signal,
    e.g. a segfault or the file-size limit).
    """
    if timeout_s <= 0 or memory_mb <= 0 or max_processes < 1:
        raise ValueError("run_program: timeout_s, memory_mb and max_processes must be positive")
    base = tempfile.mkdtemp(prefix="mtpeft-sandbox-")
    try:
        os.chmod(base, 0o711)
        work = os.path.join(base, "work")
        os.mkdir(work, 0o700)
        program = os.path.join(base, "main.py")
        with open(program, "w", encoding="utf-8") as f:
            f.write(code)
        os.chmod(program, 0o644)
        uid = None
        if os.geteuid() == 0:
            uid = _UID_BASE + (os.getpid() % 1_000_000) * 1000 + next(_uid_counter) % 1000
            os.chown(work, uid, uid)
        cfg = {
            "interpreter": _interpreter(),
            "program": program,
            "work": work,
            "uid": uid,
            "timeout_s": float(timeout_s),
            "cpu_s": int(math.ceil(cpu_s if cpu_s is not None else timeout_s)),
            "memory_bytes": int(memory_mb) << 20,
            "max_processes": int(max_processes),
            "fsize_bytes": int(output_mb) << 20,
        }
        return _supervise_from_parent(cfg, base, stdin, output_mb)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _interpreter() -> str:
    """The real interpreter binary: a venv's site-packages are not the program's business."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def _supervise_from_parent(cfg: dict, base: str, stdin: str, output_mb: int) -> RunResult:
    paths = {name: os.path.join(base, name) for name in ("stdin", "stdout", "stderr")}
    with open(paths["stdin"], "w", encoding="utf-8") as f:
        f.write(stdin)
    status_r, status_w = os.pipe()
    with open(paths["stdin"], "rb") as fin, open(paths["stdout"], "wb") as fout, open(paths["stderr"], "wb") as ferr:
        cmd = [cfg["interpreter"], "-I", "-S", os.path.abspath(__file__), json.dumps(cfg), str(status_w)]
        proc = subprocess.Popen(
            cmd, stdin=fin, stdout=fout, stderr=ferr, start_new_session=True, pass_fds=(status_w,),
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8"},
        )
    os.close(status_w)
    try:
        proc.wait(timeout=cfg["timeout_s"] + 30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    with os.fdopen(status_r, "rb") as f:
        raw = f.read()
    stdout, stderr = (_read_capped(paths[k], output_mb << 20) for k in ("stdout", "stderr"))
    try:
        report = json.loads(raw)
    except ValueError:
        if proc.returncode is not None and proc.returncode < 0:
            # Killed from outside (e.g. the OOM killer): a failed sample, not a broken sandbox.
            return RunResult("killed", stdout, stderr, proc.returncode, cfg["timeout_s"], ())
        raise SandboxError(f"sandbox supervisor failed (exit {proc.returncode}); stderr: {stderr[-500:]}") from None
    if report.get("setup_error"):
        raise SandboxError(f"sandbox could not start: {report['setup_error']}")
    return RunResult(
        status=_classify(report, stderr),
        stdout=stdout,
        stderr=stderr,
        returncode=report["returncode"],
        seconds=report["seconds"],
        isolation=tuple(report["isolation"]),
    )


def _read_capped(path: str, limit: int) -> str:
    with open(path, "rb") as f:
        return f.read(limit).decode("utf-8", errors="replace")


def _classify(report: dict, stderr: str) -> str:
    if report["timed_out"]:
        return "timeout"
    rc = report["returncode"]
    if rc == 0:
        return "ok"
    if rc < 0:
        # As PID 1 of its namespace the program ignores SIGXCPU; the hard CPU limit SIGKILLs it.
        # rusage undercounts the scheduler's CPU clock a little (0.92 s for a 1 s limit here).
        out_of_cpu = -rc == signal.SIGXCPU or (
            -rc == signal.SIGKILL and report["cpu_s"] >= 0.75 * report["cpu_limit_s"]
        )
        return "timeout" if out_of_cpu else "killed"
    tail = stderr[-2000:]
    return "memory" if "MemoryError" in tail else "error"


# ---------------------------------------------------------------- supervisor (child side) ----


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    return libc


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(libc, source, target: str, fstype, flags: int, data=None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def _expose(libc, paths: list[str]) -> None:
    """Make paths reachable for the unprivileged uid (e.g. an interpreter under /root 0700).

    Each ancestor that others cannot traverse is covered, in this private mount namespace only,
    by an empty 0755 tmpfs holding binds of just the path components we need below it. The
    directories to bind are opened before anything is mounted, so they are the real ones.
    """
    plan = []
    for path in paths:
        parts = os.path.realpath(path).strip("/").split("/")
        for depth in range(1, len(parts)):
            here, below = "/" + "/".join(parts[:depth]), "/" + "/".join(parts[: depth + 1])
            if not os.stat(here).st_mode & 0o001:
                plan.append((depth, here, below, os.open(below, os.O_PATH | os.O_DIRECTORY)))
    covered = set()
    try:
        for _, here, below, fd in sorted(plan):
            if here not in covered:
                _mount(libc, "tmpfs", here, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=0755")
                covered.add(here)
            if not os.path.isdir(below):
                os.mkdir(below, 0o755)
                _mount(libc, f"/proc/self/fd/{fd}", below, None, MS_BIND)
    finally:
        for *_, fd in plan:
            os.close(fd)


def _make_readonly_except(libc, work: str) -> bool:
    """Remount every mount read-only in this namespace, the work directory excepted."""
    _mount(libc, work, work, None, MS_BIND)
    all_ok = True
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        mounts = [line.split() for line in f]
    for fields in mounts:
        target = fields[4].encode().decode("unicode_escape")
        if target == work:
            continue
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for opt in fields[5].split(","):
            flags |= _MOUNT_OPTION_FLAGS.get(opt, 0)
        try:
            _mount(libc, None, target, None, flags)
        except OSError:
            all_ok = False if target == "/" else all_ok
    return all_ok


def _set_limits(cfg: dict) -> None:
    cpu = cfg["cpu_s"]
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    resource.setrlimit(resource.RLIMIT_AS, (cfg["memory_bytes"], cfg["memory_bytes"]))
    resource.setrlimit(resource.RLIMIT_NPROC, (cfg["max_processes"], cfg["max_processes"]))
    resource.setrlimit(resource.RLIMIT_FSIZE, (cfg["fsize_bytes"], cfg["fsize_bytes"]))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _pids_of_uid(uid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status", encoding="utf-8") as f:
                status = f.read()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if fields.get("Uid", "").split()[:1] == [str(uid)] and not fields.get("State", "").strip().startswith("Z"):
            pids.append(int(entry))
    return pids


def _kill_everything(child: int, uid: int | None) -> None:
    for target in (lambda: os.killpg(child, signal.SIGKILL), lambda: os.kill(child, signal.SIGKILL)):
        try:
            target()
        except OSError:
            pass
    if uid is None:
        return
    for _ in range(200):
        pids = _pids_of_uid(uid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.005)


def _reap_all(deadline: float) -> None:
    """Reap every descendant (we are their subreaper) so none lingers as a zombie."""
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.002)


def _isolate(cfg: dict, libc) -> list[str]:
    layers = ["audit"]
    if cfg["uid"] is None:
        if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWPID) == 0:
            layers += ["netns", "pidns"]
        return layers
    _check(libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID), "unshare")
    layers += ["uid", "netns", "pidns"]
    _mount(libc, None, "/", None, MS_REC | MS_PRIVATE)
    _expose(libc, [sys.base_prefix, os.path.dirname(cfg["program"]), cfg["work"]])
    if _make_readonly_except(libc, cfg["work"]):
        layers.append("ro")
    return layers


def _load_landlock():
    spec = importlib.util.spec_from_file_location(
        "mtpeft_sandbox_landlock", os.path.join(os.path.dirname(os.path.abspath(__file__)), "landlock.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _mapped_library_dirs() -> set[str]:
    with open("/proc/self/maps", encoding="utf-8") as f:
        paths = {line.split(None, 5)[5].strip() for line in f if len(line.split(None, 5)) == 6}
    return {os.path.dirname(p) for p in paths if p.startswith("/") and ".so" in os.path.basename(p)}


def _ruleset(cfg: dict, landlock):
    """What the program may touch; built here (as the supervisor), enforced in the child."""
    rules = landlock.Ruleset()
    readable = {os.path.realpath(sys.base_prefix), *SYSTEM_DIRS, *_mapped_library_dirs()}
    for path in sorted(readable) + list(SYSTEM_FILES) + [cfg["program"]]:
        rules.allow(path, landlock.READ)
    for path in DEVICES:
        rules.allow(path, landlock.READ_FILE | landlock.WRITE_FILE)
    rules.allow(cfg["work"], rules.fs)
    return rules


def _child(cfg: dict, enforce, ruleset_fd: int) -> None:
    """In the forked child: drop to the sandbox uid, apply limits and Landlock, become the program."""
    try:
        os.setpgid(0, 0)
        uid = cfg["uid"]
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        os.chdir(cfg["work"])
        _set_limits(cfg)
        enforce(ruleset_fd)
        os.execv(cfg["interpreter"], [cfg["interpreter"], "-I", "-c", _BOOTSTRAP, cfg["program"]])
    except BaseException as exc:  # noqa: BLE001 - report and leave, whatever happened
        os.write(2, f"mtpeft sandbox: could not start the program: {exc}\n".encode())
    os._exit(127)


def _supervise(cfg: dict, status_fd: int) -> None:
    report: dict = {"timed_out": False, "returncode": None, "seconds": 0.0, "isolation": []}
    os.set_inheritable(status_fd, False)  # the program must not be able to forge this report
    libc = _libc()
    try:
        _check(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl(PR_SET_CHILD_SUBREAPER)")
        report["isolation"] = _isolate(cfg, libc)
        landlock = _load_landlock()
        ruleset = _ruleset(cfg, landlock)
        report["isolation"].append("landlock")
    except OSError as exc:
        report["setup_error"] = str(exc)
        os.write(status_fd, json.dumps(report).encode())
        os._exit(1)
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGCHLD])
    start = time.monotonic()
    child = os.fork()
    if child == 0:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGCHLD])
        _child(cfg, landlock.enforce, ruleset.fd)
    deadline = start + cfg["timeout_s"]
    wait_status = None
    while wait_status is None:
        pid, status, usage = os.wait4(child, os.WNOHANG)
        if pid == child:
            wait_status = status
            break
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            report["timed_out"] = True
            break
        signal.sigtimedwait([signal.SIGCHLD], min(remaining, 0.05))
    report["seconds"] = time.monotonic() - start
    _kill_everything(child, cfg["uid"])
    if wait_status is None:
        _, wait_status, usage = os.wait4(child, 0)
    report["cpu_s"] = usage.ru_utime + usage.ru_stime
    report["cpu_limit_s"] = cfg["cpu_s"]
    report["returncode"] = os.waitstatus_to_exitcode(wait_status)
    _reap_all(time.monotonic() + 2.0)
    os.write(status_fd, json.dumps(report).encode())
    os._exit(0)


if __name__ == "__main__":
    _supervise(json.loads(sys.argv[1]), int(sys.argv[2]))
