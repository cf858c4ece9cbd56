"""Prefix tuning shared by all tasks: learned keys and values prepended in every attention layer
(Li & Liang; P-tuning v2), optionally re-parameterised by an MLP (``prefix_projection``).

The prefix reaches the backbone as its cache argument: a transformers ``DynamicCache`` filled with
one (key, value) pair per layer, passed under the keyword the backbone's ``forward`` declares
(``cache`` from transformers 5.24 on, ``past_key_values`` before; see ``cache_keyword``), with the attention mask extended by ones, so Llama, Qwen2 and
RoBERTa-style attention take it unchanged; grouped-query models get prefixes for their key/value
heads only (as in HF peft). A T5 encoder stack drops its cache argument, so there each
self-attention is wrapped to receive the cache directly (T5's relative-position bias then places
the prefix just before the input, and the mask is widened to see it). The hidden states hold only
the real tokens, so pooling is unchanged. Exported as HF peft's PREFIX_TUNING (with the MLP, the
export holds its output, as HF peft saves it, and reloading gives the MLP-free table); on a T5
encoder, where HF peft silently skips the prefix, the export is mtpeft's own.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from mtpeft.errors import ConfigError
from mtpeft.tuners.base import InputModule, Tuner, check_virtual_positions, peft_task_type
from mtpeft.tuners.family import T5_TYPES, key_value_heads, replace_module
from mtpeft.tuners.structure import find_blocks
from mtpeft.tuners.prompt import decoder_positions
from mtpeft.tuners.settings import MethodSettings, positive


@dataclass
class PrefixSettings(MethodSettings):
    """``peft.num_virtual_tokens`` key/value positions per layer, optionally through a projection
    (``peft.prefix_projection``) of width ``peft.prefix_hidden``."""

    num_virtual_tokens: int = 20
    projection: bool = field(default=False, metadata={"key": "prefix_projection"})
    hidden: int = field(default=512, metadata={"key": "prefix_hidden"})

    def check(self) -> None:
        positive("num_virtual_tokens", self.num_virtual_tokens)
        positive("prefix_hidden", self.hidden)


def kv_layout(cfg) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of a decoder, BERT-style or T5 config."""
    heads = cfg.num_attention_heads
    kv_heads = key_value_heads(cfg)
    head_dim = getattr(cfg, "head_dim", None) or getattr(cfg, "d_kv", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, kv_heads, head_dim


def cache_keyword(forward) -> str:
    """The keyword under which a transformers ``forward`` takes a ``Cache``. transformers 5.24 renamed
    ``past_key_values`` to ``cache`` (the old name is deprecated, and dropped when a caller also passes
    ``cache``, as T5's layers do), so the name is read from the signature instead of assumed."""
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


class PrefixCarrier:
    """The prefix cache of the latest forward of one ``PrefixInput``, read by the T5 self-attentions
    injected with it (T5's encoder stack drops a cache passed to it). One per injected model, made
    at injection and held by its modules: two models never see each other's prefix."""

    def __init__(self) -> None:
        self.cache = None
        self.tokens = 0

    def hold(self, cache, tokens: int) -> None:
        self.cache, self.tokens = cache, tokens


class T5PrefixAttention(nn.Module):
    def __init__(self, attention: nn.Module, carrier: PrefixCarrier):
        super().__init__()
        self.attention = attention
        self.carrier = carrier
        self.cache_keyword = cache_keyword(attention.forward)

    def forward(self, hidden_states, mask=None, key_value_states=None, position_bias=None, **kwargs):
        given = [kwargs.pop(name, None) for name in ("cache", "past_key_values")]
        cache, p = self.carrier.cache, self.carrier.tokens
        if cache is not None and mask is not None:
            see = mask.new_ones(()) if mask.dtype == torch.bool else mask.new_zeros(())
            mask = torch.cat([see.expand(*mask.shape[:-1], p), mask], dim=-1)
        kwargs[self.cache_keyword] = cache if cache is not None else next((c for c in given if c is not None), None)
        return self.attention(hidden_states, mask=mask, key_value_states=key_value_states, position_bias=position_bias,
                              **kwargs)


class PrefixInput(InputModule):
    virtual = 0

    def __init__(self, tokens: int, layers: int, kv_heads: int, head_dim: int, projection: bool, hidden: int,
                 cache_keyword: str = "past_key_values", carrier: Optional[PrefixCarrier] = None):
        """``cache_keyword``: the backbone forward's name for a cache; ``carrier``: for T5 encoders."""
        super().__init__()
        self.cache_keyword, self.carrier = cache_keyword, carrier
        self.tokens, self.layers, self.kv_heads, self.head_dim = tokens, layers, kv_heads, head_dim
        width = layers * 2 * kv_heads * head_dim
        if projection:
            self.embedding = nn.Embedding(tokens, kv_heads * head_dim)
            self.transform = nn.Sequential(nn.Linear(kv_heads * head_dim, hidden), nn.Tanh(), nn.Linear(hidden, width))
        else:
            self.embedding = nn.Embedding(tokens, width)
            self.transform = None

    def table(self) -> torch.Tensor:
        """``[P, layers·2·kv_heads·head_dim]``: what HF peft calls the prompt embeddings of a prefix.
        Runs through the submodules' calls, so ZeRO-3 gathers their weights."""
        index = torch.arange(self.tokens, device=self.embedding.weight.device)
        out = self.embedding(index)
        return self.transform(out) if self.transform is not None else out

    def table_from_weights(self) -> torch.Tensor:
        """The same table from the (already gathered) weights, without module hooks: for export."""
        out = self.embedding.weight
        if self.transform is not None:
            first, last = self.transform[0], self.transform[2]
            out = F.linear(torch.tanh(F.linear(out, first.weight, first.bias)), last.weight, last.bias)
        return out

    def fold(self, table: torch.Tensor) -> None:
        """Replace the MLP by its output (an exported prefix)."""
        self.transform = None
        self.embedding = nn.Embedding(table.shape[0], table.shape[1], _weight=table.detach().clone())

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, embed: nn.Module,
                decoder: bool) -> dict:
        from transformers import DynamicCache

        b = input_ids.shape[0]
        kv = self.table().to(embed.weight.dtype)
        kv = kv.view(1, self.tokens, self.layers * 2, self.kv_heads, self.head_dim).expand(b, -1, -1, -1, -1)
        pairs = kv.permute(2, 0, 3, 1, 4).split(2)  # per layer: [2, B, heads, P, head_dim]
        mask = torch.cat([attention_mask.new_ones(b, self.tokens), attention_mask], dim=1)
        cache = DynamicCache([(p[0], p[1]) for p in pairs])
        if self.carrier is not None:
            self.carrier.hold(cache, self.tokens)
            return {"input_ids": input_ids, "attention_mask": attention_mask}
        out = {"input_ids": input_ids, "attention_mask": mask, self.cache_keyword: cache}
        if decoder:
            out["position_ids"] = decoder_positions(attention_mask, offset=self.tokens)
        return out


class PrefixTuner(Tuner):
    name = "prefix"
    hf_peft = True

    def check(self, model_config, gradient_checkpointing: bool, max_seq_len: int = 0) -> None:
        if gradient_checkpointing:
            raise ConfigError("peft.method prefix needs model.gradient_checkpointing: false (transformers drops "
                              "the cache, which carries the prefix, in checkpointed layers)")
        check_virtual_positions(model_config, self.settings.num_virtual_tokens, max_seq_len)

    def inject(self, backbone: nn.Module) -> PrefixInput:
        s: PrefixSettings = self.settings
        self.layout = kv_layout(backbone.config)
        t5 = backbone.config.model_type in T5_TYPES
        module = PrefixInput(s.num_virtual_tokens, *self.layout, s.projection, s.hidden,
                             cache_keyword(backbone.forward), PrefixCarrier() if t5 else None)
        if t5:
            self.hf_peft = False
            for block in find_blocks(backbone):
                attention, parent = backbone.get_submodule(block.attention), block.attention.rpartition(".")[0]
                if not isinstance(backbone.get_submodule(parent), T5PrefixAttention):
                    replace_module(backbone, block.attention, T5PrefixAttention(attention, module.carrier))
        return module

    def named_tensors(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return {f"prefix.{n}": p for n, p in model.input_module.named_parameters()}

    def export_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {"prompt_embeddings": model.input_module.table_from_weights().detach().float().cpu().contiguous()}

    def load_tensors(self, model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
        from mtpeft.tuners.base import check_keys

        check_keys({"prompt_embeddings": None}, tensors, source)
        model.input_module.fold(tensors["prompt_embeddings"].float())

    def peft_config(self, model: nn.Module, base_model_name_or_path: str):
        if not self.hf_peft:
            return None
        from peft import PrefixTuningConfig

        layers, kv_heads, head_dim = self.layout
        return PrefixTuningConfig(num_virtual_tokens=self.settings.num_virtual_tokens, token_dim=kv_heads * head_dim,
                                  num_attention_heads=kv_heads, num_layers=layers, num_transformer_submodules=1,
                                  encoder_hidden_size=self.settings.hidden, prefix_projection=False,
                                  task_type=peft_task_type(model), base_model_name_or_path=base_model_name_or_path)
