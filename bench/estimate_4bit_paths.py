"""Static estimates of the 4-bit + LoRA layer against its targets, from bytes, FLOPs and the SASS.

No GPU: every number printed is an **estimate** from a stated model, not a measurement.

- GEMMs run at 75 % of dense bf16 peak (989 TFLOP/s on H100 SXM and H200), streaming passes at 80 %
  of HBM bandwidth (3.35 / 4.8 TB/s); a pass costs its bytes, a GEMM its FLOPs (its own operand
  traffic is inside cuBLAS's efficiency). bf16 activations, r = 16, NF4 with double quantization.
- (a) bare bf16 GEMMs: y = x·Wᵀ (fwd), + dx = dy·W (fwd+bwd). The floor.
- (b) bitsandbytes Linear4bit + HF peft LoRA: a dequantization pass to bf16 before each GEMM, and
  peft's LoRA as separate ops (x·Aᵀ, ·Bᵀ, ·scaling, + result; backward through each, dx accumulated).
- (e) mtpeft's dequant path (``nf4_lora_linear_dequant``): the dequant pass (into the reused
  buffer, with A appended), one GEMM for [y | x·Aᵀ], the LoRA add in place (reads and writes y),
  the dy pass (reads dy, writes [dy, g], partial sums), the dequant pass again, one GEMM for dx with
  the tail folded, dA = gᵀ·x (reads x).
- (d) mtpeft's split-K forward for few rows: the larger of its byte time and its issue time, the
  latter from the instructions per weight element of the compiled kernel
  (``mtpeft.kernels.compiled_code``, compiled here); the keyed-dropout kernels likewise.

    python bench/estimate_4bit_paths.py
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GPUS = {  # dense bf16 FLOP/s, HBM bytes/s, SMs, boost clock
    "H100": (989e12, 3.35e12, 132, 1.83e9),
    "H200": (989e12, 4.8e12, 132, 1.98e9),
}
GEMM_EFF, STREAM_EFF = 0.75, 0.80
R = 16
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)  # nibbles, uint8 absmax, nested fp32 scale
LARGE = ((8192, 4096, 4096), (8192, 11008, 4096), (8192, 4096, 11008))
SMALL = ((16, 4096, 4096), (16, 11008, 4096), (16, 4096, 11008))


def dequant_bytes(k: int, n: int) -> float:
    return n * k * (NF4_BYTES_PER_WEIGHT + 2)


def large_m(m: int, k: int, n: int, gpu: str) -> dict:
    flops, bw, _, _ = GPUS[gpu]
    gemm = lambda f: f / (flops * GEMM_EFF)  # noqa: E731
    stream = lambda b: b / (bw * STREAM_EFF)  # noqa: E731
    mk, mn = 2 * m * k, 2 * m * n  # bf16 bytes of x / y-shaped tensors
    base = gemm(2 * m * n * k)
    a = {"fwd": base, "fwdbwd": 2 * base}
    lora_flops = 2 * m * R * (k + n)
    b_fwd = gemm(2 * m * n * k) + stream(dequant_bytes(k, n) + mk + 6 * mn) + gemm(lora_flops)
    b_bwd = gemm(2 * m * n * k) + stream(dequant_bytes(k, n) + 4 * mn + 5 * mk) + gemm(2 * lora_flops)
    parts = {"dequant fwd": stream(dequant_bytes(k, n)), "GEMM [y|xA]": gemm(2 * m * (n + R) * k),
             "LoRA add (y read+write)": stream(2 * mn), "dy pass (read dy, write [dy,g], partials)":
             stream(2 * mn + 2 * 4 * R * (m * (n // 256 + 1) + n * 17)), "dequant bwd": stream(dequant_bytes(k, n)),
             "GEMM dx": gemm(2 * m * (n + R) * k), "dA = g^T x (read x)": stream(mk) + gemm(2 * m * R * k)}
    e_fwd = sum(v for key, v in parts.items() if key in ("dequant fwd", "GEMM [y|xA]", "LoRA add (y read+write)"))
    e = {"fwd": e_fwd, "fwdbwd": sum(parts.values())}
    return {"a": a, "b": {"fwd": b_fwd, "fwdbwd": b_fwd + b_bwd}, "e": e, "e_parts": parts}


def with_keyed_dropout(m: int, k: int, n: int, gpu: str, ipe: dict) -> float:
    """(e) with LoRA dropout drawn inside the rank-r kernels (``lora_keyed_dropout``): x·Aᵀ leaves the
    fold for ``dropout_xa`` (reads x), dx's tail leaves the GEMM for ``dropout_tail`` (reads and writes
    dx), dA is ``dropout_da`` (reads x) instead of cuBLAS, and the dy pass writes no [dy, g] copy.
    Each kernel costs the larger of its bytes and its issue time (instructions per element)."""
    _, bw, sms, clock = GPUS[gpu]
    stream = lambda b: b / (bw * STREAM_EFF)  # noqa: E731
    issue = lambda name: m * k * ipe[name] / (sms * 128 * clock)  # noqa: E731
    base = large_m(m, k, n, gpu)
    mk, mn = 2 * m * k, 2 * m * n
    return (base["e"]["fwdbwd"] - stream(mn) - base["e_parts"]["dA = g^T x (read x)"]
            + max(stream(mk), issue("dropout_xa")) + max(stream(2 * mk), issue("dropout_tail"))
            + max(stream(mk), issue("dropout_da")))


def small_m(m: int, k: int, n: int, gpu: str, instr_per_element: float) -> dict:
    flops, bw, sms, clock = GPUS[gpu]
    a = max(2 * n * k / (bw * STREAM_EFF), 2 * m * n * k / (flops * GEMM_EFF))
    d_bytes = n * k * NF4_BYTES_PER_WEIGHT / (bw * STREAM_EFF)
    d_issue = n * k * instr_per_element / (sms * 128 * clock)
    return {"a": a, "d": max(d_bytes, d_issue), "d_bytes": d_bytes, "d_issue": d_issue}


def instructions_per_element() -> dict:
    """Per element of the tile a K step (or, without a loop, the whole program) covers, from the
    compiled sm_90a code of the split-K forward and the three keyed-dropout rank-r kernels."""
    from mtpeft.kernels.compiled_code import compile_for_hopper
    from mtpeft.kernels.static_builds import all_specs

    wanted = {"split-K": lambda s: "64x16x" in s.label and s.label.endswith("split 8"),
              "dropout_xa": lambda s: True, "dropout_tail": lambda s: True, "dropout_da": lambda s: True}
    out = {}
    for spec in all_specs(("bf16",)):
        name = spec.label.split(" ")[0]
        if name in wanted and name not in out and wanted[name](spec):
            got = compile_for_hopper(spec.label, spec.kernel, spec.signature, spec.constexprs, spec.ints,
                                     spec.num_warps, spec.num_stages)
            a, b, c = spec.tile
            elements = {"split-K": a * c, "dropout_xa": a * c, "dropout_tail": a * b, "dropout_da": b * c}[name]
            count = got.loop_instructions or got.total_instructions
            out[name] = count / (elements / (32 * spec.num_warps))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    args = p.parse_args(argv)
    counts = instructions_per_element()
    ipe = counts["split-K"]
    print("STATIC ESTIMATES (no GPU ran): GEMM at 75% of peak, streaming at 80% of bandwidth\n")
    print("| M | K | N | GPU | (a) bf16 GEMMs fwd+bwd µs | (b) bnb+peft µs | (e) mtpeft dequant path µs "
          "| e/a (target ≤ 1.10) | b/e (target ≥ 1.4) |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|")
    for m, k, n in LARGE:
        for gpu in GPUS:
            t = large_m(m, k, n, gpu)
            a, b, e = (t[x]["fwdbwd"] * 1e6 for x in "abe")
            print(f"| {m} | {k} | {n} | {gpu} | {a:.0f} | {b:.0f} | {e:.0f} | {e / a:.2f} | {b / e:.2f} |")
    t = large_m(*LARGE[0], "H200")
    print("\n(e) at M=8192, K=N=4096 on H200, µs per part: "
          + "; ".join(f"{key} {v * 1e6:.1f}" for key, v in t["e_parts"].items()))
    print("instructions per element (compiled): " + ", ".join(f"{k} {v:.1f}" for k, v in counts.items()))
    for gpu in GPUS:
        without = large_m(*LARGE[0], gpu)["e"]["fwdbwd"]
        with_dropout = with_keyed_dropout(*LARGE[0], gpu, counts)
        print(f"(e) with keyed LoRA dropout, M=8192, K=N=4096, {gpu}: {with_dropout * 1e6:.0f} µs = "
              f"{with_dropout / without:.2f}x the path without dropout")
    print(f"\nSplit-K forward: {ipe:.2f} instructions per weight element (compiled, sm_90a)\n")
    print("| M | K | N | GPU | (a) bf16 GEMM µs | (d) split-K µs (bytes / issue) | a/d (target ≥ 2.5) |")
    print("|---|---|---|---|---:|---:|---:|")
    for m, k, n in SMALL:
        for gpu in GPUS:
            t = small_m(m, k, n, gpu, ipe)
            print(f"| {m} | {k} | {n} | {gpu} | {t['a'] * 1e6:.1f} | {t['d'] * 1e6:.1f} "
                  f"({t['d_bytes'] * 1e6:.1f} / {t['d_issue'] * 1e6:.1f}) | {t['a'] / t['d']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
