"""Output places across the command line (issue 15): for output.dir and every --out (profile,
compare, demo, export), a read-only place, an existing file, a path under a file and a folder holding
a user's files each end in one ``error:`` line, exit 2, no traceback, nothing on disk changed.
``--force`` writes beside a user's files and never deletes or replaces one."""

import hashlib
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from builders import demo_config_file
from distributed import REPO, env, tiny_config
from mtpeft.cli import main


def _hashes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def _one_error(capsys, *argv) -> str:
    code = main(list(argv))
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, (code, err[-2000:])
    return errors[0]


def _commands(cfg: Path, run: Path, out: Path) -> dict:
    """Each output flag, pointed at ``out``."""
    return {"output.dir": ["train", str(cfg), "--set", f"output.dir={out}"],
            "profile --out": ["profile", str(cfg), "--out", str(out)],
            "compare --out": ["compare", str(cfg), "--out", str(out)],
            "demo --out": ["demo", "--config", str(cfg), "--out", str(out)],
            "export --out": ["export", str(run), "--out", str(out)]}


FLAGS = ["output.dir", "profile --out", "compare --out", "demo --out", "export --out"]


@pytest.fixture
def setup(tmp_path):
    run = tmp_path / "run"  # a run folder as export reads it; the model is never loaded in these cases
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("model: {}\n")
    return demo_config_file(tmp_path, output__dir=str(tmp_path / "cfg_run")), run


@pytest.fixture
def read_only(tmp_path):
    """A folder nobody may write into: chmod for an ordinary user; root ignores modes, so for root a
    read-only tmpfs (skipped where mounting is not allowed)."""
    import os

    place = tmp_path / "ro"
    place.mkdir()
    if os.getuid() != 0:
        place.chmod(0o555)
        yield place
        place.chmod(0o755)
        return
    name = f"mtpeft-ro-{uuid.uuid4().hex[:8]}"
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", name, str(place)], capture_output=True).returncode:
        pytest.skip("root, and no read-only tmpfs can be mounted here")
    try:
        yield place
    finally:
        subprocess.run(["umount", str(place)], capture_output=True)


@pytest.mark.parametrize("flag", FLAGS)
def test_a_read_only_place(setup, read_only, capsys, flag):
    cfg, run = setup
    line = _one_error(capsys, *_commands(cfg, run, read_only / "out")[flag])
    assert "is not writable; choose another folder" in line and str(read_only) in line, line
    assert not (read_only / "out").exists()


@pytest.mark.parametrize("flag", FLAGS)
def test_an_existing_file(setup, tmp_path, capsys, flag):
    cfg, run = setup
    taken = tmp_path / "taken"
    taken.write_text("mine")
    line = _one_error(capsys, *_commands(cfg, run, taken)[flag])
    assert "is an existing file" in line and taken.read_text() == "mine", line


@pytest.mark.parametrize("flag", FLAGS)
def test_a_path_under_a_file(setup, tmp_path, capsys, flag):
    cfg, run = setup
    taken = tmp_path / "taken"
    taken.write_text("mine")
    line = _one_error(capsys, *_commands(cfg, run, taken / "out")[flag])
    assert f"lies under {taken}, which is a file" in line and taken.read_text() == "mine", line


@pytest.mark.parametrize("flag", FLAGS)
def test_a_folder_holding_a_users_files(setup, tmp_path, capsys, flag):
    cfg, run = setup
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    (mine / "data").mkdir()
    (mine / "data" / "rows.jsonl").write_text("{}\n")
    before = _hashes(mine)
    line = _one_error(capsys, *_commands(cfg, run, mine)[flag])
    assert "'data' and 1 more" in line and "--force" in line, line
    assert _hashes(mine) == before


def test_force_still_refuses_to_replace_a_file_under_one_of_mtpefts_names(setup, tmp_path, capsys):
    cfg, _ = setup
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    (mine / "metrics.json").write_text('{"mine": 1}')
    before = _hashes(mine)
    line = _one_error(capsys, "train", str(cfg), "--set", f"output.dir={mine}", "--force")
    assert "holds 'metrics.json' beside files mtpeft did not write" in line and _hashes(mine) == before


@pytest.mark.parametrize("as_file", [False, True])
def test_a_run_folder_whose_export_is_a_users(setup, tmp_path, capsys, as_file):
    cfg, _ = setup
    out = tmp_path / "earlier"
    out.mkdir()
    (out / "config.yaml").write_text("model: {}\n")
    if as_file:
        (out / "export").write_bytes(b"\x01")
    else:
        (out / "export").mkdir()
        (out / "export" / "my_adapter.bin").write_bytes(b"\x01")
    before = _hashes(out)
    line = _one_error(capsys, "train", str(cfg), "--set", f"output.dir={out}")
    assert ("export is a file" if as_file else "export holds 'my_adapter.bin'") in line and _hashes(out) == before


@pytest.fixture(scope="module")
def forced_run(tmp_path_factory) -> dict:
    """One real run trained with --force into a folder that already holds a user's notes."""
    tmp = tmp_path_factory.mktemp("forced")
    cfg = tiny_config(tmp, max_steps=2)
    run = tmp / "shared"
    run.mkdir()
    (run / "notes.txt").write_text("the user's notes")
    proc = subprocess.run([sys.executable, "-m", "mtpeft", "train", str(cfg), "--set", f"output.dir={run}", "--force"],
                          capture_output=True, text=True, timeout=600, env=env(), cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"run": run, "proc": proc}


@pytest.mark.distributed
def test_train_with_force_writes_beside_a_users_file(forced_run):
    run = forced_run["run"]
    assert (run / "notes.txt").read_text() == "the user's notes"
    assert (run / "metrics.json").is_file() and (run / "export" / "adapter_model.safetensors").is_file()


@pytest.mark.distributed
def test_export_with_force_beside_a_users_files_and_into_the_run_folder(forced_run, tmp_path, capsys):
    run = forced_run["run"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert main(["export", str(run), "--out", str(mine), "--force"]) == 0
    assert (mine / "notes.txt").read_text() == "keep me"
    assert {"adapter_model.safetensors", "heads.safetensors", "tasks.json"} <= {p.name for p in mine.iterdir()}
    before = _hashes(run)
    assert main(["export", str(run), "--out", str(run), "--force"]) == 0
    after = _hashes(run)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing of the run changed
    assert set(after) - set(before) >= {"adapter_model.safetensors", "heads.safetensors", "tasks.json"}
    assert not [p for p in (*run.iterdir(), *run.parent.iterdir(), *mine.iterdir()) if ".tmp-" in p.name]
    assert main(["export", str(run), "--out", str(run), "--force"]) == 0  # again: the previous export's files
    again = _hashes(run)
    assert {k: v for k, v in again.items() if k in before} == before and set(again) == set(after)
    (run / "adapter_config.json").write_text("{}")  # edited by hand: no longer the export's own
    line = _one_error(capsys, "export", str(run), "--out", str(run), "--force")
    assert "holds 'adapter_config.json' beside files mtpeft did not write" in line


@pytest.mark.parametrize("case", ["existing file", "folder", "under a file"])
def test_zero_shot_out_is_checked_before_the_model_loads(capsys, tmp_path, case):
    """eval --zero-shot --out FILE: an existing file is never replaced, a folder or a path under a
    file is refused; all before the (missing) model is loaded, so the error names --out."""
    cfg = demo_config_file(tmp_path, output__dir=str(tmp_path / "cfg_run"))
    target = {"existing file": tmp_path / "metrics.json", "folder": tmp_path / "a_folder",
              "under a file": tmp_path / "plain" / "metrics.json"}[case]
    if case == "existing file":
        target.write_text("a user's file\n")
    elif case == "folder":
        target.mkdir()
    else:
        (tmp_path / "plain").write_text("x")
    before = _hashes(tmp_path)
    line = _one_error(capsys, "eval", "--zero-shot", str(tmp_path / "no_such_model"), "--tasks", str(cfg),
                      "--out", str(target))
    assert "--out" in line, line
    assert _hashes(tmp_path) == before
