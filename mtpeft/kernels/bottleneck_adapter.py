"""Fused bottleneck adapter ``out = residual + s·up(act(down(h)))``: Triton kernels,
autograd.Function, dispatch.

Serial adapter: ``residual=None`` (the residual is h itself). Parallel adapter: h is the block's
input and ``residual`` the block's output, so the side branch's result lands on the block output in
the same epilogue (pass a zeros tensor as residual for the bare side branch).

One strided GEMM kernel with a configurable epilogue does the four activation-sized GEMMs:
  forward  z = h·Wdᵀ + bd (stored: the saved pre-activation), a = act(z);
           out = residual + s·(a·Wuᵀ + bu)                        (bias, scale, residual fused)
  backward dz = s·(dout·Wu) ⊙ act'(z)                              (activation grad fused)
           dh = dz·Wd (+ dout when the residual is h)              (residual grad fused)
Only z [M, r] is saved (r ≪ hidden size); act(z) is recomputed for d up_w. The weight gradients
reduce over all tokens into tiny outputs, which cuBLAS's split-K does better than a tile grid, so
they and the bias sums stay in torch.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from mtpeft.kernels.backend import as_output, empty_output, use_triton
from mtpeft.kernels.triton_compat import autotune_configs, cast, dot, grouped_tile
from mtpeft.kernels.bottleneck_adapter_reference import (
    ACTIVATIONS,
    bottleneck_adapter_reference,
    check_activation,
)

_ACT_IDS = {"none": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4}


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) the autotuner may pick; checked by the static
# gate like the NF4 kernels' (tests/kernels/test_kernel_static_gate.py).
ADAPTER_TILES = [
    (128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 32, 64, 4, 4),
    (64, 64, 64, 4, 4), (32, 64, 128, 4, 4), (16, 64, 128, 4, 4), (16, 32, 256, 4, 3),
]


@triton.jit
def _activation(z, ACT: tl.constexpr):
    if ACT == 1:
        return tl.maximum(z, 0.0)
    if ACT == 2:
        return 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    if ACT == 3:
        t = 2.0 * tl.sigmoid(1.5957691216057308 * (z + 0.044715 * z * z * z)) - 1.0
        return 0.5 * z * (1.0 + t)
    if ACT == 4:
        return z * tl.sigmoid(z)
    return z


@triton.jit
def _activation_grad(z, ACT: tl.constexpr):
    if ACT == 1:
        return tl.where(z > 0.0, 1.0, 0.0)
    if ACT == 2:
        return 0.5 * (1.0 + tl.erf(z * 0.7071067811865476)) + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    if ACT == 3:
        t = 2.0 * tl.sigmoid(1.5957691216057308 * (z + 0.044715 * z * z * z)) - 1.0
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z)
    if ACT == 4:
        sig = tl.sigmoid(z)
        return sig * (1.0 + z * (1.0 - sig))
    return tl.full(z.shape, 1.0, tl.float32)


@triton.autotune(configs=autotune_configs(ADAPTER_TILES, (16, 32, 32)), key=["M_BUCKET", "N", "K"])
@triton.jit
def adapter_gemm_kernel(a_ptr, b_ptr, c_ptr, bias_ptr, z_ptr, res_ptr, scale,
                          M, N, K, M_BUCKET,
                          stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                          stride_zm, stride_zn, stride_rm, stride_rn,
                          HAS_BIAS: tl.constexpr, ACT: tl.constexpr, STORE_PRE: tl.constexpr,
                          ACT_GRAD: tl.constexpr, HAS_RESIDUAL: tl.constexpr, IEEE: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          GROUP_M: tl.constexpr):
    """c = epilogue(a·b): (+bias) -> [store z] -> act -> *scale -> [*act'(z) from z_ptr] -> (+res).

    ACT and ACT_GRAD are activation ids (0 = none): the forward activation, and the one whose
    derivative at the saved pre-activation z multiplies the result."""
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        a = tl.load(a_ptr + rm[:, None] * stride_am + kk[None, :] * stride_ak,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptr + kk[:, None] * stride_bk + rn[None, :] * stride_bn,
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = dot(a, b, acc, IEEE)
    mask = m_ok[:, None] & n_ok[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if STORE_PRE:
        tl.store(z_ptr + rm[:, None] * stride_zm + rn[None, :] * stride_zn,
                 cast(acc, z_ptr.dtype.element_ty), mask=mask)
    acc = _activation(acc, ACT)
    acc = acc * scale
    if ACT_GRAD != 0:
        z = tl.load(z_ptr + rm[:, None] * stride_zm + rn[None, :] * stride_zn, mask=mask, other=0.0)
        acc = acc * _activation_grad(z.to(tl.float32), ACT_GRAD)
    if HAS_RESIDUAL:
        acc += tl.load(res_ptr + rm[:, None] * stride_rm + rn[None, :] * stride_rn,
                       mask=mask, other=0.0).to(tl.float32)
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn, cast(acc, c_ptr.dtype.element_ty), mask=mask)


def _gemm(a, b, *, bias=None, act=0, z=None, store_pre=False, act_grad=0, residual=None,
          scale=1.0, out_dtype=None):
    """Epilogue GEMM ``a[M, K] @ b[K, N]`` on any strides (transposed views cost nothing)."""
    m, k = a.shape
    n = b.shape[1]
    c = empty_output((m, n), out_dtype or a.dtype, a.device)
    if store_pre:
        z_arg = empty_output((m, n), a.dtype, a.device)
    else:
        z_arg = z if z is not None else c
    if m == 0:
        return (c, z_arg) if store_pre else c
    res = residual if residual is not None else c
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
    adapter_gemm_kernel[grid](
        a, b, c, bias if bias is not None else c, z_arg, res, float(scale),
        m, n, k, max(16, triton.next_power_of_2(m)),
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        z_arg.stride(0), z_arg.stride(1), res.stride(0), res.stride(1),
        HAS_BIAS=bias is not None, ACT=act, STORE_PRE=store_pre, ACT_GRAD=act_grad,
        HAS_RESIDUAL=residual is not None, IEEE=a.dtype == torch.float32,
    )
    return (c, z_arg) if store_pre else c


class BottleneckAdapterFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, down_w, down_b, up_w, up_b, residual, activation: str, scaling: float):
        act = _ACT_IDS[activation]
        dtype = h.dtype
        lead, hidden = h.shape[:-1], h.shape[-1]
        h2 = h.reshape(-1, hidden)
        wd, wu = down_w.to(dtype), up_w.to(dtype)
        bd = None if down_b is None else down_b.to(dtype)
        bu = None if up_b is None else up_b.to(dtype)
        out_features = wu.shape[0]
        res2 = h2 if residual is None else residual.reshape(-1, out_features)
        a, z = _gemm(h2, wd.t(), bias=bd, act=act, store_pre=True)
        out = _gemm(a, wu.t(), bias=bu, residual=res2, scale=scaling)
        ctx.activation, ctx.scaling, ctx.lead = activation, scaling, lead
        ctx.residual_is_h = residual is None
        ctx.param_dtypes = (down_w.dtype, None if down_b is None else down_b.dtype, up_w.dtype,
                            None if up_b is None else up_b.dtype)
        ctx.save_for_backward(h2, wd, wu, z)
        return as_output(out, (*lead, out_features))  # not a view: the model may add into it in place

    @staticmethod
    def backward(ctx, dout):
        h2, wd, wu, z = ctx.saved_tensors
        act, s = _ACT_IDS[ctx.activation], ctx.scaling
        dout2 = dout.reshape(-1, wu.shape[0])
        need_h, need_wd, need_bd, need_wu, need_bu, need_res = ctx.needs_input_grad[:6]
        dwd_t, dbd_t, dwu_t, dbu_t = ctx.param_dtypes
        dh = d_wd = d_bd = d_wu = d_bu = d_res = None
        dz = _gemm(dout2, wu, z=z, act_grad=act, scale=s)
        if need_wu:
            a = ACTIVATIONS[ctx.activation](z.float()).to(z.dtype)
            d_wu = ((dout2.t() @ a) * s).to(dwu_t)
        if need_bu:
            d_bu = (dout2.float().sum(0) * s).to(dbu_t)
        if need_wd:
            d_wd = (dz.t() @ h2).to(dwd_t)
        if need_bd:
            d_bd = dz.float().sum(0).to(dbd_t)
        if need_h:
            dh = _gemm(dz, wd, residual=dout2 if ctx.residual_is_h else None).reshape(*ctx.lead, wd.shape[1])
        if need_res and not ctx.residual_is_h:
            d_res = dout
        return dh, d_wd, d_bd, d_wu, d_bu, d_res, None, None


def bottleneck_adapter(
    h: torch.Tensor,
    down_w: torch.Tensor,
    down_b: Optional[torch.Tensor],
    up_w: torch.Tensor,
    up_b: Optional[torch.Tensor],
    activation: str,
    scaling: float,
    residual: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``residual + scaling * (act(h·down_wᵀ + down_b)·up_wᵀ + up_b)``, residual defaulting to h.

    h ``[..., H]``; down_w ``[r, H]``, down_b ``[r]``; up_w ``[H_out, r]``, up_b ``[H_out]``
    (nn.Linear layout, biases optional); residual ``[..., H_out]``. activation: relu, gelu (exact
    erf), gelu_tanh (tanh approximation) or silu. Serial adapter: leave residual None. Parallel
    adapter: h = the block's input, residual = the block's output. Gradients flow to h, all four
    adapter tensors and residual.
    """
    activation = check_activation(activation)
    if down_w.shape[1] != h.shape[-1] or up_w.shape[1] != down_w.shape[0]:
        raise ValueError(f"bottleneck_adapter: shapes h {tuple(h.shape)}, down_w {tuple(down_w.shape)}, "
                         f"up_w {tuple(up_w.shape)} do not chain")
    if residual is None and up_w.shape[0] != h.shape[-1]:
        raise ValueError("bottleneck_adapter: a serial adapter (residual=None) needs up_w to map back to h's width")
    if use_triton(h.device):
        return BottleneckAdapterFunction.apply(h, down_w, down_b, up_w, up_b, residual, activation, float(scaling))
    return bottleneck_adapter_reference(h, down_w, down_b, up_w, up_b, activation, scaling, residual)
