"""A write that fails (disk full, file-size limit) is one ``error:`` line naming the file and the fix,
exit status 2, no traceback; the previous checkpoint, export or metrics file stays the one that is
read (issue 15).

Two real failures, no injected errors: a tmpfs of a few MiB that really fills (ENOSPC; needs root,
skipped elsewhere), and ``RLIMIT_FSIZE`` with SIGXFSZ ignored, so the kernel refuses the write with
EFBIG on any disk. One tiny run (2 steps, a checkpoint at step 2) is trained once for the module."""

import contextlib
import hashlib
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from distributed import REPO, env, tiny_config
from write_limits import file_size_limit
from mtpeft.cli import main

pytestmark = pytest.mark.distributed  # real DeepSpeed engines in subprocesses

SIZE_LIMITED = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
                "resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.RLIM_INFINITY)); "
                "from mtpeft.cli import main; sys.exit(main(sys.argv[1:]))")


def _hashes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _train(cfg: Path, out: Path, *sets: str, limit: int = 0) -> subprocess.CompletedProcess:
    head = [sys.executable, "-c", SIZE_LIMITED.format(limit=limit)] if limit else [sys.executable, "-m", "mtpeft"]
    argv = [*head, "train", str(cfg), "--set", f"output.dir={out}", "--set", "train.save_every=2"]
    for s in sets:
        argv += ["--set", s]
    return subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env(), cwd=str(REPO))


def _one_error(proc: subprocess.CompletedProcess) -> str:
    return _error_line(proc.returncode, proc.stderr)


def _error_line(code: int, stderr: str) -> str:
    """The one ``error:`` line of a command's stderr (progress bars share the stream)."""
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 2 and "Traceback" not in stderr and len(errors) == 1, stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def run_at_step2(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("disk_full")
    cfg = tiny_config(tmp, max_steps=2)
    run = tmp / "run"
    done = _train(cfg, run)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run / "checkpoints" / "latest").read_text() == "step2"
    return {"cfg": cfg, "run": run}


@contextlib.contextmanager
def _tmpfs(where: Path, size_bytes: int):
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", f"mtpeft-{uuid.uuid4().hex[:8]}",
                              str(where)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root); the RLIMIT_FSIZE variant covers it")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], capture_output=True)


def _checkpoint_survives(run: Path, before: dict, line: str) -> None:
    ckpt = run / "checkpoints"
    assert f"{ckpt / 'step4'}: cannot be written" in line and "still points at step2" in line, line
    assert "rerun the same command" in line
    assert (ckpt / "latest").read_text() == "step2" and not (ckpt / "step4" / "run_state.pt").exists()
    assert {k: v for k, v in _hashes(run).items() if k.startswith("checkpoints/step2/")} == \
        {k: v for k, v in before.items() if k.startswith("checkpoints/step2/")}
    from mtpeft.trainer.checkpoint import latest_tag

    assert latest_tag(ckpt) == "step2"  # what a resume reads


def test_checkpoint_on_a_full_tmpfs(run_at_step2, tmp_path):
    """ENOSPC for real: the run folder copied onto a tmpfs with 3 MiB to spare; the step-4 checkpoint
    needs about 7 MiB."""
    used = sum(p.stat().st_size for p in run_at_step2["run"].rglob("*") if p.is_file())
    with _tmpfs(tmp_path / "small", used + 3 * 2**20) as disk:
        run = disk / "run"
        shutil.copytree(run_at_step2["run"], run)
        before = _hashes(run)
        line = _one_error(_train(run_at_step2["cfg"], run, "train.max_steps=4"))
        assert "the disk is full" in line
        _checkpoint_survives(run, before, line)


def test_checkpoint_past_a_file_size_limit(run_at_step2, tmp_path):
    """EFBIG for real on the ordinary disk: the rerun may not write a file over 3 MB, and the ZeRO
    model-states file of step 4 is about 4 MB (everything before it is far smaller)."""
    run = tmp_path / "run"
    shutil.copytree(run_at_step2["run"], run)
    before = _hashes(run)
    line = _one_error(_train(run_at_step2["cfg"], run, "train.max_steps=4", limit=3_000_000))
    assert "limit" in line
    _checkpoint_survives(run, before, line)


def test_export_past_a_file_size_limit_keeps_the_previous_export(run_at_step2, tmp_path, capsys):
    out = tmp_path / "exported"
    shutil.copytree(run_at_step2["run"] / "export", out)
    before = _hashes(out)
    with file_size_limit(200_000):  # the adapter file is about 600 kB
        code = main(["export", str(run_at_step2["run"]), "--out", str(out)])
    line = _error_line(code, capsys.readouterr().err)
    assert line.startswith(f"error: {out}: cannot be written") and "the previous export in" in line, line
    assert _hashes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]  # no temporary folder left


def test_export_on_a_full_tmpfs_keeps_the_previous_export(run_at_step2, tmp_path, capsys):
    export = run_at_step2["run"] / "export"
    used = sum(p.stat().st_size for p in export.iterdir())
    with _tmpfs(tmp_path / "small", used + 300_000) as disk:
        out = disk / "exported"
        shutil.copytree(export, out)
        before = _hashes(out)
        code = main(["export", str(run_at_step2["run"]), "--out", str(out)])
        assert "the disk is full" in _error_line(code, capsys.readouterr().err)
        assert _hashes(out) == before and sorted(p.name for p in disk.iterdir()) == ["exported"]


def test_eval_metrics_past_a_file_size_limit_keep_the_previous_metrics(run_at_step2, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_at_step2["run"], run)
    (run / "metrics.json").write_text("{}\n" + " " * 200)  # the earlier metrics, bigger than the limit allows
    before = _hashes(run)
    with file_size_limit(100):
        code = main(["eval", str(run)])
    line = _error_line(code, capsys.readouterr().err)
    assert line.startswith(f"error: {run / 'metrics.json'}: cannot be written"), line
    assert _hashes(run) == before


def test_log_line_past_a_file_size_limit(tmp_path):
    from mtpeft.errors import WriteError
    from mtpeft.trainer.run_log import RunLog

    log = RunLog(tmp_path, enabled=True)
    record = {"step": 1, "task": "t", "loss": 1.0, "lr": 0.1, "tokens": 8, "seconds": 1.0}
    log.step(record)
    log.metrics({}, 1)  # flushes TensorBoard's writer thread, which would otherwise write during the limit
    size = (tmp_path / "log.jsonl").stat().st_size
    with file_size_limit(size + 10), pytest.raises(WriteError, match=r"log.jsonl: cannot be written, the file-size"):
        log.step({**record, "step": 2})
    log.close()
