"""The T5 prefix reaches the encoder's self-attentions through a carrier each injected model owns:
no class attribute carries it, so two models in one process never read each other's prefix."""

import pytest
import torch

from tiny_backbones import tiny_backbone
from mtpeft.config import PeftConfig, RunConfig, TaskConfig
from mtpeft.trainer.build import assemble
from mtpeft.tuners.prefix import PrefixCarrier, T5PrefixAttention


def _model():
    cfg = RunConfig(peft=PeftConfig(method="prefix", num_virtual_tokens=3),
                    tasks=[TaskConfig(name="defect", kind="classify", head_dropout=0.0)])
    return assemble(tiny_backbone("t5"), cfg).eval()


def test_each_t5_prefix_model_has_its_own_carrier():
    first, second = _model(), _model()
    assert first.input_module.carrier is not second.input_module.carrier
    attentions = [m for m in first.backbone.modules() if isinstance(m, T5PrefixAttention)]
    assert attentions and all(a.carrier is first.input_module.carrier for a in attentions)
    ids = torch.randint(3, first.backbone.config.vocab_size, (2, 5))
    with torch.no_grad():
        first.backbone_inputs(ids, torch.ones_like(ids))
    assert first.input_module.carrier.tokens == 3 and first.input_module.carrier.cache is not None
    assert second.input_module.carrier.cache is None and second.input_module.carrier.tokens == 0
    assert "cache" not in vars(PrefixCarrier) and "tokens" not in vars(PrefixCarrier)


def _kv_cases():
    import transformers as tf

    return {
        "llama-gqa": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                                                num_attention_heads=4, num_key_value_heads=2, vocab_size=97)),
        "gpt_bigcode-multi-query": lambda: tf.GPTBigCodeForCausalLM(tf.GPTBigCodeConfig(n_embd=32, n_layer=1, n_head=4,
                                                                                        vocab_size=97, multi_query=True)),
        "gpt_bigcode-mha": lambda: tf.GPTBigCodeForCausalLM(tf.GPTBigCodeConfig(n_embd=32, n_layer=1, n_head=4,
                                                                                vocab_size=97, multi_query=False)),
        "falcon-multi-query": lambda: tf.FalconForCausalLM(tf.FalconConfig(hidden_size=32, num_hidden_layers=1,
                                                                           num_attention_heads=4, vocab_size=97)),
        "falcon-mha": lambda: tf.FalconForCausalLM(tf.FalconConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                                                   vocab_size=97, multi_query=False)),
        "falcon-new-architecture": lambda: tf.FalconForCausalLM(tf.FalconConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_kv_heads=2, vocab_size=97,
            new_decoder_architecture=True)),
        "codegen": lambda: tf.CodeGenForCausalLM(tf.CodeGenConfig(n_embd=32, n_layer=1, n_head=4, rotary_dim=4, vocab_size=97)),
        "gpt_neox": lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                                                   num_attention_heads=4, vocab_size=97)),
    }


@pytest.mark.parametrize("case", sorted(_kv_cases()))
def test_key_value_heads_are_the_ones_the_model_caches(case):
    """The prefix joins each layer's key/value cache: its head count is the cache's, read off a real
    forward (Falcon's multi_query and new_decoder_architecture each change it)."""
    from mtpeft.tuners.family import key_value_heads

    torch.manual_seed(0)
    model = _kv_cases()[case]().eval()
    with torch.no_grad():
        cache = model(input_ids=torch.zeros(1, 3, dtype=torch.long), use_cache=True).past_key_values
    assert key_value_heads(model.config) == cache.layers[0].keys.shape[1]
