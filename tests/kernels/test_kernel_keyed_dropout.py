"""keyed_dropout: the Triton kernel (interpreter) equals its torch reference bit for bit, forward and
backward, for every row-trailing shape and dtype; and the mask is the reference's keep mask."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated (import time)

import pytest  # noqa: E402
import torch  # noqa: E402

from mtpeft.kernels import backend  # noqa: E402
from mtpeft.kernels.keyed_dropout import keyed_dropout  # noqa: E402
from mtpeft.kernels.keyed_dropout_reference import keep_mask, keyed_dropout_reference  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,p", [((3, 5, 700), 0.05), ((4, 2100), 0.5), ((2, 3), 0.9)])
def test_kernel_equals_reference_forward_and_backward(monkeypatch, dtype, shape, p):
    """Rows wider than one program (2100 > 2048), a 3-D tensor indexed over (T, K), keys with the
    top bits set; backward regenerates the mask from the keys (nothing stored)."""
    gen = torch.Generator().manual_seed(len(shape) * 100 + int(p * 100))
    keys = torch.randint(-2**62, 2**62, (shape[0],), generator=gen, dtype=torch.int64)
    x = (torch.randn(shape, generator=gen) * 3).to(dtype)
    dy = torch.randn(shape, generator=gen).to(dtype)
    want_x = x.clone().requires_grad_()
    want = keyed_dropout_reference(want_x, keys, 0xDEADBEEF, p)
    want.backward(dy)
    monkeypatch.setenv("MTPEFT_KERNELS", "triton")
    got_x = x.clone().requires_grad_()
    with backend.poisoned_outputs():
        got = keyed_dropout(got_x, keys, 0xDEADBEEF, p)
        got.backward(dy)
    assert torch.equal(got, want) and torch.equal(got_x.grad, want_x.grad)
    kept = keep_mask(keys, 0xDEADBEEF, torch.Size(shape), p)
    assert torch.equal(got != 0, kept & (x != 0))  # zero exactly where the reference mask drops


def test_wrong_number_of_keys_is_reported():
    with pytest.raises(ValueError, match="row keys"):
        keyed_dropout(torch.randn(3, 4), torch.zeros(2, dtype=torch.int64), 1, 0.1)
