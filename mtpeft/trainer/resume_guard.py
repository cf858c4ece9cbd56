"""Resuming is only exact if the run is the same run: a rerun of a command whose run folder holds a
checkpoint is compared, key by key, with the ``config.yaml`` the run wrote when it started. Keys
that only decide how long to train, when to evaluate or save and how to wait are free to change;
any other difference (model, method, targets, rank, tasks and their data, sampler, weighting, seed,
batch shape, DeepSpeed template) is refused with the keys named, before anything is overwritten."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from mtpeft.config import RunConfig
from mtpeft.errors import CheckpointError
from mtpeft.trainer.checkpoint import latest_tag
from mtpeft.yaml_files import YamlFileProblem, read_yaml

FREE_ON_RESUME = (
    r"train\.(max_steps|eval_every|save_every|keep_checkpoints|max_bad_steps|collective_timeout_s|transfer_every)",
    r"tasks\.[^.]+\.(eval|max_eval_examples|max_new_tokens|bleu|codebleu|top_k)",  # evaluation only
    r"output\.dir",
)


def _flat(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): node}


def _comparable(data: dict) -> dict:
    """Flat ``section.key`` → value, tasks keyed by name (their order is checked apart)."""
    data = dict(data)
    tasks = data.pop("tasks", []) or []
    flat = _flat(data)
    flat["tasks"] = [t.get("name") for t in tasks if isinstance(t, dict)]
    for t in tasks:
        if isinstance(t, dict):
            flat.update(_flat(t, f"tasks.{t.get('name')}."))
    return flat


def check_same_run(cfg: RunConfig, run_dir: Path) -> None:
    """Raise CheckpointError if ``run_dir`` holds a checkpoint of a run configured differently."""
    if latest_tag(run_dir / "checkpoints") is None:
        return
    saved_path = run_dir / "config.yaml"
    try:
        saved = read_yaml(saved_path)
    except YamlFileProblem as exc:
        raise CheckpointError(f"{exc.where}: the run's own config cannot be read ({exc.problem}), so a resume "
                              f"cannot be checked; restore the file or choose a new output.dir") from None
    if not isinstance(saved, dict):
        raise CheckpointError(f"{saved_path}: not a RunConfig; restore the file or choose a new output.dir")
    current = yaml.safe_load(yaml.safe_dump({k: v for k, v in cfg.to_dict().items() if k != "source"}))
    before, now = _comparable(saved), _comparable(current)
    changed = [k for k in sorted(set(before) | set(now))
               if before.get(k) != now.get(k) and not any(re.fullmatch(p, k) for p in FREE_ON_RESUME)]
    if changed:
        shown = "; ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:3])
        more = f" (and {len(changed) - 3} more)" if len(changed) > 3 else ""
        raise CheckpointError(f"{run_dir} holds a checkpoint of another configuration: {shown}{more}. Resume with the "
                              f"run's own settings (only train.max_steps, eval/save settings and timeouts may change) "
                              f"or choose a new output.dir")
