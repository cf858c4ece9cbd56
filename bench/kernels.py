"""Side-by-side GPU benchmark of the 4-bit + LoRA linear layer, every path (issues 3 and 10).

One run: first a correctness check on the GPU (every path and the bottleneck adapter against
float64 math; mtpeft vs bitsandbytes + peft on every timed shape), then, per shape, for forward,
forward+backward, and forward+backward with LoRA dropout 0.05, the median of CUDA-event timings
(L2 flushed before each timed call) of
  (a) bare bf16 ``torch.matmul`` of the same shape: the floor (fwd+bwd: only the y and dx GEMMs),
  (b) bitsandbytes ``Linear4bit`` (nf4, double quant, bf16 compute) wrapped by HF peft LoRA,
  (c) ``mtpeft.kernels.nf4_lora_linear`` as dispatched (fused kernels up to
      MTPEFT_NF4_FUSED_MAX_M rows, dequant + cuBLAS above),
  (d) the fused path forced (``MTPEFT_KERNELS=fused``), (e) the dequant path forced.
LoRA weights are bf16 in (b)-(e) (peft's fp32 adapter default would slow (b) for a reason
unrelated to the kernels); dropout is mtpeft's keyed dropout in (c)-(e) (``lora_dropout``: on the
dequant path the kernels draw the mask), peft's ``nn.Dropout`` in (b). Prints a table with c/a and b/c, the FLOP and bytes-moved floors, the measured
crossover between (d) and (e), and writes ``results.json`` and ``results.md`` to ``--out``. The
1B-shaped end-to-end step is ``bench/e2e_step.py``.

    python bench/kernels.py --out runs/bench_kernels          # full grid
    python bench/kernels.py --quick --out runs/bench_quick    # one shape
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

# This file is called kernels.py: as a script its folder comes first on sys.path, where it would
# shadow the `kernels` package that bitsandbytes looks for. Drop the folder.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

MS = (16, 128, 1024, 8192)
KNS = ((4096, 4096), (11008, 4096), (4096, 11008))  # (K, N): attention, MLP down, MLP up of a 7B
DROPOUT = 0.05
RANK = 16
ALPHA = 32
QUICK = ((512, 4096, 4096),)
CPU_SMOKE = ((16, 256, 192),)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench_kernels", help="folder for results.json and results.md")
    p.add_argument("--quick", action="store_true", help="one shape (M=512, K=N=4096) instead of the full grid")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls per measurement (autotuning happens here)")
    p.add_argument("--iters", type=int, default=20, help="timed calls per measurement; the median is reported")
    p.add_argument("--skip-check", action="store_true", help="time even if the correctness check fails")
    p.add_argument("--graphs", action="store_true",
                   help="time CUDA-graph replays (GPU time without Python launch overhead, as a decode loop "
                        "under graphs would see); a callable that cannot be captured is timed eagerly and marked")
    p.add_argument("--e2e", action="store_true",
                   help="then run bench/e2e_step.py (the 1B-shaped training step: mtpeft QLoRA vs bf16 LoRA vs "
                        "HF peft + bitsandbytes; tokens/s, peak memory) into --out/e2e.json")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="exercise the whole script on CPU at one tiny shape (needs TRITON_INTERPRET=1); "
                        "checks the script, its timings mean nothing")
    return p.parse_args(argv)


def rel_err(got, ref) -> float:
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def timed_ms(torch, fn, warmup: int, iters: int, flush) -> float:
    for _ in range(warmup):
        fn()
    if flush.device.type == "cpu":
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graphed(torch, fn):
    """``fn`` captured in a CUDA graph (returns its replay), or None when it cannot be captured."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay
    except Exception as err:  # capture is best effort: report and fall back to eager timing
        print(f"  (CUDA graph capture of {fn.__name__} failed, timing it eagerly: {type(err).__name__}: {err})")
        return None


def build_bnb_peft(torch, w, r: int, dev: str):
    """bitsandbytes Linear4bit (nf4, double quant, bf16 compute) + peft LoRA, bf16 adapters."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    n, k = w.shape

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16,
                                          compress_statistics=True, quant_type="nf4")
            self.proj.weight = bnb.nn.Params4bit(w.cpu(), requires_grad=False, compress_statistics=True,
                                                 quant_type="nf4", blocksize=64)

        def forward(self, x):
            return self.proj(x)

    net = Net().to(dev)
    cfg = LoraConfig(r=r, lora_alpha=ALPHA, target_modules=["proj"], lora_dropout=0.0, bias="none")
    model = get_peft_model(net, cfg, autocast_adapter_dtype=False)
    lora = model.base_model.model.proj
    with torch.no_grad():
        torch.nn.init.normal_(lora.lora_B["default"].weight, std=0.02)  # peft zero-inits B: make it count
    for p in lora.lora_A.parameters():
        p.data = p.data.to(torch.bfloat16)
    for p in lora.lora_B.parameters():
        p.data = p.data.to(torch.bfloat16)
    return model, lora


def check_correctness(torch, dev: str) -> list[str]:
    """Fused ops on the GPU against float64 math; returns failure lines (empty when all pass)."""
    import bitsandbytes.functional as bnbf

    from mtpeft.kernels import bottleneck_adapter, nf4_lora_linear
    from mtpeft.kernels.bottleneck_adapter_reference import bottleneck_adapter_reference
    from mtpeft.quant import from_bnb

    failures = []
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
    configured = os.environ.get("MTPEFT_KERNELS")
    cases = [(dtype, dq, path, m, k) for dtype in (torch.float32, torch.bfloat16) for dq in (True, False)
             for path in ("fused", "dequant") for m, k in ((37, 200), (16, 256), (300, 256))]
    for dtype, dq, path, m, k in cases:
        os.environ["MTPEFT_KERNELS"] = path
        if True:
            n, r, s = 129, 7, 0.75
            w = torch.randn(n, k, device=dev).to(dtype)
            packed, state = bnbf.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=dq)
            q, w_deq = from_bnb(packed, state), bnbf.dequantize_4bit(packed, state).double()
            x = torch.randn(m, k, device=dev).to(dtype).requires_grad_()
            a = (torch.randn(r, k, device=dev) / k**0.5).to(dtype).requires_grad_()
            b = torch.randn(n, r, device=dev).to(dtype).requires_grad_()
            bias = torch.randn(n, device=dev).to(dtype).requires_grad_()
            ia3 = (torch.rand(n, device=dev) + 0.5).to(dtype).requires_grad_()
            dy = torch.randn(m, n, device=dev).to(dtype)
            y = nf4_lora_linear(x, q, a, b, s, bias=bias, ia3=ia3)
            y.backward(dy)
            leaves = {"x": x, "A": a, "B": b, "bias": bias, "ia3": ia3}
            c = {key: t.detach().double().requires_grad_() for key, t in leaves.items()}
            y64 = (c["x"] @ w_deq.t() + s * (c["x"] @ c["A"].t()) @ c["B"].t() + c["bias"]) * c["ia3"]
            y64.backward(dy.double())
            errs = {"y": rel_err(y.detach(), y64.detach())}
            errs.update({"d" + key: rel_err(t.grad, c[key].grad) for key, t in leaves.items()})
            bad = {key: f"{e:.2e}" for key, e in errs.items() if not e <= tol[dtype]}
            if bad:
                failures.append(f"nf4_lora_linear {path} {dtype} double_quant={dq} M={m} K={k}: {bad}")
    if configured is None:
        os.environ.pop("MTPEFT_KERNELS", None)
    else:
        os.environ["MTPEFT_KERNELS"] = configured
    for dtype in (torch.float32, torch.bfloat16):
        for activation in ("relu", "gelu", "gelu_tanh", "silu"):
            h = torch.randn(37, 129, device=dev).to(dtype).requires_grad_()
            ps = [torch.randn(7, 129, device=dev).div(129**0.5).requires_grad_(),
                  torch.randn(7, device=dev).requires_grad_(),
                  torch.randn(129, 7, device=dev).div(7**0.5).requires_grad_(),
                  torch.randn(129, device=dev).requires_grad_()]
            dout = torch.randn(37, 129, device=dev).to(dtype)
            out = bottleneck_adapter(h, *ps, activation, 0.6)
            out.backward(dout)
            c = [t.detach().to(dtype).double().requires_grad_() for t in [h] + ps]
            out64 = bottleneck_adapter_reference(c[0], *c[1:], activation, 0.6)
            out64.backward(dout.double())
            errs = [rel_err(out.detach(), out64.detach())] + [rel_err(t.grad, u.grad) for t, u in zip([h] + ps, c)]
            if max(errs) > tol[dtype]:
                failures.append(f"bottleneck_adapter {dtype} {activation}: max relative error {max(errs):.2e}")
    return failures


def floors(m: int, k: int, n: int, r: int) -> dict:
    """FLOPs and bytes no implementation can avoid (bf16 activations, NF4 weight + uint8 absmax)."""
    nf4_w = n * k * (0.5 + 1 / 64)
    lora_w = 2 * r * (k + n)
    return {
        "fwd_flop": 2 * m * n * k + 2 * m * r * (k + n),
        "fwdbwd_flop": 4 * m * n * k + 6 * m * r * (k + n),
        "fwd_bytes": 2 * m * k + 2 * m * n + nf4_w + lora_w,
        "fwdbwd_bytes": 2 * m * k + 2 * m * n + nf4_w + lora_w + (2 * m * n + 4 * m * k + nf4_w + lora_w),
    }


def with_kernels(path, fn):
    """``fn`` run with MTPEFT_KERNELS set to ``path`` (None: as configured)."""
    def run():
        previous = os.environ.get("MTPEFT_KERNELS")
        if path is not None:
            os.environ["MTPEFT_KERNELS"] = path
        try:
            return fn()
        finally:
            if path is not None:
                if previous is None:
                    os.environ.pop("MTPEFT_KERNELS", None)
                else:
                    os.environ["MTPEFT_KERNELS"] = previous
    run.__name__ = getattr(fn, "__name__", "fn") + (f"[{path}]" if path else "")
    return run


def bench_shape(torch, m, k, n, args, flush, dev: str) -> list[dict]:
    from mtpeft.kernels import nf4_lora_linear
    from mtpeft.kernels.lora_keyed_dropout import KeyedMask
    from mtpeft.quant import from_params4bit

    w = (torch.randn(n, k, device=dev) * 0.02).to(torch.bfloat16)
    model, lora = build_bnb_peft(torch, w, RANK, dev)
    q = from_params4bit(lora.base_layer.weight)
    a = lora.lora_A["default"].weight.detach().clone().requires_grad_()
    b = lora.lora_B["default"].weight.detach().clone().requires_grad_()
    s = lora.scaling["default"]
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    xg = x.clone().requires_grad_()
    dy = torch.randn(m, n, device=dev, dtype=torch.bfloat16)

    y_b = model(xg)
    y_b.backward(dy)
    dx_b, xg.grad = xg.grad.clone(), None
    y_c = nf4_lora_linear(xg, q, a, b, s)
    y_c.backward(dy)
    check = {"y_rel_err_vs_bnb": rel_err(y_c.detach(), y_b.detach()), "dx_rel_err_vs_bnb": rel_err(xg.grad, dx_b)}
    del y_b, y_c, dx_b

    def floor_fwd():
        return x @ w.t()

    def floor_fwdbwd():
        x @ w.t()
        dy @ w

    def bnb_fwd():
        with torch.no_grad():
            model(x)

    def bnb_fwdbwd():
        xg.grad = None
        model(xg).backward(dy)

    def ours_fwd():
        with torch.no_grad():
            nf4_lora_linear(x, q, a, b, s)

    def ours_fwdbwd():
        xg.grad = None
        nf4_lora_linear(xg, q, a, b, s).backward(dy)

    keyed = KeyedMask(torch.arange(m, device=dev, dtype=torch.int64), 0x5EED, DROPOUT)

    def ours_fwdbwd_dropout():  # mtpeft's keyed dropout, as the trainer applies it (mask drawn by the kernels)
        xg.grad = None
        nf4_lora_linear(xg, q, a, b, s, lora_dropout=keyed).backward(dy)

    fl = floors(m, k, n, RANK)
    rows = []
    plans = (("fwd", 0.0, floor_fwd, bnb_fwd, ours_fwd), ("fwd+bwd", 0.0, floor_fwdbwd, bnb_fwdbwd, ours_fwdbwd),
             ("fwd+bwd/d", DROPOUT, floor_fwdbwd, bnb_fwdbwd, ours_fwdbwd_dropout))
    floor_ms = {}
    for mode, p, floor_fn, bnb_fn, ours_fn in plans:
        # peft's own modules: Identity without dropout (what lora_dropout=0 builds), Dropout(p) with
        lora.lora_dropout["default"] = torch.nn.Dropout(p) if p else torch.nn.Identity()
        fns = {"a": floor_fn, "b": bnb_fn, "c": ours_fn, "d": with_kernels("fused", ours_fn),
               "e": with_kernels("dequant", ours_fn)}
        kinds, times = {}, {}
        for key, fn in fns.items():
            if key == "a" and floor_fn in floor_ms:
                kinds[key], times[key] = "eager", floor_ms[floor_fn]
                continue
            replay = graphed(torch, fn) if args.graphs and dev == "cuda" else None
            kinds[key] = "cuda-graph" if replay else "eager"
            times[key] = timed_ms(torch, replay or fn, args.warmup, args.iters, flush)
        floor_ms[floor_fn] = times["a"]
        key = "fwd" if mode == "fwd" else "fwdbwd"
        t_c = times["c"]
        rows.append({
            "M": m, "K": k, "N": n, "r": RANK, "mode": mode, "dropout": p, "timing": kinds,
            "a_bf16_matmul_ms": times["a"], "b_bnb_peft_ms": times.get("b", float("nan")),
            "c_mtpeft_ms": t_c, "d_fused_ms": times["d"], "e_dequant_ms": times["e"],
            "c_over_a": t_c / times["a"], "b_over_c": times.get("b", float("nan")) / t_c,
            "flop_floor": fl[key + "_flop"], "bytes_floor": fl[key + "_bytes"],
            "c_tflops": fl[key + "_flop"] / t_c / 1e9, "c_gbps": fl[key + "_bytes"] / t_c / 1e6,
            **check,
        })
    del model, lora
    if dev == "cuda":
        torch.cuda.empty_cache()
    return rows


def crossover_lines(rows: list[dict]) -> list[str]:
    """Per (K, N) and mode: the smallest measured M at which the dequant path beats the fused one."""
    lines = []
    for k, n in sorted({(r["K"], r["N"]) for r in rows}):
        for mode in ("fwd", "fwd+bwd"):
            sel = sorted((r for r in rows if (r["K"], r["N"], r["mode"]) == (k, n, mode)), key=lambda r: r["M"])
            faster = [r["M"] for r in sel if r["e_dequant_ms"] < r["d_fused_ms"]]
            fused_up_to = [r["M"] for r in sel if r["M"] < (faster[0] if faster else float("inf"))]
            lines.append(f"crossover K={k} N={n} {mode}: dequant faster from M={faster[0] if faster else 'never'}"
                         f" (fused faster up to M={fused_up_to[-1] if fused_up_to else 'none'} of {[r['M'] for r in sel]})")
    return lines


def target_lines(rows: list[dict]) -> list[str]:
    lines = []
    for row in rows:
        if row.get("dropout", 0.0):
            continue
        shape = f"M={row['M']} K={row['K']} N={row['N']} {row['mode']}"
        if row["M"] == 8192 and row["mode"] == "fwd+bwd":
            ok = row["c_over_a"] <= 1.10 and row["b_over_c"] >= 1.4
            lines.append(f"{'PASS' if ok else 'MISS'} {shape}: c/a={row['c_over_a']:.3f} (<=1.10), "
                         f"b/c={row['b_over_c']:.2f} (>=1.4)")
        if row["M"] == 16 and row["mode"] == "fwd":
            ok = row["c_over_a"] <= 1 / 2.5
            lines.append(f"{'PASS' if ok else 'MISS'} {shape}: a/c={1 / row['c_over_a']:.2f} (>=2.5)")
    return lines


def markdown(rows: list[dict], meta: dict) -> str:
    head = ("| M | K | N | mode | (a) bf16 matmul ms | (b) bnb+peft ms | (c) mtpeft ms | (d) fused ms | (e) dequant ms "
            "| c/a | b/c | FLOP floor (GFLOP) | bytes floor (MB) | c TFLOP/s | c GB/s | c vs b rel err (y, dx) |")
    out = [f"Device: {meta['device']}; date {meta['date']}; torch {meta['torch']}, triton {meta['triton']}, "
           f"bitsandbytes {meta['bitsandbytes']}, peft {meta['peft']}; command `{meta['command']}`. "
           "Mode fwd+bwd/d: LoRA dropout 0.05.", "", head, "|" + "---|" * 16]
    for r in rows:
        out.append(f"| {r['M']} | {r['K']} | {r['N']} | {r['mode']} | {r['a_bf16_matmul_ms']:.3f} | "
                   f"{r['b_bnb_peft_ms']:.3f} | {r['c_mtpeft_ms']:.3f} | {r['d_fused_ms']:.3f} | "
                   f"{r['e_dequant_ms']:.3f} | {r['c_over_a']:.3f} | "
                   f"{r['b_over_c']:.2f} | {r['flop_floor'] / 1e9:.1f} | {r['bytes_floor'] / 1e6:.1f} | "
                   f"{r['c_tflops']:.1f} | {r['c_gbps']:.0f} | "
                   f"{r['y_rel_err_vs_bnb']:.1e}, {r['dx_rel_err_vs_bnb']:.1e} |"
                   + ("" if set(r["timing"].values()) == {"eager"} else f" timing {r['timing']}"))
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    dev = "cpu" if args.cpu_smoke else "cuda"
    if args.cpu_smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("--cpu-smoke runs the Triton kernels in the interpreter: export TRITON_INTERPRET=1 first.",
                  file=sys.stderr)
            return 2
        os.environ["MTPEFT_KERNELS"] = "triton"
        args.warmup, args.iters = 1, 1
    elif not torch.cuda.is_available():
        print("bench/kernels.py needs a CUDA GPU and found none; run it on a GPU machine (see bench/README.md).",
              file=sys.stderr)
        return 2
    import bitsandbytes
    import peft
    import triton

    meta = {
        "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu (smoke run, timings meaningless)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
        "bitsandbytes": bitsandbytes.__version__, "peft": peft.__version__, "python": platform.python_version(),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    }
    print(f"{meta['device']} | torch {meta['torch']} cuda {meta['cuda']} | triton {meta['triton']} | "
          f"bitsandbytes {meta['bitsandbytes']} | peft {meta['peft']}")
    torch.manual_seed(0)
    failures = check_correctness(torch, dev)
    print(f"correctness on {dev}:", "PASS" if not failures else "FAIL")
    for line in failures:
        print("  " + line)
    if failures and not args.skip_check:
        return 1

    shapes = QUICK if args.quick else [(m, k, n) for m in MS for k, n in KNS]
    if args.cpu_smoke:
        shapes = CPU_SMOKE
    flush = torch.empty(256 * 1024 * 1024 if dev == "cuda" else 1, dtype=torch.int8, device=dev)
    rows = []
    print(f"{'M':>5} {'K':>6} {'N':>6} {'mode':>9} {'a ms':>9} {'b ms':>9} {'c ms':>9} {'c/a':>6} {'b/c':>6} "
          f"{'d fused':>9} {'e dequant':>9} {'GFLOP':>8} {'MB':>8} {'c TF/s':>7} {'c GB/s':>7}")
    for m, k, n in shapes:
        for row in bench_shape(torch, m, k, n, args, flush, dev):
            rows.append(row)
            print(f"{m:>5} {k:>6} {n:>6} {row['mode']:>9} {row['a_bf16_matmul_ms']:>9.3f} {row['b_bnb_peft_ms']:>9.3f} "
                  f"{row['c_mtpeft_ms']:>9.3f} {row['c_over_a']:>6.3f} {row['b_over_c']:>6.2f} "
                  f"{row['d_fused_ms']:>9.3f} {row['e_dequant_ms']:>9.3f} "
                  f"{row['flop_floor'] / 1e9:>8.1f} {row['bytes_floor'] / 1e6:>8.1f} {row['c_tflops']:>7.1f} "
                  f"{row['c_gbps']:>7.0f}", flush=True)
            if max(row["y_rel_err_vs_bnb"], row["dx_rel_err_vs_bnb"]) > 2e-2:
                print(f"  WARNING: fused vs bnb+peft differ by {row['y_rel_err_vs_bnb']:.1e} (y), "
                      f"{row['dx_rel_err_vs_bnb']:.1e} (dx)")
    targets = target_lines(rows)
    for line in targets + crossover_lines(rows):
        print(line)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows, "targets": targets, "crossover": crossover_lines(rows),
                   "correctness_failures": failures}, f, indent=1)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(markdown(rows, meta) + "\n" + "\n".join(f"- {t}" for t in targets + crossover_lines(rows)) + "\n")
    print(f"wrote {args.out}/results.json and results.md")
    if args.e2e:  # loaded by path: putting bench/ back on sys.path would shadow the `kernels` package again
        import importlib.util

        spec = importlib.util.spec_from_file_location("e2e_step", os.path.join(_HERE, "e2e_step.py"))
        e2e_step = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(e2e_step)
        return e2e_step.main(["--json", os.path.join(args.out, "e2e.json")] + (["--cpu-smoke"] if args.cpu_smoke else []))
    return 0


if __name__ == "__main__":
    sys.exit(main())
