"""Every backbone family of the studies trains out of the box: a tiny random model of each (Llama,
Mistral, Qwen2, StarCoder2, CodeGen, GPT-BigCode, RoBERTa, T5 encoder; GPT-2 and Falcon beyond the
studies) takes 3 optimizer steps
with every method that applies to it, with a bf16 base and with a 4-bit NF4 base, default
targets, in this process. Each run must keep the loss finite, move every tuner tensor and leave
the frozen base as it was; the loss after the steps must be below the first one (a fixed batch).
"""

import pytest
import torch
import torch.nn.functional as F

from tiny_backbones import tiny_backbone
from mtpeft.quant import QuantLinear
from mtpeft.config import PeftConfig, RunConfig, TaskConfig
from mtpeft.trainer.build import assemble
from mtpeft.tuners.registry import METHODS

FAMILIES = ["llama", "mistral", "qwen2", "starcoder2", "codegen", "gpt_bigcode", "roberta", "t5",
            "gpt2", "falcon"]  # two beyond the studies: GPT-2's Conv1D layers, Falcon's one-head key/value cache
ENCODERS = ("roberta", "t5")


def _cfg(family: str, method: str, dtype: str) -> RunConfig:
    tasks = [TaskConfig(name="defect", kind="classify", head_dropout=0.0)]
    if family not in ENCODERS:
        tasks.append(TaskConfig(name="codegen", kind="generate"))
    cfg = RunConfig(peft=PeftConfig(method=method, r=4, alpha=8, dropout=0.0, bottleneck=8, num_virtual_tokens=3),
                    tasks=tasks)  # target_modules and ia3 targets: the defaults
    cfg.model.dtype = dtype
    cfg.train.max_seq_len = 64
    return cfg


def _backbone(family: str, quant: str):
    backbone = tiny_backbone(family).to(torch.bfloat16)
    if quant == "nf4":
        from mtpeft.quant.linear import quantize_model

        quantize_model(backbone, skip=("lm_head",))
    return backbone


def _loss(model, ids, mask, labels) -> torch.Tensor:
    loss = F.binary_cross_entropy_with_logits(model.classify("defect", ids, mask).float(), labels)
    if not model.is_encoder:
        logits = model.lm_logits(ids, mask, task="codegen").float()
        loss = loss + F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return loss


@pytest.mark.parametrize("quant", ["none", "nf4"], ids=["bf16", "nf4"])
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", FAMILIES)
def test_three_steps_with_default_targets(family, method, quant):
    backbone = _backbone(family, quant)
    frozen = [(t, _bits(t)) for t in [*backbone.parameters(), *backbone.buffers()]]  # the same objects after
    model = assemble(backbone, _cfg(family, method, "bfloat16")).train()
    tuner = {n: p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("heads.")}
    start = {n: p.detach().clone() for n, p in tuner.items()}
    assert tuner
    assert quant == "none" or any(isinstance(m, QuantLinear) for m in model.backbone.modules())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, backbone.config.vocab_size, (4, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[3, 8:] = 0
    labels = torch.tensor([0.0, 1.0, 0.0, 1.0])
    losses = []
    for _ in range(3):
        loss = _loss(model, ids, mask, labels)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(_loss(model, ids, mask, labels).item())
    assert losses[-1] < losses[0], losses
    assert all(not torch.equal(p, start[n]) for n, p in tuner.items()), [n for n, p in tuner.items()
                                                                       if torch.equal(p, start[n])]
    assert all(_bits(t) == bits for t, bits in frozen)


def _bits(t: torch.Tensor) -> bytes:
    """NF4 bytes are stored as bf16 views, some of them NaN patterns: compare bits, not values."""
    return t.detach().reshape(-1).view(torch.uint8).numpy().tobytes()
