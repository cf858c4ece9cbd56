"""Every configuration mtpeft's kernels can launch with, as compile specs for ``compiled_code``.

One spec per (kernel, autotune tile, dtype) with the runtime's argument values at a benchmark shape
(M = 8192, K = N = 4096, r = 16: every size a multiple of 16, unit strides constant), all optional
features on (LoRA, bias, IA3 with its pre-scale store, double quantization), which is the largest
variant of each kernel. The fused NF4 kernels are listed in bf16 only: fp32 inputs are routed to the
dequant path when compiled (their fp32 variants spill). Import with ``TRITON_INTERPRET`` unset: under the interpreter the kernels
are plain Python and there is nothing to compile.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Iterator, Optional

SHAPE = dict(M=8192, N=4096, K=4096, R=16)
DTYPES = {"bf16": "bf16", "fp32": "fp32"}
_QUANT_TYPES = {"packed_ptr": "*u8", "absmax_ptr": "*u8", "code_ptr": "*fp32", "absmax_code_ptr": "*fp32",
                "absmax_scale_ptr": "*fp32", "absmax_offset": "fp32", "ia3_ptr": "*fp32",
                "row_scale_ptr": "*fp32", "g_part_ptr": "*fp32", "db_part_ptr": "*fp32"}


@dataclasses.dataclass
class BuildSpec:
    label: str
    kernel: object
    signature: dict
    constexprs: dict
    ints: dict
    num_warps: int
    num_stages: int
    tile: Optional[tuple] = None  # (BLOCK_M, BLOCK_N, BLOCK_K) of a GEMM's K step, None otherwise
    dtype: str = "bf16"
    tensor_cores: bool = True


def _module(name: str):
    return importlib.import_module(f"mtpeft.kernels.{name}")  # submodules shadowed by same-named functions


def _signature(kernel, dtype: str, scalars: dict) -> dict:
    """Triton types of the non-constexpr arguments: pointers of ``dtype`` unless listed otherwise."""
    fn = kernel
    while not hasattr(fn, "arg_names"):
        fn = fn.fn
    sig = {}
    for name in fn.arg_names:
        if name in scalars:
            sig[name] = scalars[name]
        elif name in _QUANT_TYPES:
            sig[name] = _QUANT_TYPES[name]
        elif name.endswith("_ptr"):
            sig[name] = "*" + dtype
        elif name.isupper() and name not in ("M", "N", "K", "R", "T", "M_BUCKET"):
            continue  # constexpr
        else:
            sig[name] = "i32"
    return sig


def _fused_specs(dtype: str) -> Iterator[BuildSpec]:
    lin = _module("nf4_lora_linear")
    m, n, k, r = SHAPE["M"], SHAPE["N"], SHAPE["K"], SHAPE["R"]
    common = dict(M=m, N=n, K=k, R=r, M_BUCKET=m, row_bytes=k // 2)
    flags = dict(DOUBLE_QUANT=True, BLOCKSIZE=64, PAIRED=True, ALIGNED=True, IEEE=dtype == "fp32", BLOCK_R=16)
    fwd_ints = dict(common, stride_xm=k, stride_xk=1, stride_am=r, stride_ar=1, stride_bn=r, stride_br=1,
                    stride_ym=n, stride_yn=1)
    dx_ints = dict(common, stride_dym=n, stride_dyn=1, stride_gm=r, stride_gr=1, stride_ar=k, stride_ak=1,
                   stride_dxm=k, stride_dxk=1)
    for bm, bn, bk, w, s in lin.GEMM_TILES:
        tiles = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8)
        yield BuildSpec(f"fused fwd {bm}x{bn}x{bk} w{w} s{s}", lin.nf4_lora_fwd_kernel,
                        _signature(lin.nf4_lora_fwd_kernel, dtype, {"lora_scale": "fp32"}),
                        dict(flags, HAS_LORA=True, HAS_BIAS=True, HAS_IA3=True, STORE_PRE=True, **tiles),
                        fwd_ints, w, s, (bm, bn, bk), dtype, dtype != "fp32")
        yield BuildSpec(f"fused dx {bm}x{bn}x{bk} w{w} s{s}", lin.nf4_lora_dx_kernel,
                        _signature(lin.nf4_lora_dx_kernel, dtype, {}),
                        dict(flags, HAS_LORA=True, HAS_IA3=True, **tiles), dx_ints, w, s, (bm, bk, bn), dtype,
                        dtype != "fp32")


def _split_k_specs(dtype: str) -> Iterator[BuildSpec]:
    sk = _module("nf4_split_k")
    n, k, r = SHAPE["N"], SHAPE["K"], SHAPE["R"]
    for bm, splits in ((16, 1), (16, 8), (32, 8), (64, 8)):
        ints = dict(M=bm, N=n, K=k, R=r, row_bytes=k // 2, k_per_split=k // splits, stride_xm=k, stride_xk=1,
                    stride_am=r, stride_ar=1, stride_bn=r, stride_br=1, stride_ym=n, stride_yn=1)
        yield BuildSpec(f"split-K fwd {sk.BLOCK_N}x{bm}x{sk.BLOCK_K} w{sk.NUM_WARPS} s{sk.NUM_STAGES} "
                        f"split {splits}", sk.nf4_lora_fwd_split_k_kernel,
                        _signature(sk.nf4_lora_fwd_split_k_kernel, dtype,
                                   {"lora_scale": "fp32", "part_ptr": "*fp32", "ticket_ptr": "*i32"}),
                        dict(HAS_LORA=True, HAS_BIAS=True, HAS_IA3=True, STORE_PRE=True, DOUBLE_QUANT=True,
                             BLOCKSIZE=64, IEEE=False, BLOCK_R=16, SPLIT_K=splits, BLOCK_N=sk.BLOCK_N,
                             BLOCK_K=sk.BLOCK_K, BLOCK_M=bm),
                        ints, sk.NUM_WARPS, sk.NUM_STAGES, (sk.BLOCK_N, bm, sk.BLOCK_K), dtype, True)


def _dequant_path_specs(dtype: str) -> Iterator[BuildSpec]:
    deq = _module("nf4_dequant")
    n, k = SHAPE["N"], SHAPE["K"]
    for row_scale in (False, True):
        yield BuildSpec(f"nf4_dequant {deq.BYTES_PER_PROGRAM} B/program w{deq.NUM_WARPS}"
                        + (" row-scaled" if row_scale else ""), deq.nf4_dequant_kernel,
                        _signature(deq.nf4_dequant_kernel, dtype, {}),
                        dict(BLOCKSIZE=64, NESTED_BLOCK=256, DOUBLE_QUANT=True, HAS_ROW_SCALE=row_scale,
                             ROWS_HOLD_BLOCKS=True, BYTES=deq.BYTES_PER_PROGRAM),
                        dict(numel=n * k, nbytes=n * k // 2, row_len=k), deq.NUM_WARPS, 3, None, dtype, False)
    dy = _module("lora_dy_pass")
    m, r = SHAPE["M"], SHAPE["R"]
    bm, bn, warps = dy.TILES["fp32" if dtype == "fp32" else "16-bit"]
    for copy in (False, True):
        yield BuildSpec(f"lora_dy_pass {bm}x16x{bn} w{warps}" + (" +dy copy" if copy else ""),
                        dy.lora_dy_pass_kernel, _signature(dy.lora_dy_pass_kernel, dtype, {}),
                        dict(COPY_DY=copy, IEEE=dtype == "fp32", BLOCK_R=16, BLOCK_M=bm, BLOCK_N=bn),
                        dict(M=m, N=n, R=r, rows_per_split=m // 16, stride_dym=n, stride_dyn=1, stride_bn=r,
                             stride_br=1, stride_xam=r, stride_xar=1, stride_outm=n + r),
                        warps, dy.NUM_STAGES, (bm, 16, bn), dtype, dtype != "fp32")


def _dropout_specs(dtype: str) -> Iterator[BuildSpec]:
    kd = _module("keyed_dropout")
    yield BuildSpec(f"keyed_dropout {kd.BLOCK}/program w{kd.NUM_WARPS}", kd.keyed_dropout_kernel,
                    _signature(kd.keyed_dropout_kernel, dtype, {"key_ptr": "*i64", "threshold_signed": "i32",
                                                                "keep_prob": "fp32"}),
                    dict(BLOCK=kd.BLOCK), dict(inner=SHAPE["K"] * 2048), kd.NUM_WARPS, 3, None, dtype, False)
    lkd = _module("lora_keyed_dropout")
    m, k, r = SHAPE["M"], SHAPE["K"], SHAPE["R"]
    scalars = {"key_ptr": "*i64", "part_ptr": "*fp32", "threshold_signed": "i32", "keep_scale": "fp32"}
    bm, bk = lkd.TILES["fp32" if dtype == "fp32" else "16-bit"]
    common = dict(IEEE=dtype == "fp32", BLOCK_R=16, BLOCK_M=bm, BLOCK_K=bk)
    for name, ints, tile in (
            ("dropout_xa", dict(M=m, K=k, T=2048, R=r, k_per_split=k // 2, stride_xm=k, stride_ar=k),
             (bm, 16, bk)),
            ("dropout_tail", dict(M=m, K=k, T=2048, R=r, stride_dxm=k, stride_gm=r, stride_ar=k),
             (bm, bk, 16)),
            ("dropout_da", dict(M=m, K=k, T=2048, R=r, m_per_split=m // 4, stride_xm=k, stride_gm=r),
             (16, bk, bm))):
        kernel = getattr(lkd, name + "_kernel")
        yield BuildSpec(f"{name} {bm}x{bk} w{lkd.NUM_WARPS}", kernel,
                        _signature(kernel, dtype, scalars), dict(common), ints, lkd.NUM_WARPS, lkd.NUM_STAGES, tile,
                        dtype, dtype != "fp32")


def _adapter_specs(dtype: str) -> Iterator[BuildSpec]:
    ada = _module("bottleneck_adapter")
    m, n, k = SHAPE["M"], 64, SHAPE["K"]  # the down projection to a 64-wide bottleneck
    ints = dict(M=m, N=n, K=k, M_BUCKET=m, stride_am=k, stride_ak=1, stride_bk=n, stride_bn=1, stride_cm=n,
                stride_cn=1, stride_zm=n, stride_zn=1, stride_rm=n, stride_rn=1)
    for bm, bn, bk, w, s in ada.ADAPTER_TILES:
        yield BuildSpec(f"adapter gemm {bm}x{bn}x{bk} w{w} s{s}", ada.adapter_gemm_kernel,
                        _signature(ada.adapter_gemm_kernel, dtype, {"scale": "fp32"}),
                        dict(HAS_BIAS=True, ACT=2, STORE_PRE=True, ACT_GRAD=0, HAS_RESIDUAL=True,
                             IEEE=dtype == "fp32", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8),
                        ints, w, s, (bm, bn, bk), dtype, dtype != "fp32")


def all_specs(dtypes=("bf16", "fp32")) -> list[BuildSpec]:
    specs: list[BuildSpec] = []
    for dtype in dtypes:
        if dtype != "fp32":  # compiled, fp32 activations never reach the fused kernels (backend.nf4_path)
            specs += [*_fused_specs(dtype), *_split_k_specs(dtype)]
        specs += [*_dequant_path_specs(dtype), *_dropout_specs(dtype), *_adapter_specs(dtype)]
    return specs
