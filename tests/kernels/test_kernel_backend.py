"""MTPEFT_KERNELS selection: auto/triton/torch, the interpreter requirement on CPU, bad values."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from mtpeft.errors import UserError
from mtpeft.kernels import backend, use_triton


@pytest.mark.parametrize("mode,device,expected", [
    ("auto", "cpu", False), ("auto", "cuda", True), ("torch", "cpu", False), ("torch", "cuda", False),
    ("triton", "cuda", True), ("triton", "cpu", True), (None, "cpu", False), (None, "cuda", True),
    (" Triton ", "cpu", True),
])
def test_mode_picks_the_path(monkeypatch, mode, device, expected):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if mode is None:
        monkeypatch.delenv("MTPEFT_KERNELS", raising=False)
    else:
        monkeypatch.setenv("MTPEFT_KERNELS", mode)
    assert use_triton(torch.device(device)) is expected


def test_triton_on_cpu_without_interpreter_says_how_to_fix(monkeypatch):
    monkeypatch.setenv("MTPEFT_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(UserError, match="TRITON_INTERPRET=1"):
        use_triton("cpu")


def test_unknown_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("MTPEFT_KERNELS", "cuda")
    with pytest.raises(UserError, match="MTPEFT_KERNELS='cuda'.*auto, triton, torch"):
        use_triton("cpu")


def test_poisoned_outputs_fill_nan_only_inside_the_context():
    with backend.poisoned_outputs():
        assert torch.isnan(backend.empty_output((3, 4), torch.float32, torch.device("cpu"))).all()
    assert not backend._poison
