"""A model folder or config.json that transformers cannot use, the class: a config value its checks
reject (heads that do not divide the width, a string for a number, a zero size), a config that is not
JSON or is missing, weights cut short or missing, a broken tokenizer. Every command that reads one
(train in bf16 and NF4, eval --zero-shot, plan --model) ends in one ``error:`` line naming the
folder or file, exit status 2, no traceback, and the folder unchanged."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from builders import demo_config_file
from distributed import REPO
from mtpeft.cli import main

BASE = REPO / "mtpeft/assets/demo/base_model"


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


FOLDER_DAMAGE = {
    "heads do not divide the width": lambda f: _edit_config(f, num_attention_heads=5),
    "a string for a number": lambda f: _edit_config(f, hidden_size="wide"),
    "a zero head count": lambda f: _edit_config(f, num_attention_heads=0),
    "config.json not JSON": lambda f: (f / "config.json").write_text('{"model_type": "llama",'),
    "no config.json": lambda f: (f / "config.json").unlink(),
    "weights cut short": lambda f: (f / "model.safetensors").write_bytes((BASE / "model.safetensors").read_bytes()[:5000]),
    "no weights": lambda f: (f / "model.safetensors").unlink(),
    "tokenizer.json broken": lambda f: (f / "tokenizer.json").write_text('{"version": '),
}


def _hashes(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _one_error(capsys, argv, folder: Path) -> str:
    before = _hashes(folder)
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], (code, err)
    assert _hashes(folder) == before
    return err[0]


@pytest.fixture(params=sorted(FOLDER_DAMAGE))
def damaged_model(request, tmp_path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(BASE, folder)
    FOLDER_DAMAGE[request.param](folder)
    return folder


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_train_names_the_model_folder(damaged_model, tmp_path, capsys, quant):
    cfg = demo_config_file(tmp_path, output__dir=str(tmp_path / "run"))
    line = _one_error(capsys, ["train", str(cfg), "--set", f"model.name_or_path={damaged_model}",
                               "--set", f"model.quant={quant}", "--set", "train.max_steps=1"], damaged_model)
    assert str(damaged_model) in line, line


@pytest.mark.parametrize("case", ["heads do not divide the width", "weights cut short", "tokenizer.json broken"])
def test_zero_shot_names_the_model_folder(tmp_path, capsys, case):
    folder = tmp_path / "model"
    shutil.copytree(BASE, folder)
    FOLDER_DAMAGE[case](folder)
    cfg = demo_config_file(tmp_path, output__dir=str(tmp_path / "run"))
    line = _one_error(capsys, ["eval", "--zero-shot", str(folder), "--tasks", str(cfg),
                               "--out", str(tmp_path / "zs.json")], folder)
    assert str(folder) in line and not (tmp_path / "zs.json").exists(), line


PLAN_CONFIGS = {
    "heads do not divide the width": ({"num_attention_heads": 3}, "not a multiple of the number of attention heads"),
    "a string for a number": ({"hidden_size": "big"}, "hidden_size"),
    "a zero head count": ({"num_attention_heads": 0}, "division"),
    "not a language model": ({"model_type": "vit"}, "ViTConfig"),
}


@pytest.mark.parametrize("case", sorted(PLAN_CONFIGS))
def test_plan_names_the_config_file(tmp_path, capsys, case):
    changes, expect = PLAN_CONFIGS[case]
    config = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
              "intermediate_size": 128, "vocab_size": 100, **changes}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    line = _one_error(capsys, ["plan", "--model", str(path)], tmp_path)
    assert str(path) in line and expect in line, line
