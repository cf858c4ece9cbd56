"""QuantLinear and the Triton NF4 dequant kernel (Triton's interpreter on CPU) vs bitsandbytes / float64."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # read when @triton.jit decorates: must precede the kernel import

import importlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as BF  # noqa: E402

from mtpeft.kernels import backend  # noqa: E402
from mtpeft.quant import QuantLinear, dequantize_nf4, quantize_model, quantize_nf4, to_bnb  # noqa: E402

# Shapes avoid [.., k] with k % 16 == 0 but k % 64 != 0, where bitsandbytes 0.50.2's AVX-512 CPU
# dequantization misplaces absmax (see test_nf4_format.test_dequant_rows_straddling_blocks).
KERNEL_SHAPES = [(129, 200), (37, 31), (5, 7), (70, 257)]


@pytest.fixture(autouse=True)
def _eager_bitsandbytes():
    # bitsandbytes torch.compile()s its odd-shape fallback; compiling costs seconds per shape.
    import torch._dynamo

    with torch._dynamo.config.patch(disable=True):
        yield


@pytest.fixture
def kernel_module():
    """The kernel module with interpreted kernels, reloaded if something imported it without the env var."""
    from triton.runtime.interpreter import InterpretedFunction

    # (import_module: the package re-exports a function of the same name as this submodule)
    module = importlib.import_module("mtpeft.kernels.nf4_dequant")
    if not isinstance(module.nf4_dequant_kernel, InterpretedFunction):
        module = importlib.reload(module)
    return module


def _bnb_dequant(q, dtype):
    packed, state = to_bnb(q)
    state.dtype = dtype
    return BF.dequantize_4bit(packed, state, quant_type="nf4").reshape(q.shape)


def _rel_err(got, want):
    return ((got.double() - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", KERNEL_SHAPES)
def test_triton_dequant_equals_bitsandbytes(kernel_module, shape, double_quant, dtype):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))) * 0.05
    q = quantize_nf4(w.to(dtype), double_quant=double_quant)
    out = torch.full(shape, float("nan"), dtype=dtype)
    got = kernel_module.nf4_dequant_triton(q, dtype, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(got, _bnb_dequant(q, dtype))
    with backend.poisoned_outputs():
        assert torch.equal(kernel_module.nf4_dequant_triton(q, dtype), got)


@pytest.mark.parametrize("blocksize", [128, 4096])
def test_triton_dequant_other_blocksizes_equal_bitsandbytes(kernel_module, blocksize):
    """Blocks wider than one program's default tile (4096: the tile grows to one whole block)."""
    w = torch.randn(33, 300, generator=torch.Generator().manual_seed(blocksize)) * 0.05
    q = quantize_nf4(w.to(torch.bfloat16), blocksize=blocksize, double_quant=True)
    with backend.poisoned_outputs():
        assert torch.equal(kernel_module.nf4_dequant_triton(q, torch.bfloat16), _bnb_dequant(q, torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_dequant_row_scale(kernel_module, dtype):
    """IA3's output scale folded into the rows: fp32 product of bitsandbytes' fp32 value and the
    scale, rounded once to the dtype."""
    w = torch.randn(70, 257, generator=torch.Generator().manual_seed(3)) * 0.05
    q = quantize_nf4(w.to(dtype), double_quant=True)
    scale = torch.rand(70, generator=torch.Generator().manual_seed(4)) + 0.5
    want = (_bnb_dequant(q, torch.float32) * scale[:, None]).to(dtype)
    with backend.poisoned_outputs():
        assert torch.equal(kernel_module.nf4_dequant_triton(q, dtype, row_scale=scale), want)


def test_dispatch_follows_env(kernel_module, monkeypatch):
    q = quantize_nf4(torch.randn(9, 70))
    monkeypatch.setenv("MTPEFT_KERNELS", "torch")
    assert torch.equal(kernel_module.nf4_dequant(q, torch.float32), dequantize_nf4(q, torch.float32))
    monkeypatch.setenv("MTPEFT_KERNELS", "triton")
    calls = []
    monkeypatch.setattr(kernel_module, "nf4_dequant_triton", lambda *a: calls.append(a) or dequantize_nf4(*a))
    kernel_module.nf4_dequant(q, torch.float32)
    assert len(calls) == 1


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_forward_backward_against_float64(kernel_module, monkeypatch, dtype, tol):
    torch.manual_seed(0)
    m, k, n = 37, 200, 129
    lin = nn.Linear(k, n).to(dtype)
    layer = QuantLinear.from_linear(lin)
    w64 = _bnb_dequant(quantize_nf4(lin.weight.data), torch.float32).double()
    x = torch.randn(3, m, k, dtype=dtype)
    g = torch.randn(3, m, n, dtype=dtype)
    y64 = x.double() @ w64.T + lin.bias.double()
    dx64 = g.double() @ w64
    outputs = {}
    for mode in ("torch", "triton"):
        monkeypatch.setenv("MTPEFT_KERNELS", mode)
        xr = x.clone().requires_grad_(True)
        with backend.poisoned_outputs():
            y = layer(xr)
        y.backward(g)
        assert y.dtype == dtype and y.shape == (3, m, n)
        assert _rel_err(y, y64) <= tol and _rel_err(xr.grad, dx64) <= tol
        outputs[mode] = (y.detach(), xr.grad)
    # training goes through the fused op (dequantized again in backward), so the two paths differ
    # only by GEMM rounding
    assert _rel_err(outputs["torch"][0], outputs["triton"][0].double()) <= tol
    assert _rel_err(outputs["torch"][1], outputs["triton"][1].double()) <= tol
    assert all(p.grad is None for p in layer.parameters())


def test_storage_is_frozen_bf16_bytes():
    q = quantize_nf4(torch.randn(33, 70), double_quant=True)
    layer = QuantLinear.from_nf4(q, bias=torch.randn(33))
    params = dict(layer.named_parameters())
    assert set(params) == {"packed", "absmax", "absmax_scale", "absmax_code", "absmax_offset", "bias"}
    assert all(not p.requires_grad for p in params.values())
    assert all(p.dtype == torch.bfloat16 for name, p in params.items() if name != "bias")
    # every byte accounted for: 1155 packed (odd -> 1 pad byte), 37 absmax codes (+1 pad), 1 fp32 scale,
    # 256 fp32 code entries, 1 fp32 offset
    assert [params[k].numel() for k in ("packed", "absmax", "absmax_scale", "absmax_code", "absmax_offset")] == [578, 19, 2, 512, 2]
    view = layer.quant_weight()
    assert torch.equal(view.packed, q.packed) and torch.equal(view.absmax, q.absmax)
    assert torch.equal(view.absmax_scale, q.absmax_scale) and torch.equal(view.absmax_code, q.absmax_code)
    assert view.absmax_offset == q.absmax_offset and view.shape == q.shape and view.dtype == q.dtype
    assert (layer.in_features, layer.out_features, layer.weight_shape) == (70, 33, torch.Size([33, 70]))


def test_casts_move_but_never_convert_the_bytes():
    layer = QuantLinear.from_linear(nn.Linear(70, 33))
    before = {n: p.detach().clone() for n, p in layer.named_parameters() if n != "bias"}
    x = torch.randn(4, 70)
    y = layer(x)
    for cast in (layer.half, layer.float, layer.double, lambda: layer.to(torch.bfloat16)):
        cast()
        for name, p in layer.named_parameters():
            if name != "bias":
                assert p.dtype == torch.bfloat16 and torch.equal(p.view(torch.int16), before[name].view(torch.int16))
    assert layer.bias.dtype == torch.bfloat16
    assert torch.equal(layer(x), nn.functional.linear(x, dequantize_nf4(layer.quant_weight(), torch.float32), layer.bias.float()))
    assert _rel_err(layer(x), y.double()) < 1e-2


def test_state_dict_round_trip_and_partitioned_error():
    source = QuantLinear.from_linear(nn.Linear(70, 33))
    target = QuantLinear.from_linear(nn.Linear(70, 33))
    target.load_state_dict(source.state_dict())
    x = torch.randn(2, 70)
    assert target._offset == source._offset and torch.equal(target(x), source(x))
    target.packed.data = torch.empty(0, dtype=torch.bfloat16)  # what ZeRO-3 leaves outside forward
    with pytest.raises(RuntimeError, match="partitioned"):
        target.quant_weight()


def test_from_bitsandbytes_checkpoint_without_requantizing():
    torch.manual_seed(1)
    lin = nn.Linear(72, 40)
    layer4 = bnb.nn.Linear4bit(72, 40, quant_type="nf4", compress_statistics=True)
    layer4.load_state_dict(lin.state_dict())
    layer4 = layer4.to("cpu")
    packed = layer4.weight.data.reshape(-1).clone()
    x = torch.randn(5, 72)
    want = x @ BF.dequantize_4bit(layer4.weight.data, layer4.weight.quant_state).T + lin.bias
    for layer in (QuantLinear.from_bnb_state_dict(layer4.state_dict()), QuantLinear.from_linear4bit(layer4)):
        assert torch.equal(layer.quant_weight().packed, packed)
        assert torch.allclose(layer(x), want, rtol=0, atol=1e-6)
    assert torch.equal(layer.quant_weight().packed, quantize_nf4(lin.weight.data).packed)  # same bytes as ours


def test_quantize_model_llama_matches_dequantized_reference():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = LlamaForCausalLM(config).eval()
    reference = LlamaForCausalLM(config).eval()
    reference.load_state_dict(model.state_dict())
    for module in reference.modules():  # the same model with each linear's weight replaced by bnb's dequant
        if isinstance(module, nn.Linear) and module is not reference.lm_head:
            module.weight.data = _bnb_dequant(quantize_nf4(module.weight.data), torch.float32)
    quantize_model(model, skip=("lm_head", "layers.1.mlp.down_proj"))
    kinds = {name: type(m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, QuantLinear))}
    assert kinds.pop("lm_head") is nn.Linear and kinds.pop("model.layers.1.mlp.down_proj") is nn.Linear
    assert len(kinds) == 13 and set(kinds.values()) == {QuantLinear}
    reference.model.layers[1].mlp.down_proj.weight.data = model.model.layers[1].mlp.down_proj.weight.data
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)
