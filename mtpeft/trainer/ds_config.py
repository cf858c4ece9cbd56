"""Fill a DeepSpeed JSON template from RunConfig.

``"auto"`` fields take RunConfig's values. A concrete value that contradicts RunConfig (micro-batch,
accumulation, global batch, precision) is an error rather than a silent override: two sources of
truth for the batch size is how runs stop being reproducible.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch.distributed as dist

from mtpeft.config import RunConfig
from mtpeft.errors import ConfigError
from mtpeft.shipped_files import ds_template, ds_template_names


def template_path(name: str, config_dir: Path | None = None) -> Path:
    """``deepspeed.config`` as a path (as given, then beside the RunConfig), else a shipped template
    by bare name (``zero3``) or file name (``zero3.json``)."""
    candidates = [Path(name)]
    if config_dir is not None:
        candidates.append(config_dir / name)
    for c in candidates:
        if c.is_file():
            return c
    shipped = ds_template(name)
    if shipped is not None:
        return shipped
    raise ConfigError(f"deepspeed.config: {name} is neither a file (looked in "
                      f"{', '.join(str(c.parent) for c in candidates)}) nor a shipped template; "
                      f"shipped templates: {', '.join(ds_template_names())}")


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _fill(ds: dict, key_path: str, value, where: str) -> None:
    *parents, leaf = key_path.split(".")
    node = ds
    for p in parents:
        node = node.setdefault(p, {})
    current = node.get(leaf, "auto")
    if current == "auto":
        node[leaf] = value
    elif current != value:
        raise ConfigError(f"{where}: {key_path} is {current!r} but RunConfig gives {value!r}; "
                          f"set it to \"auto\" (or change the RunConfig key instead)")


def _check_zero(zero, where: str) -> None:
    """What DeepSpeed would otherwise reject deep inside engine setup, with a traceback."""
    if not isinstance(zero, dict):
        raise ConfigError(f"{where}: zero_optimization must be an object, got {zero!r}")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ConfigError(f"{where}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r} "
                          f"(mtpeft's templates use 3; zero2 for stage 2)")


# DeepSpeed's pydantic section models by the key they parse (a ValidationError names only the model)
_SECTIONS = {"DeepSpeedZeroConfig": "zero_optimization", "DeepSpeedZeroOffloadParamConfig": "zero_optimization.offload_param",
             "DeepSpeedZeroOffloadOptimizerConfig": "zero_optimization.offload_optimizer",
             "ZenFlowConfig": "zero_optimization.zenflow", "DeepSpeedBF16Config": "bf16", "DeepSpeedFP16Config": "fp16",
             "CommsLoggerConfig": "comms_logger", "TensorBoardConfig": "tensorboard", "WandbConfig": "wandb",
             "CSVConfig": "csv_monitor", "CometConfig": "comet", "HybridEngineConfig": "hybrid_engine",
             "CompileConfig": "compile", "TPTrainingConfig": "tensor_parallel"}


def _check_with_deepspeed(ds: dict, where: str) -> None:
    """DeepSpeed's own parser, run on the filled config now: a value it refuses (an offload device, a
    key its section does not have, a flag that is not a boolean) is named here, instead of failing
    inside model loading or engine setup with a pydantic traceback."""
    from deepspeed.runtime.config import DeepSpeedConfig, DeepSpeedConfigError
    from pydantic import ValidationError

    probe = copy.deepcopy(ds)
    # DeepSpeed checks the global batch against this process's world size; mtpeft filled it for the run's
    probe["train_batch_size"] = probe["train_micro_batch_size_per_gpu"] * probe["gradient_accumulation_steps"] * (
        dist.get_world_size() if dist.is_initialized() else 1)
    try:
        DeepSpeedConfig(probe)
    except ValidationError as exc:
        problem = exc.errors()[0]
        key = ".".join([_SECTIONS.get(exc.title, exc.title)] + [str(part) for part in problem["loc"]])
        got = f" (got {problem['input']!r})" if "input" in problem and not isinstance(problem["input"], dict) else ""
        raise ConfigError(f"{where}: {key}: {problem['msg']}{got}; see DeepSpeed's configuration documentation") from None
    except (DeepSpeedConfigError, AssertionError, ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"{where}: DeepSpeed refuses this config ({str(exc) or type(exc).__name__})") from None


def build_ds_config(cfg: RunConfig, world_size: int) -> dict:
    path = template_path(cfg.deepspeed.config, Path(cfg.source).resolve().parent if cfg.source else None)
    try:
        template = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}: malformed JSON in DeepSpeed config ({exc.msg})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the DeepSpeed config ({exc})") from None
    if not isinstance(template, dict):
        raise ConfigError(f"{path}: a DeepSpeed config is a JSON object ({{...}}), got a {type(template).__name__}")
    ds = _merge(template, cfg.deepspeed.overrides or {})
    where = f"{path.name} (+ deepspeed.overrides)"
    _check_zero(ds.get("zero_optimization", {}), where)
    t = cfg.train
    _fill(ds, "train_micro_batch_size_per_gpu", t.micro_batch_size, where)
    _fill(ds, "gradient_accumulation_steps", t.grad_accum, where)
    _fill(ds, "train_batch_size", t.micro_batch_size * t.grad_accum * world_size, where)
    _fill(ds, "bf16.enabled", cfg.model.dtype == "bfloat16", where)
    _fill(ds, "fp16.enabled", cfg.model.dtype == "float16", where)
    if ds.get("fp16", {}).get("enabled"):
        ds["fp16"].setdefault("initial_scale_power", 16)
    _check_with_deepspeed(ds, where)
    return ds
