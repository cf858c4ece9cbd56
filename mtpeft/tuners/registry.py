"""``peft.method`` → the tuner that builds, exports and reloads it. The only place methods are named.

Each method is registered with its own settings dataclass (``LoraSettings``, ``AdapterSettings``,
...: the ``peft`` keys it reads, their defaults and checks). Defaults follow the studies: LoRA and
mtl_lora r=16, α=32, dropout 0.05 on every attention and MLP projection; bottleneck 64 (relu, scale
1) for both adapters; IA3 on k_proj, v_proj (output) and down_proj (input). Prompt and prefix
tuning share ``num_virtual_tokens``, default 20: the code-generation study's prompt length and the
top of the code-analysis study's prefix range (10-20); its prefix runs used 10, so set
``peft.num_virtual_tokens: 10`` to reproduce them.
Names are the Llama ones; RoBERTa-style and T5 encoders map them through ``family.ROLE_ALIASES``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

from mtpeft.errors import ConfigError
from mtpeft.tuners.adapters import AdapterSettings, ParallelAdapterTuner, SerialAdapterTuner
from mtpeft.tuners.base import Tuner
from mtpeft.tuners.ia3 import IA3Settings, IA3Tuner
from mtpeft.tuners.lora import LoraSettings, LoraTuner
from mtpeft.tuners.mtl_lora import MtlLoraTuner
from mtpeft.tuners.prefix import PrefixSettings, PrefixTuner
from mtpeft.tuners.prompt import PromptSettings, PromptTuner
from mtpeft.tuners.settings import field_default, read_settings, settings_fields


class Method(NamedTuple):
    tuner: type[Tuner]
    settings: type  # its settings dataclass: the flat ``peft`` keys it reads, their defaults and checks


METHODS = {  # config validation, the peft section's keys and the memory planner read the names from here
    "lora": Method(LoraTuner, LoraSettings),
    "mtl_lora": Method(MtlLoraTuner, LoraSettings),
    "serial_adapter": Method(SerialAdapterTuner, AdapterSettings),
    "parallel_adapter": Method(ParallelAdapterTuner, AdapterSettings),
    "ia3": Method(IA3Tuner, IA3Settings),
    "prompt": Method(PromptTuner, PromptSettings),
    "prefix": Method(PrefixTuner, PrefixSettings),
}


def method_keys(method: str) -> tuple[str, ...]:
    """The flat ``peft`` keys ``method`` reads (besides ``method``)."""
    return tuple(settings_fields(METHODS[method].settings))


def unread_settings(peft: Any) -> dict[str, list[str]]:
    """Keys of the flat ``peft`` section set to another value than their default that ``peft.method``
    does not read (e.g. ``dropout``, LoRA's, with a serial adapter), each with the methods that do:
    they change nothing in this run. Not an error: a config may hold them to switch ``peft.method``."""
    chosen = set(method_keys(peft.method))
    unread: dict[str, list[str]] = {}
    for name, method in METHODS.items():
        for key, (f, _) in settings_fields(method.settings).items():
            if key not in chosen and getattr(peft, key) != field_default(f):
                unread.setdefault(key, []).append(name)
    return unread


def peft_section_class() -> type:
    """The flat ``peft:`` section users write: ``method`` and every registered method's keys, each
    with the type and default its settings class gives (a key two methods share must agree). Built
    from the registry, so a new method's keys are valid YAML without editing ``config.py``; keys
    of methods other than the chosen one are kept (a config may switch with ``--set peft.method=``,
    and a run's ``config.yaml`` has always held them all)."""
    return _section_class(tuple(dict.fromkeys(m.settings for m in METHODS.values())))


@functools.cache
def _section_class(settings_classes: tuple) -> type:
    fields: dict[str, tuple] = {"method": ("method", str, dataclasses.field(default="lora"))}
    for settings in settings_classes:
        for key, (f, hint) in settings_fields(settings).items():
            if key in fields:
                if fields[key][1] != hint or field_default(fields[key][2]) != field_default(f):
                    raise TypeError(f"peft.{key}: methods disagree on its type or default")
                continue
            default = (dataclasses.field(default_factory=f.default_factory)
                       if f.default_factory is not dataclasses.MISSING else dataclasses.field(default=f.default))
            fields[key] = (key, hint, default)
    cls = dataclasses.make_dataclass("PeftConfig", list(fields.values()), namespace={
        "__doc__": "The flat ``peft:`` section; ``settings()`` is the chosen method's settings object.",
        "settings": lambda self: method_settings(self),
    })
    cls.__module__ = "mtpeft.config"  # where pickle finds it (config's module __getattr__)
    return cls


def method_settings(peft: Any) -> Any:
    """The settings object of ``peft.method``, read from the flat ``peft`` section."""
    if peft.method not in METHODS:
        raise ConfigError(f"peft.method must be one of {', '.join(METHODS)}, got {peft.method!r}")
    return read_settings(METHODS[peft.method].settings, peft)


def check_section(peft: Any) -> None:
    """Every registered settings class checks the keys it reads (a bad value is an error whichever
    method is chosen, so switching ``peft.method`` never meets a bad value late)."""
    for cls in dict.fromkeys(m.settings for m in METHODS.values()):
        read_settings(cls, peft).check()


def planned_as(method: str) -> str:
    """The method whose memory and FLOPs the planner models for ``method`` (mtl_lora: its LoRA; the
    per-task r×r matrices are negligible)."""
    return METHODS[method].tuner.planned_as or method


def make_tuner(peft: Any, task_names: list[str]) -> Tuner:
    """The tuner of ``peft.method``, with its settings read from the ``peft`` section."""
    settings = method_settings(peft)
    return METHODS[peft.method].tuner(settings, task_names)
