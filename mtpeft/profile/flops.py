"""Matmul FLOPs of one training step of a decoder whose base is frozen.

The usual "backward = 2 × forward" rule (DeepSpeed's flops profiler, 6·N·tokens) assumes every
weight gets a gradient. With a frozen base a linear's backward only computes the input gradient
``dX = dY·W`` (one matmul, same FLOPs as its forward); weight gradients exist only for the PEFT
parameters. So, per step, with ``T = b·L`` tokens and a matmul ``[m, k]·[k, n]`` costing ``2·m·n·k``:

  forward      every block linear ``2·T·in·out``; attention ``QKᵀ`` and ``P·V`` each ``2·b·heads·L·L_k·d``
               (causal attention counted in full, as torch's FlopCounterMode and the fused kernels'
               dense tiles do); LM head ``2·T·h·V``; LoRA ``2·T·r·(in + out)`` per adapted linear.
  backward     input gradients of the frozen linears and the LM head (1 × their forward); attention
               ``dQ, dK, dP, dV`` (2 × its forward); LoRA: ``dB, d(xA), dA, dx`` (2 × its forward).
               Block 0's linears that read the block input (q/k/v or a fused qkv, and in a parallel
               block such as CodeGen's the feed-forward input too; traced, ``Architecture.
               block_input_linears``) read the frozen embedding, which needs no gradient: their input
               gradients (base and LoRA ``dx``) are not computed, exactly as autograd skips them.
  recompute    with gradient checkpointing, one more forward of the blocks (not the LM head).
               torch's non-reentrant checkpoint stops recomputing once the last tensor backward
               needs exists, so the block's final matmul (e.g. down_proj's LoRA B) is skipped in
               practice: 2·T·r·h per block, about 0.5 % on the test model, not subtracted here.

Elementwise work (norms, RoPE, softmax, SiLU, loss, Adam) is not counted: it is memory-bound and
torch's FlopCounterMode ignores it too. Flash attention's backward also recomputes ``QKᵀ``; that
kernel-internal matmul is not counted here (FlopCounterMode's SDPA rule omits it as well).
"""

from __future__ import annotations

from typing import Any, Dict, Union

from mtpeft.conv1d import as_linear
from mtpeft.profile.architecture import Architecture, count_architecture, load_architecture

_ROLES_BY_COUNT = {1: ("qkv",), 2: ("q", "kv"), 3: ("q", "k", "v")}  # a fused qkv; q beside a fused kv; apart


def _qkv_roles(arch: Architecture) -> Dict[str, str]:
    """Which of q, k, v each attention input linear of a block produces, from their number and order
    (every family registers q before k before v); a parallel block's feed-forward input is not one."""
    attention = [n for n in arch.block_input_linears if n.startswith(arch.attention_path + ".")]
    roles = _ROLES_BY_COUNT.get(len(attention), ("qkv",) * len(attention))
    return dict(zip(attention, roles))


def _as_architecture(config: Any) -> Architecture:
    if isinstance(config, Architecture):
        return config
    if isinstance(config, str):
        return load_architecture(config)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

    if isinstance(config, dict):
        config = AutoConfig.for_model(**config)
    if not isinstance(config, PretrainedConfig):
        raise TypeError(f"step_flops: expected a name, config dict, PretrainedConfig or Architecture, got {type(config)}")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    as_linear(model)  # GPT-2's Conv1D layers, as the trainer holds them
    return count_architecture(model, getattr(config, "model_type", "model"))


def step_flops(config: Union[str, Dict[str, Any], Any], seq: int, micro_batch: int, peft: str = "lora",
               r: int = 16, checkpointing: bool = True, targets: Any = None, virtual_tokens: int = 0,
               bottleneck: int = 64, embedding_grad: bool = False) -> Dict[str, int]:
    """Named FLOP terms of one optimizer step on one micro-batch, and their ``total``.

    ``peft``: lora (``r``, ``targets`` = leaf names, default all block linears), ia3, prompt / prefix
    (``virtual_tokens``), serial_adapter / parallel_adapter (``bottleneck``), or none.
    ``embedding_grad``: the embedding output requires grad anyway (HF's ``gradient_checkpointing_enable``
    on a PEFT model registers ``enable_input_require_grads``), so block 0 computes its q/k/v input grads.
    """
    arch = _as_architecture(config)
    b, n_layers = micro_batch, arch.num_layers
    L = seq + (virtual_tokens if peft == "prompt" else 0)
    keys = L + (virtual_tokens if peft == "prefix" else 0)
    T, h = b * L, arch.hidden_size
    leaf = lambda s: s.name.rsplit(".", 1)[-1]  # noqa: E731
    lora = [s for s in arch.block_linears if peft == "lora" and (targets is None or leaf(s) in targets)]

    fwd_linear = n_layers * sum(2 * T * s.in_features * s.out_features for s in arch.block_linears)
    one_attn_matmul = 2 * b * arch.num_heads * L * keys * arch.head_dim
    fwd_attn = n_layers * 2 * one_attn_matmul
    fwd_lora = n_layers * sum(2 * T * r * (s.in_features + s.out_features) for s in lora)
    fwd_adapter = 0
    if peft in ("serial_adapter", "parallel_adapter"):
        fwd_adapter = n_layers * (2 if peft == "serial_adapter" else 1) * 2 * (2 * T * h * bottleneck)
    fwd_head = 2 * T * h * arch.vocab_size

    # Block 0: inputs of q/k/v carry no gradient unless the prompt itself is trained.
    layer0_frozen_input = peft != "prompt" and not embedding_grad
    skipped_dx = 0
    skipped_lora_dx = 0
    bwd_attn = 2 * fwd_attn
    if layer0_frozen_input:
        reads_input = set(arch.block_input_linears)
        skipped_dx = sum(2 * T * s.in_features * s.out_features for s in arch.block_linears if s.name in reads_input)
        skipped_lora_dx = sum(2 * T * r * s.in_features for s in lora if s.name in reads_input)
        trained = {role for s in lora for role in _qkv_roles(arch).get(s.name, ())}
        q_grad = "q" in trained or peft == "prefix"
        k_grad = "k" in trained or peft in ("prefix", "ia3")
        v_grad = "v" in trained or peft in ("prefix", "ia3")
        layer0 = one_attn_matmul * (int(q_grad) + int(k_grad) + int(q_grad or k_grad) + int(v_grad))
        bwd_attn = 2 * fwd_attn * (n_layers - 1) // n_layers + layer0

    terms = {
        "forward_linears": fwd_linear,
        "forward_attention": fwd_attn,
        "forward_peft": fwd_lora + fwd_adapter,
        "forward_lm_head": fwd_head,
        "backward_input_grad_linears": fwd_linear - skipped_dx,
        "backward_attention": bwd_attn,
        "backward_peft": 2 * fwd_lora - skipped_lora_dx + 2 * fwd_adapter,
        "backward_lm_head_input_grad": fwd_head,
        "recompute": (fwd_linear + fwd_attn + fwd_lora + fwd_adapter) if checkpointing else 0,
    }
    terms["total"] = sum(terms.values())
    return terms
