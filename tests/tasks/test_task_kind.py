"""The TaskKind interface: every shipped kind answers what the trainer, evaluation and profiler ask
(checked against the rule it replaced: tokens and passes read off every ``*mask`` tensor of a
training batch), and a kind added as one file plus one registry line trains in a 2-rank run."""

import json
import sys

import pytest
import torch
import yaml

from builders import kinds_config
from distributed import REPO, deepspeed_cmd, run, tiny_config
from mtpeft.config import load_config
from mtpeft.tasks.kinds import KINDS, make_kind
from mtpeft.trainer.build import load_tokenizer
from mtpeft.trainer.loop import prepare_tasks

sys.path.insert(0, str(REPO / "tests" / "fixtures"))
from focal_kind import FocalClassify, focal_loss  # noqa: E402


def _masks(batch: dict) -> list[torch.Tensor]:
    return [v for k, v in sorted(batch.items()) if k.endswith("mask") and torch.is_tensor(v) and v.dim() == 2]


def test_every_kind_counts_tokens_and_passes_like_the_mask_rule(tmp_path):
    seen = set()
    for cfg in (load_config(tiny_config(tmp_path)), kinds_config()):
        seen |= _check_kinds_of(cfg)
    assert seen == set(KINDS) - {"focal_classify"}


def _check_kinds_of(cfg) -> set:
    tok = load_tokenizer(cfg.model.name_or_path)
    seen = set()
    for task in prepare_tasks(cfg):
        batch = task.kind.collate([task.kind.encode(r, tok, 64) for r in (task.train_set[i] for i in range(3))], tok.pad_token_id)
        masks = _masks(batch)
        assert task.kind.token_count(batch) == int(sum(m.sum() for m in masks)), task.name
        assert sorted(task.kind.backbone_passes(batch)) == sorted(tuple(m.shape) for m in masks), task.name
        assert (task.kind.make_head(8, 0.0) is None) == task.kind.uses_lm_head
        seen.add(task.kind.name)
    return seen


def test_registry_builds_every_kind_from_its_config():
    from mtpeft.config import TaskConfig, TrainConfig

    for name, cls in KINDS.items():
        kind = make_kind(TaskConfig(name="t", kind=name, max_new_tokens=5), TrainConfig(retrieval_temperature=0.3))
        assert type(kind) is cls and kind.name == name and kind.metric
    assert make_kind(TaskConfig(kind="retrieve"), TrainConfig(retrieval_temperature=0.3)).temperature == 0.3


def test_focal_loss_against_float64_by_hand():
    logits, labels = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1.0, 1.0, 0.0])
    p = 1 / (1 + torch.exp(-logits.double()))
    p_t = torch.where(labels.bool(), p, 1 - p)
    expected = (-(1 - p_t) ** 2 * torch.log(p_t)).mean()
    assert focal_loss(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.distributed
def test_a_kind_added_as_one_file_and_one_registry_line_trains_on_two_ranks(tmp_path):
    raw = yaml.safe_load(tiny_config(tmp_path, max_steps=8, lr=5e-3, head_lr=5e-3).read_text())
    raw["tasks"] = [dict(raw["tasks"][0], kind=FocalClassify.name)]  # the defect task (devign format)
    raw["output"]["dir"] = str(tmp_path / "run")
    config = tmp_path / "focal.yaml"
    config.write_text(yaml.safe_dump(raw))
    run(deepspeed_cmd(2, str(REPO / "tests/dist_scripts/train_new_kind.py"), str(config)), tmp_path / "log.txt")
    steps = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    losses = [s["loss"] for s in steps]
    assert len(losses) == 8 and all(0 < v < 1 for v in losses)
    assert sum(losses[-3:]) < sum(losses[:3])  # it trains
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["defect"]["kind"] == "focal_classify" and metrics["defect"]["metric"] == "accuracy"
    assert (tmp_path / "run" / "export" / "tasks.json").is_file()
