"""lora_dy_pass (Triton interpreter) and its torch reference against float64: g = s·dy·B, dB = s·dyᵀ·xa."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated (import time)

import pytest  # noqa: E402
import torch  # noqa: E402

from mtpeft.kernels import backend  # noqa: E402
from mtpeft.kernels.lora_dy_pass import lora_dy_pass_reference, lora_dy_pass_triton  # noqa: E402


@pytest.mark.parametrize("impl", [lora_dy_pass_triton, lora_dy_pass_reference])
@pytest.mark.parametrize("copy_dy", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("m,n,r,transposed", [(150, 200, 5, False), (64, 64, 16, True), (3, 130, 1, False)])
def test_both_products_match_float64(impl, copy_dy, dtype, tol, m, n, r, transposed):
    """Row tiles not multiples of 64 (150 = 2 full + 1 partial), column slabs split in two, a dy
    with transposed strides (autograd hands those over), ranks below and at the 16-wide tile."""
    gen = torch.Generator().manual_seed(m * n + r)
    dy = torch.randn(n, m, generator=gen).to(dtype).t() if transposed else torch.randn(m, n, generator=gen).to(dtype)
    b = torch.randn(n, r, generator=gen).to(dtype)
    xa = torch.randn(m, r, generator=gen).to(dtype)
    if copy_dy and impl is lora_dy_pass_reference:
        pytest.skip("the reference has no dy copy")
    dy_ext = torch.full((m, n + r), float("nan"), dtype=dtype) if copy_dy else None
    with backend.poisoned_outputs():
        g, db = impl(dy, b, xa, 0.75, dy_ext=dy_ext) if copy_dy else impl(dy, b, xa, 0.75)
    if copy_dy:  # [dy, g], for dx = [dy, g]·[W; A]
        assert torch.equal(dy_ext[:, :n], dy) and torch.equal(dy_ext[:, n:], g)
    g64 = 0.75 * dy.double() @ b.double()
    db64 = 0.75 * dy.double().t() @ xa.double()
    assert g.dtype == dtype and db.dtype == torch.float32
    assert ((g.double() - g64).abs().max() / g64.abs().max()).item() <= tol
    assert ((db.double() - db64).abs().max() / db64.abs().max()).item() <= tol
