"""Static report of every kernel configuration mtpeft can launch, compiled for Hopper (sm_90a), no GPU.

For each (kernel, autotune tile, dtype) of ``mtpeft.kernels.static_builds``: registers, spill bytes,
shared memory, CTAs per SM, MMA kind (wgmma / mma.sync / none), instructions per thread in one K
step of the main loop, and an issue-bound estimate: the clocks one SM needs to issue a K step of the
CTA's warps against the tensor-core clocks of that K step (> 1: the loop cannot keep the tensor
cores busy; the decode and the MMAs are not overlapped in the compiled code, so the K step costs
about issue + MMA clocks). For the dequant kernel, instructions per weight element against the
budget that streaming at full bandwidth leaves. Every number is read off the compiled code: these
are **static estimates**, not measurements.

    python bench/sass_report.py                       # table (bf16 and fp32), ~1-2 minutes on 2 cores
    python bench/sass_report.py --json out.json       # plus the rows as JSON
    python bench/sass_report.py --check               # exit 1 if a configuration fails the gate

The gate (also ``tests/kernels/test_kernel_static_gate.py``): no spills, shared memory within the
227 KiB a block may use, and wgmma for every tensor-core tile with BLOCK_M ≥ 64.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # compile for real: the interpreter has no compiled code
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# H100 SXM / H200: bytes per clock per SM at full HBM bandwidth (3.35 / 4.8 TB/s, 132 SMs, 1.83 /
# 1.98 GHz); the dequant kernel moves 2.5 bytes per element (half a packed byte in, bf16 out).
BYTES_PER_CLOCK_PER_SM = {"H100": 3.35e12 / 132 / 1.83e9, "H200": 4.8e12 / 132 / 1.98e9}
DEQUANT_BYTES_PER_ELEMENT = 2.5
LANES_PER_CLOCK = 128


def _compile(index: int) -> dict:
    from mtpeft.kernels.compiled_code import compile_for_hopper, mma_cycles
    from mtpeft.kernels.static_builds import all_specs

    spec = all_specs()[index]
    got = compile_for_hopper(spec.label, spec.kernel, spec.signature, spec.constexprs, spec.ints,
                             spec.num_warps, spec.num_stages)
    row = dict(label=spec.label, dtype=spec.dtype, regs=got.regs, spill_stores=got.spill_stores,
               spill_loads=got.spill_loads, shared=got.shared, fits_shared=got.fits_shared,
               ctas_per_sm=got.ctas_per_sm, mma=got.mma, loop_instructions=got.loop_instructions,
               total_instructions=got.total_instructions, loads_128=got.loads_128, stores_128=got.stores_128,
               tile=spec.tile, tensor_cores=spec.tensor_cores)
    if spec.tile and got.loop_instructions:  # a kernel without a K loop has no K step to compare
        row["issue_cycles"] = got.issue_cycles()
        row["mma_cycles"] = mma_cycles(*spec.tile, spec.tensor_cores)
        row["issue_over_mma"] = row["issue_cycles"] / row["mma_cycles"]
    streaming = {"nf4_dequant": (2 * spec.constexprs.get("BYTES", 0), DEQUANT_BYTES_PER_ELEMENT),
                 "keyed_dropout": (spec.constexprs.get("BLOCK", 0), 2 * (2 if spec.dtype == "bf16" else 4))}
    for prefix, (elements, bytes_per_element) in streaming.items():
        if spec.label.startswith(prefix):
            row["instructions_per_element"] = got.total_instructions / (elements / (32 * spec.num_warps))
            for gpu, bpc in BYTES_PER_CLOCK_PER_SM.items():
                budget = LANES_PER_CLOCK / (bpc / bytes_per_element)
                row[f"bandwidth_fraction_{gpu}"] = min(1.0, budget / row["instructions_per_element"])
    return row


def gate_failures(row: dict) -> list[str]:
    """Why a configuration fails the gate (empty: it passes)."""
    why = []
    if row["spill_stores"] or row["spill_loads"]:
        why.append(f"spills {row['spill_stores']}/{row['spill_loads']} B")
    if not row["fits_shared"]:
        why.append(f"shared memory {row['shared']} B > 227 KiB")
    if row["tile"] and row["tensor_cores"] and row["tile"][0] >= 64 and row["mma"] != "wgmma":
        why.append(f"BLOCK_M {row['tile'][0]} without wgmma ({row['mma']})")
    return why


def report(workers: int) -> list[dict]:
    from mtpeft.kernels.static_builds import all_specs

    count = len(all_specs())
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_compile, range(count)))


def format_table(rows: list[dict]) -> str:
    lines = ["| kernel, tile M×N×K, warps, stages | dtype | regs | spills st/ld (B) | smem (B) | CTAs/SM | MMA "
             "| instr / K step | issue / MMA clocks | gate |",
             "|---|---|---:|---:|---:|---:|---|---:|---:|---|"]
    for r in rows:
        ratio = f"{r['issue_over_mma']:.2f}" if "issue_over_mma" in r else "–"
        if "instructions_per_element" in r:
            ratio = (f"{r['instructions_per_element']:.1f} instr/element: "
                     f"{100 * r['bandwidth_fraction_H100']:.0f}% / {100 * r['bandwidth_fraction_H200']:.0f}% "
                     f"of H100 / H200 bandwidth")
        loop = r["loop_instructions"] or "–"
        gate = "; ".join(gate_failures(r)) or "ok"
        lines.append(f"| {r['label']} | {r['dtype']} | {r['regs']} | {r['spill_stores']}/{r['spill_loads']} | "
                     f"{r['shared']:,} | {r['ctas_per_sm']} | {r['mma']} | {loop} | {ratio} | {gate} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", help="write the rows to this file")
    p.add_argument("--check", action="store_true", help="exit 1 when a configuration fails the gate")
    p.add_argument("--workers", type=int, default=max(1, min(4, os.cpu_count() or 1)),
                   help="parallel compiles (default: up to 4)")
    args = p.parse_args(argv)
    rows = report(args.workers)
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    failing = [(r["label"], r["dtype"], gate_failures(r)) for r in rows if gate_failures(r)]
    for label, dtype, why in failing:
        print(f"gate: {label} ({dtype}): {'; '.join(why)}", file=sys.stderr)
    return 1 if args.check and failing else 0


if __name__ == "__main__":
    sys.exit(main())
