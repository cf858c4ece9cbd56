"""Every bad input of issue 2 item 9 gives one ``error:`` line naming file/line/key, exit 2, no traceback."""

import json
import subprocess
import sys
from pathlib import Path

import yaml

from builders import demo_config_file
from distributed import REPO
from mtpeft.cli import main

TASKS = REPO / "mtpeft/assets/demo/tasks"


def _config(tmp_path: Path, **changes) -> Path:
    return demo_config_file(tmp_path, **changes)


def _run(capsys, *argv) -> str:
    code = main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_unknown_key_suggests_nearest(tmp_path, capsys):
    raw = yaml.safe_load(_config(tmp_path).read_text())
    raw["train"]["max_step"] = 3
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    line = _run(capsys, "train", str(tmp_path / "run.yaml"))
    assert "train.max_step" in line and "did you mean train.max_steps" in line


def test_unknown_override_key(tmp_path, capsys):
    line = _run(capsys, "train", str(_config(tmp_path)), "--set", "peft.rank=8")
    assert "peft.rank" in line and "peft.r" in line


def test_wrong_value_type(tmp_path, capsys):
    line = _run(capsys, "train", str(_config(tmp_path)), "--set", "train.max_steps=many")
    assert "train.max_steps must be an integer" in line


def test_missing_config_file(tmp_path, capsys):
    line = _run(capsys, "train", str(tmp_path / "nope.yaml"))
    assert "nope.yaml" in line and "not found" in line


def test_missing_dataset_file(tmp_path, capsys):
    line = _run(capsys, "train", str(_config(tmp_path, tasks__0__train=str(tmp_path / "gone.jsonl"))))
    assert "tasks[0].train" in line and "gone.jsonl" in line


def test_malformed_jsonl_row_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    lines = (TASKS / "devign_train.jsonl").read_text().splitlines()[:5]
    lines[3] = lines[3][:-5]  # cut the closing brace off line 4
    bad.write_text("\n".join(lines) + "\n")
    line = _run(capsys, "train", str(_config(tmp_path, tasks__0__train=str(bad))))
    assert f"{bad}:4:" in line and "malformed JSON" in line


def test_missing_required_field(tmp_path, capsys):
    bad = tmp_path / "nolabel.jsonl"
    rows = [json.loads(x) for x in (TASKS / "devign_train.jsonl").read_text().splitlines()[:3]]
    del rows[2]["target"]
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    line = _run(capsys, "train", str(_config(tmp_path, tasks__0__train=str(bad))))
    assert f"{bad}:3:" in line and "'target'" in line


def test_empty_dataset(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    line = _run(capsys, "train", str(_config(tmp_path, tasks__1__eval=str(empty))))
    assert str(empty) in line and "empty" in line


def test_unknown_task_kind(tmp_path, capsys):
    line = _run(capsys, "train", str(_config(tmp_path, tasks__0__kind="clasify")))
    assert "tasks[0].kind" in line and "did you mean classify" in line


def test_unknown_format(tmp_path, capsys):
    line = _run(capsys, "train", str(_config(tmp_path, tasks__2__format="advtset")))
    assert "tasks[2].format" in line and "did you mean advtest" in line


def test_console_script_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mtpeft", "train", str(_config(tmp_path)), "--set", "train.lr=-1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: " + f"{tmp_path / 'run.yaml'}: train.lr must be positive, got -1.0"
