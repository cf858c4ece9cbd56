"""Models and configs several test modules build the same way (imported like ``distributed``)."""

import torch
import yaml

from distributed import REPO, tiny_config
from mtpeft.config import from_dict, load_config
from mtpeft.trainer.build import build_model

DEMO_BASE = REPO / "mtpeft/assets/demo/base_model"
FORMAT_FIXTURES = REPO / "tests" / "fixtures" / "formats"
KINDS_MAX_LEN = 128


def trained_like(tmp_path, method: str, *overrides: str):
    """The demo model with ``method``, every tuner tensor moved off its identity init (an export
    that silently drops tensors cannot then pass a comparison)."""
    cfg = load_config(tiny_config(tmp_path), [f"peft.method={method}", "peft.num_virtual_tokens=6",
                                              "peft.bottleneck=8", "peft.r=4", *overrides])
    model = build_model(cfg).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return cfg, model


def kinds_config(**train):
    """The demo model with a cluster (POJ-104) and a program synthesis (APPS) task on the fixtures."""
    return from_dict({
        "model": {"name_or_path": str(DEMO_BASE)},
        "tasks": [{"name": "poj", "kind": "cluster", "format": "poj104",
                   "train": str(FORMAT_FIXTURES / "poj104.jsonl"), "eval": str(FORMAT_FIXTURES / "poj104.jsonl")},
                  {"name": "apps", "kind": "program_synthesis", "format": "apps", "max_new_tokens": 12,
                   "train": str(FORMAT_FIXTURES / "apps.jsonl"), "eval": str(FORMAT_FIXTURES / "apps.jsonl")}],
        "train": {"max_seq_len": KINDS_MAX_LEN, **train}})


def demo_config_file(tmp_path, **changes):
    """The demo config with absolute paths written to ``tmp_path/run.yaml``; ``changes`` set keys
    by ``section__key`` (list positions by number: ``tasks__0__format``)."""
    raw = yaml.safe_load((REPO / "configs/demo.yaml").read_text())
    raw["model"]["name_or_path"] = str(DEMO_BASE)
    for t in raw["tasks"]:
        for split in ("train", "eval"):
            t[split] = str((REPO / "configs" / t[split]).resolve())
    for dotted, value in changes.items():
        node = raw
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        node[leaf] = value
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path
