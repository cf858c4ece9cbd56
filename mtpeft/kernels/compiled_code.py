"""What a Triton kernel compiles to on Hopper, read without a GPU: the static performance instrument.

:func:`compile_for_hopper` compiles one configuration of a kernel for ``sm_90a`` with the argument
specialization the runtime applies (pointers 16-byte aligned, integers divisible by 16 marked so,
integers equal to 1 turned into constants), then reads the result with the tools Triton's wheel
carries (``backends/nvidia/bin``): ``ptxas -v`` for registers and spills, ``cuobjdump -sass`` for
the instructions. It reports registers, spill bytes, shared memory, CTAs per SM, the MMA kind
(``wgmma`` = HGMMA, ``mma.sync`` = HMMA, ``none`` = FFMA only) and the instructions per thread in
the main loop's body (one K step), with an issue-bound estimate against the tensor-core cycles of
that K step. ``bench/sass_report.py`` prints the table; ``tests/kernels/test_kernel_static_gate.py``
fails on a selectable configuration that spills, exceeds shared memory or (BLOCK_M ≥ 64) lacks wgmma.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import tempfile
from typing import Iterable, Mapping, Optional

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

SMEM_PER_BLOCK = 232448  # sm_90 opt-in dynamic shared memory per block (227 KiB)
SMEM_PER_SM = 233472  # 228 KiB per SM, 1 KiB of it reserved per resident block
REGS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
# H100 SXM: 989 dense bf16 TFLOP/s over 132 SMs at 1.83 GHz = 4096 FLOP per clock per SM;
# FFMA: 128 lanes per clock per SM = 256 FLOP per clock per SM.
TENSOR_FLOP_PER_CLOCK = 4096
FFMA_FLOP_PER_CLOCK = 256
ISSUE_PER_CLOCK = 4  # four schedulers per SM, one warp instruction each per clock

_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)(.*?);")


@dataclasses.dataclass
class CompiledKernel:
    label: str
    num_warps: int
    regs: int
    spill_stores: int
    spill_loads: int
    shared: int
    mma: str
    loop_instructions: int
    total_instructions: int
    ops: dict
    loads_128: int = 0  # LDG.E.128: 16-byte global loads
    stores_128: int = 0  # STG.E.128: 16-byte global stores

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0

    @property
    def fits_shared(self) -> bool:
        return self.shared <= SMEM_PER_BLOCK

    @property
    def ctas_per_sm(self) -> int:
        if not self.fits_shared:
            return 0
        warp_regs = -(-max(self.regs, 1) * 32 // 256) * 256
        by_regs = REGS_PER_SM // (warp_regs * self.num_warps)
        by_smem = SMEM_PER_SM // (self.shared + 1024)
        return max(0, min(by_regs, by_smem, MAX_WARPS_PER_SM // self.num_warps, 32))

    def issue_cycles(self) -> float:
        """Clocks one SM needs to issue one K step of every resident warp of this CTA."""
        return self.loop_instructions * self.num_warps / ISSUE_PER_CLOCK


def toolchain_dir() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def runtime_specialization(fn, ints: Mapping[str, int]) -> tuple[dict, dict]:
    """(attrs, constants) as Triton's launcher would derive them for these integer values; every
    pointer is taken as 16-byte aligned (torch allocations are)."""
    attrs, constants = {}, {}
    for name in fn.arg_names:
        if name.endswith("_ptr"):
            attrs[(fn.arg_names.index(name),)] = [["tt.divisibility", 16]]
        elif name in ints:
            value = ints[name]
            if value == 1:
                constants[name] = 1
            elif value % 16 == 0:
                attrs[(fn.arg_names.index(name),)] = [["tt.divisibility", 16]]
    return attrs, constants


def _ptxas_report(ptx: str, workdir: str) -> str:
    path = os.path.join(workdir, "kernel.ptx")
    with open(path, "w") as f:
        f.write(ptx)
    for tool in ("ptxas-blackwell", "ptxas"):  # the newer one reads the PTX version Triton emits
        exe = os.path.join(toolchain_dir(), tool)
        if not os.path.exists(exe):
            continue
        done = subprocess.run([exe, "-arch=sm_90a", "-v", path, "-o", os.path.join(workdir, "kernel.o")],
                              capture_output=True, text=True)
        if done.returncode == 0:
            return done.stderr + done.stdout
    raise RuntimeError(f"no ptxas in {toolchain_dir()} assembles the kernel for sm_90a")


def _sass(cubin: bytes, workdir: str) -> list[tuple[int, str, str]]:
    path = os.path.join(workdir, "kernel.cubin")
    with open(path, "wb") as f:
        f.write(cubin)
    text = subprocess.run([os.path.join(toolchain_dir(), "cuobjdump"), "-sass", path],
                          capture_output=True, text=True, check=True).stdout
    return [(int(m.group(1), 16), m.group(3), m.group(4)) for m in map(_SASS_LINE.search, text.splitlines()) if m]


def _main_loop(sass: list[tuple[int, str, str]]) -> list[tuple[int, str, str]]:
    """The backward-branch loop holding the most MMA instructions (else the longest loop)."""
    by_address = {addr: i for i, (addr, _, _) in enumerate(sass)}
    best, best_key = [], (-1, -1)
    for i, (addr, op, rest) in enumerate(sass):
        if not op.startswith("BRA"):
            continue
        target = re.search(r"0x([0-9a-f]+)", rest)
        if target is None or int(target.group(1), 16) >= addr or int(target.group(1), 16) not in by_address:
            continue
        body = sass[by_address[int(target.group(1), 16)]: i + 1]
        key = (sum(op.startswith(("HGMMA", "HMMA")) for _, op, _ in body), len(body))
        if key > best_key:
            best, best_key = body, key
    return best


def compile_for_hopper(label: str, fn, signature: Mapping[str, str], constexprs: Mapping[str, object],
                       ints: Optional[Mapping[str, int]] = None, num_warps: int = 4, num_stages: int = 3,
                       extra_options: Optional[Mapping[str, object]] = None) -> CompiledKernel:
    """Compile ``fn`` (a ``@triton.jit`` function or its ``.fn``) for sm_90a and read the result.

    ``signature`` maps every non-constexpr argument to its Triton type; ``ints`` gives the integer
    arguments' values at the shape of interest, for the runtime's specialization."""
    jit = fn
    while not isinstance(jit, JITFunction) and hasattr(jit, "fn"):  # through @triton.autotune
        jit = jit.fn
    if not isinstance(jit, JITFunction):
        raise TypeError(f"{label}: pass a @triton.jit function")
    attrs, constants = runtime_specialization(jit, ints or {})
    sig = dict(signature)
    for name in constants:
        sig[name] = "constexpr"
    for name in constexprs:
        sig[name] = "constexpr"
    src = ASTSource(jit, sig, {**constexprs, **constants}, attrs)
    options = {"num_warps": num_warps, "num_stages": num_stages, **(extra_options or {})}
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    with tempfile.TemporaryDirectory() as workdir:
        report = _ptxas_report(kernel.asm["ptx"], workdir)
        sass = _sass(kernel.asm["cubin"], workdir)
    regs = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    ops: dict[str, int] = {}
    for _, op, _ in sass:
        ops[op.split(".")[0]] = ops.get(op.split(".")[0], 0) + 1
    mma = "wgmma" if ops.get("HGMMA") else "mma.sync" if ops.get("HMMA") else "none"
    return CompiledKernel(label=label, num_warps=num_warps, regs=int(regs.group(1)) if regs else 0,
                          spill_stores=int(spills.group(1)) if spills else 0,
                          spill_loads=int(spills.group(2)) if spills else 0,
                          shared=int(kernel.metadata.shared), mma=mma,
                          loop_instructions=len(_main_loop(sass)), total_instructions=len(sass), ops=ops,
                          loads_128=sum(op.startswith("LDG") and op.endswith(".128") for _, op, _ in sass),
                          stores_128=sum(op.startswith("STG") and op.endswith(".128") for _, op, _ in sass))


def mma_cycles(block_m: int, block_n: int, block_k: int, tensor_cores: bool) -> float:
    """Clocks one SM's math units need for one K step of a BLOCK_M × BLOCK_N × BLOCK_K tile."""
    return 2 * block_m * block_n * block_k / (TENSOR_FLOP_PER_CLOCK if tensor_cores else FFMA_FLOP_PER_CLOCK)


def all_ok(kernels: Iterable[CompiledKernel]) -> bool:
    return all(not k.spills and k.fits_shared for k in kernels)
