"""A rerun on a run folder that holds a checkpoint must be the same run: changed model, method,
targets, rank, tasks or seed are refused with the keys named; the free keys (steps, eval/save
settings, timeouts) pass; a damaged config.yaml is named. Through ``mtpeft train`` (one error line,
exit 2) and the guard itself."""

from pathlib import Path

import pytest

from distributed import REPO, tiny_config
from mtpeft.cli import main
from mtpeft.config import dump_config, load_config
from mtpeft.errors import CheckpointError
from mtpeft.trainer.resume_guard import check_same_run

TASKS = REPO / "mtpeft/assets/demo/tasks"


def _run_with_checkpoint(tmp_path: Path, *overrides: str) -> tuple[Path, Path]:
    config = tiny_config(tmp_path)
    run = tmp_path / "run"
    cfg = load_config(config, [f"output.dir={run}", *overrides])
    (run / "checkpoints" / "step5").mkdir(parents=True)
    (run / "checkpoints" / "step5" / "run_state.pt").write_bytes(b"x")
    (run / "checkpoints" / "latest").write_text("step5")
    dump_config(cfg, run / "config.yaml")
    return config, run


@pytest.mark.parametrize("change,named", [
    ("peft.method=ia3", "peft.method: 'lora' -> 'ia3'"),
    ("peft.r=8", "peft.r: 16 -> 8"),
    ("peft.target_modules=[q_proj, v_proj]", "peft.target_modules"),
    ("train.seed=3", "train.seed: 0 -> 3"),
    ("train.micro_batch_size=4", "train.micro_batch_size: 2 -> 4"),
    (f"tasks.codegen.train={TASKS / 'conala_eval.jsonl'}", "tasks.codegen.train"),
    ("sampler.kind=proportional", "sampler.kind"),
])
def test_changed_run_is_refused_with_the_key(tmp_path, change, named):
    config, run = _run_with_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="another configuration") as err:
        check_same_run(load_config(config, [f"output.dir={run}", change]), run)
    assert named in str(err.value)


def test_removed_task_is_refused(tmp_path):
    config, run = _run_with_checkpoint(tmp_path)
    cfg = load_config(config, [f"output.dir={run}"])
    cfg.tasks = cfg.tasks[:3]
    with pytest.raises(CheckpointError, match=r"tasks: \['defect', 'clone', 'search', 'codegen'\] -> "):
        check_same_run(cfg, run)


@pytest.mark.parametrize("change", ["train.max_steps=20", "train.eval_every=4", "train.collective_timeout_s=60",
                                    "tasks.codegen.max_new_tokens=12", "tasks.0.max_eval_examples=5",
                                    "tasks.codegen.bleu=sacrebleu", "tasks.codegen.codebleu=package",
                                    "tasks.search.top_k=100"])
def test_free_keys_may_change(tmp_path, change):
    config, run = _run_with_checkpoint(tmp_path)
    check_same_run(load_config(config, [f"output.dir={run}", change]), run)


def test_no_checkpoint_no_check(tmp_path):
    config, run = _run_with_checkpoint(tmp_path)
    (run / "checkpoints" / "latest").unlink()
    check_same_run(load_config(config, [f"output.dir={run}", "peft.method=ia3"]), run)


def test_cli_refuses_before_touching_the_run(tmp_path, capsys):
    config, run = _run_with_checkpoint(tmp_path)
    before = (run / "config.yaml").read_text()
    code = main(["train", str(config), "--set", f"output.dir={run}", "--set", "peft.method=prefix"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "peft.method: 'lora' -> 'prefix'" in err[0], err
    assert (run / "config.yaml").read_text() == before


def test_damaged_run_config_is_named(tmp_path, capsys):
    config, run = _run_with_checkpoint(tmp_path)
    (run / "config.yaml").write_text("model: {name_or_path: [unclosed\n")
    code = main(["train", str(config), "--set", f"output.dir={run}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "config.yaml:2: the run's own config cannot be read (not valid YAML" in err[0], err
