"""The structural search finds every family's blocks, attention and feed-forward from the shapes of
their linears: checked against each family's own module names (tiny random models, the same with a
4-bit base, and the real sizes of shipped architectures built on the meta device)."""

import pytest
import torch

from tiny_backbones import tiny_backbone
from mtpeft.errors import ConfigError
from mtpeft.tuners.structure import ffn_modules, find_blocks

# Layer 0 of each family by transformers' names: (block, attention, its output, feed-forward, its output).
EXPECTED = {
    "llama": ("model.layers.0", "self_attn", "self_attn.o_proj", "mlp", "mlp.down_proj"),
    "mistral": ("model.layers.0", "self_attn", "self_attn.o_proj", "mlp", "mlp.down_proj"),
    "qwen2": ("model.layers.0", "self_attn", "self_attn.o_proj", "mlp", "mlp.down_proj"),
    "starcoder2": ("model.layers.0", "self_attn", "self_attn.o_proj", "mlp", "mlp.c_proj"),
    "codegen": ("transformer.h.0", "attn", "attn.out_proj", "mlp", "mlp.fc_out"),
    "gpt_bigcode": ("transformer.h.0", "attn", "attn.c_proj", "mlp", "mlp.c_proj"),
    "gpt2": ("transformer.h.0", "attn", "attn.c_proj", "mlp", "mlp.c_proj"),  # Conv1D, turned into nn.Linear
    "falcon": ("transformer.h.0", "self_attention", "self_attention.dense", "mlp", "mlp.dense_4h_to_h"),
    "roberta": ("encoder.layer.0", "attention", "attention.output.dense", None, "output.dense"),
    "t5": ("encoder.block.0", "layer.0.SelfAttention", "layer.0.SelfAttention.o", "layer.1.DenseReluDense",
           "layer.1.DenseReluDense.wo"),
}


def _check(model, family: str, layers: int) -> None:
    blocks = find_blocks(model)
    assert len(blocks) == layers
    path, attention, attention_out, ffn, ffn_out = EXPECTED[family]
    b = blocks[0]
    assert (b.path, b.attention, b.attention_out, b.ffn, b.ffn_out) == (
        path, f"{path}.{attention}", f"{path}.{attention_out}", ffn and f"{path}.{ffn}", f"{path}.{ffn_out}")
    assert blocks[-1].path == path[:-1] + str(layers - 1)


@pytest.mark.parametrize("quant", ["none", "nf4"])
@pytest.mark.parametrize("family", list(EXPECTED))
def test_tiny_model_of_every_family(family, quant):
    from mtpeft.conv1d import as_linear

    model = tiny_backbone(family)
    as_linear(model)  # as the trainer builds it (GPT-2)
    if quant == "nf4":
        from mtpeft.quant.linear import quantize_model

        quantize_model(model)
    _check(model, family, 2)


REAL = {  # shipped architecture files, plus the encoders' published configs (roberta-base, CodeT5+ 220m)
    "deepseek-coder-1.3b": "llama", "qwen2.5-coder-1.5b": "qwen2", "starcoder2-3b": "starcoder2",
    "codegen-350m": "codegen",
}


def _meta(data: dict):
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(**data))


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_sizes_of_shipped_architectures(name):
    from mtpeft.profile.architecture import load_config_dict

    _, data = load_config_dict(name)
    _check(_meta(data), REAL[name], data.get("num_hidden_layers") or data["n_layer"])


def test_real_sizes_of_gpt_bigcode_and_the_encoders():
    import transformers as tf

    with torch.device("meta"):
        bigcode = tf.GPTBigCodeForCausalLM(tf.GPTBigCodeConfig(n_embd=6144, n_layer=2, n_head=48, multi_query=True))
        roberta = tf.RobertaModel(tf.RobertaConfig())  # roberta-base widths (UniXcoder)
        t5 = tf.T5EncoderModel(tf.T5Config(d_model=768, d_ff=3072, num_layers=2, num_heads=12, d_kv=64))
    _check(bigcode, "gpt_bigcode", 2)
    _check(roberta, "roberta", 12)
    _check(t5, "t5", 2)


def test_parallel_adapter_places_are_the_feed_forwards_or_the_table():
    names, split = ffn_modules(tiny_backbone("roberta"))
    assert split and names == ["encoder.layer.0.output", "encoder.layer.1.output"]
    names, split = ffn_modules(tiny_backbone("codegen"))
    assert not split and names == ["transformer.h.0.mlp", "transformer.h.1.mlp"]


def test_a_model_without_blocks_is_named():
    with pytest.raises(ConfigError, match="no list of transformer blocks"):
        find_blocks(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_a_mixture_of_experts_block_says_which_methods_apply():
    """Mixtral keeps its experts in 3-D tensors: no linear feed-forward. The adapters are refused in one
    line that names what works; LoRA on the default targets and IA3 on named attention targets train."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from mtpeft.config import PeftConfig, RunConfig, TaskConfig
    from mtpeft.trainer.build import assemble

    def backbone():
        torch.manual_seed(0)
        return MixtralForCausalLM(MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
                                                num_local_experts=2)).eval()

    def cfg(**peft):
        return RunConfig(peft=PeftConfig(**peft), tasks=[TaskConfig(name="defect", kind="classify")])

    with pytest.raises(ConfigError, match="no feed-forward made of linear layers.*mixture-of-experts.*use lora"):
        assemble(backbone(), cfg(method="serial_adapter"))
    with pytest.raises(ConfigError, match="mixture-of-experts"):
        assemble(backbone(), cfg(method="ia3"))
    for peft in ({"method": "lora"}, {"method": "ia3", "ia3_target_modules": ["k_proj", "v_proj"],
                                      "ia3_feedforward_modules": []}):
        model = assemble(backbone(), cfg(**peft))
        assert any(p.requires_grad for n, p in model.named_parameters() if not n.startswith("heads."))
