"""Every PEFT method on every backbone family (Llama, Qwen2, RoBERTa-style, T5 encoder), on small
random-initialised configs: it injects, gradients reach only its own tensors, and the methods that
start as the identity (lora, adapters, ia3, mtl_lora) leave the base outputs unchanged at init.
Each layer's formula is checked against float64 math; prefix and prompt on an encoder against HF peft.
"""

import math

import pytest
import torch
import torch.nn as nn

from tiny_backbones import tiny_backbone
from mtpeft.config import PeftConfig, RunConfig, TaskConfig
from mtpeft.errors import ConfigError
from mtpeft.tasks.heads import mean_pool
from mtpeft.trainer.build import assemble
from mtpeft.tuners.registry import METHODS

FAMILIES = ["llama", "qwen2", "mistral", "codegen", "gpt_bigcode", "starcoder2", "roberta", "t5", "gpt2", "falcon"]
IDENTITY_AT_INIT = {"lora", "serial_adapter", "parallel_adapter", "ia3", "mtl_lora"}


def _cfg(method: str, **peft) -> RunConfig:
    tasks = [TaskConfig(name="defect", kind="classify", head_dropout=0.0),
             TaskConfig(name="search", kind="retrieve", head_dropout=0.0)]
    settings = dict(method=method, r=4, alpha=8, dropout=0.0, bottleneck=6, num_virtual_tokens=3)
    cfg = RunConfig(peft=PeftConfig(**{**settings, **peft}), tasks=tasks)
    cfg.train.max_seq_len = 64  # within the tiny RoBERTa's 78 positions with the virtual tokens
    return cfg


def _batch(vocab: int):
    ids = torch.randint(3, vocab, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    return ids, mask


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", list(METHODS))
def test_method_on_family(family, method):
    backbone = tiny_backbone(family)
    ids, mask = _batch(backbone.config.vocab_size)
    with torch.no_grad():
        before = mean_pool(backbone.base_model(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
    base = {id(p): p for p in backbone.parameters()}  # held: a freed id could come back as a tuner's
    model = assemble(backbone, _cfg(method)).eval()
    # the base after assembly (GPT-2's Conv1D weights are turned into new linear weights there)
    frozen = {id(p): p for p in backbone.parameters() if not p.requires_grad} | base
    tuner = [(n, p) for n, p in model.named_parameters() if p.requires_grad and not n.startswith("heads.")]
    assert tuner and all(id(p) not in frozen for _, p in tuner)
    model.set_task("defect")
    pooled = model.pooled(ids, mask)
    assert pooled.shape == before.shape
    if method in IDENTITY_AT_INIT:
        assert (pooled - before).abs().max().item() <= 1e-5
    else:
        assert (pooled - before).abs().max().item() > 1e-4
    loss = model.classify("defect", ids, mask).square().sum() + model.embed("search", ids, mask).sum()
    loss.backward()
    assert all(p.grad is None for p in backbone.parameters() if id(p) in frozen)
    assert all(p.grad is not None for _, p in tuner)
    assert sum(p.grad.abs().sum().item() for _, p in tuner) > 0
    if backbone.config.model_type not in ("roberta", "t5"):
        assert model.lm_logits(ids, mask).shape == (*ids.shape, backbone.config.vocab_size)
    else:
        with pytest.raises(ConfigError, match="decoder"):
            model.lm_logits(ids, mask)


def _f64(t):
    return t.detach().double()


def _perturbed(module: nn.Module) -> None:
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))


def test_layer_formulas_against_float64():
    backbone = tiny_backbone("llama")
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(4))
    for method in ("serial_adapter", "parallel_adapter", "ia3", "mtl_lora"):
        model = assemble(tiny_backbone("llama"), _cfg(method, adapter_activation="gelu", adapter_scaling=0.5))
        _perturbed(model)
        layer = model.backbone.model.layers[0]
        base = backbone.model.layers[0]
        with torch.no_grad():
            if method == "serial_adapter":
                m = layer.self_attn.o_proj
                h = _f64(base.self_attn.o_proj(x))
                want = h + 0.5 * (torch.nn.functional.gelu(h @ _f64(m.adapter_down).T + _f64(m.adapter_down_bias))
                                  @ _f64(m.adapter_up).T + _f64(m.adapter_up_bias))
                got = m(x)
            elif method == "parallel_adapter":
                m = layer.mlp
                z = torch.nn.functional.gelu(_f64(x) @ _f64(m.adapter_down).T + _f64(m.adapter_down_bias))
                want = _f64(base.mlp(x)) + 0.5 * (z @ _f64(m.adapter_up).T + _f64(m.adapter_up_bias))
                got = m(x)
            elif method == "ia3":
                k, d = layer.self_attn.k_proj, layer.mlp.down_proj
                assert not k.feedforward and d.feedforward
                want = _f64(x) @ _f64(base.self_attn.k_proj.weight).T * _f64(k.ia3_l).flatten()
                got = k(x)
                xd = torch.randn(2, 5, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
                want_d = (xd * _f64(d.ia3_l).flatten()) @ _f64(base.mlp.down_proj.weight).T
                assert (d(xd.float()).double() - want_d).abs().max().item() <= 1e-5
            else:
                m = layer.self_attn.q_proj
                for task, t in (("defect", 0), ("search", 1)):
                    model.set_task(task)
                    a, b, lam = _f64(m.lora_A), _f64(m.lora_B), _f64(m.lora_T[t])
                    want = _f64(base.self_attn.q_proj(x)) + (8 / 4) * ((_f64(x) @ a.T) * lam) @ b.T
                    assert (m(x).double() - want).abs().max().item() <= 1e-5
                continue
        assert (got.double() - want).abs().max().item() <= 1e-5, method


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_prefix_and_prompt_on_roberta_match_hf_peft(tmp_path, method):
    """HF peft's feature-extraction model on the same encoder is the reference for the hidden states."""
    from peft import PeftModel

    from mtpeft.data.dist import DistContext
    from mtpeft.trainer.export import export

    backbone = tiny_backbone("roberta")
    backbone.save_pretrained(str(tmp_path / "base"))
    cfg = _cfg(method)
    cfg.model.name_or_path = str(tmp_path / "base")
    model = assemble(backbone, cfg).eval()
    out = export(model, cfg, tmp_path / "export", DistContext(0, 1))
    ids, mask = _batch(backbone.config.vocab_size)
    mask = torch.ones_like(mask)
    from transformers import RobertaModel

    with torch.no_grad():
        kwargs, virtual = model.backbone_inputs(ids, mask)
        ours = model.encoder()(**kwargs).last_hidden_state[:, virtual:]
        peft_model = PeftModel.from_pretrained(RobertaModel.from_pretrained(str(tmp_path / "base")), str(out)).eval()
        theirs = peft_model(input_ids=ids, attention_mask=mask).last_hidden_state[:, -ids.shape[1]:]
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_defaults_follow_the_studies():
    p = PeftConfig()
    assert (p.r, p.alpha, p.dropout, p.bottleneck, p.num_virtual_tokens) == (16, 32.0, 0.05, 64, 20)
    assert math.isclose(p.alpha / p.r, 2.0)


def test_t5_prefix_attention_against_float64():
    """T5's encoder stack drops past_key_values: the wrapped self-attention must see the prefix keys
    and values, with T5's relative-position bias placing them just before the input."""
    model = assemble(tiny_backbone("t5"), _cfg("prefix")).eval()
    ids, mask = _batch(model.backbone.config.vocab_size)
    kwargs, _ = model.backbone_inputs(ids, mask)
    cache = model.input_module.carrier.cache
    pk, pv = cache.layers[0].keys.detach().double(), cache.layers[0].values.detach().double()
    block = model.backbone.encoder.block[0].layer[0]
    attn = block.SelfAttention.attention
    x = torch.randn(3, 9, 32, generator=torch.Generator().manual_seed(6))
    h = _f64(block.layer_norm(x))
    b, t, p, heads = 3, 9, pk.shape[2], 4

    def split(z):
        return z.view(b, t, heads, 8).transpose(1, 2)

    q, k, v = (split(h @ _f64(lin.weight).T) for lin in (attn.q, attn.k, attn.v))
    k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
    bias = attn.compute_bias(t, p + t, past_seen_tokens=p).double()
    keep = torch.cat([torch.ones(b, p), mask.double()], dim=1)[:, None, None, :]
    scores = q @ k.transpose(2, 3) + bias + (1 - keep) * -1e9
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, 32) @ _f64(attn.o.weight).T
    with torch.no_grad():
        model.input_module(ids, mask, model.backbone.get_input_embeddings(), False)  # fill the carrier
        from transformers.masking_utils import create_bidirectional_mask

        mask4 = create_bidirectional_mask(config=model.backbone.config, inputs_embeds=x, attention_mask=mask)
        got = block.SelfAttention(block.layer_norm(x), mask=mask4)[0]
    assert (got.double() - out).abs().max().item() <= 1e-5


def test_t5_prefix_export_reloads_through_mtpeft(tmp_path):
    from mtpeft.data.dist import DistContext
    from mtpeft.trainer.export import export, load_export

    cfg = _cfg("prefix", prefix_projection=True, prefix_hidden=8)
    model = assemble(tiny_backbone("t5"), cfg).eval()
    _perturbed(model)
    out = export(model, cfg, tmp_path / "export", DistContext(0, 1))
    assert not (out / "adapter_config.json").exists()  # HF peft would silently drop a T5 encoder prefix
    fresh = assemble(tiny_backbone("t5"), _cfg("prefix", prefix_projection=True, prefix_hidden=8)).eval()
    load_export(fresh, out)
    ids, mask = _batch(model.backbone.config.vocab_size)
    with torch.no_grad():
        assert (fresh.classify("defect", ids, mask) - model.classify("defect", ids, mask)).abs().max() <= 1e-5
        assert (fresh.pooled(ids, mask) - model.pooled(ids, mask)).abs().max() <= 1e-5


def test_ia3_on_a_4bit_base_matches_the_dequantized_weight():
    """Output scale through the fused NF4 op (``nf4_lora_linear(..., ia3=l)``), input scale through the
    base: both against float64 math on the dequantized weight."""
    from mtpeft.kernels.nf4_dequant import nf4_dequant
    from mtpeft.quant import QuantLinear
    from mtpeft.tuners.ia3 import IA3Linear

    torch.manual_seed(7)
    dense = nn.Linear(40, 24, bias=True)
    q = QuantLinear.from_linear(dense)
    w = nf4_dequant(q.quant_weight(), torch.float32).double()
    x = torch.randn(3, 40)
    for feedforward in (False, True):
        layer = IA3Linear(q, feedforward)
        with torch.no_grad():
            layer.ia3_l.copy_(torch.rand(layer.ia3_l.shape) + 0.5)
        scale = _f64(layer.ia3_l).flatten()
        if feedforward:
            want = (_f64(x) * scale) @ w.T + _f64(q.bias)
        else:
            want = (_f64(x) @ w.T + _f64(q.bias)) * scale
        got = layer(x)
        assert (got.double() - want).abs().max().item() <= 1e-4
        got.sum().backward()
        assert layer.ia3_l.grad is not None and layer.ia3_l.grad.abs().sum() > 0


@pytest.mark.parametrize("override,key", [("peft.bottleneck=0", "peft.bottleneck"),
                                          ("peft.num_virtual_tokens=-1", "peft.num_virtual_tokens"),
                                          ("peft.ia3_feedforward_modules=[up_proj]", "peft.ia3_feedforward_modules"),
                                          ("peft.target_modules=[]", "peft.target_modules")])
def test_bad_peft_keys_name_the_key(tmp_path, override, key):
    from distributed import tiny_config
    from mtpeft.config import load_config

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(tiny_config(tmp_path), [override])


def test_encoder_backbone_refuses_generation_and_unmatched_targets(tmp_path):
    from distributed import tiny_config
    from mtpeft.config import load_config
    from mtpeft.trainer.build import build_model

    tiny_backbone("roberta").save_pretrained(str(tmp_path / "enc"))
    cfg = load_config(tiny_config(tmp_path), [f"model.name_or_path={tmp_path / 'enc'}"])
    with pytest.raises(ConfigError, match="tasks\\[3\\].*decoder"):
        build_model(cfg)
    with pytest.raises(ConfigError, match="matched no linear layer"):
        assemble(tiny_backbone("roberta"), _cfg("lora", target_modules=["nope_proj"]))


def test_lora_dropout_on_a_4bit_base_runs_fused_and_matches_float64():
    from mtpeft.kernels.nf4_dequant import nf4_dequant
    from mtpeft.quant import QuantLinear
    from mtpeft.tuners.lora import LoraLinear

    torch.manual_seed(8)
    q = QuantLinear.from_linear(nn.Linear(40, 24, bias=True))
    layer = LoraLinear(q, r=4, alpha=8, dropout=0.5).train()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 40)
    torch.manual_seed(9)
    got = layer(x)
    torch.manual_seed(9)
    kept = _f64(torch.nn.functional.dropout(x, 0.5, training=True))
    w = nf4_dequant(q.quant_weight(), torch.float32).double()
    want = _f64(x) @ w.T + _f64(q.bias) + 2.0 * (kept @ _f64(layer.lora_A).T) @ _f64(layer.lora_B).T
    assert (got.double() - want).abs().max().item() <= 1e-4
    got.sum().backward()
    assert layer.lora_A.grad.abs().sum() > 0 and layer.lora_B.grad.abs().sum() > 0


DECODERS = ["llama", "qwen2", "mistral", "codegen", "gpt_bigcode", "starcoder2", "gpt2", "falcon"]


@pytest.mark.parametrize("family", DECODERS)
@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_default_target_exports_of_every_decoder_family_reload_in_hf_peft(tmp_path, family, method):
    """Default targets (the Llama names, resolved per family) on every decoder family; HF peft's
    ``PeftModel`` on the saved base and the export gives mtpeft's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mtpeft.data.dist import DistContext
    from mtpeft.trainer.export import export

    backbone = tiny_backbone(family)
    backbone.save_pretrained(str(tmp_path / "base"))
    cfg = _cfg(method)
    cfg.model.name_or_path = str(tmp_path / "base")
    model = assemble(backbone, cfg).eval()
    _perturbed(model)
    out = export(model, cfg, tmp_path / "export", DistContext(0, 1))
    ids, mask = _batch(backbone.config.vocab_size)
    mask = torch.ones_like(mask)
    with torch.no_grad():
        ours = model.lm_logits(ids, mask)
        base = AutoModelForCausalLM.from_pretrained(str(tmp_path / "base")).eval()
        plain = base(input_ids=ids).logits
        theirs = PeftModel.from_pretrained(base, str(out)).eval()(input_ids=ids, attention_mask=mask).logits
    assert (ours - theirs).abs().max().item() <= 1e-5
    assert (theirs - plain).abs().max().item() > 1e-3


# Each family's projections by role, read off transformers' module names (layer 0).
EXPECTED_LORA_TARGETS = {
    "codegen": {"attn.qkv_proj", "attn.out_proj", "mlp.fc_in", "mlp.fc_out"},
    "gpt_bigcode": {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"},
    "gpt2": {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"},  # Conv1D in transformers, nn.Linear here
    "starcoder2": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.c_fc",
                   "mlp.c_proj"},
    "mistral": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                "mlp.up_proj", "mlp.down_proj"},
}


@pytest.mark.parametrize("family", list(EXPECTED_LORA_TARGETS))
def test_default_targets_resolve_to_every_attention_and_mlp_projection(family):
    from mtpeft.conv1d import as_linear
    from mtpeft.tuners.family import find_linears

    backbone = tiny_backbone(family)
    as_linear(backbone)  # as assemble does (GPT-2's Conv1D layers)
    chosen = find_linears(backbone, PeftConfig().target_modules, "peft.target_modules")
    layer0 = {n.split(".0.", 1)[1] for n in chosen if ".0." in n}
    assert layer0 == EXPECTED_LORA_TARGETS[family]
    assert len(chosen) == 2 * len(layer0)  # both layers, nothing else (no LM head)


@pytest.mark.parametrize("family", ["llama", "codegen", "roberta"])
def test_all_linear_is_every_linear_but_the_lm_head(family):
    from mtpeft.tuners.family import find_linears

    backbone = tiny_backbone(family)
    every = {n for n, m in backbone.named_modules() if isinstance(m, nn.Linear)}
    chosen = set(find_linears(backbone, ["all-linear"], "peft.target_modules"))
    assert chosen == {n for n in every if n != "lm_head" and "pooler" not in n}


@pytest.mark.parametrize("family", ["roberta", "t5"])
@pytest.mark.parametrize("method", list(METHODS))
def test_method_on_a_4bit_encoder_matches_the_dequantized_encoder(family, method):
    """An NF4 encoder (UniXcoder- and CodeT5+-style) with every method: the pooled output and the
    task head equal the same tuner on a dense copy holding the dequantized weights, and the tuner
    gets gradients through the 4-bit layers."""
    from mtpeft.quant import QuantLinear
    from mtpeft.quant.linear import quantize_model
    from mtpeft.quant.nf4 import dequantize_nf4

    quant, dense = tiny_backbone(family), tiny_backbone(family)  # same seed: the same weights
    quantize_model(quant)
    assert sum(isinstance(m, QuantLinear) for m in quant.modules()) >= 8  # attention + feed-forward, 2 layers
    with torch.no_grad():
        for name, module in quant.named_modules():
            if isinstance(module, QuantLinear):
                dense.get_submodule(name).weight.copy_(dequantize_nf4(module.quant_weight(), torch.float32))
    models = [assemble(b, _cfg(method)).eval() for b in (quant, dense)]
    for m in models:
        _perturbed(m)
    ids, mask = _batch(quant.config.vocab_size)
    outs = []
    for m in models:
        m.set_task("defect")
        outs.append((m.pooled(ids, mask), m.classify("defect", ids, mask)))
    (pq, cq), (pd, cd) = outs
    assert (pq - pd).abs().max().item() <= 1e-4 and (cq - cd).abs().max().item() <= 1e-4
    (cq.square().sum() + models[0].embed("search", ids, mask).sum()).backward()
    tuner = [p for n, p in models[0].named_parameters() if p.requires_grad and not n.startswith("heads.")]
    assert tuner and all(p.grad is not None for p in tuner) and sum(p.grad.abs().sum() for p in tuner) > 0
