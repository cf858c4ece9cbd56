"""Files that ship inside the package: the example RunConfigs (``mtpeft/configs``) and the DeepSpeed
templates (``mtpeft/ds_configs``).

They are found through ``importlib.resources``, so a plain (non-editable) wheel install finds them
wherever site-packages is; the checkout's top-level ``configs/`` and ``ds_configs/`` are links to
the same folders. Wheels install unpacked, so each resource folder is a real directory and a
config's relative data paths resolve against it.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def _folder(name: str) -> Path:
    return Path(str(files("mtpeft") / name))


def run_config_names() -> list[str]:
    """The shipped RunConfigs by bare name (``demo``, ``demo_nf4``, ``analysis``, ``codegen``)."""
    return sorted(p.stem for p in _folder("configs").glob("*.yaml"))


def run_config(name: str) -> Path:
    """A RunConfig argument as a path: the file if one exists there, else the shipped RunConfig of that
    bare name (``demo`` or ``demo.yaml``), else the argument unchanged (for the caller's not-found error)."""
    given = Path(name)
    if given.is_file():
        return given
    stem = name[:-len(".yaml")] if name.endswith(".yaml") else name
    return _folder("configs") / f"{stem}.yaml" if stem in run_config_names() else given


def ds_template_names() -> list[str]:
    """The shipped DeepSpeed templates, as ``deepspeed.config`` accepts them bare (``zero3``)."""
    return sorted(p.stem for p in _folder("ds_configs").glob("*.json"))


def ds_template(name: str) -> Path | None:
    """A shipped DeepSpeed template by bare name (``zero3``) or file name (``zero3.json``); None if unknown."""
    stem = name[:-len(".json")] if name.endswith(".json") else name
    return _folder("ds_configs") / f"{stem}.json" if stem in ds_template_names() else None
