"""A model may add into a layer's output in place (Falcon: ``mlp_output += attention_output``). A
custom Function whose output is a view of its own buffer is refused by autograd there ("Output 0 of
… is a view and is being modified inplace"), which the CPU reference path never showed. Each kernel
path (Triton interpreter) returns a tensor that is not a view, and the in-place add then gives the
gradients of the same computation in float64 without it."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated (import time)

import pytest
import torch

from mtpeft.kernels.bottleneck_adapter import bottleneck_adapter
from mtpeft.kernels.nf4_lora_linear import nf4_lora_linear
from mtpeft.quant.nf4 import dequantize_nf4, quantize_nf4

torch.manual_seed(0)


def _check(out: torch.Tensor, leaves: dict, reference) -> None:
    assert not out._is_view() and out._base is None
    added = torch.randn(out.shape, dtype=out.dtype)
    out += added  # what the model does with it
    weight = torch.randn(out.shape, dtype=out.dtype)
    (out * weight).sum().backward()
    leaves64 = {name: t.detach().double().requires_grad_(True) for name, t in leaves.items()}
    want = reference(leaves64) + added.double()
    (want * weight.double()).sum().backward()
    assert (out.detach().double() - want.detach()).abs().max().item() <= 1e-4
    for name, t in leaves.items():
        assert (t.grad.double() - leaves64[name].grad).abs().max().item() <= 1e-4, name


@pytest.mark.parametrize("kernels", ["fused", "dequant"])
@pytest.mark.parametrize("ia3", [False, True], ids=["lora", "lora+ia3"])
def test_nf4_lora_linear_output_takes_an_in_place_add(monkeypatch, kernels, ia3):
    monkeypatch.setenv("MTPEFT_KERNELS", kernels)
    n, k, r = 48, 64, 4
    q = quantize_nf4(torch.randn(n, k), 64, True)
    w = dequantize_nf4(q, torch.float32).double()
    leaves = {"x": torch.randn(2, 5, k, requires_grad=True), "A": (0.1 * torch.randn(r, k)).requires_grad_(True),
              "B": (0.1 * torch.randn(n, r)).requires_grad_(True)}
    if ia3:
        leaves["ia3"] = (1 + 0.1 * torch.randn(n)).requires_grad_(True)
    out = nf4_lora_linear(leaves["x"], q, leaves["A"], leaves["B"], 0.5, ia3=leaves.get("ia3"))

    def reference(t):
        y = t["x"] @ w.t() + 0.5 * (t["x"] @ t["A"].t()) @ t["B"].t()
        return y * t["ia3"] if "ia3" in t else y

    _check(out, leaves, reference)


def test_bottleneck_adapter_output_takes_an_in_place_add(monkeypatch):
    monkeypatch.setenv("MTPEFT_KERNELS", "triton")
    h, r = 32, 6
    leaves = {"h": torch.randn(2, 5, h, requires_grad=True), "down": (0.2 * torch.randn(r, h)).requires_grad_(True),
              "up": (0.2 * torch.randn(h, r)).requires_grad_(True)}
    out = bottleneck_adapter(leaves["h"], leaves["down"], None, leaves["up"], None, "relu", 1.0)

    def reference(t):
        return t["h"] + torch.relu(t["h"] @ t["down"].t()) @ t["up"].t()

    _check(out, leaves, reference)
