"""Exact parameter counts of a backbone from its config alone.

The model is built on the meta device as the trainer loads it (a causal LM with
``AutoModelForCausalLM``; an encoder, RoBERTa-style or a T5 encoder, without an LM head), so a 34B
architecture costs no memory and the counts come from the real transformers module tree (not from
a formula that drifts when a family adds biases, GQA or tied heads). Parameters are split by what
the planner does with them: decoder-block linears are quantizable (4-bit), everything else
(embeddings, norms, linear biases, an untied LM head) stays in bf16.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Tuple, Union

import torch
from torch import nn

from mtpeft.conv1d import as_linear
from mtpeft.errors import ConfigError, UserError
from mtpeft.model_load_errors import MODEL_LOAD_ERRORS, one_line
from mtpeft.tuners.family import T5_TYPES, is_encoder, key_value_heads
from mtpeft.tuners.structure import block_list, split_block

ARCHS_DIR = Path(__file__).resolve().parent / "archs"  # the shipped architectures: one file per name
SOURCE_KEY = "mtpeft_source"  # where a shipped file's values were read (not a transformers key)


@dataclass(frozen=True)
class LinearShape:
    """One decoder-block linear: ``name`` relative to the block (``self_attn.q_proj``)."""

    name: str
    in_features: int
    out_features: int
    bias: bool


@dataclass
class Architecture:
    """What the planner and FLOP counter need to know about a model, counted exactly."""

    name: str
    config: Any
    total_params: int
    quantizable_linear_params: int
    linear_bias_params: int
    embedding_params: int
    norm_params: int
    lm_head_params: int
    other_params: int
    tied_lm_head: bool
    encoder: bool
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    gated_mlp: bool
    block_linears: List[LinearShape] = field(default_factory=list)
    block_input_linears: List[str] = field(default_factory=list)
    """Block linears that read the block's own input (through a norm only), in module order: q/k/v,
    a fused qkv, and in a parallel block (CodeGen) the feed-forward's input too. In block 0 that input
    is the frozen embedding, so their input gradients are never computed."""
    attention_path: str = ""
    """The attention module inside a block (``self_attn``, ``attn``), found by structure."""
    attention_output: str = ""
    """The attention's output projection inside a block (``self_attn.o_proj``, ``attn.c_proj``)."""
    input_reader: Dict[str, str] = field(default_factory=dict)
    """Traced: each block linear → the first block linear (module order) that reads the very same input
    tensor (q/k/v; gate/up; CodeGen's qkv and feed-forward input), so that an input saved for LoRA's
    backward is counted once. Untraceable models map each linear to itself."""
    ia3_vectors: List[Tuple[int, bool]] = field(default_factory=list)
    """Per block, IA3's default scaling vectors as the trainer resolves them: (length, scales the input)."""
    block_norm_params: int = 0
    tensors: List[Tuple[str, int, int]] = field(default_factory=list)
    """Every parameter tensor once: (kind, numel, layer index or -1). ZeRO-3 pads per tensor."""

    @property
    def block_linear_params(self) -> int:
        return sum(s.in_features * s.out_features for s in self.block_linears)

    @property
    def non_quantized_params(self) -> int:
        return self.total_params - self.quantizable_linear_params


def known_architectures() -> List[str]:
    return sorted(p.stem for p in ARCHS_DIR.glob("*.json"))


def load_config_dict(name_or_path: Union[str, Path]) -> Tuple[str, Dict[str, Any]]:
    """Short name (``codellama-34b``) or a local ``config.json`` (or a folder holding one)."""
    text = str(name_or_path)
    shipped = ARCHS_DIR / f"{text}.json"
    if shipped.is_file():
        path = shipped
    else:
        path = Path(text)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise UserError(
                f"--model {text!r}: not a known architecture nor a config.json file; "
                f"known: {', '.join(known_architectures())}"
            )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: unreadable config.json ({exc}); pass a valid HF config.json") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise UserError(f"{path}: config.json has no 'model_type'; pass an HF model config.json")
    return (text if path == shipped else str(path)), data


def build_meta_model(config_dict: Dict[str, Any], source: str = "config") -> nn.Module:
    """The real transformers model with every tensor on the meta device (no memory, no init)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, T5EncoderModel

    data = {k: v for k, v in config_dict.items() if k != SOURCE_KEY}
    try:
        config = AutoConfig.for_model(**data)
        with torch.device("meta"):
            if not is_encoder(config):
                model = AutoModelForCausalLM.from_config(config)
            else:
                model = T5EncoderModel(config) if config.model_type in T5_TYPES else AutoModel.from_config(config)
    except MODEL_LOAD_ERRORS as exc:
        raise UserError(f"{source}: transformers cannot build a decoder LM or an encoder from it ({one_line(exc)})") from None
    as_linear(model)  # GPT-2's Conv1D layers, as the trainer holds them
    return model


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    try:
        return block_list(model)[1]
    except ConfigError as exc:
        raise UserError(f"{type(model).__name__}: {exc}") from None


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def count_architecture(model: nn.Module, name: str = "model") -> Architecture:
    """Split every parameter of ``model`` (counted once, even when tied) by module kind."""
    layers = _decoder_layers(model)
    in_blocks = {id(p) for p in layers.parameters()}
    lm_head = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    tied = lm_head is not None and lm_head.weight is embed.weight
    kinds = dict(quant=0, bias=0, embed=0, norm=0, head=0, other=0)
    layer_of = {id(p): i for i, layer in enumerate(layers) for p in layer.parameters()}
    tensors: List[Tuple[str, int, int]] = []
    seen = set()
    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if module is lm_head:
                kind = "head"
            elif isinstance(module, nn.Embedding):
                kind = "embed"
            elif _is_norm(module):
                kind = "norm"
            elif isinstance(module, nn.Linear) and id(p) in in_blocks:
                kind = "quant" if pname == "weight" else "bias"
            elif isinstance(module, nn.Linear) and pname == "bias":
                kind = "bias"
            else:
                kind = "other"
            kinds[kind] += p.numel()
            tensors.append((kind, p.numel(), layer_of.get(id(p), -1)))
    cfg = model.config
    block = layers[0]
    ia3_vectors = _ia3_vectors(model, block)
    linears = [
        LinearShape(n, m.in_features, m.out_features, m.bias is not None)
        for n, m in block.named_modules()
        if isinstance(m, nn.Linear)
    ]
    block_inputs, input_reader = _trace_block_inputs(model, block, linears)
    attention_path, attention_output = _attention_linears(block, int(cfg.hidden_size))
    heads = int(cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or getattr(cfg, "d_kv", None) or cfg.hidden_size // heads)
    return Architecture(
        name=name,
        config=cfg,
        total_params=sum(kinds.values()),
        quantizable_linear_params=kinds["quant"],
        linear_bias_params=kinds["bias"],
        embedding_params=kinds["embed"],
        norm_params=kinds["norm"],
        lm_head_params=kinds["head"],
        other_params=kinds["other"],
        tied_lm_head=tied,
        encoder=is_encoder(cfg),
        num_layers=len(layers),
        hidden_size=int(cfg.hidden_size),
        intermediate_size=int(getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None)
                              or getattr(cfg, "d_ff", None)  # T5
                              or 4 * cfg.hidden_size),  # GPT-style configs (CodeGen): n_inner, None = 4h
        num_heads=heads,
        num_kv_heads=key_value_heads(cfg),
        head_dim=head_dim,
        vocab_size=int(cfg.vocab_size),
        max_positions=int(getattr(cfg, "max_position_embeddings", 0) or 0),
        gated_mlp=any(s.name.endswith("gate_proj") for s in linears),
        block_linears=linears,
        block_input_linears=block_inputs,
        attention_path=attention_path,
        attention_output=attention_output,
        input_reader=input_reader,
        ia3_vectors=ia3_vectors,
        block_norm_params=sum(p.numel() for m in block.modules() if _is_norm(m) for p in m.parameters(False)),
        tensors=tensors,
    )


def _trace_block_inputs(model: nn.Module, block: nn.Module,
                        linears: List[LinearShape]) -> Tuple[List[str], Dict[str, str]]:
    """Traced, not named: one forward of 4 tokens (on the meta device for a planned model: no memory,
    no arithmetic) with every weight frozen except block 0's linears. A linear whose input needs no
    gradient reads the block input; linears handed the same tensor object share their input.
    Where a model will not run that forward (an unusual signature): the attention's linears other
    than its output projection, from the block's structure, and no shared inputs."""
    flags: Dict[str, bool] = {}
    inputs: Dict[str, torch.Tensor] = {}
    frozen = {p: p.requires_grad for p in model.parameters()}
    training, own = model.training, dict(vars(model.config))
    hooks = []
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for name, module in block.named_modules():
            if isinstance(module, nn.Linear):
                module.weight.requires_grad_(True)

                def record(mod, args, name=name):
                    if args and isinstance(args[0], torch.Tensor):
                        flags.setdefault(name, args[0].requires_grad)
                        inputs.setdefault(name, args[0])  # held, so that no other tensor reuses its id

                hooks.append(module.register_forward_pre_hook(record))
        device = next(model.parameters()).device
        with torch.random.fork_rng(devices=[]):
            # with a cache, transformers skips its packed-sequence search, which reads a value (.item())
            # that a meta tensor does not have; a decoder built for training often has use_cache off
            if not is_encoder(model.config):
                model.config.use_cache = True
            model.eval()(input_ids=torch.zeros(1, 4, dtype=torch.long, device=device))
    except Exception:  # noqa: BLE001  the structural answer below is the fallback, for any failure
        flags = {}
    finally:
        model.train(training)
        if "use_cache" in own:
            model.config.use_cache = own["use_cache"]
        else:
            vars(model.config).pop("use_cache", None)
        for h in hooks:
            h.remove()
        for p, wanted in frozen.items():
            p.requires_grad_(wanted)
    if flags and len(flags) == len(linears):
        reader: Dict[str, str] = {}
        for s in linears:
            reader[s.name] = next((n for n in reader if inputs[n] is inputs[s.name]), s.name)
        return [s.name for s in linears if not flags[s.name]], reader
    alone = {s.name: s.name for s in linears}
    attention, attention_out = _attention_linears(block, int(model.config.hidden_size))
    if not attention:
        return [], alone
    return [s.name for s in linears if s.name.startswith(attention + ".") and s.name != attention_out], alone


def _attention_linears(block: nn.Module, hidden_size: int) -> Tuple[str, str]:
    """(the attention module, its output projection) inside ``block``, both relative to it."""
    try:
        attention, attention_out, _, _ = split_block(block, hidden_size)
    except ConfigError:  # a block the structural search cannot split: no attention-specific counts
        return "", ""
    return attention, attention_out


def _ia3_vectors(model: nn.Module, block: nn.Module) -> List[Tuple[int, bool]]:
    """IA3's default targets in the first block, resolved by the tuner's own rule (per-family names)."""
    from mtpeft.tuners.ia3 import IA3Settings, ia3_targets

    chosen, ff, _ = ia3_targets(model, IA3Settings())
    paths = {id(m): n for n, m in model.named_modules()}
    out = []
    for m in block.modules():
        path = paths.get(id(m))
        if path in chosen:
            out.append((m.in_features, True) if path in ff else (m.out_features, False))
    return out


def load_architecture(name_or_path: Union[str, Path]) -> Architecture:
    """Short name or config.json path → exact counts, built on the meta device."""
    name, data = load_config_dict(name_or_path)
    return count_architecture(build_meta_model(data, source=name), name=name)
