"""What the planner reads off a block by tracing one forward, not by module names: which linears read
the block's input (block 0's input gradients are never computed) and which read the very same tensor
(LoRA saves that input once). Expected groups written by hand from each family's modeling code."""

import pytest

from mtpeft.profile.architecture import count_architecture
from tiny_backbones import tiny_backbone

LLAMA_LIKE = {
    "readers": [{"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"}, {"self_attn.o_proj"},
                {"mlp.gate_proj", "mlp.up_proj"}, {"mlp.down_proj"}],
    "block_input": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    "attention_output": "self_attn.o_proj",
}
EXPECTED = {
    "llama": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,
    "starcoder2": {  # q/k/v, then a plain (ungated) feed-forward
        "readers": [{"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"}, {"self_attn.o_proj"},
                    {"mlp.c_fc"}, {"mlp.c_proj"}],
        "block_input": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        "attention_output": "self_attn.o_proj",
    },
    "codegen": {  # a parallel block: attention and feed-forward both read ln_1's output
        "readers": [{"attn.qkv_proj", "mlp.fc_in"}, {"attn.out_proj"}, {"mlp.fc_out"}],
        "block_input": ["attn.qkv_proj", "mlp.fc_in"],
        "attention_output": "attn.out_proj",
    },
    "gpt_bigcode": {  # one fused c_attn; every linear reads its own tensor
        "readers": [{"attn.c_attn"}, {"attn.c_proj"}, {"mlp.c_fc"}, {"mlp.c_proj"}],
        "block_input": ["attn.c_attn"],
        "attention_output": "attn.c_proj",
    },
    "roberta": {
        "readers": [{"attention.self.query", "attention.self.key", "attention.self.value"},
                    {"attention.output.dense"}, {"intermediate.dense"}, {"output.dense"}],
        "block_input": ["attention.self.query", "attention.self.key", "attention.self.value"],
        "attention_output": "attention.output.dense",
    },
    "t5": {  # gated-gelu: wi_0 and wi_1 read the same normed input
        "readers": [{"layer.0.SelfAttention.q", "layer.0.SelfAttention.k", "layer.0.SelfAttention.v"},
                    {"layer.0.SelfAttention.o"}, {"layer.1.DenseReluDense.wi_0", "layer.1.DenseReluDense.wi_1"},
                    {"layer.1.DenseReluDense.wo"}],
        "block_input": ["layer.0.SelfAttention.q", "layer.0.SelfAttention.k", "layer.0.SelfAttention.v"],
        "attention_output": "layer.0.SelfAttention.o",
    },
}


def _groups(reader: dict) -> list:
    groups: dict = {}
    for name, first in reader.items():
        groups.setdefault(first, set()).add(name)
    return sorted(groups.values(), key=sorted)


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_traced_inputs_of_every_family(family):
    arch = count_architecture(tiny_backbone(family), family)
    want = EXPECTED[family]
    assert _groups(arch.input_reader) == sorted(want["readers"], key=sorted)
    assert all(arch.input_reader[n] == min(g, key=[s.name for s in arch.block_linears].index)
               for g in want["readers"] for n in g)  # the first reader in module order names the group
    assert arch.block_input_linears == want["block_input"]
    assert arch.attention_output == want["attention_output"]


def test_a_meta_model_built_for_training_is_traced_too():
    """use_cache off (as a training script builds it) sent transformers' mask code to a value a meta
    tensor does not have, and the trace fell back to no shared inputs; the setting is left as it was."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=97, use_cache=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    arch = count_architecture(model, "llama")
    assert _groups(arch.input_reader) == sorted(LLAMA_LIKE["readers"], key=sorted)
    assert model.config.use_cache is False and not any(p.requires_grad is False for p in model.parameters())
