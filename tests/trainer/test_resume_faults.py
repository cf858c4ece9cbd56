"""Exact resume after SIGKILL, a checkpoint pointer that an interrupted save cannot corrupt,
SIGTERM preemption, and the non-finite-loss guard. Single-process runs (the same engine code as
multi-rank, without the launcher's start-up cost)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distributed import REPO, env, tiny_config

pytestmark = pytest.mark.distributed  # real DeepSpeed engines or several processes


def _cmd(cfg: Path, out: Path, *sets: str) -> list[str]:
    cmd = [sys.executable, "-m", "mtpeft", "train", str(cfg), "--set", f"output.dir={out}"]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def _losses(run_dir: Path) -> list[tuple[int, str, float]]:
    rows = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["task"], r["loss"]) for r in rows]


def _wait_for(predicate, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early with {proc.returncode}: {proc.stdout.read()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError("timed out waiting")


@pytest.fixture(scope="module")
def straight_and_resumed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    cfg = tiny_config(tmp, max_steps=10, save_every=5, keep_checkpoints=3)
    straight, killed = tmp / "straight", tmp / "killed"
    subprocess.run(_cmd(cfg, straight), env=env(), cwd=REPO, check=True, capture_output=True, timeout=600)
    proc = subprocess.Popen(_cmd(cfg, killed), env=env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    pointer = killed / "checkpoints" / "latest"
    _wait_for(lambda: pointer.is_file() and pointer.read_text() == "step5", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = subprocess.run(_cmd(cfg, killed), env=env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"cfg": cfg, "straight": straight, "killed": killed, "resume_out": done.stdout, "tmp": tmp}


def test_sigkill_after_step5_checkpoint_then_resume_gives_identical_losses(straight_and_resumed):
    a = _losses(straight_and_resumed["straight"])
    b = _losses(straight_and_resumed["killed"])
    assert [s for s, _, _ in a] == list(range(1, 11))
    assert [s for s, _, _ in b] == list(range(1, 11))
    assert "resumed from" in straight_and_resumed["resume_out"]
    for (sa, ta, la), (sb, tb, lb) in zip(a, b):
        assert (sa, ta) == (sb, tb)
        assert la == pytest.approx(lb, rel=1e-6, abs=0), (sa, la, lb)


def test_interrupted_save_leaves_previous_checkpoint_in_charge(straight_and_resumed, tmp_path):
    from mtpeft.cli import main
    from mtpeft.trainer.checkpoint import latest_tag

    ckpt = straight_and_resumed["killed"] / "checkpoints"
    assert latest_tag(ckpt) == "step10"
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step10", "step5"]
    # what a kill in the middle of saving step 15 leaves behind: a partial tag folder and a half
    # written pointer under its temporary name; the pointer itself was never touched
    partial = ckpt / "step15"
    partial.mkdir()
    (partial / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"\x80\x02trunc")
    (ckpt / "latest.tmp").write_text("step1")
    assert latest_tag(ckpt) == "step10"
    assert main(["export", str(straight_and_resumed["killed"]), "--out", str(tmp_path / "exp"),
                 "--source", "checkpoint"]) == 0
    assert (tmp_path / "exp" / "adapter_model.safetensors").stat().st_size > 1000


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    cfg = tiny_config(tmp_path, max_steps=400)
    out = tmp_path / "preempted"
    proc = subprocess.Popen(_cmd(cfg, out), env=env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    log = out / "log.jsonl"
    _wait_for(lambda: log.is_file() and len(log.read_text().splitlines()) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    text = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, text[-3000:]
    last = json.loads(log.read_text().splitlines()[-1])["step"]
    assert (out / "checkpoints" / "latest").read_text() == f"step{last}"
    assert "SIGTERM: saved" in text
    assert last < 400 and not (out / "metrics.json").exists()


def test_non_finite_losses_skip_steps_then_stop_with_one_error_line(tmp_path):
    cfg = tiny_config(tmp_path, max_steps=12, lr=1.0e30, head_lr=1.0e30, max_bad_steps=2)
    out = tmp_path / "diverged"
    proc = subprocess.run(_cmd(cfg, out), env=env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 3, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "not finite 2 steps in a row" in errors[0]
    assert "Traceback" not in proc.stderr
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    skipped = [r for r in rows if r.get("skipped")]
    assert len(skipped) == 2 and skipped[-1]["step"] == rows[-1]["step"]


def test_dead_peer_ends_the_run_with_an_error_naming_the_step(tmp_path):
    """Two ranks started by hand (as a per-node launcher would); rank 1 is killed mid-run: rank 0
    must stop with one error line naming the step instead of hanging."""
    from distributed import free_port

    cfg = tiny_config(tmp_path, max_steps=400, collective_timeout_s=30)
    out = tmp_path / "peer"
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        e = env()
        e.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                  "MASTER_PORT": port})
        procs.append(subprocess.Popen(_cmd(cfg, out), env=e, cwd=REPO, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    log = out / "log.jsonl"
    try:
        _wait_for(lambda: log.is_file() and len(log.read_text().splitlines()) >= 3, procs[0])
        procs[1].kill()
        _, err = procs[0].communicate(timeout=120)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[0].returncode == 3, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "a collective operation failed" in errors[0], err[-3000:]
    step = int(errors[0].split("step ")[1].split(":")[0])
    assert step > 3


def test_truncated_zero_shard_is_named_and_the_older_checkpoint_offered(straight_and_resumed, tmp_path, capsys):
    import shutil

    from mtpeft.cli import main

    run = tmp_path / "run"
    shutil.copytree(straight_and_resumed["straight"], run)
    shards = [p for p in (run / "checkpoints" / "step10").glob("*.pt") if p.name != "run_state.pt"
              and not p.name.startswith("rng_")]
    assert shards
    for shard in shards:
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    code = main(["export", str(run), "--out", str(tmp_path / "exp"), "--source", "checkpoint"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and "Traceback" not in err and len(lines) == 1, err[-2000:]
    assert "step10: cannot be read" in lines[0] and "--source export" in lines[0] and "at step5" in lines[0]
    assert not (tmp_path / "exp").exists()
