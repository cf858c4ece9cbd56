"""``peft.method`` → the tuner that builds, exports and reloads it. The only place methods are named.

Defaults (``PeftConfig``) follow the studies: LoRA and mtl_lora r=16, α=32, dropout 0.05 on every
attention and MLP projection; bottleneck 64 (relu, scale 1) for both adapters; IA3 on k_proj, v_proj
(output) and down_proj (input). Prompt and prefix tuning share ``num_virtual_tokens``, default 20:
the code-generation study's prompt length and the top of the code-analysis study's prefix range
(10-20); its prefix runs used 10, so set ``peft.num_virtual_tokens: 10`` to reproduce them.
Names are the Llama ones; RoBERTa-style and T5 encoders map them through ``family.ROLE_ALIASES``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mtpeft.errors import ConfigError
from mtpeft.tuners.adapters import AdapterSettings, ParallelAdapterTuner, SerialAdapterTuner
from mtpeft.tuners.base import Tuner
from mtpeft.tuners.ia3 import IA3Settings, IA3Tuner
from mtpeft.tuners.lora import LoraSettings, LoraTuner
from mtpeft.tuners.mtl_lora import MtlLoraTuner
from mtpeft.tuners.prefix import PrefixSettings, PrefixTuner
from mtpeft.tuners.prompt import PromptSettings, PromptTuner

if TYPE_CHECKING:
    from mtpeft.config import PeftConfig


def _lora(p: PeftConfig) -> LoraSettings:
    return LoraSettings(r=p.r, alpha=p.alpha, dropout=p.dropout, target_modules=list(p.target_modules))


def _adapter(p: PeftConfig) -> AdapterSettings:
    return AdapterSettings(bottleneck=p.bottleneck, activation=p.adapter_activation, scaling=p.adapter_scaling)


METHODS = {  # config validation and the memory planner read the names from here
    "lora": (LoraTuner, _lora),
    "mtl_lora": (MtlLoraTuner, _lora),
    "serial_adapter": (SerialAdapterTuner, _adapter),
    "parallel_adapter": (ParallelAdapterTuner, _adapter),
    "ia3": (IA3Tuner, lambda p: IA3Settings(list(p.ia3_target_modules), list(p.ia3_feedforward_modules))),
    "prompt": (PromptTuner, lambda p: PromptSettings(p.num_virtual_tokens)),
    "prefix": (PrefixTuner, lambda p: PrefixSettings(p.num_virtual_tokens, p.prefix_projection, p.prefix_hidden)),
}


def planned_as(method: str) -> str:
    """The method whose memory and FLOPs the planner models for ``method`` (mtl_lora: its LoRA; the
    per-task r×r matrices are negligible)."""
    return METHODS[method][0].planned_as or method


def make_tuner(peft: PeftConfig, task_names: list[str]) -> Tuner:
    """The tuner of ``peft.method``, with its settings read from the ``peft`` section."""
    if peft.method not in METHODS:
        raise ConfigError(f"peft.method must be one of {', '.join(METHODS)}, got {peft.method!r}")
    cls, settings = METHODS[peft.method]
    return cls(settings(peft), task_names)
