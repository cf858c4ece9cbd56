"""GPT-2's Conv1D layers (weights stored transposed) become nn.Linear before anything else sees them:
the model computes the same function (float64), a checkpoint streamed into 4-bit equals loading it
whole and quantizing, and the planner counts the same linears as the trainer holds."""

import pytest
import torch
from torch import nn

from mtpeft.conv1d import as_linear, may_hold_conv1d


def _gpt2(dtype=torch.float32, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=64, n_inner=160, n_layer=2, n_head=4, vocab_size=96, n_positions=64, bos_token_id=0,
                     eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).to(dtype).eval()


def _ids():
    return torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(5))


def test_the_turned_model_computes_the_same_function_in_float64():
    from transformers.pytorch_utils import Conv1D

    model = _gpt2(torch.float64)
    with torch.no_grad():
        want = model(input_ids=_ids()).logits
    conv = model.transformer.h[0].attn.c_attn
    swapped = as_linear(model)
    assert len(swapped) == 8 and "transformer.h.0.attn.c_attn" in swapped  # 4 per block, 2 blocks
    linear = model.transformer.h[0].attn.c_attn
    assert type(linear) is nn.Linear and not any(isinstance(m, Conv1D) for m in model.modules())
    assert torch.equal(linear.weight, conv.weight.t()) and torch.equal(linear.bias, conv.bias)
    assert (linear.in_features, linear.out_features) == (64, 192) and linear.weight.dtype == torch.float64
    with torch.no_grad():
        assert (model(input_ids=_ids()).logits - want).abs().max().item() <= 1e-12
    assert as_linear(model) == []  # nothing left to turn


def test_a_meta_model_is_turned_by_shape():
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=96))
    as_linear(model)
    fc = model.transformer.h[0].mlp.c_fc
    assert type(fc) is nn.Linear and fc.weight.is_meta and tuple(fc.weight.shape) == (256, 64)


def test_which_model_classes_hold_conv1d():
    import transformers as tf

    assert may_hold_conv1d(tf.GPT2LMHeadModel) and may_hold_conv1d(tf.OpenAIGPTLMHeadModel)
    assert not any(may_hold_conv1d(c) for c in (tf.LlamaForCausalLM, tf.GPTBigCodeForCausalLM, tf.RobertaModel, None))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_streamed_4bit_gpt2_equals_loading_whole_and_quantizing(tmp_path, dtype):
    from transformers import AutoModelForCausalLM

    from mtpeft.quant import QuantLinear
    from mtpeft.quant.linear import quantize_model
    from mtpeft.quant.streaming_loader import load_quantized_backbone

    _gpt2().save_pretrained(tmp_path, max_shard_size="60KB")
    ref = quantize_model(AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype), skip=("lm_head",)).eval()
    got = load_quantized_backbone(tmp_path, None, dtype)
    fc = got.transformer.h[1].mlp.c_fc
    assert isinstance(fc, QuantLinear) and tuple(fc.weight_shape) == (160, 64) and fc.bias is not None
    with torch.no_grad():
        assert torch.equal(got(input_ids=_ids()).logits, ref(input_ids=_ids()).logits)


def test_the_planner_counts_the_linears_the_trainer_holds():
    from mtpeft.profile.architecture import build_meta_model, count_architecture

    model = _gpt2()
    arch = count_architecture(build_meta_model(model.config.to_dict()), "gpt2")
    per_block = 64 * 192 + 64 * 64 + 64 * 160 + 160 * 64
    assert arch.quantizable_linear_params == 2 * per_block
    assert [s.name for s in arch.block_linears] == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    assert arch.total_params == sum(p.numel() for p in model.parameters())
