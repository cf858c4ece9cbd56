"""RunConfig: the whole experiment in one typed object.

Loaded from YAML, then ``--set a.b=value`` overrides; every key is checked against the dataclass
fields so a typo is an ``error:`` naming the key and the nearest valid one, never a silent default.
Relative paths are resolved against the YAML file's folder, so a config and its data travel together.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from mtpeft.errors import ConfigError
from mtpeft.output_folder import check_output_folder
from mtpeft.shipped_files import run_config, run_config_names
from mtpeft.yaml_files import YamlFileProblem, read_yaml


@dataclass
class ModelConfig:
    name_or_path: str = ""
    quant: str = "none"
    dtype: str = "float32"
    gradient_checkpointing: bool = False


@dataclass
class TaskConfig:
    name: str = ""
    kind: str = ""
    format: str = ""
    train: str = ""
    eval: str = ""
    max_eval_examples: int = 0
    head_dropout: float = 0.1
    max_new_tokens: int = 32
    metric: str = ""  # the headline metric, among the kind's (classify: accuracy | f1); "" = the kind's default
    num_beams: int = 1  # generation eval: 1 greedy, k > 1 beam search with EM@k (the code-generation study: 10)
    bleu: str = "study"  # generation eval: a name in tasks/bleu.py's BLEU_CONVENTIONS
    codebleu: str = "codexglue"  # generation eval: a name in tasks/codebleu.py's CODEBLEU_CONVENTIONS
    top_k: Optional[int] = None  # retrieval eval: MRR over each query's top-k list (None: every rank; AdvTest: 100)


@dataclass
class SamplerConfig:
    kind: str = "round_robin"
    temperature: float = 0.5  # p_i ∝ N_i^T for kind: temperature


@dataclass
class WeightingConfig:
    kind: str = "uniform"
    weights: dict = field(default_factory=dict)  # task name -> weight, for kind: static
    temperature: float = 2.0  # dwa
    alpha: float = 1.5  # gradnorm
    lr: float = 0.025  # learnable weights (softmax_learnable, uncertainty, famo, gradnorm)
    gamma: float = 0.01  # famo's decay of its logits


@dataclass
class TrainConfig:
    max_steps: int = 100
    micro_batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    head_lr: float = 0.0
    weight_decay: float = 0.0
    warmup_steps: int = 0
    seed: int = 0
    max_seq_len: int = 256
    eval_every: int = 0
    save_every: int = 0
    retrieval_temperature: float = 0.05
    transfer_every: int = 0  # gradient cosine between tasks every N steps (0: off)
    keep_checkpoints: int = 2
    max_bad_steps: int = 3  # non-finite losses in a row before the run stops
    collective_timeout_s: float = 1800.0
    logits_chunk: int = 0  # generation loss: 0 automatic (chunked above 256 MiB of fp32 logits), -1 full, N tokens


@dataclass
class DeepSpeedSection:
    config: str = "zero3.json"
    overrides: dict = field(default_factory=dict)


@dataclass
class OutputConfig:
    dir: str = "runs/default"


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    peft: Any = field(default_factory=lambda: peft_section_class()())  # the flat peft: section (see PeftConfig)
    tasks: list = field(default_factory=list)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    weighting: WeightingConfig = field(default_factory=WeightingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    output: OutputConfig = field(default_factory=OutputConfig)
    source: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def peft_section_class() -> type:
    """``PeftConfig``: ``method`` and the keys of every method's settings dataclass, built from the
    tuner registry (imported on first use, so that loading this module does not import the tuners)."""
    from mtpeft.tuners.registry import peft_section_class as built

    return built()


def __getattr__(name: str):
    if name == "PeftConfig":
        return peft_section_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_CHOICES = {
    "model.quant": ("none", "nf4"),
    "model.dtype": ("float32", "bfloat16", "float16"),
}


def _registered_choices() -> dict[str, tuple]:
    """Names that live in their registries (imported here, at validation, so that loading the config
    module does not import every tuner, sampler and weighting)."""
    from mtpeft.data.schedule import SAMPLER_KINDS
    from mtpeft.trainer.weighting import WEIGHTING_KINDS
    from mtpeft.tuners.registry import METHODS

    return {"peft.method": tuple(METHODS), "sampler.kind": SAMPLER_KINDS, "weighting.kind": WEIGHTING_KINDS}


_PATH_KEYS = ("train", "eval")


def load_config(path: str | Path, overrides: Optional[list[str]] = None) -> RunConfig:
    """Read a YAML RunConfig (a path, or a shipped config's bare name such as ``demo``), apply
    ``a.b=value`` overrides and validate everything."""
    path = run_config(str(path))
    if path.is_dir():
        own = path / "config.yaml"
        hint = (f"to continue or redo that run, pass {own}" if own.is_file() else
                "pass the path of a YAML RunConfig file")
        raise ConfigError(f"{path}: a folder, not a RunConfig; {hint}")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found; pass the path of a YAML RunConfig "
                          f"or a shipped one ({', '.join(run_config_names())})")
    try:
        raw = read_yaml(path)
    except YamlFileProblem as exc:
        raise ConfigError(f"{exc.where}: {exc.problem}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model, peft, tasks, ...)")
    for item in overrides or []:
        _apply_override(raw, item)
    return from_dict(raw, base_dir=path.resolve().parent, source=str(path))


def from_dict(raw: dict, base_dir: Path = Path("."), source: str = "<dict>") -> RunConfig:
    cfg = _build(RunConfig, raw, "", source)
    cfg.source = source
    cfg.tasks = [_build(TaskConfig, t, f"tasks[{i}].", source) if isinstance(t, dict) else _not_mapping(i, source)
                 for i, t in enumerate(cfg.tasks)]
    _validate(cfg, base_dir, source)
    return cfg


def _not_mapping(i: int, source: str):
    raise ConfigError(f"{source}: tasks[{i}] must be a mapping with name, kind, format, train, eval")


def _list_index(node: list, part: str, key: str) -> int:
    """A list position named by index or, for a list of named entries (``tasks``), by name."""
    names = [e.get("name") for e in node if isinstance(e, dict)]
    if part.isdigit() and int(part) < len(node):
        return int(part)
    if part in names:
        return names.index(part)
    by_name = f" or a name ({', '.join(str(n) for n in names)})" if any(names) else ""
    raise ConfigError(f"--set {key}: {part!r} is not an entry of a list of {len(node)}; "
                      f"use an index 0..{len(node) - 1}{by_name}")


def _apply_override(raw: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lr=1e-4")
    key, value = item.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"--set {key}: empty part in the key; write sections with dots, e.g. train.lr")
    node = raw
    for i, part in enumerate(parts[:-1]):
        where = ".".join(parts[:i + 1])
        if isinstance(node, list):
            node = node[_list_index(node, part, key)]
        elif isinstance(node, dict):
            node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"--set {key}: {where} is a value, not a section")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: {value!r} is not valid YAML ({getattr(exc, 'problem', exc)}); "
                          f"close the brackets or quote the value") from None
    if isinstance(node, list):
        node[_list_index(node, parts[-1], key)] = parsed
    else:
        node[parts[-1]] = parsed


def _build(cls, raw: Any, prefix: str, source: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'} must be a mapping")
    hints = {**typing.get_type_hints(cls), **({"peft": peft_section_class()} if cls is RunConfig else {})}
    names = [f.name for f in dataclasses.fields(cls) if f.name != "source"]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {prefix}{near[0]}?" if near else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"{source}: unknown config key {prefix}{key}{hint}")
        kwargs[key] = _coerce(hints[key], value, f"{prefix}{key}", source)
    return cls(**kwargs)


def _coerce(hint, value, key: str, source: str):
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".", source)
    expected = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
                list: "a list", dict: "a mapping"}
    origin = typing.get_origin(hint) or hint
    if origin is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if origin in expected and not (isinstance(value, origin) and not (origin is int and isinstance(value, bool))):
        raise ConfigError(f"{source}: {key} must be {expected[origin]}, got {value!r} ({type(value).__name__})")
    return value


def _validate(cfg: RunConfig, base_dir: Path, source: str) -> None:
    for key, allowed in {**_CHOICES, **_registered_choices()}.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ConfigError(f"{source}: {key} must be one of {', '.join(allowed)}, got {value!r}")
    if not cfg.model.name_or_path:
        raise ConfigError(f"{source}: model.name_or_path is required (a local model folder or a hub id)")
    local = base_dir / cfg.model.name_or_path
    if local.exists():
        cfg.model.name_or_path = str(local.resolve())
    if not cfg.tasks:
        raise ConfigError(f"{source}: tasks is empty; list at least one task with name, kind, format, train, eval")
    from mtpeft.tasks.bleu import BLEU_CONVENTIONS
    from mtpeft.tasks.codebleu import CODEBLEU_CONVENTIONS
    from mtpeft.tasks.formats import FORMATS
    from mtpeft.tasks.kinds import KINDS

    seen = set()
    for i, task in enumerate(cfg.tasks):
        where = f"{source}: tasks[{i}]"
        for req in ("name", "kind", "format", "train", "eval"):
            if not getattr(task, req):
                raise ConfigError(f"{where}.{req} is required")
        if task.name in seen:
            raise ConfigError(f"{where}.name {task.name!r} is used twice; task names must be unique")
        seen.add(task.name)
        for key in ("max_new_tokens", "num_beams"):
            if getattr(task, key) < 1:
                raise ConfigError(f"{where}.{key} must be at least 1, got {getattr(task, key)}")
        if task.max_eval_examples < 0:
            raise ConfigError(f"{where}.max_eval_examples must be 0 (all) or more, got {task.max_eval_examples}")
        if not 0.0 <= task.head_dropout < 1.0:
            raise ConfigError(f"{where}.head_dropout must be in [0, 1), got {task.head_dropout}")
        if task.kind not in KINDS:
            near = difflib.get_close_matches(task.kind, list(KINDS), n=1)
            hint = f"; did you mean {near[0]}?" if near else ""
            raise ConfigError(f"{where}.kind: unknown task kind {task.kind!r} (one of {', '.join(KINDS)}){hint}")
        if task.format not in FORMATS:
            near = difflib.get_close_matches(task.format, list(FORMATS), n=1)
            hint = f"; did you mean {near[0]}?" if near else ""
            raise ConfigError(f"{where}.format: unknown dataset format {task.format!r} "
                              f"(one of {', '.join(sorted(FORMATS))}){hint}")
        for key, registry in (("bleu", BLEU_CONVENTIONS), ("codebleu", CODEBLEU_CONVENTIONS)):
            if getattr(task, key) not in registry:
                raise ConfigError(f"{where}.{key} must be one of {', '.join(registry)}, got {getattr(task, key)!r}")
        if task.top_k is not None and (isinstance(task.top_k, bool) or not isinstance(task.top_k, int)
                                       or task.top_k < 1):
            raise ConfigError(f"{where}.top_k must be a positive integer or null (every rank), got {task.top_k!r}")
        allowed = KINDS[task.kind].headline_metrics()
        if task.metric and task.metric not in allowed:
            raise ConfigError(f"{where}.metric: kind {task.kind} reports {', '.join(allowed)}, got {task.metric!r}")
        if FORMATS[task.format].kind != KINDS[task.kind].example_kind():
            raise ConfigError(f"{where}: format {task.format} gives {FORMATS[task.format].kind} examples, "
                              f"but kind is {task.kind}; set kind: {FORMATS[task.format].kind}")
        for key in _PATH_KEYS:
            value = getattr(task, key)
            p = base_dir / value
            if p.exists() or not _looks_like_hub_id(value):
                if not p.exists():
                    raise ConfigError(f"{where}.{key}: file not found: {p}")
                setattr(task, key, str(p.resolve()))
    t = cfg.train
    for key in ("max_steps", "micro_batch_size", "grad_accum", "max_seq_len", "keep_checkpoints", "max_bad_steps",
                "lr", "collective_timeout_s", "retrieval_temperature"):
        value = getattr(t, key)
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{source}: train.{key} must be positive, got {value}")
    if t.logits_chunk < -1:
        raise ConfigError(f"{source}: train.logits_chunk must be -1 (full logits), 0 (automatic) or a number of "
                          f"tokens, got {t.logits_chunk}")
    for key in ("head_lr", "weight_decay", "warmup_steps", "eval_every", "save_every", "transfer_every"):
        value = getattr(t, key)
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{source}: train.{key} must be 0 or more, got {value}")
    _validate_peft(cfg.peft, source)
    _validate_sampler_and_weighting(cfg, source)
    out = Path(cfg.output.dir)
    if not out.is_absolute():
        cfg.output.dir = str((Path.cwd() / out).resolve())
    check_output_folder(Path(cfg.output.dir), f"{source}: output.dir")


def _validate_sampler_and_weighting(cfg: RunConfig, source: str) -> None:
    """``sampler.temperature``, and the weighting rule built once, so that its settings (``weighting.weights``
    per task, ``temperature``, ``gamma``, ``alpha``, ``lr``) are checked with the file named, before any
    model loads."""
    from mtpeft.data.schedule import check_temperature
    from mtpeft.trainer.weighting import make_weighting

    w = cfg.weighting
    try:
        check_temperature(cfg.sampler.temperature)
        make_weighting(w.kind, [t.name for t in cfg.tasks], static_weights=w.weights, lr=w.lr,
                       dwa_temperature=w.temperature, famo_gamma=w.gamma, gradnorm_alpha=w.alpha)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _validate_peft(peft, source: str) -> None:
    """Which keys a method reads and what values they take is its settings dataclass's business
    (``tuners/registry.py``); here its ``ConfigError`` gets the file's name."""
    from mtpeft.tuners.registry import check_section

    try:
        check_section(peft)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _looks_like_hub_id(value: str) -> bool:
    """``owner/name`` or ``owner/name:split``-style dataset ids are fetched through HF datasets."""
    return value.count("/") == 1 and not value.startswith((".", "/")) and "." not in value.split("/")[-1]


def dump_config(cfg: RunConfig, path: Path) -> None:
    data = cfg.to_dict()
    data.pop("source", None)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
