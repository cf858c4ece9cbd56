"""The launch scripts forward a SIGTERM to the whole process group of the run and exit 0 when the
run saved its checkpoint (issue 15). DeepSpeed is replaced by a stand-in with the real launcher's
behaviour on SIGTERM: the launcher process exits 1 (DeepSpeed's per-node launcher always does) or
dies at once (the top ``deepspeed`` runner without ssh has no handler), while its rank goes on
unless someone signals it; the rank saves (writes ``MTPEFT_PREEMPTED_FILE``) and exits 0."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distributed import REPO

FAKE_DEEPSPEED = r'''#!/usr/bin/env bash
# pdsh starts the ranks on other hosts without this environment: they learn the marker from argv
[[ ${FAKE_LAUNCHER:-} == pdsh ]] && unset MTPEFT_PREEMPTED_FILE
"$FAKE_PYTHON" - "$@" <<'PY' &
import os, signal, sys, time
if os.environ.get("FAKE_LAUNCHER") == "pdsh":
    from mtpeft.cli import build_parser
    from mtpeft.trainer.faults import Preemption
    args = build_parser().parse_args(sys.argv[sys.argv.index("mtpeft") + 1:])
    assert "MTPEFT_PREEMPTED_FILE" not in os.environ and args.preempted_file
    Preemption.report_to(args.preempted_file)  # what `mtpeft train` does with it
def term(*_):
    time.sleep(0.5)  # writing the checkpoint
    if os.environ.get("FAKE_SAVES") == "1":
        open(os.environ["MTPEFT_PREEMPTED_FILE"], "w").write("step7\n")
    open(os.environ["FAKE_DIR"] + "/rank_saved", "w").write("1")
    sys.exit(0)
signal.signal(signal.SIGTERM, term)
open(os.environ["FAKE_DIR"] + "/rank_pid.tmp", "w").write(str(os.getpid()))
os.replace(os.environ["FAKE_DIR"] + "/rank_pid.tmp", os.environ["FAKE_DIR"] + "/rank_pid")
while True:
    time.sleep(0.05)
PY
rank=$!
echo "$@" > "$FAKE_DIR/argv"
[[ ${FAKE_LAUNCHER:-exit1} == exit1 ]] && trap 'exit 1' TERM
# the pdsh runner's handler signals the ranks on every host (pdsh + pkill), then exits 1
[[ ${FAKE_LAUNCHER:-} == pdsh ]] && trap 'kill -TERM $rank; wait $rank; exit 1' TERM
while :; do sleep 0.05; done
'''


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z" if Path(f"/proc/{pid}").exists() else False


def _stop_and_report(proc: subprocess.Popen, why: str) -> None:
    """End the whole process group first: reading the pipes of a live run would wait for it."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    raise AssertionError(f"{why} (exit {proc.returncode}):\n{out[-1500:]}\n{err[-3000:]}")


def _run_and_terminate(tmp_path: Path, script: list[str], saves: bool, launcher: str = "exit1", cwd: Path = REPO,
                       **extra: str):
    fake = tmp_path / "deepspeed"
    fake.write_text(FAKE_DEEPSPEED)
    fake.chmod(0o755)
    env = {**os.environ, "DEEPSPEED": str(fake), "FAKE_DIR": str(tmp_path), "FAKE_SAVES": "1" if saves else "0",
           "FAKE_PYTHON": sys.executable, "FAKE_LAUNCHER": launcher, "PYTHON": sys.executable, "TMPDIR": str(tmp_path),
           "PYTHONPATH": str(REPO), **extra}
    proc = subprocess.Popen(["bash", *script], env=env, cwd=str(cwd), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 30
        while not (tmp_path / "rank_pid").exists():
            if proc.poll() is not None or time.time() > deadline:
                _stop_and_report(proc, "the fake rank never started")
            time.sleep(0.05)
        rank = int((tmp_path / "rank_pid").read_text())
        proc.send_signal(signal.SIGTERM)  # the script alone, as a user's `kill PID` or SLURM's batch signal
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, err, rank


SCRIPTS = {
    "single_node": ["launch/single_node.sh", "cfg.yaml"],
    "per_node_no_ssh": ["launch/per_node_no_ssh.sh", "--node_rank", "0", "HOSTFILE", "cfg.yaml"],
}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
@pytest.mark.parametrize("launcher", ["exit1", "dies"])
def test_sigterm_reaches_the_ranks_and_a_saved_run_exits_0(tmp_path, name, launcher):
    (tmp_path / "hosts").write_text("localhost slots=1\n")
    script = [str(tmp_path / "hosts") if a == "HOSTFILE" else a for a in SCRIPTS[name]]
    code, err, rank = _run_and_terminate(tmp_path, script, saves=True, launcher=launcher)
    assert (tmp_path / "rank_saved").exists() and not _alive(rank)
    assert code == 0 and "checkpoint step7 saved; rerun the same command to resume" in err, (code, err)
    assert not list(tmp_path.glob(".mtpeft-preempted.*"))  # the marker is removed


def test_pdsh_ranks_report_a_saved_checkpoint_through_the_shared_working_directory(tmp_path):
    """pdsh forwards no environment and the launch host's TMPDIR is not the ranks': the script names a
    marker in the working directory (which the pdsh runner enters on every host) on the command line."""
    (tmp_path / "hosts").write_text("localhost slots=1\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "pdsh").write_text("#!/usr/bin/env bash\nexit 0\n")
    (bin_dir / "pdsh").chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    code, err, rank = _run_and_terminate(
        tmp_path, [str(REPO / "launch/multi_node_pdsh.sh"), str(tmp_path / "hosts"), "cfg.yaml"], saves=True,
        launcher="pdsh", cwd=work, PATH=f"{bin_dir}:{os.environ['PATH']}")
    argv = (tmp_path / "argv").read_text().split()
    assert argv[argv.index("--preempted-file") + 1].startswith(str(work / ".mtpeft-preempted."))
    assert (tmp_path / "rank_saved").exists() and not _alive(rank)
    assert code == 0 and "checkpoint step7 saved; rerun the same command to resume" in err, (code, err)
    assert not list(work.iterdir())  # the marker is removed


def test_a_run_that_did_not_save_keeps_the_launchers_status(tmp_path):
    code, err, rank = _run_and_terminate(tmp_path, SCRIPTS["single_node"], saves=False)
    assert code == 1 and "saved" not in err and not _alive(rank)


SRUN_STUB = r'''#!/usr/bin/env bash
# srun on one node: drop the options, run the task in a process group of its own (a job step)
while [[ $1 == --* ]]; do shift; done
echo $$ > "$FAKE_DIR/step_pgid"
export SLURM_NODEID=0
exec setsid "$@"
'''
SCANCEL_STUB = r'''#!/usr/bin/env bash
# scancel --signal=SIG JOBID: signal every job step (here the one step), never the batch shell
sig=${1#--signal=}
echo "$*" >> "$FAKE_DIR/scancel_calls"
kill -"$sig" -- -"$(cat "$FAKE_DIR/step_pgid")"
'''


def test_slurm_batch_shell_passes_a_term_on_to_the_job_steps(tmp_path):
    """`scancel --batch` / `--signal=B:TERM`: only the batch shell gets the signal; slurm.sbatch
    re-sends it to the steps with scancel, the per-node script reaches the ranks, the job exits 0."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", SRUN_STUB), ("scancel", SCANCEL_STUB),
                       ("scontrol", "#!/usr/bin/env bash\necho localhost\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    code, err, rank = _run_and_terminate(
        tmp_path, ["launch/slurm.sbatch", "cfg.yaml"], saves=True, PATH=f"{bin_dir}:{os.environ['PATH']}",
        SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="localhost", SLURM_SUBMIT_DIR=str(REPO), GPUS_PER_NODE="1",
        HOSTFILE=str(tmp_path / "hosts"))
    assert (tmp_path / "scancel_calls").read_text().split() == ["--signal=TERM", "4242"]
    assert (tmp_path / "rank_saved").exists() and not _alive(rank)
    assert code == 0 and "checkpoint step7 saved" in err, (code, err)


@pytest.mark.distributed
def test_single_node_script_with_the_real_launcher(tmp_path):
    """The real deepspeed runner and per-node launcher: a SIGTERM to the script alone saves a
    checkpoint on every rank, leaves no process behind, and the script exits 0 (deepspeed itself
    would exit 1)."""
    import json

    from distributed import env, free_port, tiny_config

    cfg = tiny_config(tmp_path, max_steps=400)
    out = tmp_path / "run"
    e = {**env(), "NUM_GPUS": "1", "MASTER_PORT": str(free_port()),
         "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.Popen(["bash", "launch/single_node.sh", str(cfg), "--set", f"output.dir={out}"], env=e,
                            cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    log = out / "log.jsonl"
    try:
        deadline = time.time() + 300
        while not (log.is_file() and len(log.read_text().splitlines()) >= 2):
            if proc.poll() is not None or time.time() > deadline:
                _stop_and_report(proc, "no two training steps within 300 s")
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        left = subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True, text=True).stdout.split()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    last = json.loads(log.read_text().splitlines()[-1])["step"]
    assert proc.returncode == 0, err[-3000:]
    assert (out / "checkpoints" / "latest").read_text() == f"step{last}"
    assert f"checkpoint step{last} saved" in err and not left


def test_mtpeft_demo_and_profile_forward_a_term_to_the_launchers_group(tmp_path):
    """``mtpeft demo`` and ``mtpeft profile --ranks N`` start the launcher through
    ``mtpeft.launch.process_group.run_in_group``: the same forwarding and exit status, from Python."""
    driver = tmp_path / "driver.py"
    driver.write_text("import sys\nfrom mtpeft.launch.process_group import run_in_group\n"
                      f"sys.exit(run_in_group([{str(tmp_path / 'deepspeed')!r}]))\n")
    code, err, rank = _run_and_terminate(tmp_path, ["-c", f"exec {sys.executable!r} {str(driver)!r}"], saves=True)
    assert (tmp_path / "rank_saved").exists() and not _alive(rank)
    assert code == 0 and "mtpeft: SIGTERM: checkpoint step7 saved" in err, (code, err)


def test_a_preempted_demo_ends_quietly(tmp_path, capsys, monkeypatch):
    """After run_in_group reports a saved preemption (0) the demo has no metrics to show: no traceback."""
    import mtpeft.demo.launch as demo
    from mtpeft.cli import main

    monkeypatch.setattr(demo, "run_in_group", lambda cmd: 0)
    assert main(["demo", "--ranks", "1", "--out", str(tmp_path / "d")]) == 0
    assert "error" not in capsys.readouterr().err


def test_train_takes_the_marker_from_the_command_line(tmp_path, monkeypatch):
    """`mtpeft train --preempted-file PATH` (relative to where the rank starts) is where a saved
    preemption is reported, as MTPEFT_PREEMPTED_FILE is on one node."""
    from mtpeft import cli
    from mtpeft.launch.process_group import PREEMPTED_FILE_ENV
    from mtpeft.trainer import recipe
    from mtpeft.trainer.faults import Preemption

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(PREEMPTED_FILE_ENV, "")  # so that monkeypatch removes what report_to sets
    monkeypatch.delenv(PREEMPTED_FILE_ENV)
    monkeypatch.setenv("LOCAL_RANK", "0")
    seen = []
    monkeypatch.setattr(recipe, "train", lambda cfg, leave_group: seen.append(os.environ.get(PREEMPTED_FILE_ENV)))
    assert cli.main(["train", "demo", "--set", f"output.dir={tmp_path / 'run'}", "--preempted-file", "m"]) == 0
    assert seen == [str(tmp_path / "m")]
    Preemption.report_saved("step3")
    assert (tmp_path / "m").read_text() == "step3\n"
