"""Reopen a finished run directory: its config, a model rebuilt from it, and its trained weights.

Used by ``mtpeft eval`` and ``mtpeft export``: both run in one process, without DeepSpeed, on a
model rebuilt from ``RUN_DIR/config.yaml`` with the weights from the run's export or from its
latest ZeRO-3 checkpoint (consolidated from the partitioned optimizer states).
"""

from __future__ import annotations

from pathlib import Path

import torch

from mtpeft.config import RunConfig, from_dict
from mtpeft.errors import CheckpointError
from mtpeft.trainer.build import build_model
from mtpeft.trainer.damaged import complete_tags, pointer_tag, reading
from mtpeft.trainer.export import load_export
from mtpeft.yaml_files import YamlFileProblem, read_yaml


def load_run_config(run_dir: Path) -> RunConfig:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: not a run directory (no config.yaml); pass the output.dir of a run")
    try:
        raw = read_yaml(path)
    except YamlFileProblem as exc:
        raise CheckpointError(f"{exc.where}: the run's config cannot be read ({exc.problem}); "
                              f"restore it from the config the run was started with") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: not a RunConfig; restore it from the config the run was started with")
    return from_dict(raw, base_dir=Path(run_dir), source=str(path))


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpt = Path(run_dir) / "checkpoints"
    tag = pointer_tag(ckpt)
    if tag and (ckpt / tag).is_dir():
        return ckpt / tag
    return None


def _load_checkpoint(model, tag_dir: Path) -> None:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    others = complete_tags(tag_dir.parent, but=tag_dir.name)
    instead = ("use --source export" + (f", or point {tag_dir.parent / 'latest'} at {others[0]}" if others else ""))
    with reading(tag_dir, instead):
        state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    missing = sorted(trainable - set(state))
    if missing:
        raise CheckpointError(f"{tag_dir}: checkpoint lacks trainable tensors such as {missing[0]}")
    with torch.no_grad():
        for name in trainable:
            params[name].copy_(state[name].to(params[name].dtype))


def load_trained_model(run_dir: Path, source: str = "export"):
    """``source``: ``export`` (RUN_DIR/export) or ``checkpoint`` (the latest ZeRO-3 checkpoint)."""
    cfg = load_run_config(run_dir)
    model = build_model(cfg, ds_config=None)
    if source == "checkpoint":
        tag_dir = latest_checkpoint(run_dir)
        if tag_dir is None:
            raise CheckpointError(f"{run_dir}/checkpoints: no complete checkpoint (set train.save_every)")
        _load_checkpoint(model, tag_dir)
    else:
        load_export(model, Path(run_dir) / "export")
    model.eval()
    return cfg, model
