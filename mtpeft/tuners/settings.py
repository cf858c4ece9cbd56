"""A PEFT method's settings dataclass and the flat ``peft:`` keys it reads.

Each method has its own settings class (as HF peft has ``LoraConfig``, ``IA3Config``), registered
beside its tuner in ``tuners/registry.py``. Users still write one flat ``peft:`` section, so a field
whose name is not the YAML key says so in ``metadata={"key": ...}`` (``AdapterSettings.activation``
is ``peft.adapter_activation``); the class's ``check()`` validates the values it holds and raises
``ConfigError`` naming ``peft.<key>``.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from mtpeft.errors import ConfigError


class MethodSettings:
    """Base of every method's settings dataclass."""

    def check(self) -> None:
        """Raise ConfigError (message starting ``peft.<key>``) for a value this method cannot use."""


def peft_key(f: dataclasses.Field) -> str:
    return f.metadata.get("key", f.name)


def settings_fields(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    """Flat ``peft`` key → (the field, its resolved type) of a settings class, in field order."""
    hints = typing.get_type_hints(cls)
    return {peft_key(f): (f, hints[f.name]) for f in dataclasses.fields(cls)}


def field_default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def read_settings(cls: type, section: Any) -> Any:
    """The settings object of ``cls`` read from a ``peft`` section (any object with the flat keys as
    attributes); values are copied, so the settings never share a list with the section."""
    values = {f.name: getattr(section, key) for key, (f, _) in settings_fields(cls).items()}
    return cls(**{k: list(v) if isinstance(v, list) else v for k, v in values.items()})


def positive(key: str, value) -> None:
    if not value > 0:
        raise ConfigError(f"peft.{key} must be positive, got {value}")


def module_names(key: str, names) -> None:
    if not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"peft.{key} must be a list of module names, got {names!r}")
