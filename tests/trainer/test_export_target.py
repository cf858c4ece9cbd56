"""``mtpeft export --out`` and ``export()`` never cost the user a file: a folder holding anything an
export did not write, the run folder itself and an existing file are refused (one ``error:`` line,
exit 2, nothing changed); a new folder, an empty one and a previous export are written."""

from pathlib import Path

import pytest

from distributed import tiny_config
from mtpeft.cli import main
from mtpeft.config import load_config
from mtpeft.data.dist import DistContext
from mtpeft.errors import UserError
from mtpeft.trainer.build import build_model
from mtpeft.trainer.export import EXPORT_FILES, export



def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def _refused(capsys, run_dir: Path, out: Path, match: str) -> None:
    code = main(["export", str(run_dir), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and match in err[0], err


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("model: {}\n")
    (run / "log.jsonl").write_text('{"step": 1}\n')
    return run


def test_cli_refuses_a_folder_with_a_users_file(tmp_path, capsys, run_dir):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "tasks.json").write_text("{}")  # export-named files do not make the others ours
    before = _snapshot(out)
    _refused(capsys, run_dir, out, "notes.txt")
    assert _snapshot(out) == before


def test_cli_refuses_a_subfolder_too(tmp_path, capsys, run_dir):
    out = tmp_path / "mine"
    (out / "adapter_model.safetensors").mkdir(parents=True)  # an export file name, but a folder
    _refused(capsys, run_dir, out, "adapter_model.safetensors")
    assert (out / "adapter_model.safetensors").is_dir()


def test_cli_refuses_the_run_folder_and_its_parent(tmp_path, capsys, run_dir):
    before = _snapshot(run_dir)
    _refused(capsys, run_dir, run_dir, "run folder itself")
    _refused(capsys, run_dir, run_dir / ".." / "run", "run folder itself")
    _refused(capsys, run_dir, tmp_path, "'run'")  # the parent holds the run folder
    assert _snapshot(run_dir) == before


def test_cli_refuses_an_existing_file(tmp_path, capsys, run_dir):
    out = tmp_path / "model.bin"
    out.write_bytes(b"\x00\x01")
    _refused(capsys, run_dir, out, "existing file")
    assert out.read_bytes() == b"\x00\x01" and not (tmp_path / "model.bin.old").exists()


def test_export_replaces_only_a_previous_export(tmp_path):
    cfg = load_config(tiny_config(tmp_path), ["peft.method=lora", "peft.r=4"])
    model = build_model(cfg).eval()
    out = tmp_path / "exp"
    export(model, cfg, out, DistContext(0, 1))
    first = _snapshot(out)
    assert set(first) <= set(EXPORT_FILES) and "tasks.json" in first
    export(model, cfg, out, DistContext(0, 1))  # a previous export is replaced
    assert _snapshot(out) == first
    (out / "README.md").write_text("mine")
    with pytest.raises(UserError, match="README.md"):
        export(model, cfg, out, DistContext(0, 1))
    assert (out / "README.md").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".exp")) == []  # no temp left
    empty = tmp_path / "empty"
    empty.mkdir()
    assert export(model, cfg, empty, DistContext(0, 1)) == empty and (empty / "tasks.json").is_file()


def test_force_export_again_beside_a_users_file_replaces_only_its_own_files(tmp_path):
    """The manifest's SHA-256 list proves which files a previous export wrote; a method switch drops
    the previous export's adapter_config.json, and a file edited since is a stranger's again."""
    lora = load_config(tiny_config(tmp_path), ["peft.method=lora", "peft.r=4"])
    serial = load_config(tiny_config(tmp_path, "serial.yaml"), ["peft.method=serial_adapter"])
    out = tmp_path / "shared"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    export(build_model(lora).eval(), lora, out, DistContext(0, 1), force=True)
    assert "adapter_config.json" in _snapshot(out)
    export(build_model(serial).eval(), serial, out, DistContext(0, 1), force=True)
    second = _snapshot(out)
    assert set(second) == {"notes.txt", "adapter_model.safetensors", "heads.safetensors", "tasks.json"}
    assert second["notes.txt"] == b"keep me"
    import json

    assert json.loads(second["tasks.json"])["peft"]["method"] == "serial_adapter"
    (out / "heads.safetensors").write_bytes(second["heads.safetensors"] + b"\x00")  # touched by someone
    touched = _snapshot(out)
    with pytest.raises(UserError, match="beside files mtpeft did not write"):
        export(build_model(serial).eval(), serial, out, DistContext(0, 1), force=True)
    assert _snapshot(out) == touched
