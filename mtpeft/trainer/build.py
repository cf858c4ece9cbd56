"""Assemble what a run trains: tokenizer, frozen backbone (optionally NF4), the shared PEFT module of
``peft.method`` (asked of the tuner registry; nothing here knows one method from another), task heads.

Decoder backbones load as a causal LM; encoder backbones (RoBERTa-style, T5 encoder) through
``AutoModel`` / ``T5EncoderModel``, without an LM head, so generation tasks are refused for them.

The bf16/fp32 base is loaded through transformers' ZeRO-3 path (``HfDeepSpeedConfig`` makes
``from_pretrained`` build under ``deepspeed.zero.Init`` and load each rank's partition); the tuner and
the heads are created under ``zero.Init`` too. All ranks seed identically before creating anything,
so initial weights do not depend on the world size.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from mtpeft.config import RunConfig
from mtpeft.conv1d import as_linear, may_hold_conv1d
from mtpeft.errors import ConfigError
from mtpeft.model_load_errors import MODEL_LOAD_ERRORS, one_line
from mtpeft.tasks.kinds import KINDS
from mtpeft.tuners.keyed_dropout import key_dropouts
from mtpeft.multitask_model import MultitaskModel
from mtpeft.tuners.base import check_virtual_positions
from mtpeft.tuners.family import T5_TYPES, is_encoder
from mtpeft.tuners.registry import make_tuner

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(name_or_path: str):
    try:  # the tokenizer reads config.json too: a bad one is named as such, not as the tokenizer's fault
        AutoConfig.from_pretrained(name_or_path)
    except MODEL_LOAD_ERRORS as exc:
        raise ConfigError(f"model.name_or_path: cannot read the config.json of {name_or_path!r} ({one_line(exc)})") from None
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
    except MODEL_LOAD_ERRORS as exc:
        raise ConfigError(f"model.name_or_path: cannot load a tokenizer from {name_or_path!r} ({one_line(exc)})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def _load_backbone(cfg: RunConfig, ds_config: dict | None):
    path = cfg.model.name_or_path
    if not Path(path).exists() and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ConfigError(f"model.name_or_path: {path!r} is not a local folder and HF_HUB_OFFLINE=1")
    dtype = DTYPES[cfg.model.dtype]
    keep_alive = None
    try:
        config = AutoConfig.from_pretrained(path)
    except MODEL_LOAD_ERRORS as exc:
        raise ConfigError(f"model.name_or_path: cannot load {path!r} ({one_line(exc)})") from None
    # a Conv1D model (GPT-2) loads whole and is partitioned by the engine: its weights are turned first
    if ds_config is not None and cfg.model.quant == "none" and not may_hold_conv1d(_model_class(config)):
        from transformers.integrations import HfDeepSpeedConfig

        keep_alive = HfDeepSpeedConfig(ds_config)  # noqa: F841  (must be alive during from_pretrained)
    try:
        _check_kinds(cfg, config)
        check_virtual_positions(config, 0, cfg.train.max_seq_len)  # the input alone, whatever the method
        make_tuner(cfg.peft, []).check(config, cfg.model.gradient_checkpointing, cfg.train.max_seq_len)
        if cfg.model.quant == "nf4" and Path(path).is_dir():
            # skeleton on meta, shards streamed and quantized module by module, partitioned at once:
            # a rank's peak is its partition plus one module, not the whole model
            from mtpeft.quant.streaming_loader import load_quantized_backbone

            return load_quantized_backbone(path, ds_config, dtype, skip=("lm_head",), model_class=_auto_class(config))
        model = _auto_class(config).from_pretrained(path, dtype=dtype)
    except MODEL_LOAD_ERRORS as exc:
        raise ConfigError(f"model.name_or_path: cannot load {path!r} ({one_line(exc)})") from None
    del keep_alive
    if cfg.model.quant == "nf4":
        from mtpeft.quant import quantize_model

        quantize_model(model, skip=("lm_head",))
    return model


def _auto_class(config):
    if not is_encoder(config):
        return AutoModelForCausalLM
    if config.model_type in T5_TYPES:
        from transformers import T5EncoderModel

        return T5EncoderModel
    return AutoModel


def _model_class(config):
    """The concrete class ``_auto_class(config)`` builds (None where the auto class has no entry)."""
    auto = _auto_class(config)
    mapping = getattr(auto, "_model_mapping", None)
    if mapping is None:
        return auto
    try:
        return mapping[type(config)]
    except KeyError:
        return None


def _check_kinds(cfg: RunConfig, config) -> None:
    if is_encoder(config):
        for i, t in enumerate(cfg.tasks):
            if KINDS[t.kind].uses_lm_head:
                raise ConfigError(f"tasks[{i}] ({t.name}): kind {t.kind} needs a decoder (causal LM) backbone, but "
                                  f"model.name_or_path is a {config.model_type} encoder; drop the task or use a decoder")


def hidden_size(config) -> int:
    return getattr(config, "hidden_size", None) or config.d_model


def build_model(cfg: RunConfig, ds_config: dict | None = None) -> MultitaskModel:
    """The MultitaskModel of ``cfg``; with ``ds_config`` (ZeRO-3) new parameters are partitioned at birth."""
    torch.manual_seed(cfg.train.seed)
    backbone = _load_backbone(cfg, ds_config)
    return assemble(backbone, cfg, ds_config)


def assemble(backbone, cfg: RunConfig, ds_config: dict | None = None) -> MultitaskModel:
    """Freeze ``backbone``, inject the tuner of ``cfg.peft`` and add the task heads."""
    as_linear(backbone)  # GPT-2's Conv1D layers (4-bit ones were turned when quantized)
    backbone.requires_grad_(False)
    if cfg.model.gradient_checkpointing:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tuner = make_tuner(cfg.peft, [t.name for t in cfg.tasks])
    tuner.check(backbone.config, cfg.model.gradient_checkpointing, cfg.train.max_seq_len)
    torch.manual_seed(cfg.train.seed + 1)
    with _zero_init(ds_config):
        input_module = tuner.inject(backbone)
        model = MultitaskModel(backbone, cfg.tasks, hidden_size(backbone.config), input_module=input_module,
                               selector=tuner.selector, is_encoder=is_encoder(backbone.config))
    model.tuner = tuner
    if not cfg.model.gradient_checkpointing:  # recomputation would read the keys of a later pass
        key_dropouts(model, model.dropout_keys)
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
