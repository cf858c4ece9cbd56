"""Where each tuner attaches in a backbone family, in one vocabulary.

Users name target projections the Llama way (``q_proj`` … ``down_proj``). A RoBERTa-style encoder
(UniXcoder) calls them ``query`` … ``output.dense``, a T5 encoder (CodeT5+) ``q`` … ``wo``, CodeGen
``qkv_proj`` (one fused projection for q, k and v) … ``fc_out``, GPT-BigCode (StarCoder) and GPT-2
``c_attn`` (fused) … ``mlp.c_proj`` and StarCoder2 ``q_proj`` … ``mlp.c_proj``; a name that matches nothing
literally is looked up here, so one config (and the defaults) works on every family. ``all-linear``
names every linear layer of the stack except the LM head; it is what the defaults become on an
architecture whose projections the Llama names do not reach (``default_or_all_linear``).
"""

from __future__ import annotations

import re

import torch.nn as nn

from mtpeft.errors import ConfigError
from mtpeft.tuners.structure import is_linear

ENCODER_TYPES = ("roberta", "bert", "xlm-roberta", "camembert", "electra", "t5", "mt5", "umt5")
T5_TYPES = ("t5", "mt5", "umt5")

_BERT_ROLES = {
    "q_proj": r".*attention\.self\.query", "k_proj": r".*attention\.self\.key",
    "v_proj": r".*attention\.self\.value", "o_proj": r".*attention\.output\.dense",
    "up_proj": r".*intermediate\.dense", "down_proj": r".*layer\.\d+\.output\.dense",
}
_T5_ROLES = {
    "q_proj": r".*SelfAttention\.q", "k_proj": r".*SelfAttention\.k", "v_proj": r".*SelfAttention\.v",
    "o_proj": r".*SelfAttention\.o", "gate_proj": r".*DenseReluDense\.wi_0",
    "up_proj": r".*DenseReluDense\.(wi|wi_1)", "down_proj": r".*DenseReluDense\.wo",
}
_CODEGEN_ROLES = {  # q, k and v share one fused projection; no gate
    "q_proj": r".*attn\.qkv_proj", "k_proj": r".*attn\.qkv_proj", "v_proj": r".*attn\.qkv_proj",
    "o_proj": r".*attn\.out_proj", "up_proj": r".*mlp\.fc_in", "down_proj": r".*mlp\.fc_out",
}
_BIGCODE_ROLES = {  # multi-query attention: q, k and v in one c_attn; c_proj names both outputs
    "q_proj": r".*attn\.c_attn", "k_proj": r".*attn\.c_attn", "v_proj": r".*attn\.c_attn",
    "o_proj": r".*attn\.c_proj", "up_proj": r".*mlp\.c_fc", "down_proj": r".*mlp\.c_proj",
}
_STARCODER2_ROLES = {"up_proj": r".*mlp\.c_fc", "down_proj": r".*mlp\.c_proj"}  # attention names are Llama's
ROLE_ALIASES = {"roberta": _BERT_ROLES, "bert": _BERT_ROLES, "xlm-roberta": _BERT_ROLES, "camembert": _BERT_ROLES,
                "electra": _BERT_ROLES, "t5": _T5_ROLES, "mt5": _T5_ROLES, "umt5": _T5_ROLES,
                "codegen": _CODEGEN_ROLES, "gpt_bigcode": _BIGCODE_ROLES, "starcoder2": _STARCODER2_ROLES,
                "gpt2": _BIGCODE_ROLES, "openai-gpt": _BIGCODE_ROLES}  # GPT-2 (CodeParrot): the same names
ALL_LINEAR = "all-linear"
LLAMA_ROLES = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")  # gate_proj: gated MLPs only

def model_type(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", "")


def is_encoder(config) -> bool:
    """Encoder-only backbones are loaded with ``AutoModel`` (no LM head) and cannot generate."""
    return getattr(config, "model_type", "") in ENCODER_TYPES


def key_value_heads(config) -> int:
    """Key/value heads per attention layer as the attention keeps them (its cache layout, which a
    prefix joins), in each config convention: ``num_key_value_heads`` (Llama, Mistral, Qwen2,
    StarCoder2; GPT-BigCode sets it from ``multi_query``); Falcon: one with ``multi_query``, every
    head with ``new_decoder_architecture`` (it broadcasts its ``num_kv_heads`` before caching), else
    ``num_kv_heads``; other configs with ``multi_query``: one; else every head."""
    heads = int(config.num_attention_heads)
    if getattr(config, "model_type", "") == "falcon":
        if getattr(config, "new_decoder_architecture", False):
            return heads
        return 1 if getattr(config, "multi_query", False) else int(getattr(config, "num_kv_heads", None) or heads)
    explicit = getattr(config, "num_key_value_heads", None)
    if explicit:
        return int(explicit)
    return 1 if getattr(config, "multi_query", False) else heads


def _name_matches(name: str, target: str) -> bool:
    return name.rsplit(".", 1)[-1] == target or re.fullmatch(target, name) is not None


def find_linears(model: nn.Module, targets: list, key: str, skip=()) -> list[str]:
    """Paths of the linear layers that ``targets`` name, literally or through the family's aliases."""
    linears = {n: m for n, m in model.named_modules() if n and is_linear(m) and not isinstance(m, skip)}
    aliases = ROLE_ALIASES.get(model_type(model), {})
    found: set[str] = set()
    if ALL_LINEAR in targets:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        found |= {n for n, m in linears.items() if m is not head and "pooler" not in n}  # mean pooling: unused
    for target in (t for t in targets if t != ALL_LINEAR):
        hits = {n for n in linears if _name_matches(n, target)}
        if not hits and target in aliases:
            hits = {n for n in linears if re.fullmatch(aliases[target], n)}
        found |= hits
    if not found:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise ConfigError(f"{key} {list(targets)} matched no linear layer of this {model_type(model) or 'model'}; "
                          f"it has: {', '.join(leaves)} (or use [{ALL_LINEAR}])")
    return sorted(found, key=_natural)


def knows_roles(model: nn.Module) -> bool:
    """Whether the default (Llama) role names reach every projection of this architecture: it has
    them all, or its family has aliases for them."""
    if model_type(model) in ROLE_ALIASES:
        return True
    leaves = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and is_linear(m)}
    return all(role in leaves for role in LLAMA_ROLES)


def default_or_all_linear(model: nn.Module, targets: list, defaults: list, key: str) -> tuple[list, str]:
    """``targets``, unless they are the defaults and this architecture is unknown: then ``all-linear``
    and the one-line notice that says so (the tuner keeps it for the run to print)."""
    if list(targets) != list(defaults) or knows_roles(model):
        return list(targets), ""
    return [ALL_LINEAR], (f"{key}: no default targets for a {model_type(model) or type(model).__name__} backbone; "
                          f"using {ALL_LINEAR} (every linear layer but the LM head)")


def replace_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_name, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def peft_target_names(model: nn.Module, chosen: list[str]) -> list[str]:
    """Before wrapping: leaf names where every linear with that leaf is chosen (as HF peft configs
    read them), else the full paths of the chosen ones."""
    all_linears = [n for n, m in model.named_modules() if n and is_linear(m)]
    out = []
    for leaf in sorted({c.rsplit(".", 1)[-1] for c in chosen}):
        with_leaf = [n for n in all_linears if n.rsplit(".", 1)[-1] == leaf]
        mine = [c for c in chosen if c.rsplit(".", 1)[-1] == leaf]
        out.extend([leaf] if len(with_leaf) == len(mine) else mine)
    return out


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]
