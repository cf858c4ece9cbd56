"""What every PEFT method provides, so the trainer, export and reload never special-case one.

A method is a ``Tuner``: built from ``peft`` settings, it injects its layers into the backbone (and
may return an *input module* that rewrites the backbone's inputs, for prompt and prefix tuning),
names its tensors for export, and says whether HF peft can load that export.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from mtpeft.errors import CheckpointError, ConfigError
from mtpeft.tuners.family import T5_TYPES


class TaskSelector:
    """Which task the next forward serves; shared by layers whose weights depend on the task."""

    def __init__(self, names: list[str]):
        self.names = list(names)
        self.index: Optional[int] = None

    def set(self, name: Optional[str]) -> None:
        if name is None:
            return
        if name not in self.names:
            raise KeyError(f"unknown task {name!r}; this model has {self.names}")
        self.index = self.names.index(name)

    def current(self) -> int:
        if self.index is None:
            raise RuntimeError("this tuner needs the active task: call MultitaskModel.set_task(name) first")
        return self.index


class InputModule(nn.Module):
    """Rewrites the backbone's inputs; ``virtual`` positions are prepended to its outputs."""

    virtual: int = 0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, embed: nn.Module,
                decoder: bool) -> dict:
        raise NotImplementedError


class Tuner:
    """Base of every method. ``hf_peft``: the export is HF peft format (``adapter_config.json``)."""

    name = ""
    planned_as = ""  # the method the memory planner models this one as, if not itself
    hf_peft = False
    notice = ""  # set at injection when the default targets became all-linear (an unknown architecture)

    def __init__(self, settings, task_names: list[str]):
        self.settings = settings
        self.task_names = list(task_names)
        self.selector: Optional[TaskSelector] = None

    def check(self, model_config, gradient_checkpointing: bool, max_seq_len: int = 0) -> None:
        """Raise ConfigError if this method cannot run on this backbone / setup."""

    def inject(self, backbone: nn.Module) -> Optional[InputModule]:
        raise NotImplementedError

    def resolved_targets(self) -> dict:
        """After ``inject``: the ``peft`` keys this method read, as resolved on the backbone (the
        per-family names the defaults became); written beside the run's config and in the export."""
        return {}

    def named_tensors(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """Export key → trainable parameter of ``model`` (a MultitaskModel)."""
        raise NotImplementedError

    def export_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The tensors written to the adapter file; called with every tuner parameter gathered."""
        return {k: p.detach().cpu().clone().contiguous() for k, p in self.named_tensors(model).items()}

    def load_tensors(self, model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
        targets = self.named_tensors(model)
        check_keys(targets, tensors, source)
        with torch.no_grad():
            for key, param in targets.items():
                if tuple(param.shape) != tuple(tensors[key].shape):
                    raise CheckpointError(f"{source}: {key} has shape {tuple(tensors[key].shape)}, "
                                          f"this config builds {tuple(param.shape)}")
                param.copy_(tensors[key].to(param.dtype))

    def peft_config(self, model: nn.Module, base_model_name_or_path: str):
        """HF peft config object of the export, or None for methods HF peft does not have."""
        return None

    def manifest(self) -> dict:
        from dataclasses import asdict

        resolved = self.resolved_targets()
        return {"method": self.name, "format": "hf_peft" if self.hf_peft else "mtpeft", **asdict(self.settings),
                **({"resolved": resolved} if resolved else {})}


ABSOLUTE_POSITION_TYPES = ("roberta", "xlm-roberta", "camembert", "bert", "electra", "gpt_bigcode", "gpt2", "openai-gpt")


def check_virtual_positions(model_config, virtual: int, max_seq_len: int) -> None:
    """Prompt and prefix tokens take positions before the input (``virtual``; 0 for the other methods).
    A learned position table (RoBERTa, GPT-BigCode, GPT-2) must hold them and the longest input together, or training indexes past it; rotary
    positions extend past ``max_position_embeddings`` (outside the trained range), so there only the
    virtual tokens alone must fit."""
    positions = getattr(model_config, "max_position_embeddings", None)
    if not positions or model_config.model_type in T5_TYPES:  # relative positions: no table to overrun
        return
    if model_config.model_type in ("roberta", "xlm-roberta", "camembert"):  # positions start after padding_idx
        positions -= (getattr(model_config, "pad_token_id", None) or 1) + 1
    if model_config.model_type in ABSOLUTE_POSITION_TYPES:
        if not virtual and max_seq_len > positions:
            raise ConfigError(f"train.max_seq_len ({max_seq_len}) exceeds the {positions} positions of this "
                              f"{model_config.model_type} model (a learned position table); use at most {positions}")
        if virtual + max_seq_len > positions:
            raise ConfigError(f"peft.num_virtual_tokens ({virtual}) + train.max_seq_len ({max_seq_len}) exceed the "
                              f"{positions} positions of this {model_config.model_type} model; lower one of them")
    elif virtual >= positions:
        raise ConfigError(f"peft.num_virtual_tokens ({virtual}) leaves no room for the input in the {positions} "
                          f"positions of this {model_config.model_type} model; use far fewer (the studies use 10-20)")


def check_keys(targets: dict, loaded: dict, source: str) -> None:
    missing = sorted(set(targets) - set(loaded))
    extra = sorted(set(loaded) - set(targets))
    if missing or extra:
        raise CheckpointError(f"{source}: export does not match this config "
                              f"(missing {missing[:3]}, unexpected {extra[:3]})")


def peft_task_type(model: nn.Module) -> str:
    """HF peft's task type: a causal LM for decoders, bare feature extraction for encoder backbones."""
    return "FEATURE_EXTRACTION" if getattr(model, "is_encoder", False) else "CAUSAL_LM"


class WrappedLinear(nn.Module):
    """A tuner layer around a frozen linear ``self.base`` that still reads as that linear (shape and
    ``weight``), since some models inspect e.g. ``wo.weight.dtype`` (T5)."""

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight
