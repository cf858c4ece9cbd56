"""The static performance gate: every kernel configuration mtpeft can launch, compiled for Hopper.

``bench/sass_report.py`` compiles each (kernel, autotune tile, dtype) of
``mtpeft.kernels.static_builds`` for sm_90a with Triton's own toolchain (ptxas and cuobjdump ship in
the wheel; no GPU), in a subprocess without TRITON_INTERPRET, and reads registers, spills, shared
memory and the MMA instructions off the result. A configuration the autotuner may pick must not
spill, must fit the 227 KiB of shared memory a block may use, and from BLOCK_M = 64 up must use
wgmma (Hopper's asynchronous warpgroup MMA; mma.sync reaches about half its throughput).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("sass") / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(out.parent / "cache")  # compile for real, never a cached cubin
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "sass_report.py"), "--json", str(out),
                           "--workers", "2"], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def test_every_kernel_and_tile_is_compiled(compiled):
    """The report covers each autotune tile of each kernel in bf16 and fp32 (nothing skipped)."""
    from mtpeft.kernels.static_builds import all_specs

    labels = {(r["label"], r["dtype"]) for r in compiled}
    assert labels == {(s.label, s.dtype) for s in all_specs()}
    kinds = {label.split(" ")[0] + " " + label.split(" ")[1] for label, _ in labels}
    assert {"fused fwd", "fused dx", "adapter gemm"} <= kinds
    assert any(label.startswith("nf4_dequant") for label, _ in labels)
    assert any(label.startswith("lora_dy_pass") for label, _ in labels)


def test_no_configuration_spills_or_overflows_shared_memory(compiled):
    bad = [(r["label"], r["dtype"], r["spill_stores"], r["spill_loads"], r["shared"]) for r in compiled
           if r["spill_stores"] or r["spill_loads"] or not r["fits_shared"] or r["ctas_per_sm"] < 1]
    assert not bad, f"configurations that spill or cannot launch: {bad}"


def test_large_tiles_use_wgmma(compiled):
    bad = [(r["label"], r["mma"]) for r in compiled
           if r["tile"] and r["tensor_cores"] and r["tile"][0] >= 64 and r["mma"] != "wgmma"]
    assert not bad, f"BLOCK_M >= 64 tiles without wgmma: {bad}"
    assert all(r["mma"] == "none" for r in compiled if r["dtype"] == "fp32" and r["tile"]), \
        "fp32 tiles are compiled with IEEE products (FFMA): a tensor-core MMA here would mean TF32"


def test_dequant_kernel_is_vectorized_and_table_lookup_is_not_a_global_gather(compiled):
    """16-byte loads and stores, and no more than the bandwidth budget of instructions per element."""
    rows = [r for r in compiled if r["label"].startswith("nf4_dequant") and r["dtype"] == "bf16"]
    assert rows and all(r["bandwidth_fraction_H200"] >= 0.8 for r in rows), rows
    # per thread: 16 packed bytes in one load, 32 bf16 out in four stores
    assert all(r["loads_128"] >= 1 and r["stores_128"] >= 4 for r in rows), rows
