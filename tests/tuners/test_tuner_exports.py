"""Exports of every PEFT method on the demo Llama, without DeepSpeed (the 2-rank ZeRO-3 path is in
test_methods_zero3.py).

HF peft is the independent reference for lora, ia3, prompt and prefix: ``PeftModel.from_pretrained``
on a fresh base must give mtpeft's logits. Bottleneck adapters and mtl_lora have no HF counterpart:
a fresh model reloaded through ``load_export`` must give the same outputs. Every tuner tensor is
first moved off its identity init so an export that silently drops tensors cannot pass.
"""

import json

import pytest
import torch

from builders import DEMO_BASE, trained_like
from distributed import tiny_config
from mtpeft.config import load_config
from mtpeft.data.dist import DistContext
from mtpeft.errors import CheckpointError
from mtpeft.trainer.build import build_model
from mtpeft.trainer.export import export, load_export

BASE = DEMO_BASE


def _ids(vocab: int, rows: int = 2, width: int = 17):
    return torch.randint(5, vocab, (rows, width), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method,extra", [("lora", ()), ("ia3", ()), ("prompt", ()), ("prefix", ()),
                                          ("prefix", ("peft.prefix_projection=true", "peft.prefix_hidden=16"))],
                         ids=["lora", "ia3", "prompt", "prefix", "prefix_mlp"])
def test_hf_peft_loads_export_and_reproduces(tmp_path, method, extra):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg, model = trained_like(tmp_path, method, *extra)
    out = export(model, cfg, tmp_path / "export", DistContext(0, 1))
    peft_type = json.loads((out / "adapter_config.json").read_text())["peft_type"]
    assert peft_type == {"lora": "LORA", "ia3": "IA3", "prompt": "PROMPT_TUNING", "prefix": "PREFIX_TUNING"}[method]
    ids = _ids(model.backbone.config.vocab_size)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ours = model.lm_logits(ids, mask)
        base = AutoModelForCausalLM.from_pretrained(str(BASE), dtype=torch.float32).eval()
        plain = base(input_ids=ids).logits
        theirs = PeftModel.from_pretrained(base, str(out)).eval()(input_ids=ids, attention_mask=mask).logits
    theirs = theirs[:, -ids.shape[1]:]  # prompt tuning: HF peft returns the virtual positions too
    assert (ours - theirs).abs().max().item() <= 1e-5
    assert (theirs - plain).abs().max().item() > 1e-2  # the adapter is not a no-op


@pytest.mark.parametrize("method", ["serial_adapter", "parallel_adapter", "mtl_lora", "prefix_mlp"])
def test_mtpeft_reloads_export_and_reproduces(tmp_path, method):
    extra = ("peft.prefix_projection=true", "peft.prefix_hidden=16") if method == "prefix_mlp" else ()
    cfg, model = trained_like(tmp_path, method.replace("prefix_mlp", "prefix"), *extra)
    out = export(model, cfg, tmp_path / "export", DistContext(0, 1))
    manifest = json.loads((out / "tasks.json").read_text())
    assert manifest["peft"]["method"] == method.replace("prefix_mlp", "prefix")
    assert (out / "adapter_config.json").exists() == (manifest["peft"]["format"] == "hf_peft")
    fresh = build_model(cfg).eval()
    load_export(fresh, out)
    ids = _ids(model.backbone.config.vocab_size)
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    with torch.no_grad():
        for task in ("defect", "clone"):
            assert torch.allclose(fresh.classify(task, ids, mask), model.classify(task, ids, mask), atol=1e-5)
        assert torch.allclose(fresh.embed("search", ids, mask), model.embed("search", ids, mask), atol=1e-5)
        assert torch.allclose(fresh.lm_logits(ids, mask), model.lm_logits(ids, mask), atol=1e-5)
        if method == "mtl_lora":  # per-task Λ: the same input gives task-dependent hidden states
            assert not torch.allclose(fresh.pooled(ids, mask), (fresh.set_task("defect"), fresh.pooled(ids, mask))[1])


def test_export_of_another_method_is_refused(tmp_path):
    cfg, model = trained_like(tmp_path, "serial_adapter")
    out = export(model, cfg, tmp_path / "export", DistContext(0, 1))
    other = build_model(load_config(tiny_config(tmp_path, "other.yaml"), ["peft.method=parallel_adapter"]))
    with pytest.raises(CheckpointError, match="peft.method serial_adapter"):
        load_export(other, out)


def test_mtl_lora_export_refuses_another_task_order(tmp_path):
    cfg, model = trained_like(tmp_path, "mtl_lora")
    out = export(model, cfg, tmp_path / "export", DistContext(0, 1))
    swapped = load_config(tiny_config(tmp_path, "swapped.yaml"), ["peft.method=mtl_lora", "peft.r=4"])
    swapped.tasks = swapped.tasks[::-1]
    with pytest.raises(CheckpointError, match="order"):
        load_export(build_model(swapped), out)


def _hf_peft_greedy(peft_model, prompt: list[int], steps: int, eos: int) -> list[int]:
    """Greedy decoding through HF peft's own forward, one unpadded prompt at a time, no cache."""
    ids = torch.tensor([prompt])
    for _ in range(steps):
        nxt = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].argmax()
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
        if nxt.item() == eos:
            break
    return ids[0, len(prompt):].tolist()


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_uncached_greedy_decoding_matches_hf_peft(tmp_path, method):
    """Prompt/prefix tuners decode through ``lm_logits`` step by step, a batch left-padded; HF peft's
    model on the export, decoding each prompt alone, must pick the same tokens.

    The reference is HF peft's forward, not its ``generate``: peft 0.21.2's ``generate`` for prompt and
    prefix tuning reads the cache from ``model_kwargs["past_key_values"]``, which transformers 5.24
    renamed to ``cache``, so on 5.24 it re-inserts the virtual tokens at every cached step."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mtpeft.tasks.generation import Generate
    from mtpeft.trainer.build import load_tokenizer

    cfg, model = trained_like(tmp_path, method)
    out = export(model, cfg, tmp_path / "export", DistContext(0, 1))
    tok = load_tokenizer(str(BASE))
    prompts = [[1, 50, 60, 70, 80, 90], [1, 33, 44]]
    ours = Generate(max_new_tokens=8).generate(model, prompts, tok, synced=False, task="codegen")
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(BASE)), str(out)).eval()
    with torch.no_grad():
        theirs = [tok.decode(_hf_peft_greedy(peft_model, p, 8, tok.eos_token_id), skip_special_tokens=True).strip()
                  for p in prompts]
    assert ours == theirs and any(ours)
