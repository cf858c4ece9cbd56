"""bottleneck_adapter, Triton (interpreter) and torch paths, against float64 math written out by hand
(activations from their textbook formulas, not torch.nn.functional)."""

import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated (import time)

import pytest
import torch

from mtpeft.errors import ConfigError
from mtpeft.kernels import backend
from mtpeft.kernels.bottleneck_adapter import bottleneck_adapter

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def act64(name: str, z: torch.Tensor) -> torch.Tensor:
    if name == "relu":
        return torch.where(z > 0, z, torch.zeros_like(z))
    if name == "gelu":
        return 0.5 * z * (1 + torch.erf(z / math.sqrt(2)))
    if name == "gelu_tanh":
        return 0.5 * z * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))
    if name == "silu":
        return z / (1 + torch.exp(-z))
    raise AssertionError(name)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref).abs().max() / ref.abs().max()).item()


def run_case(monkeypatch, kernels, h_shape, r, dtype, activation, with_bias, parallel, scaling=0.6):
    monkeypatch.setenv("MTPEFT_KERNELS", kernels)
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    gen = torch.Generator().manual_seed(seed)
    hidden = h_shape[-1]
    h = torch.randn(*h_shape, generator=gen).to(dtype).requires_grad_()
    p = {
        "down_w": (torch.randn(r, hidden, generator=gen) / hidden**0.5).requires_grad_(),
        "up_w": (torch.randn(hidden, r, generator=gen) / r**0.5).requires_grad_(),
    }
    if with_bias:
        p["down_b"] = (torch.randn(r, generator=gen) * 0.5).requires_grad_()
        p["up_b"] = (torch.randn(hidden, generator=gen) * 0.5).requires_grad_()
    residual = torch.randn(*h_shape, generator=gen).to(dtype).requires_grad_() if parallel else None
    dout = torch.randn(*h_shape, generator=gen).to(dtype)

    with backend.poisoned_outputs():
        out = bottleneck_adapter(h, p["down_w"], p.get("down_b"), p["up_w"], p.get("up_b"), activation,
                                 scaling, residual=residual)
        out.backward(dout)

    leaves = dict(p, h=h)
    if parallel:
        leaves["residual"] = residual
    c = {name: t.detach().to(dtype).double().requires_grad_() for name, t in leaves.items()}
    z = c["h"] @ c["down_w"].t() + (c["down_b"] if with_bias else 0)
    delta = act64(activation, z) @ c["up_w"].t() + (c["up_b"] if with_bias else 0)
    out64 = (c["residual"] if parallel else c["h"]) + scaling * delta
    out64.backward(dout.double())

    tol = TOLERANCE[dtype]
    assert out.dtype == dtype and out.shape == out64.shape
    errors = {"out": rel_err(out.detach(), out64.detach())}
    for name, t in leaves.items():
        assert t.grad is not None and t.grad.dtype == t.dtype, name
        errors["d" + name] = rel_err(t.grad, c[name].grad)
    bad = {name: e for name, e in errors.items() if not e <= tol}
    assert not bad, f"{kernels} {dtype} {activation} seed={seed}: relative errors above {tol}: {bad}"


CASES = [
    # h shape, bottleneck r, dtype, activation, biases, parallel (residual given)
    ((37, 129), 7, torch.float32, "relu", True, False),
    ((3, 13, 129), 7, torch.float32, "gelu", True, True),
    ((37, 129), 7, torch.float32, "gelu_tanh", False, False),
    ((37, 129), 7, torch.float32, "silu", True, False),
    ((3, 13, 129), 7, torch.bfloat16, "gelu", True, False),
    ((37, 129), 7, torch.bfloat16, "silu", False, True),
]


def case_id(case) -> str:
    h_shape, r, dtype, activation, with_bias, parallel = case
    parts = [str(dtype).replace("torch.", ""), "x".join(map(str, h_shape)) + f"-r{r}", activation]
    return "-".join(parts + (["bias"] if with_bias else []) + ["parallel" if parallel else "serial"])


@pytest.mark.parametrize("kernels", ["triton", "torch"])
@pytest.mark.parametrize("h_shape,r,dtype,activation,with_bias,parallel", CASES, ids=[case_id(c) for c in CASES])
def test_forward_and_all_gradients_match_float64(monkeypatch, kernels, h_shape, r, dtype, activation, with_bias,
                                                 parallel):
    run_case(monkeypatch, kernels, h_shape, r, dtype, activation, with_bias, parallel)


def test_unknown_activation_names_the_choices(monkeypatch):
    monkeypatch.setenv("MTPEFT_KERNELS", "triton")
    h = torch.randn(4, 8)
    with pytest.raises(ConfigError, match="relu, gelu, gelu_tanh, silu"):
        bottleneck_adapter(h, torch.randn(2, 8), None, torch.randn(8, 2), None, "tanh", 1.0)


@pytest.mark.parametrize("kernels", ["triton", "torch"])
def test_empty_batch(monkeypatch, kernels):
    monkeypatch.setenv("MTPEFT_KERNELS", kernels)
    h = torch.randn(0, 3, 16, requires_grad=True)
    down_w, up_w = torch.randn(4, 16, requires_grad=True), torch.randn(16, 4, requires_grad=True)
    out = bottleneck_adapter(h, down_w, None, up_w, None, "relu", 1.0)
    out.sum().backward()
    assert out.shape == (0, 3, 16) and h.grad.shape == h.shape
    assert torch.equal(down_w.grad, torch.zeros_like(down_w)) and torch.equal(up_w.grad, torch.zeros_like(up_w))
