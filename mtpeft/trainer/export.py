"""Export the shared adapter (HF peft format) and the task heads, and load them back.

Under ZeRO-3 each rank holds a slice of every trainable tensor, so the tensors are gathered
explicitly before rank 0 writes them (a consolidated 16-bit state dict would drop the 4-bit quant
state, and an ungathered save writes empty adapters). The export is written to a temporary folder
and renamed into place, so an interrupted export never replaces a good one.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mtpeft.config import RunConfig
from mtpeft.data.dist import DistContext
from mtpeft.errors import CheckpointError
from mtpeft.tuners.lora import peft_state_dict

ADAPTER_FILE = "adapter_model.safetensors"
HEADS_FILE = "heads.safetensors"


def _gathered(params: list):
    if params and hasattr(params[0], "ds_id"):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def _head_params(model) -> dict:
    return {f"{task}.{name}": p for task, head in model.heads.items() for name, p in head.named_parameters()}


def export(model, cfg: RunConfig, out_dir: Path, ctx: DistContext) -> Path | None:
    """Write ``adapter_config.json``, ``adapter_model.safetensors``, ``heads.safetensors``, ``tasks.json``."""
    lora = peft_state_dict(model.backbone)
    heads = _head_params(model)
    with _gathered(list(lora.values()) + list(heads.values())):
        if not ctx.is_main:
            return None
        lora_t = {k: p.detach().cpu().clone().contiguous() for k, p in lora.items()}
        heads_t = {k: p.detach().cpu().clone().contiguous() for k, p in heads.items()}
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _adapter_config(cfg).save_pretrained(str(tmp))
    save_file(lora_t, str(tmp / ADAPTER_FILE), metadata={"format": "pt"})
    save_file(heads_t, str(tmp / HEADS_FILE), metadata={"format": "pt"})
    (tmp / "tasks.json").write_text(json.dumps(_manifest(cfg, model), indent=2))
    old = out_dir.with_name(out_dir.name + ".old")
    if out_dir.exists():
        shutil.rmtree(old, ignore_errors=True)
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir


def _adapter_config(cfg: RunConfig):
    from peft import LoraConfig

    return LoraConfig(r=cfg.peft.r, lora_alpha=cfg.peft.alpha, lora_dropout=cfg.peft.dropout,
                      target_modules=list(cfg.peft.target_modules), bias="none", task_type="CAUSAL_LM",
                      base_model_name_or_path=cfg.model.name_or_path)


def _manifest(cfg: RunConfig, model) -> dict:
    tasks = []
    for t in cfg.tasks:
        head = model.heads[t.name] if t.name in model.heads else None
        tasks.append({"name": t.name, "kind": t.kind, "format": t.format,
                      "head": type(head).__name__ if head is not None else "lm_head",
                      "head_tensors": sorted(k for k in _head_params(model) if k.startswith(t.name + "."))})
    return {"base_model_name_or_path": cfg.model.name_or_path, "quant": cfg.model.quant,
            "peft": {"method": cfg.peft.method, "r": cfg.peft.r, "alpha": cfg.peft.alpha,
                     "target_modules": list(cfg.peft.target_modules)},
            "adapter_file": ADAPTER_FILE, "heads_file": HEADS_FILE, "tasks": tasks}


def load_export(model, export_dir: Path) -> None:
    """Load an export into a freshly built (non-ZeRO) MultitaskModel, checking every tensor is used."""
    export_dir = Path(export_dir)
    for name in (ADAPTER_FILE, HEADS_FILE):
        if not (export_dir / name).is_file():
            raise CheckpointError(f"{export_dir / name}: missing; re-run `mtpeft export RUN_DIR --out DIR`")
    targets = {**peft_state_dict(model.backbone), **_head_params(model)}
    loaded = {**load_file(str(export_dir / ADAPTER_FILE)), **load_file(str(export_dir / HEADS_FILE))}
    missing = sorted(set(targets) - set(loaded))
    extra = sorted(set(loaded) - set(targets))
    if missing or extra:
        raise CheckpointError(f"{export_dir}: export does not match this config "
                              f"(missing {missing[:3]}, unexpected {extra[:3]})")
    with torch.no_grad():
        for key, param in targets.items():
            param.copy_(loaded[key].to(param.dtype))
