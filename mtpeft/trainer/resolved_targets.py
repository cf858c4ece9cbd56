"""What the tuner's targets became on this backbone, recorded at the end of the run's ``config.yaml``.

``peft.target_modules`` stays as given (the Llama role names by default), so a rerun still compares
equal to the run (``resume_guard``) and ``mtpeft eval`` rebuilds the same model; the per-family
names those roles resolved to, or ``all-linear`` on an unknown architecture, follow as a commented
block that YAML readers skip. The export carries the same lists (``adapter_config.json`` for HF
peft, ``tasks.json`` under ``peft.resolved``). The notice of an all-linear fallback is printed once.
"""

from __future__ import annotations

import json
from pathlib import Path

from mtpeft.failed_writes import replacing

MARK = "# resolved on this backbone"


def resolved_block(tuner, model_type: str) -> str:
    resolved = tuner.resolved_targets()
    if not resolved:
        return ""
    lines = [f"{MARK} ({model_type}, peft.method {tuner.name}):"]
    lines += [f"#   peft.{key}: {json.dumps(value)}" for key, value in resolved.items()]
    if tuner.notice:
        lines.append(f"#   notice: {tuner.notice}")
    return "\n".join(lines) + "\n"


def record_resolved_targets(config_path: Path, tuner, model_type: str) -> None:
    """Append the resolved block to ``config_path`` (replacing an earlier one) and print the notice."""
    if tuner.notice:
        print(f"notice: {tuner.notice}", flush=True)
    block = resolved_block(tuner, model_type)
    if not block:
        return
    text = config_path.read_text().split(MARK, 1)[0].rstrip("\n") + "\n"
    with replacing(config_path) as tmp:  # as the config itself is written
        tmp.write_text(text + block)
