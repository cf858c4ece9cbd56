"""Assemble what a run trains: tokenizer, frozen backbone (optionally NF4), shared LoRA, task heads.

The bf16/fp32 base is loaded through transformers' ZeRO-3 path (``HfDeepSpeedConfig`` makes
``from_pretrained`` build under ``deepspeed.zero.Init`` and load each rank's partition); the LoRA and
the heads are created under ``zero.Init`` too. All ranks seed identically before creating anything,
so initial weights do not depend on the world size.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from mtpeft.config import RunConfig
from mtpeft.errors import ConfigError
from mtpeft.multitask_model import MultitaskModel
from mtpeft.tuners.lora import LoraSettings, inject_lora

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(name_or_path: str):
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model.name_or_path: cannot load a tokenizer from {name_or_path!r} "
                          f"({str(exc).splitlines()[0][:160]})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def _load_backbone(cfg: RunConfig, ds_config: dict | None):
    path = cfg.model.name_or_path
    if not Path(path).exists() and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ConfigError(f"model.name_or_path: {path!r} is not a local folder and HF_HUB_OFFLINE=1")
    dtype = DTYPES[cfg.model.dtype]
    keep_alive = None
    if ds_config is not None and cfg.model.quant == "none":
        from transformers.integrations import HfDeepSpeedConfig

        keep_alive = HfDeepSpeedConfig(ds_config)  # noqa: F841  (must be alive during from_pretrained)
    try:
        AutoConfig.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model.name_or_path: cannot load {path!r} ({str(exc).splitlines()[0][:160]})") from None
    del keep_alive
    if cfg.model.quant == "nf4":
        from mtpeft.quant import quantize_model

        quantize_model(model, skip=("lm_head",))
    return model


def build_model(cfg: RunConfig, ds_config: dict | None = None) -> MultitaskModel:
    """The MultitaskModel of ``cfg``; with ``ds_config`` (ZeRO-3) new parameters are partitioned at birth."""
    torch.manual_seed(cfg.train.seed)
    backbone = _load_backbone(cfg, ds_config)
    backbone.requires_grad_(False)
    if cfg.model.gradient_checkpointing:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    settings = LoraSettings(r=cfg.peft.r, alpha=cfg.peft.alpha, dropout=cfg.peft.dropout,
                            target_modules=list(cfg.peft.target_modules))
    torch.manual_seed(cfg.train.seed + 1)
    with _zero_init(ds_config):
        inject_lora(backbone, settings)
        model = MultitaskModel(backbone, cfg.tasks, backbone.config.hidden_size)
    if DTYPES[cfg.model.dtype] != torch.float32:
        model.heads.to(DTYPES[cfg.model.dtype])
    return model


def _zero_init(ds_config: dict | None):
    if ds_config is None or ds_config.get("zero_optimization", {}).get("stage") != 3:
        import contextlib

        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.Init(config_dict_or_path=ds_config)


def trainable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
