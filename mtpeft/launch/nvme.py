"""Fill ``nvme_path: "auto"`` in a DeepSpeed config from the node-local ``MTPEFT_NVME_PATH``.

An NVMe swap folder is a property of the machine, not of the experiment: the same RunConfig runs on
nodes whose fast local disk is mounted in different places, so the path comes from the environment
of each node (exported by the launch scripts or the user), never from RunConfig. DeepSpeed itself
reads ``"auto"`` as "unset" and fails much later inside its async-I/O setup, so an unset or missing
folder is reported here, before any engine exists.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Mapping, Optional

from mtpeft.errors import ConfigError

ENV_VAR = "MTPEFT_NVME_PATH"
_SECTIONS = ("offload_optimizer", "offload_param")


def async_io_available() -> bool:
    """Whether DeepSpeed's async_io op (libaio) can be loaded here; NVMe offload needs it."""
    try:
        from deepspeed.ops.op_builder import AsyncIOBuilder

        return bool(AsyncIOBuilder().is_compatible(verbose=False))
    except Exception:
        return False


def fill_nvme_paths(ds: dict, where: str, environ: Optional[Mapping[str, str]] = None,
                    aio_available: Callable[[], bool] = async_io_available) -> dict:
    """Resolve every NVMe offload section's ``nvme_path`` in place; return ``ds``."""
    environ = os.environ if environ is None else environ
    zero = ds.get("zero_optimization", {})
    uses_nvme = any(isinstance(zero.get(s), dict) and zero[s].get("device") == "nvme" for s in _SECTIONS)
    if uses_nvme and not aio_available():
        raise ConfigError(f"{where}: NVMe offload needs DeepSpeed's async_io op, which cannot load on "
                          f"{os.uname().nodename} (install libaio-dev, reinstall deepspeed with DS_BUILD_AIO=1, "
                          f"check with ds_report) or use zero3_offload_cpu.json")
    for section in _SECTIONS:
        offload = zero.get(section)
        if not isinstance(offload, dict) or offload.get("device") != "nvme":
            continue
        key = f"zero_optimization.{section}.nvme_path"
        value = offload.get("nvme_path", "auto")
        if value == "auto":
            value = environ.get(ENV_VAR, "")
            if not value:
                raise ConfigError(f"{where}: {key} is \"auto\" but {ENV_VAR} is not set; export {ENV_VAR}=/path/to/local/nvme "
                                  f"on every node (or set {key} in deepspeed.overrides)")
        if not Path(value).is_dir():
            raise ConfigError(f"{where}: {key} {value!r} is not an existing folder on {os.uname().nodename}; "
                              f"create it or point {ENV_VAR} at a mounted local NVMe folder")
        offload["nvme_path"] = str(value)
    return ds
