"""The Triton kernels compile for an H100 (sm_90) down to a cubin, with no GPU present.

The interpreter runs kernels as Python, so it accepts code the compiler rejects (a dead
``return`` of another type, for example). This compiles representative variants of every kernel
with Triton's own toolchain (ptxas ships in the wheel), in a subprocess without TRITON_INTERPRET,
and checks each fits in the H100's shared memory.
"""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent('''
    import sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import mtpeft.kernels
    lin = sys.modules["mtpeft.kernels.nf4_lora_linear"]
    ada = sys.modules["mtpeft.kernels.bottleneck_adapter"]
    SMEM_LIMIT = 232448  # H100 max dynamic shared memory per block

    def signature(fn, dtype, types):
        sig = {}
        for name in fn.arg_names:
            if name in types:
                sig[name] = types[name]
            elif name.endswith("_ptr"):
                sig[name] = "*" + dtype
            elif name.isupper() and name not in ("M", "N", "K", "R", "M_BUCKET"):
                sig[name] = "constexpr"
            else:
                sig[name] = "i32"
        return sig

    def build(label, fn, dtype, types, constexprs):
        tiles = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8)
        src = ASTSource(fn, signature(fn, dtype, types), {**constexprs, **tiles})
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3})
        assert kernel.metadata.shared <= SMEM_LIMIT, (label, kernel.metadata.shared)
        assert kernel.asm["cubin"], label
        print("compiled", label, kernel.metadata.shared)

    quant = {"packed_ptr": "*u8", "absmax_ptr": "*u8", "code_ptr": "*fp32", "absmax_code_ptr": "*fp32",
             "absmax_scale_ptr": "*fp32", "ia3_ptr": "*fp32", "absmax_offset": "fp32", "lora_scale": "fp32"}
    flags = dict(HAS_LORA=True, HAS_IA3=True, DOUBLE_QUANT=True, BLOCKSIZE=64, BLOCK_R=16)
    build("fwd bf16 aligned", lin._fwd_kernel.fn, "bf16", quant,
          dict(flags, HAS_BIAS=True, STORE_PRE=True, PAIRED=True, ALIGNED=True, IEEE=False))
    build("fwd fp32 odd K", lin._fwd_kernel.fn, "fp32", dict(quant, absmax_ptr="*fp32"),
          dict(flags, HAS_LORA=False, DOUBLE_QUANT=False, HAS_BIAS=False, STORE_PRE=False, PAIRED=False,
               ALIGNED=False, IEEE=True))
    build("dx bf16 aligned", lin._dx_kernel.fn, "bf16", quant, dict(flags, PAIRED=True, ALIGNED=True, IEEE=False))
    build("adapter down gelu", ada._gemm_epilogue_kernel.fn, "bf16", {"scale": "fp32"},
          dict(HAS_BIAS=True, ACT=2, STORE_PRE=True, ACT_GRAD=0, HAS_RESIDUAL=False, IEEE=False))
    build("adapter dz gelu_tanh grad", ada._gemm_epilogue_kernel.fn, "fp32", {"scale": "fp32"},
          dict(HAS_BIAS=False, ACT=0, STORE_PRE=False, ACT_GRAD=3, HAS_RESIDUAL=True, IEEE=True))
''')


def test_kernels_compile_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, never a cached cubin
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("compiled") == 5, done.stdout
