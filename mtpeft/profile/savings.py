"""The savings study: the same model, data and steps trained four ways, side by side, in one process.

  full_ft         every weight trained (small models only), AdamW on all of them;
  lora            HF peft LoRA on the plain base (bf16 on GPU; fp32 on CPU, where bf16 matmuls are
                  emulated and slow);
  qlora_bnb_peft  what users run today: ``bitsandbytes.nn.Linear4bit`` (NF4, double quant) under
                  ``peft.get_peft_model`` LoRA;
  qlora_mtpeft    mtpeft's QuantLinear (NF4, double quant) with mtpeft's LoRA, whose forward is the
                  fused NF4·LoRA op (Triton on CUDA; on CPU the op's torch reference runs instead).

Every variant wraps its backbone in the same MultitaskModel (same task heads) and runs the same
multitask schedule on the same examples, so losses, memory and speed differ only by the method.
LoRA dropout is 0 in every variant (the fused kernel has none). Memory is reported twice: the exact
bytes of the model states (weights, quantization constants, trainable parameters, gradients, Adam
states), and the resident / CUDA-allocator peak while the variant ran. Then the multitask question:
one shared module for all tasks versus one module per task (trainable parameters, bytes on disk,
training FLOPs for the same examples).

Why this study does not run through ``trainer.recipe.Recipe`` (as ``train``, ``profile`` and
``compare`` do): the recipe's model is what ``trainer.build`` makes of the config and its optimizer
is a DeepSpeed engine (ZeRO-3 partitions, DeepSpeed's AdamW, warmup schedule, a param group per
head, loss weighting). Two of the four variants are other libraries' models (HF peft LoRA, and
``bitsandbytes`` ``Params4bit`` under it, which ZeRO-3 cannot partition), and the study's numbers
are the exact, unpartitioned bytes of plain ``torch.optim.AdamW`` states and the time of a bare
forward/backward/step, the same for every variant. Swapping the model in a recipe hook would change
every one of those numbers. What the study shares with the recipe is public: the tasks
(``loop.prepare_tasks``), the schedule (``MultitaskState``), the rank's batch (``loop.micro_batch``),
the tuner (``build.assemble``) and the task kinds' loss and token count.
"""

from __future__ import annotations

import copy
import gc
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from mtpeft.errors import ConfigError
from mtpeft.profile import measure, report

VARIANTS = ("full_ft", "lora", "qlora_bnb_peft", "qlora_mtpeft")
FULL_FT_MAX_PARAMS = 2_000_000_000


def _compute_dtype() -> torch.dtype:
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _backbone(cfg, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path, dtype=dtype)


def _hf_lora(cfg, backbone: nn.Module) -> nn.Module:
    """LoRA through HF peft; returns the backbone with LoRA layers injected in place."""
    from peft import LoraConfig, get_peft_model

    p = cfg.peft
    peft_model = get_peft_model(backbone, LoraConfig(r=p.r, lora_alpha=p.alpha, lora_dropout=0.0,
                                                     target_modules=list(p.target_modules)))
    return peft_model.base_model.model


def _bnb_quantize(backbone: nn.Module, compute_dtype: torch.dtype, device: torch.device) -> nn.Module:
    """Every block linear (not the LM head) → ``bitsandbytes.nn.Linear4bit`` NF4 + double quant."""
    import bitsandbytes as bnb

    linears = [(n, m) for n, m in backbone.named_modules() if isinstance(m, nn.Linear) and not n.endswith("lm_head")]
    for name, lin in linears:
        parent, _, child = name.rpartition(".")
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True)
        q.weight = bnb.nn.Params4bit(lin.weight.data.to(compute_dtype).clone(), requires_grad=False,
                                     quant_type="nf4", compress_statistics=True)
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
        setattr(backbone.get_submodule(parent) if parent else backbone, child, q.to(device))
    return backbone


def build_variant(name: str, cfg) -> nn.Module:
    """The MultitaskModel of one variant, on the compute device, seeded like every other variant."""
    from mtpeft.multitask_model import MultitaskModel
    from mtpeft.trainer.build import assemble, hidden_size

    dtype, device = _compute_dtype(), _device()
    torch.manual_seed(cfg.train.seed)
    backbone = _backbone(cfg, dtype)
    if name == "qlora_mtpeft":
        from mtpeft.quant import quantize_model

        mcfg = copy.deepcopy(cfg)
        mcfg.model.quant, mcfg.peft.method, mcfg.peft.dropout = "nf4", "lora", 0.0
        mcfg.model.dtype = "bfloat16" if dtype == torch.bfloat16 else "float32"
        quantize_model(backbone.requires_grad_(False), skip=("lm_head",))
        return assemble(backbone, mcfg).to(device)
    backbone.requires_grad_(name == "full_ft")
    if name == "full_ft":
        n = sum(p.numel() for p in backbone.parameters())
        if n > FULL_FT_MAX_PARAMS:
            raise ConfigError(f"savings: full fine-tuning of {n:,} parameters is not run (limit "
                              f"{FULL_FT_MAX_PARAMS:,}); drop full_ft from the variants")
    elif name == "lora":
        backbone = _hf_lora(cfg, backbone)
    elif name == "qlora_bnb_peft":
        backbone = _hf_lora(cfg, _bnb_quantize(backbone, dtype, device))
    else:
        raise ConfigError(f"savings: unknown variant {name!r}; use one of {', '.join(VARIANTS)}")
    torch.manual_seed(cfg.train.seed + 1)
    model = MultitaskModel(backbone, cfg.tasks, hidden_size(backbone.config))
    if dtype != torch.float32:
        model.heads.to(dtype)
    return model.to(device)


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def train_variant(name: str, cfg, tasks, tok, steps: int) -> Dict[str, Any]:
    """Build, train ``steps`` multitask steps, and measure one variant."""
    from mtpeft.data.dist import DistContext
    from mtpeft.trainer.loop import micro_batch
    from mtpeft.trainer.multitask_state import MultitaskState

    gc.collect()
    rss_before = measure.rss_bytes()
    cuda_before = torch.cuda.memory_allocated() if torch.cuda.is_available() else None
    peak_reset = measure.reset_peak_memory()
    model = build_variant(name, cfg).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    mt = MultitaskState(cfg, [t.name for t in tasks], [len(t.train_set) for t in tasks])
    ctx, device = DistContext(), _device()
    records, states = [], None
    for step in range(steps):
        slot = mt.schedule.slot(step)
        task = tasks[slot.task]
        batch = micro_batch(task, slot, 0, ctx, tok, cfg.train)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = model(task.kind, task.name, _to(batch, device), ctx)
        loss.backward()
        optimizer.step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        if step == steps - 1:
            states = measure.plain_state_bytes(model, optimizer)
        optimizer.zero_grad(set_to_none=True)
        records.append({"step": step + 1, "task": task.name, "loss": float(loss.detach()), "tokens": task.kind.token_count(batch),
                        "seconds": seconds})
    memory = measure.peak_memory()
    result = {
        "variant": name,
        "dtype": str(_compute_dtype()).replace("torch.", ""),
        "trainable_params": sum(p.numel() for p in trainable),
        "total_params": sum(p.numel() for p in model.parameters()),
        "states": states,
        "rss_peak_minus_before_bytes": memory["rss_peak_bytes"] - rss_before if peak_reset else None,
        "device_peak_minus_before_bytes": (memory["device_peak_bytes"] - cuda_before
                                           if memory["device_peak_bytes"] is not None else None),
        "timing": measure.step_timing(records),
        "records": records,
        "lora_layer": _lora_layer_name(model),
    }
    del model, optimizer, trainable
    gc.collect()
    return result


def _lora_layer_name(model: nn.Module) -> Optional[str]:
    """What a q_proj is in this variant: the LoRA wrapper's class and the base layer it wraps."""
    for name, m in model.named_modules():
        if name.endswith("q_proj"):
            base = getattr(m, "base_layer", None) or getattr(m, "base", None)
            inner = f" over {type(base).__module__}.{type(base).__name__}" if isinstance(base, nn.Module) else ""
            return f"{type(m).__module__}.{type(m).__name__}{inner}"
    return None


def multitask_vs_per_task(cfg, out: Path, tasks, steps: int, flops_per_step: Optional[List[int]]) -> Dict[str, Any]:
    """One shared mtpeft LoRA + heads versus one LoRA per task + the same heads, written to disk."""
    from safetensors.torch import save_file

    from mtpeft.trainer.build import assemble

    mcfg = copy.deepcopy(cfg)
    mcfg.peft.dropout = 0.0
    torch.manual_seed(cfg.train.seed)
    model = assemble(_backbone(cfg, torch.float32), mcfg)
    adapter = {k: v.detach().contiguous() for k, v in model.tuner.export_tensors(model).items()}
    heads = {f"{t}.{n}": p.detach().contiguous() for t, h in model.heads.items() for n, p in h.named_parameters()}
    shared_dir, separate_dir = out / "multitask_adapter", out / "per_task_adapters"
    shared_dir.mkdir(parents=True, exist_ok=True)
    save_file(adapter, str(shared_dir / "adapter_model.safetensors"))
    save_file(heads, str(shared_dir / "heads.safetensors"))
    separate = 0
    for t in tasks:
        d = separate_dir / t.name
        d.mkdir(parents=True, exist_ok=True)
        save_file(adapter, str(d / "adapter_model.safetensors"))
        mine = {k: v for k, v in heads.items() if k.startswith(t.name + ".")}
        if mine:
            save_file(mine, str(d / "heads.safetensors"))
    shared_bytes = sum(f.stat().st_size for f in shared_dir.iterdir())
    separate = sum(f.stat().st_size for f in separate_dir.rglob("*.safetensors"))
    n_adapter = sum(v.numel() for v in adapter.values())
    n_heads = sum(v.numel() for v in heads.values())
    total_flops = sum(flops_per_step) if flops_per_step else None
    return {
        "tasks": len(tasks),
        "multitask": {"trainable_params": n_adapter + n_heads, "bytes_on_disk": shared_bytes,
                      "training_flops": total_flops, "modules": 1},
        "per_task": {"trainable_params": len(tasks) * n_adapter + n_heads, "bytes_on_disk": separate,
                     "training_flops": total_flops, "modules": len(tasks)},
        "note": "the same examples per task cost the same training FLOPs either way; a separate module per "
                "task multiplies the trainable parameters, their optimizer states and the bytes stored",
    }


def run_savings(cfg, out: Path, steps: int = 4, variants: Optional[List[str]] = None) -> Dict[str, Any]:
    """Train every variant ``steps`` steps on the same schedule and write the savings report to ``out``."""
    from mtpeft.trainer.build import load_tokenizer
    from mtpeft.trainer.loop import prepare_tasks

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tasks = prepare_tasks(cfg)
    tok = load_tokenizer(cfg.model.name_or_path)
    results, skipped = {}, {}
    for name in variants or VARIANTS:
        try:
            results[name] = train_variant(name, cfg, tasks, tok, steps)
        except ConfigError as exc:  # full fine-tuning of a large model: the study goes on without it
            if name != "full_ft":
                raise
            skipped[name] = str(exc)
    flops = _schedule_flops(cfg, tasks, tok, steps)
    mt = multitask_vs_per_task(cfg, out, tasks, steps, flops)
    result = {"config": cfg.source, "steps": steps, "device": str(_device()),
              "dtype": str(_compute_dtype()).replace("torch.", ""), "variants": results, "skipped": skipped,
              "multitask_vs_per_task": mt, "flops_per_step": flops}
    write_savings_report(out, result)
    return result


def _schedule_flops(cfg, tasks, tok, steps: int) -> Optional[List[int]]:
    """Frozen-base LoRA FLOPs of each scheduled step (``flops.step_flops``), None where the base cannot be read."""
    from mtpeft.profile.architecture import load_architecture
    from mtpeft.profile.run_flops import step_flops_of_run

    try:
        arch = load_architecture(cfg.model.name_or_path)
    except Exception:  # encoders and unknown families: the analytic counter does not apply
        return None
    return [s["flops"] for s in step_flops_of_run(cfg, tasks, tok, 1, steps, arch)]


HEADERS = ("variant", "dtype", "trainable params", "model states", "of which frozen base", "peak − before",
           "step time (s)", "tokens/s", "LoRA layer")


def _variant_rows(result: Dict[str, Any]) -> List[List[str]]:
    f = report.fmt
    rows = []
    for name, v in result["variants"].items():
        s = v["states"]
        frozen = s["packed_weights"] + s["quant_constants"] + s["bf16_weights"]
        peak = v["device_peak_minus_before_bytes"] if v["device_peak_minus_before_bytes"] is not None \
            else v["rss_peak_minus_before_bytes"]
        rows.append([name, v["dtype"], f(v["trainable_params"]), f(s["total"], "bytes"), f(frozen, "bytes"),
                     f(peak, "bytes"), f(v["timing"]["step_seconds_mean"]), f(v["timing"]["tokens_per_s"]),
                     v["lora_layer"] or "—"])
    return rows


def write_savings_report(out: Path, r: Dict[str, Any]) -> None:
    f = report.fmt
    rows = _variant_rows(r)
    mt = r["multitask_vs_per_task"]
    mt_rows = [[k, f(v["modules"]), f(v["trainable_params"]), f(v["bytes_on_disk"], "bytes"),
                f(v["training_flops"], "flops")] for k, v in (("multitask (one shared module)", mt["multitask"]),
                                                              ("one module per task", mt["per_task"]))]
    mt_headers = ("setup", "PEFT modules", "trainable params", "bytes on disk", f"training FLOPs ({r['steps']} steps)")
    r["table"] = report.text_table(HEADERS, rows) + "\n\n" + report.text_table(mt_headers, mt_rows)
    breakdown = {name: {k: v["states"][k] for k in measure.STATE_KEYS} for name, v in r["variants"].items()}
    report.stacked_bars(out / "memory_breakdown.png", "model states by variant (exact tensor bytes)", breakdown, "MiB",
                        scale=report.MIB)
    report.grouped_bars(out / "throughput.png", "training throughput",
                        {"tokens/s": {n: v["timing"]["tokens_per_s"] for n, v in r["variants"].items()}}, "tokens/s")
    curves = {n: report.task_curves(v["records"]) for n, v in r["variants"].items()}
    report.loss_curves(out / "loss_curves.png", "per-task loss, same schedule and examples", curves)
    scalars, tb_curves = {}, {}
    for n, v in r["variants"].items():
        scalars[f"savings/{n}/model_state_bytes"] = v["states"]["total"]
        scalars[f"savings/{n}/tokens_per_s"] = v["timing"]["tokens_per_s"]
        scalars[f"savings/{n}/step_seconds"] = v["timing"]["step_seconds_mean"]
        scalars[f"savings/{n}/trainable_params"] = v["trainable_params"]
        tb_curves.update({f"savings/{n}/loss/{t}": pts for t, pts in curves[n].items()})
    for k in ("multitask", "per_task"):
        scalars[f"savings/{k}/bytes_on_disk"] = mt[k]["bytes_on_disk"]
        scalars[f"savings/{k}/trainable_params"] = mt[k]["trainable_params"]
    report.tensorboard_scalars(out / "tensorboard", scalars, curves=tb_curves)
    cpu = r["device"] == "cpu"
    md = [f"# mtpeft savings report: {r['config']}", "",
          f"{r['steps']} steps per variant on {r['device']}, compute dtype {r['dtype']}"
          + (" (fp32 on CPU: bf16 matmuls are emulated there; the `lora` row is fp32 LoRA, not bf16)" if cpu else "")
          + ". Same model, same multitask schedule, same examples, LoRA dropout 0 everywhere.", "",
          report.markdown_table(HEADERS, rows), "",
          *(f"Not run: {name}: {why}" for name, why in r["skipped"].items()), "",
          "*model states*: exact bytes of frozen weights (packed NF4 + quantization constants for the 4-bit "
          "variants), trainable parameters, gradients and AdamW states after the last step. *peak − before*: "
          + ("resident high-water mark (VmHWM, reset per variant) minus resident memory before the variant; "
             "it includes activations and allocator slack, and memory freed by an earlier variant may be reused."
             if cpu else "CUDA allocator peak minus memory allocated before the variant."),
          "" if not cpu else "On CPU `qlora_mtpeft` runs the fused NF4·LoRA op's torch reference (the Triton "
          "kernel needs CUDA), and bitsandbytes runs its CPU 4-bit path: the step times are not GPU figures.", "",
          "## Multitask (one shared module) versus one PEFT module per task", "",
          report.markdown_table(mt_headers, mt_rows), "", mt["note"] + ".", "",
          "![memory](memory_breakdown.png)", "![throughput](throughput.png)", "![loss](loss_curves.png)", ""]
    report.write_text(out / "report.md", "\n".join(md))
    report.write_json(out / "report.json", r)
