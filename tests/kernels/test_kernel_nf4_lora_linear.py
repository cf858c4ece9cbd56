"""nf4_lora_linear, Triton (interpreter) and torch paths, against float64 math on bitsandbytes' NF4.

Weights are quantized by bitsandbytes. The oracle decodes them from the documented layout with
bitsandbytes' own code tables (not mtpeft.quant; and not bitsandbytes' CPU dequantize_4bit, which
0.50.2 gets wrong for some widths, e.g. K=96), rounds to the dtype the op computes in, and does the
rest of the layer in float64 with autograd, so it shares no code with either path.
"""

import dataclasses
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated (import time)

import pytest
import torch
import bitsandbytes.functional as bnbf

from mtpeft.kernels import backend
from mtpeft.kernels.nf4_lora_linear import nf4_lora_linear
from mtpeft.quant.nf4_format import NF4Weight

# fused: the kernels that decode NF4 inside the GEMM (small M); dequant: NF4 -> buffer -> matmul
# with the rank-r pass over dy (large M); torch: the reference. "triton" picks one by M.
PATHS = ["fused", "dequant", "torch"]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def oracle_dequant(packed: torch.Tensor, state) -> torch.Tensor:
    """fp32 code[nibble] * absmax[block], rounded once to the weight's dtype (bitsandbytes' semantics)."""
    numel = state.shape.numel()
    flat = packed.reshape(-1)
    nibbles = torch.stack([flat >> 4, flat & 15], dim=1).reshape(-1)[:numel].long()
    absmax = state.absmax.float()
    if state.nested:
        scales = state.state2.absmax.float().repeat_interleave(state.state2.blocksize)[: absmax.numel()]
        absmax = state.state2.code.float()[state.absmax.long()] * scales + state.offset.float()
    per_element = absmax.repeat_interleave(state.blocksize)[:numel]
    return (state.code.float()[nibbles] * per_element).reshape(state.shape).to(state.dtype)


def bnb_nf4(weight: torch.Tensor, double_quant: bool, blocksize: int = 64):
    """(NF4Weight, the oracle's dequantization in the weight's dtype)."""
    packed, state = bnbf.quantize_4bit(weight, quant_type="nf4", blocksize=blocksize,
                                       compress_statistics=double_quant)
    q = NF4Weight(packed=packed.reshape(-1), absmax=state.absmax, shape=state.shape, dtype=state.dtype,
                  blocksize=blocksize)
    if double_quant:
        q.absmax_scale = state.state2.absmax
        q.absmax_code = state.state2.code
        q.absmax_offset = float(state.offset)
    return q, oracle_dequant(packed, state)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref).abs().max() / ref.abs().max()).item()


def run_case(monkeypatch, kernels, x_shape, n, r, dtype, double_quant, with_bias, with_ia3, scaling=0.75,
             blocksize=64, separate_lora_x=False):
    monkeypatch.setenv("MTPEFT_KERNELS", kernels)
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    gen = torch.Generator().manual_seed(seed)
    k = x_shape[-1]
    q, w_deq = bnb_nf4(torch.randn(n, k, generator=gen).to(dtype), double_quant, blocksize)
    x = torch.randn(*x_shape, generator=gen).to(dtype).requires_grad_()
    lora = r > 0
    a = (torch.randn(r, k, generator=gen) / k**0.5).requires_grad_() if lora else None
    b = torch.randn(n, r, generator=gen).requires_grad_() if lora else None
    bias = torch.randn(n, generator=gen).to(dtype).requires_grad_() if with_bias else None
    ia3 = (torch.rand(n, generator=gen) + 0.5).requires_grad_() if with_ia3 else None
    dy = torch.randn(*x_shape[:-1], n, generator=gen).to(dtype)
    lora_x = torch.randn(*x_shape, generator=gen).to(dtype).requires_grad_() if separate_lora_x else None

    with backend.poisoned_outputs():
        y = nf4_lora_linear(x, q, a, b, scaling, bias=bias, ia3=ia3, lora_x=lora_x)
        y.backward(dy)
    leaves = {"x": x, "lora_x": lora_x, "lora_A": a, "lora_B": b, "bias": bias, "ia3": ia3}
    leaves = {name: t for name, t in leaves.items() if t is not None}

    # float64 oracle: operands as the op computes with them (x dtype), math in float64.
    c = {name: t.detach().to(dtype).double().requires_grad_() for name, t in leaves.items()}
    y64 = c["x"] @ w_deq.double().t()
    if lora:
        y64 = y64 + scaling * (c["lora_x" if separate_lora_x else "x"] @ c["lora_A"].t()) @ c["lora_B"].t()
    if with_bias:
        y64 = y64 + c["bias"]
    if with_ia3:
        y64 = y64 * c["ia3"]
    y64.backward(dy.double())

    tol = TOLERANCE[dtype]
    assert y.dtype == dtype and y.shape == y64.shape
    errors = {"y": rel_err(y.detach(), y64.detach())}
    for name, t in leaves.items():
        assert t.grad is not None and t.grad.dtype == t.dtype, name
        errors["d" + name] = rel_err(t.grad, c[name].grad)
    bad = {name: e for name, e in errors.items() if not e <= tol}
    assert not bad, f"{kernels} {dtype} seed={seed}: relative errors above {tol}: {bad}"


CASES = [
    # x shape, N, r, dtype, double quant, bias, ia3
    ((37, 200), 129, 7, torch.float32, True, True, True),
    ((3, 13, 200), 129, 7, torch.float32, False, False, False),
    ((37, 201), 37, 5, torch.float32, True, False, True),  # odd numel: last byte half used
    ((3, 13, 200), 129, 7, torch.bfloat16, True, True, False),
    ((37, 200), 129, 7, torch.bfloat16, False, False, True),
    ((37, 200), 129, 7, torch.float16, True, True, True),
    ((37, 200), 129, 0, torch.float32, True, False, True),  # IA3 only: no LoRA term
    # K a multiple of the blocksize: absmax loaded per block and broadcast (the LLM case)
    ((37, 256), 129, 7, torch.float32, True, True, True),
    ((3, 13, 256), 70, 7, torch.bfloat16, False, False, True),
]


def case_id(case) -> str:
    x_shape, n, r, dtype, double_quant, with_bias, with_ia3 = case
    dims = "x".join(map(str, x_shape)) + f"-N{n}-r{r}"
    flags = ["dq" if double_quant else "nodq"] + (["bias"] if with_bias else []) + (["ia3"] if with_ia3 else [])
    return "-".join([str(dtype).replace("torch.", ""), dims] + flags)


@pytest.mark.parametrize("kernels", PATHS)
@pytest.mark.parametrize("x_shape,n,r,dtype,double_quant,with_bias,with_ia3", CASES, ids=[case_id(c) for c in CASES])
def test_forward_and_all_gradients_match_float64(monkeypatch, kernels, x_shape, n, r, dtype, double_quant,
                                                 with_bias, with_ia3):
    run_case(monkeypatch, kernels, x_shape, n, r, dtype, double_quant, with_bias, with_ia3)


@pytest.mark.parametrize("kernels", ["fused", "dequant"])
def test_other_blocksize(monkeypatch, kernels):
    run_case(monkeypatch, kernels, (21, 96), 45, 3, torch.float32, True, True, False, blocksize=128)


SPLIT_K_CASES = [
    # x shape, K, N, r, dtype, double quant, bias, ia3, blocksize
    ((3, 5), 384, 70, 5, torch.float32, True, True, True, 64),  # 3 K steps split 2 + 1
    ((40,), 640, 70, 5, torch.bfloat16, True, True, True, 64),  # 5 K steps split 3 + 2
    ((7,), 256, 129, 0, torch.float16, False, False, True, 64),  # IA3 only, N not a tile multiple
    ((2, 8), 256, 33, 3, torch.bfloat16, True, False, False, 128),  # blocksize 128: one block per half tile
]


@pytest.mark.parametrize("x_shape,k,n,r,dtype,double_quant,with_bias,with_ia3,blocksize", SPLIT_K_CASES)
def test_split_k_kernel_serves_few_rows(monkeypatch, x_shape, k, n, r, dtype, double_quant, with_bias, with_ia3,
                                         blocksize):
    """Few rows and K a multiple of 128: the split-K kernel (uneven splits, LoRA, bias and IA3 in the
    last program's epilogue) — twice, so the tickets are reset between launches."""
    import importlib

    module = importlib.import_module("mtpeft.kernels.nf4_lora_linear")
    launches = []
    original = module.launch_split_k
    monkeypatch.setattr(module, "launch_split_k", lambda *a: launches.append(1) or original(*a))
    for _ in range(2):
        run_case(monkeypatch, "fused", (*x_shape, k), n, r, dtype, double_quant, with_bias, with_ia3,
                 blocksize=blocksize)
    assert len(launches) == 2


def test_blocksize_wider_than_the_split_k_tile_takes_the_row_major_kernel(monkeypatch):
    """Blocksize 256 > BLOCK_K: the split-K kernel does not apply; the row-major fused kernel serves it."""
    import importlib

    module = importlib.import_module("mtpeft.kernels.nf4_lora_linear")
    monkeypatch.setattr(module, "launch_split_k", lambda *a: pytest.fail("split-K for blocksize 256"))
    run_case(monkeypatch, "fused", (9, 512), 40, 4, torch.float32, True, True, False, blocksize=256)


@pytest.mark.parametrize("max_m,rows,path", [(4, 5, "dequant"), (5, 5, "fused"), (0, 1, "dequant")])
def test_triton_mode_dispatches_by_rows(monkeypatch, max_m, rows, path):
    """MTPEFT_KERNELS=triton: the fused kernel up to MTPEFT_NF4_FUSED_MAX_M rows, dequant above."""
    import importlib

    module = importlib.import_module("mtpeft.kernels.nf4_lora_linear")
    monkeypatch.setenv("MTPEFT_KERNELS", "triton")
    monkeypatch.setenv("MTPEFT_NF4_FUSED_MAX_M", str(max_m))
    taken = []
    for name, label in (("NF4LoRALinearFunction", "fused"), ("DequantNF4LoRALinearFunction", "dequant")):
        cls = getattr(module, name)
        monkeypatch.setattr(module, name, type(name, (cls,), {"apply": staticmethod(
            lambda *args, _cls=cls, _label=label: taken.append(_label) or _cls.apply(*args))}))
    q, w_deq = bnb_nf4(torch.randn(33, 64), True)
    x = torch.randn(rows, 64)
    y = nf4_lora_linear(x, q, None, None, 1.0)
    assert taken == [path] and rel_err(y, x.double() @ w_deq.double().t()) <= 1e-5


def test_bad_crossover_setting_is_a_config_error(monkeypatch):
    from mtpeft.errors import ConfigError

    monkeypatch.setenv("MTPEFT_KERNELS", "triton")
    monkeypatch.setenv("MTPEFT_NF4_FUSED_MAX_M", "-3")
    q, _ = bnb_nf4(torch.randn(8, 16), False)
    with pytest.raises(ConfigError, match="MTPEFT_NF4_FUSED_MAX_M"):
        nf4_lora_linear(torch.randn(2, 16), q, None, None, 1.0)


@pytest.mark.parametrize("kernels", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_separate_lora_input(monkeypatch, kernels, dtype):
    """lora_x (e.g. dropout(x)) feeds only the LoRA branch; both inputs get their own gradient."""
    run_case(monkeypatch, kernels, (3, 11, 256), 70, 5, dtype, True, True, True, separate_lora_x=True)


@pytest.mark.parametrize("kernels", PATHS)
def test_lora_dropout_through_autograd(monkeypatch, kernels):
    monkeypatch.setenv("MTPEFT_KERNELS", kernels)
    q, w_deq = bnb_nf4(torch.randn(40, 64), False)
    x = torch.randn(9, 64, requires_grad=True)
    a, b = torch.randn(4, 64, requires_grad=True), torch.randn(40, 4, requires_grad=True)
    dropped = torch.nn.functional.dropout(x, p=0.25, training=True)
    keep = (dropped != 0).double() / 0.75
    y = nf4_lora_linear(x, q, a, b, 0.5, lora_x=dropped)
    y.sum().backward()
    x64, a64, b64 = (t.detach().double() for t in (x, a, b))
    y64 = x64 @ w_deq.double().t() + 0.5 * ((x64 * keep) @ a64.t()) @ b64.t()
    ones = torch.ones(9, 40, dtype=torch.float64)
    dx64 = ones @ w_deq.double() + 0.5 * (ones @ b64 @ a64) * keep
    assert rel_err(y.detach(), y64) <= 1e-5 and rel_err(x.grad, dx64) <= 1e-5


@pytest.mark.parametrize("kernels", PATHS)
def test_frozen_bias_and_ia3_get_no_gradient(monkeypatch, kernels):
    monkeypatch.setenv("MTPEFT_KERNELS", kernels)
    q, w_deq = bnb_nf4(torch.randn(33, 40), True)
    x = torch.randn(5, 40, requires_grad=True)
    a = torch.randn(4, 40, requires_grad=True)
    b = torch.randn(33, 4, requires_grad=True)
    bias, ia3 = torch.randn(33), torch.rand(33) + 0.5
    with backend.poisoned_outputs():
        y = nf4_lora_linear(x, q, a, b, 2.0, bias=bias, ia3=ia3)
    y.sum().backward()
    assert bias.grad is None and ia3.grad is None
    expected = ((x.double() @ w_deq.double().t() + 2.0 * (x.double() @ a.double().t()) @ b.double().t()
                 + bias.double()) * ia3.double())
    assert rel_err(y.detach(), expected.detach()) <= 1e-5
    dx_expected = ia3.double()[None, :].expand(5, 33) @ (w_deq.double() + 2.0 * b.double() @ a.double())
    assert rel_err(x.grad, dx_expected) <= 1e-5


@pytest.mark.parametrize("kernels", ["fused", "dequant"])
def test_weight_shape_mismatch_is_reported(monkeypatch, kernels):
    monkeypatch.setenv("MTPEFT_KERNELS", kernels)
    q, _ = bnb_nf4(torch.randn(8, 16), False)
    with pytest.raises(ValueError, match="features"):
        nf4_lora_linear(torch.randn(2, 17), q, None, None, 1.0)


@pytest.mark.parametrize("kernels", PATHS)
def test_packed_bytes_viewed_as_bf16_give_identical_results(monkeypatch, kernels):
    """QuantLinear stores the bytes viewed as bf16 (quant_storage) so ZeRO-3 partitions them."""
    monkeypatch.setenv("MTPEFT_KERNELS", kernels)
    q, _ = bnb_nf4(torch.randn(33, 64), True)
    q_bf16 = dataclasses.replace(q, packed=q.packed.view(torch.bfloat16))
    x, a, b = torch.randn(5, 64), torch.randn(3, 64), torch.randn(33, 3)
    assert torch.equal(nf4_lora_linear(x, q, a, b, 0.5), nf4_lora_linear(x, q_bf16, a, b, 0.5))


@pytest.mark.parametrize("kernels", PATHS)
def test_empty_batch(monkeypatch, kernels):
    monkeypatch.setenv("MTPEFT_KERNELS", kernels)
    q, _ = bnb_nf4(torch.randn(33, 64), True)
    x = torch.randn(2, 0, 64, requires_grad=True)
    a, b = torch.randn(3, 64, requires_grad=True), torch.randn(33, 3, requires_grad=True)
    y = nf4_lora_linear(x, q, a, b, 0.5)
    y.sum().backward()
    assert y.shape == (2, 0, 33) and x.grad.shape == x.shape
    assert torch.equal(a.grad, torch.zeros_like(a)) and torch.equal(b.grad, torch.zeros_like(b))


@pytest.mark.parametrize("kernels", PATHS)
def test_weight_given_as_callable_is_asked_again_in_backward(monkeypatch, kernels):
    """QuantLinear passes its ``quant_weight``: under ZeRO-3 backward then reads re-gathered bytes."""
    monkeypatch.setenv("MTPEFT_KERNELS", kernels)
    q, _ = bnb_nf4(torch.randn(33, 64), True)
    calls = []

    def source():
        calls.append(1)
        return q

    x, a, b = torch.randn(5, 64, requires_grad=True), torch.randn(3, 64), torch.randn(33, 3)
    y = nf4_lora_linear(x, source, a, b, 0.5)
    y.backward(torch.ones_like(y))
    assert len(calls) == 2
    x_ref = x.detach().clone().requires_grad_()
    y_ref = nf4_lora_linear(x_ref, q, a, b, 0.5)
    y_ref.backward(torch.ones_like(y_ref))
    assert torch.equal(y, y_ref) and torch.equal(x.grad, x_ref.grad)


@pytest.mark.parametrize("kernels", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("x_shape", [(3, 50, 200), (70, 256)])
def test_keyed_lora_dropout_matches_float64(monkeypatch, kernels, dtype, x_shape):
    """lora_dropout (mtpeft's keyed mask, drawn inside the rank-r kernels on the dequant path, by
    keyed_dropout elsewhere) against float64 with the reference keep mask: y and the gradients of x,
    A and B; rows of a 3-D x map to (example, position) as keyed_dropout indexes them."""
    from mtpeft.kernels.keyed_dropout_reference import keep_mask
    from mtpeft.kernels.lora_keyed_dropout import KeyedMask

    monkeypatch.setenv("MTPEFT_KERNELS", kernels)
    gen = torch.Generator().manual_seed(sum(x_shape))
    k, n, r, p, s = x_shape[-1], 90, 6, 0.3, 0.5
    q, w_deq = bnb_nf4(torch.randn(n, k, generator=gen).to(dtype), True)
    x = torch.randn(*x_shape, generator=gen).to(dtype).requires_grad_()
    a = (torch.randn(r, k, generator=gen) / k**0.5).requires_grad_()
    b = torch.randn(n, r, generator=gen).requires_grad_()
    keys = torch.randint(-2**62, 2**62, (x_shape[0],), generator=gen, dtype=torch.int64)
    dy = torch.randn(*x_shape[:-1], n, generator=gen).to(dtype)
    with backend.poisoned_outputs():
        y = nf4_lora_linear(x, q, a, b, s, lora_dropout=KeyedMask(keys, 0xC0FFEE, p))
        y.backward(dy)
    keep = keep_mask(keys, 0xC0FFEE, x.shape, p).double() / (1 - p)
    x64, a64, b64 = (t.detach().to(dtype).double().requires_grad_() for t in (x, a, b))
    y64 = x64 @ w_deq.double().t() + s * ((x64 * keep) @ a64.t()) @ b64.t()
    y64.backward(dy.double())
    tol = TOLERANCE[dtype]
    errors = {"y": rel_err(y.detach(), y64.detach()), "dx": rel_err(x.grad, x64.grad),
              "dA": rel_err(a.grad, a64.grad), "dB": rel_err(b.grad, b64.grad)}
    assert all(e <= tol for e in errors.values()), (kernels, dtype, errors)
