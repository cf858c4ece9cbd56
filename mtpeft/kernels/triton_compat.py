"""``dot`` and ``cast`` for kernels that must behave the same compiled and under the interpreter.

Triton 3.9's interpreter (TRITON_INTERPRET=1, how the CPU tests run the kernels) mishandles bf16:
``tl.dot`` multiplies bf16 tiles as their raw uint16 bits, and fp32 -> bf16 casts truncate instead
of rounding to nearest even. Under the interpreter these helpers upcast before the dot (exact: a
bf16 x bf16 product fits fp32, and tensor cores accumulate in fp32 too) and round bf16 by hand,
so the tests see the GPU's arithmetic. Compiled, they are plain ``tl.dot`` / ``.to``; ``ieee`` keeps
fp32 inputs out of TF32 so fp32 training gets fp32 products.
"""

import triton
import triton.language as tl

from mtpeft.kernels.backend import interpreter_enabled

if interpreter_enabled():

    @triton.jit
    def dot(a, b, acc, IEEE: tl.constexpr):
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)

    @triton.jit
    def cast(x, dtype: tl.constexpr):
        if dtype == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return x.to(dtype)

else:

    @triton.jit
    def dot(a, b, acc, IEEE: tl.constexpr):
        if IEEE:
            return tl.dot(a, b, acc, input_precision="ieee")
        return tl.dot(a, b, acc)

    @triton.jit
    def cast(x, dtype: tl.constexpr):
        return x.to(dtype)


def autotune_configs(tiles, interpreter_tile) -> list:
    """``triton.Config``s from (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) tiles; under the
    interpreter one small (BLOCK_M, BLOCK_N, BLOCK_K) tile instead, which keeps the CPU tests short."""
    if interpreter_enabled():
        bm, bn, bk = interpreter_tile
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 4}, num_warps=4)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in tiles]


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's (row tile, column tile), visiting GROUP_M row tiles per column sweep so
    neighbouring programs reuse the same weight tiles from L2."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    group_start = (pid // width) * GROUP_M
    group_rows = min(grid_m - group_start, GROUP_M)
    return group_start + (pid % width) % group_rows, (pid % width) // group_rows
