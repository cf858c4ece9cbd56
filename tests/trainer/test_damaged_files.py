"""Files mtpeft reads back, damaged: a truncated adapter or heads file, a broken manifest, a run
config with a broken line, a truncated checkpoint run state. Each is one CheckpointError naming the
file and what to do; through the CLI one ``error:`` line and exit 2. (A truncated ZeRO shard read by
``export --source checkpoint`` is in test_resume_faults.py, which has real checkpoints.)"""

import shutil
from pathlib import Path

import pytest

from distributed import tiny_config
from mtpeft.cli import main
from mtpeft.config import dump_config, load_config
from mtpeft.data.dist import DistContext
from mtpeft.errors import CheckpointError
from mtpeft.trainer.build import build_model
from mtpeft.trainer.export import export, load_export


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished run's folder as eval reads it: config.yaml and export/."""
    tmp = tmp_path_factory.mktemp("damaged")
    run = tmp / "run"
    cfg = load_config(tiny_config(tmp), [f"output.dir={run}", "peft.r=4"])
    run.mkdir()
    dump_config(cfg, run / "config.yaml")
    export(build_model(cfg), cfg, run / "export", DistContext(0, 1))
    return run


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run_dir, dst)
    return dst


def _cli(capsys, *argv) -> tuple[int, list[str]]:
    """Exit code and the ``error:`` lines (progress bars of model loading may share stderr)."""
    code = main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, [line for line in err.splitlines() if line.startswith("error:")]


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "heads.safetensors", "tasks.json"])
def test_damaged_export_file_is_named(run_dir, tmp_path, name):
    run = _copy(run_dir, tmp_path)
    _truncate(run / "export" / name)
    cfg = load_config(run / "config.yaml")
    with pytest.raises(CheckpointError, match=f"{name}: cannot be read.*export the run again"):
        load_export(build_model(cfg), run / "export")


@pytest.mark.parametrize("text", ["[]", '{"peft": 3}', '"tasks"'])
def test_a_manifest_that_parses_but_is_not_one_is_named(run_dir, tmp_path, capsys, text):
    """Valid JSON of another shape (a list, a scalar, a 'peft' that is not an object) was an
    AttributeError traceback in `mtpeft eval`."""
    run = _copy(run_dir, tmp_path)
    (run / "export" / "tasks.json").write_text(text)
    code, err = _cli(capsys, "eval", str(run))
    assert code == 2 and len(err) == 1 and "tasks.json: not the manifest an export writes" in err[0], err


def test_eval_of_a_run_with_a_truncated_adapter_is_one_error_line(run_dir, tmp_path, capsys):
    run = _copy(run_dir, tmp_path)
    _truncate(run / "export" / "adapter_model.safetensors", 0.3)
    before = (run / "export" / "adapter_model.safetensors").read_bytes()
    code, err = _cli(capsys, "eval", str(run))
    assert code == 2 and len(err) == 1 and "adapter_model.safetensors: cannot be read" in err[0], err
    assert (run / "export" / "adapter_model.safetensors").read_bytes() == before
    assert not (run / "metrics.json").exists()


@pytest.mark.parametrize("text,where", [("model: {name_or_path: [x\n", ":2:"), ("peft: [1, 2\ntasks: {}\n", ":")])
def test_run_config_with_a_broken_line(run_dir, tmp_path, capsys, text, where):
    run = _copy(run_dir, tmp_path)
    (run / "config.yaml").write_text(text)
    code, err = _cli(capsys, "eval", str(run))
    assert code == 2 and len(err) == 1 and "config.yaml" in err[0] and "cannot be read" in err[0], err


def test_truncated_run_state_offers_the_previous_checkpoint(tmp_path):
    from mtpeft.trainer import checkpoint

    ckpt = tmp_path / "checkpoints"
    for tag in ("step5", "step10"):
        (ckpt / tag).mkdir(parents=True)
        import torch

        torch.save({"world_size": 1, "step": int(tag[4:])}, ckpt / tag / "run_state.pt")
    (ckpt / "latest").write_text("step10")
    _truncate(ckpt / "step10" / "run_state.pt", 0.4)
    with pytest.raises(CheckpointError, match=r"run_state.pt: cannot be read.*point .*latest at step5"):
        checkpoint.load(None, ckpt, DistContext(0, 1))


@pytest.mark.parametrize("content", [b"\xff\xfe", b"", b"step9\n"])
def test_a_damaged_latest_pointer_is_named(tmp_path, content):
    """Bytes that are not UTF-8 were a UnicodeDecodeError traceback on resume; every damaged pointer is
    now the same one line, and eval/export find no checkpoint through it instead of failing."""
    from mtpeft.run_dir import latest_checkpoint
    from mtpeft.trainer.checkpoint import latest_tag

    ckpt = tmp_path / "checkpoints"
    (ckpt / "step1").mkdir(parents=True)
    (ckpt / "step1" / "run_state.pt").write_bytes(b"x")
    (ckpt / "latest").write_bytes(content)
    with pytest.raises(CheckpointError, match=r"latest: points at .*, which is not a complete checkpoint"):
        latest_tag(ckpt)
    assert latest_checkpoint(tmp_path) is None
