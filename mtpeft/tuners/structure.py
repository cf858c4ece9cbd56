"""Where a transformer's blocks, attentions and feed-forwards are, found by the shapes of its linears
rather than by their names, so adapters and prefixes reach a family without a name table.

The block list is the longest ``nn.ModuleList`` whose entries hold linear layers (the shallowest on a
tie: a T5 block's inner ``layer`` list is shorter or deeper). In a block of width h, the feed-forward's
output projection is the linear back to h with the widest input (the intermediate width, wider than
the attention's), its input projections the linears from h to that width (or twice it: a fused
gate and up), those beside it preferred; every other linear is the attention's, whose output projection is the last one back
to h (modules register q, k, v before o in every family). Each part is the smallest module holding
all its linears; a BERT-style layer splits its feed-forward between ``intermediate`` and ``output``,
so no module holds it alone (``ffn`` is None) and ``FFN_OVERRIDES``, the per-family table, decides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import re

import torch.nn as nn

from mtpeft.errors import ConfigError

# Overrides of the search, by model type: BERT-style layers split the feed-forward between
# ``intermediate`` (h → I) and ``output`` (I → h, dropout, then LayerNorm of it plus the residual); the
# parallel adapter wraps that ``output`` module (``adapters.ParallelAdapterBertOutput``).
FFN_OVERRIDES = {t: r".*layer\.\d+\.output" for t in ("roberta", "bert", "xlm-roberta", "camembert", "electra")}


@dataclass(frozen=True)
class Block:
    """Full module paths inside the model of one transformer block's parts."""

    path: str
    attention: str
    attention_out: str
    ffn: Optional[str]
    ffn_out: str


def is_linear(module: nn.Module) -> bool:
    return hasattr(module, "in_features") and hasattr(module, "out_features")


def block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The path and the ``nn.ModuleList`` of the model's transformer blocks."""
    lists = [(n, m) for n, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) and any(is_linear(x) for x in m[0].modules())]
    if not lists:
        raise ConfigError(f"this {_kind(model)} has no list of transformer blocks (an nn.ModuleList of layers "
                          f"holding linear layers)")
    return max(lists, key=lambda item: (len(item[1]), -item[0].count(".")))


def _linears(block: nn.Module) -> list[tuple[str, nn.Module]]:
    """The block's linear layers, outermost only (a tuner-wrapped linear counts once)."""
    out: list[tuple[str, nn.Module]] = []
    for name, m in block.named_modules():
        if name and is_linear(m) and not any(name.startswith(n + ".") for n, _ in out):
            out.append((name, m))
    return out


def _common_parent(names: list[str]) -> str:
    parts = [n.split(".")[:-1] for n in names]
    common = []
    for level in zip(*parts):
        if any(p != level[0] for p in level):
            break
        common.append(level[0])
    return ".".join(common)


def width(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    h = getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model", None) or getattr(cfg, "n_embd", None)
    if h:
        return int(h)
    _, blocks = block_list(model)
    ins = [m.in_features for _, m in _linears(blocks[0])]
    return max(set(ins), key=ins.count)  # q, k, v and the up projections all read h


def split_block(block: nn.Module, h: int, where: str = "") -> tuple[str, str, Optional[str], str]:
    """(attention, attention output, feed-forward or None, feed-forward output), relative to ``block``."""
    linears = _linears(block)
    back = [(n, m) for n, m in linears if m.out_features == h]
    if len(back) < 2:
        raise ConfigError(f"{where or 'block'}: found {len(back)} linear layer(s) back to the width {h}, "
                          f"expected an attention output and a feed-forward output")
    ffn_out, down = max(back, key=lambda item: item[1].in_features)
    wide = down.in_features
    if sum(m.in_features == wide for _, m in back) > 1:
        # no linear wider than the rest comes back to h: the feed-forward is not made of nn.Linear layers
        # (a mixture of experts keeps its experts' weights in 3-D tensors), or it is as narrow as the attention
        raise ConfigError(f"{where or 'block'}: no feed-forward made of linear layers found (its linears: "
                          f"{', '.join(n for n, _ in linears)}; every one back to the width {h} reads width {wide}); "
                          f"a mixture-of-experts block keeps its experts outside nn.Linear. Serial and parallel "
                          f"adapters and IA3's default targets need one: use lora, mtl_lora, prompt or prefix, or "
                          f"ia3 with peft.ia3_target_modules and peft.ia3_feedforward_modules: [] naming attention "
                          f"projections")
    ups = [n for n, m in linears if n != ffn_out and m.in_features == h and m.out_features in (wide, 2 * wide)]
    beside = [n for n in ups if n.rpartition(".")[0] == ffn_out.rpartition(".")[0]]
    ups = beside or ups  # a fused qkv can have the intermediate width too; the up projections sit by the down
    attn = [n for n, _ in linears if n != ffn_out and n not in ups]
    attn_back = [n for n, m in linears if n in attn and m.out_features == h]
    if not ups or not attn_back:
        raise ConfigError(f"{where or 'block'}: no feed-forward input or attention output projection found")
    attention = _common_parent(attn)
    ffn = _common_parent(ups + [ffn_out])
    return attention, attn_back[-1], (ffn or None), ffn_out


def find_blocks(model: nn.Module) -> list[Block]:
    """Every block of ``model`` with its attention and feed-forward, as full module paths."""
    path, blocks = block_list(model)
    h = width(model)
    out = []
    for i, block in enumerate(blocks):
        prefix = f"{path}.{i}" if path else str(i)
        attention, attention_out, ffn, ffn_out = split_block(block, h, f"{_kind(model)} {prefix}")
        full = (lambda rel: f"{prefix}.{rel}" if rel else prefix)
        out.append(Block(prefix, full(attention), full(attention_out), full(ffn) if ffn else None, full(ffn_out)))
    return out


def ffn_modules(model: nn.Module) -> tuple[list[str], bool]:
    """The module of each block the parallel adapter wraps, and whether it is a split feed-forward's
    output module (from ``FFN_OVERRIDES``) rather than the whole feed-forward."""
    pattern = FFN_OVERRIDES.get(_kind(model))
    if pattern:
        names = [n for n, _ in model.named_modules() if n and re.fullmatch(pattern, n)]
        if names:
            return names, True
    names = [b.ffn for b in find_blocks(model)]
    if None in names:
        raise ConfigError(f"peft.method parallel_adapter: the feed-forward of this {_kind(model)} is split over "
                          f"several modules of its blocks; add its model type to structure.FFN_OVERRIDES")
    return names, False


def _kind(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", "") or type(model).__name__
