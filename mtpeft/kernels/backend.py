"""Which implementation a fused op runs: the Triton kernel or its torch reference.

``MTPEFT_KERNELS`` picks it: ``auto`` (default) runs Triton on CUDA tensors and the reference on
CPU; ``triton`` forces the kernels (on CPU only through Triton's interpreter, ``TRITON_INTERPRET=1``,
which is how the tests check them without a GPU); ``torch`` forces the references everywhere, the
escape hatch when a kernel misbehaves on some GPU. ``fused`` and ``dequant`` force the kernels too,
and pin the 4-bit linear layer to one of its two paths (:func:`nf4_path`).

The 4-bit linear layer has two Triton paths, chosen by the number of rows M of its input: up to
``MTPEFT_NF4_FUSED_MAX_M`` rows (default :data:`FUSED_MAX_M`) the fused kernel that decodes NF4
inside the GEMM (bandwidth-bound decode and small batches: it reads 4-bit bytes only); above it,
dequantization into a reused buffer and cuBLAS (compute-bound training batches: each weight tile
is decoded once instead of once per row tile). The default is a static estimate (see
docs/BENCHMARKS.md); ``bench/kernels.py`` measures the crossover on a GPU and prints it.

Kernel outputs are allocated through :func:`empty_output` so tests can fill them with NaN
(:func:`poisoned_outputs`): a kernel that forgets to write an element then fails loudly instead of
returning whatever the allocator left there.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Sequence

import torch

from mtpeft.errors import ConfigError

ENV_VAR = "MTPEFT_KERNELS"
CHOICES = ("auto", "triton", "torch", "fused", "dequant")
CROSSOVER_ENV_VAR = "MTPEFT_NF4_FUSED_MAX_M"
FUSED_MAX_M = 128  # static estimate, not a measurement: see docs/BENCHMARKS.md

_poison = False


def kernel_mode() -> str:
    """``MTPEFT_KERNELS``; ``MTPEFT_NF4_FUSED_MAX_M`` is checked here too, so a bad value is named at
    the first 4-bit layer call on any machine, not only where the crossover is read (Triton, auto)."""
    mode = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if mode not in CHOICES:
        raise ConfigError(
            f"environment variable {ENV_VAR}={os.environ.get(ENV_VAR)!r} is not one of "
            f"{', '.join(CHOICES)}; set it to auto (Triton on CUDA, torch on CPU), triton, torch, or fused / "
            f"dequant (Triton, one path of the 4-bit layer)"
        )
    fused_max_m()
    return mode


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip() == "1"


def use_triton(device: torch.device | str) -> bool:
    """True when the op on tensors of ``device`` should launch its Triton kernel."""
    mode = kernel_mode()
    on_cuda = torch.device(device).type == "cuda"
    if mode == "torch":
        return False
    if mode == "auto":
        return on_cuda
    if not on_cuda and not interpreter_enabled():
        raise ConfigError(
            f"{ENV_VAR}=triton on a {torch.device(device).type} tensor needs Triton's interpreter: "
            f"export TRITON_INTERPRET=1 before starting Python, or set {ENV_VAR}=auto"
        )
    return True


def fused_max_m() -> int:
    raw = os.environ.get(CROSSOVER_ENV_VAR, "").strip()
    if not raw:
        return FUSED_MAX_M
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ConfigError(f"environment variable {CROSSOVER_ENV_VAR}={raw!r} is not a whole number >= 0; "
                          f"unset it for the default ({FUSED_MAX_M}) or give the largest M for the fused kernel")
    return value


def nf4_path(m: int, dtype: torch.dtype) -> str:
    """``"fused"`` or ``"dequant"``: which Triton path the 4-bit linear layer takes for M rows.

    fp32 activations always take the dequant path when compiled: the fused kernels' fp32 variants
    (IEEE products on FFMA, no tensor cores) spill thousands of bytes per thread on sm_90a, and fp32
    work is cuBLAS SGEMM's. Under the interpreter ``fused`` still forces them, to test their math."""
    mode = kernel_mode()
    if dtype == torch.float32 and not interpreter_enabled():
        return "dequant"
    if mode in ("fused", "dequant"):
        return mode
    return "fused" if m <= fused_max_m() else "dequant"


def empty_output(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocation for a buffer a kernel must fully overwrite (NaN-filled under poisoned_outputs)."""
    out = torch.empty(tuple(shape), dtype=dtype, device=device)
    if _poison:
        out.fill_(float("nan"))
    return out


def as_output(t: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """A custom Function's 2-D result ``t`` (rows with one stride, columns contiguous) returned as
    ``shape`` (leading dims, then ``t``'s columns) over the same memory, as a tensor autograd does not
    count as a view. A view of a Function's own buffer may not be modified in place downstream (Falcon
    adds its attention output into the MLP output, ``mlp_output += …``), and a copy would cost one more
    pass over the output; nothing else in the Function keeps ``t``'s memory once it returns."""
    shape = tuple(int(d) for d in shape)
    strides = [t.stride(1)]
    row = t.stride(0)
    for d in reversed(shape[:-1]):
        strides.insert(0, row)
        row *= d
    return t.new_empty(0).set_(t.untyped_storage(), t.storage_offset(), shape, tuple(strides))


@contextlib.contextmanager
def poisoned_outputs() -> Iterator[None]:
    global _poison
    previous, _poison = _poison, True
    try:
        yield
    finally:
        _poison = previous
