"""Hostfile validation and the launch scripts, run for real with stub ``deepspeed`` / ``srun`` / ``scontrol``.

The stubs print the argument vector they receive, so these tests check the exact command each
script would start (no GPU, no cluster needed); the real two-node launch is tests/trainer/test_two_nodes.py.
"""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from distributed import REPO

LAUNCH = REPO / "launch"
SCRIPTS = sorted(p for p in LAUNCH.iterdir() if p.suffix in (".sh", ".sbatch"))

MALFORMED = {
    "missing_slots": ("node-a slots=2\nnode-b\n", 2, "has no slots"),
    "missing_host": ("node-a slots=2\nslots=4\n", 2, "'slots=4' has no host name; write 'HOST slots=4'"),
    "zero_slots": ("# two nodes\nnode-a slots=0\n", 2, "positive integer"),
    "letter_slots": ("node-a slots=x\n", 1, "positive integer"),
    "negative_slots": ("\nnode-a slots=-1\n", 2, "positive integer"),
    "duplicate_host": ("node-a slots=2\n\nnode-b slots=2\nnode-a slots=4\n", 4, "listed again (first on line 1)"),
    "garbage": ("node-a slots=2\n!!! what\n", 2, "cannot parse"),
    "wrong_key": ("node-a gpus=2\n", 1, "expected 'slots=N'"),
    "extra_field": ("node-a slots=2 max_slots=4\n", 1, "cannot parse"),
}


def _check(path: Path, command: str = "check") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mtpeft.launch.hostfile", command, str(path)],
                          capture_output=True, text=True, cwd=str(REPO), timeout=60)


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_hostfile_is_one_error_line_naming_file_and_line(case, tmp_path):
    text, line, message = MALFORMED[case]
    path = tmp_path / "hostfile"
    path.write_text(text)
    proc = _check(path)
    assert proc.returncode == 2 and proc.stdout == ""
    error = _one_error_line(proc.stderr)
    assert error.startswith(f"error: {path}:{line}: ") and message in error


def test_missing_and_empty_hostfiles_are_errors(tmp_path):
    proc = _check(tmp_path / "absent")
    assert proc.returncode == 2 and "cannot read hostfile" in _one_error_line(proc.stderr)
    (tmp_path / "empty").write_text("# nothing\n\n")
    proc = _check(tmp_path / "empty")
    assert proc.returncode == 2 and "lists no hosts" in _one_error_line(proc.stderr)


def test_good_hostfile_passes_and_answers_queries(tmp_path):
    path = tmp_path / "hostfile"
    path.write_text("# cluster\n\n10.0.0.7 slots=8  # master\nnode-b.local slots=4\n  gpu_03 slots=2\n")
    proc = _check(path)
    assert proc.returncode == 0 and proc.stdout.strip() == f"{path}: 3 hosts, 14 slots" and proc.stderr == ""
    assert [_check(path, c).stdout.strip() for c in ("master", "nodes", "slots")] == ["10.0.0.7", "3", "14"]
    assert _check(LAUNCH / "hostfile.example").returncode == 0


def test_deepspeed_accepts_what_we_accept(tmp_path):
    from deepspeed.launcher.runner import _parse_hostfile

    good = "# c\nnode-a slots=8\nnode-b slots=4 # x\n"
    assert dict(_parse_hostfile(good.splitlines())) == {"node-a": 8, "node-b": 4}


@pytest.mark.parametrize("script", [p.name for p in SCRIPTS])
def test_script_syntax(script):
    proc = subprocess.run(["bash", "-n", str(LAUNCH / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def _stub_bin(tmp_path: Path) -> Path:
    """deepspeed/srun/scontrol stand-ins: deepspeed prints its argv, srun runs its command per node."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stubs = {
        "deepspeed": 'printf "%s\\n" "ARGV" "$@"\n',
        "pdsh": "exit 0\n",
        "scontrol": 'printf "gpu-node-1\\ngpu-node-2\\n"\n',
        "srun": 'while [[ $1 == --* ]]; do shift; done\nfor n in 0 1; do SLURM_NODEID=$n "$@" || exit $?; done\n',
    }
    for name, body in stubs.items():
        f = bin_dir / name
        f.write_text("#!/usr/bin/env bash\n" + body)
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def _run_script(tmp_path: Path, argv: list[str], cwd: Path = REPO, **extra_env) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{_stub_bin(tmp_path)}:{os.environ['PATH']}", PYTHON=sys.executable, **extra_env)
    for k in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "NUM_GPUS", "HOSTFILE"):
        if k not in extra_env:
            env.pop(k, None)
    return subprocess.run(argv, capture_output=True, text=True, cwd=str(cwd), env=env, timeout=60)


def _launches(stdout: str) -> list[list[str]]:
    return [chunk.strip("\n").split("\n") for chunk in stdout.split("ARGV\n")[1:]]


@pytest.fixture
def two_hosts(tmp_path):
    path = tmp_path / "hosts"
    path.write_text("node-a slots=2\nnode-b slots=2\n")
    return path


def test_per_node_script_builds_the_no_ssh_command(tmp_path, two_hosts):
    proc = _run_script(tmp_path, [str(LAUNCH / "per_node_no_ssh.sh"), "--node_rank", "1", "--num_gpus", "2",
                                  str(two_hosts), "cfg.yaml", "--set", "train.lr=1e-4"])
    assert proc.returncode == 0, proc.stderr
    assert _launches(proc.stdout) == [["--hostfile", str(two_hosts), "--no_ssh", "--node_rank", "1", "--num_nodes", "2",
                                       "--master_addr", "node-a", "--master_port", "29500", "--num_gpus", "2",
                                       "--module", "mtpeft", "train", "cfg.yaml", "--set", "train.lr=1e-4"]]


def test_multi_node_script_passes_the_launcher_through(tmp_path, two_hosts):
    work = tmp_path / "work"
    work.mkdir()
    proc = _run_script(tmp_path, [str(LAUNCH / "multi_node_pdsh.sh"), "--launcher", "openmpi", "--launcher_args",
                                  "-x FOO", str(two_hosts), "cfg.yaml", "--set", "train.lr=1e-4"], cwd=work)
    assert proc.returncode == 0, proc.stderr
    (argv,) = _launches(proc.stdout)
    marker = argv.index("--preempted-file")
    assert argv[:marker] == ["--hostfile", str(two_hosts), "--launcher", "openmpi", "--launcher_args", "-x FOO",
                             "--master_addr", "node-a", "--master_port", "29500", "--module", "mtpeft", "train", "cfg.yaml"]
    assert Path(argv[marker + 1]).parent == work and argv[marker + 2:] == ["--set", "train.lr=1e-4"]
    assert not list(work.iterdir())  # the marker is gone when the launcher is


def test_slurm_script_runs_one_launcher_per_node(tmp_path):
    proc = _run_script(tmp_path, ["bash", str(LAUNCH / "slurm.sbatch"), "cfg.yaml", "--set", "a.b=1"],
                       SLURM_JOB_NODELIST="gpu-node-[1-2]", SLURM_JOB_ID="4242", SLURM_SUBMIT_DIR=str(REPO),
                       GPUS_PER_NODE="4", HOSTFILE=str(tmp_path / "slurm_hosts"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "slurm_hosts").read_text() == "gpu-node-1 slots=4\ngpu-node-2 slots=4\n"
    launches = _launches(proc.stdout)
    assert [cmd[cmd.index("--node_rank") + 1] for cmd in launches] == ["0", "1"]
    for cmd in launches:
        assert cmd[cmd.index("--master_addr") + 1] == "gpu-node-1" and cmd[cmd.index("--master_port") + 1] == "24242"
        assert cmd[-6:] == ["--module", "mtpeft", "train", "cfg.yaml", "--set", "a.b=1"] and "--no_ssh" in cmd
    assert "#SBATCH --signal=TERM@120" in (LAUNCH / "slurm.sbatch").read_text()


@pytest.mark.parametrize("script", ["per_node_no_ssh.sh", "multi_node_pdsh.sh"])
def test_scripts_stop_on_a_bad_hostfile_before_launching(tmp_path, script):
    bad = tmp_path / "bad_hosts"
    bad.write_text("node-a slots=2\nnode-b slots=zero\n")
    argv = [str(LAUNCH / script)] + (["--node_rank", "0"] if script.startswith("per_node") else []) + [str(bad), "cfg.yaml"]
    proc = _run_script(tmp_path, argv)
    assert proc.returncode == 2 and "ARGV" not in proc.stdout
    assert _one_error_line(proc.stderr).startswith(f"error: {bad}:2: ")


def test_per_node_script_rejects_a_node_rank_outside_the_hostfile(tmp_path, two_hosts):
    proc = _run_script(tmp_path, [str(LAUNCH / "per_node_no_ssh.sh"), "--node_rank", "2", str(two_hosts), "cfg.yaml"])
    assert proc.returncode == 2 and "[0, 2)" in _one_error_line(proc.stderr)
