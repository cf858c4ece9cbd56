"""Dropout keyed by example: the hash against a plain-Python reference, the keep rate, masks that do
not depend on padding width or on how the rows are split into micro-batches, the gradient, and the
model-level consequence (1 × 4 rows = mean of 2 × 2 rows with dropout on; plain dropout is not)."""

import pytest
import torch

from distributed import tiny_config
from mtpeft.tuners.keyed_dropout import DropoutKeys, KeyedDropout, hash32, keep_mask


def _lowbias32(x: int) -> int:
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_hash_matches_a_python_reference():
    values = [0, 1, 2, 12345, 0xFFFFFFFF, 0x7FFFFFFF, 2**31, 987654321]
    got = hash32(torch.tensor(values, dtype=torch.int64)).tolist()
    assert got == [_lowbias32(v) for v in values]


def test_keep_rate():
    keys = DropoutKeys()
    keys.begin(torch.arange(64, dtype=torch.int64))
    keys.next_pass()
    mask = keep_mask(keys.rows(64), 7, torch.Size([64, 50, 40]), 0.1)
    n = mask.numel()
    rate = mask.float().mean().item()
    assert abs(rate - 0.9) < 4 * (0.9 * 0.1 / n) ** 0.5
    per_row = mask.float().mean(dim=(1, 2))
    assert per_row.std().item() > 0  # rows differ
    assert not torch.equal(mask[0], mask[1])


def test_mask_ignores_padding_width_and_micro_batch_split():
    rows = torch.tensor([11, 12, 13, 14], dtype=torch.int64)
    whole, halves = DropoutKeys(), [DropoutKeys(), DropoutKeys()]
    whole.begin(rows)
    whole.next_pass()
    halves[0].begin(rows[:2])
    halves[1].begin(rows[2:])
    for h in halves:
        h.next_pass()
    wide = keep_mask(whole.rows(4), 3, torch.Size([4, 30, 8]), 0.3)
    narrow = torch.cat([keep_mask(h.rows(2), 3, torch.Size([2, 17, 8]), 0.3) for h in halves])
    assert torch.equal(wide[:, :17], narrow)
    other_pass = DropoutKeys()
    other_pass.begin(rows)
    other_pass.next_pass()
    other_pass.next_pass()
    assert not torch.equal(keep_mask(other_pass.rows(4), 3, torch.Size([4, 30, 8]), 0.3), wide)


def test_gradient_is_the_scaled_mask():
    keys = DropoutKeys()
    keys.begin(torch.tensor([5, 6], dtype=torch.int64))
    keys.next_pass()
    drop = KeyedDropout(0.25, keys, site=9).train()
    x = torch.randn(2, 7, 5, dtype=torch.float64, requires_grad=True)
    y = drop(x)
    y.sum().backward()
    mask = keep_mask(keys.rows(2), 9, x.shape, 0.25).double()
    assert torch.equal(y, x * mask / 0.75)
    assert torch.equal(x.grad, mask / 0.75)
    assert torch.equal(drop.eval()(x), x)


def _losses(model, kind, batch, halves):
    from mtpeft.data.dist import DistContext

    whole = model(kind, "defect", dict(batch), DistContext(0, 1)).item()
    parts = []
    for rows in halves:
        part = {k: (v[rows] if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in batch.items()}
        width = int(part["attention_mask"].sum(1).max())
        part["input_ids"], part["attention_mask"] = part["input_ids"][:, :width], part["attention_mask"][:, :width]
        parts.append(model(kind, "defect", part, DistContext(0, 1)).item())
    return whole, sum(parts) / len(parts)


def test_model_losses_do_not_depend_on_the_split_with_dropout_on(tmp_path):
    from mtpeft.config import load_config
    from mtpeft.trainer.build import build_model, load_tokenizer
    from mtpeft.trainer.loop import prepare_tasks

    cfg = load_config(tiny_config(tmp_path, keep_dropout=True), ["peft.dropout=0.3", "tasks.defect.head_dropout=0.5"])
    model = build_model(cfg).train()
    task = next(t for t in prepare_tasks(cfg) if t.name == "defect")
    tok = load_tokenizer(cfg.model.name_or_path)
    batch = task.kind.collate([task.kind.encode(task.train_set[i], tok, 64) for i in range(4)], tok.pad_token_id)
    batch["row_keys"] = torch.tensor([101, 102, 103, 104], dtype=torch.int64)
    halves = [slice(0, 2), slice(2, 4)]
    with torch.no_grad():
        whole, split = _losses(model, task.kind, batch, halves)
        assert whole == pytest.approx(split, rel=1e-6)
        model.eval()
        assert abs(model(task.kind, "defect", dict(batch), None).item() - whole) > 1e-4  # dropout did act
        model.train()
        del batch["row_keys"]  # no keys: per-rank random dropout, the split changes the loss
        whole, split = _losses(model, task.kind, batch, halves)
        assert whole != pytest.approx(split, rel=1e-4)


@pytest.mark.parametrize("kernels", ["dequant", "fused"])
def test_lora_on_a_4bit_base_draws_the_keyed_mask_in_the_kernels(monkeypatch, kernels):
    """LoRA with keyed dropout on a QuantLinear: the Triton paths (the dequant path redraws the mask
    inside its rank-r kernels, the fused path materializes it) give the torch path's output and
    gradients, and differ from the same layer without dropout (the mask is applied)."""
    from mtpeft.quant import QuantLinear
    from mtpeft.tuners.keyed_dropout import key_dropouts
    from mtpeft.tuners.lora import LoraLinear

    torch.manual_seed(0)
    layer = LoraLinear(QuantLinear.from_linear(torch.nn.Linear(128, 48)), r=4, alpha=8, dropout=0.25)
    torch.nn.init.normal_(layer.lora_B, std=0.5)
    keys = DropoutKeys()
    assert key_dropouts(layer, keys) == 1
    keys.begin(torch.tensor([11, 12, 13], dtype=torch.int64))
    keys.next_pass()
    x = torch.randn(3, 10, 128)
    dy = torch.randn(3, 10, 48)

    def run(mode, train=True):
        monkeypatch.setenv("MTPEFT_KERNELS", mode)
        layer.train(train)
        layer.zero_grad()
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y.backward(dy)
        return y.detach(), xi.grad, layer.lora_A.grad.clone(), layer.lora_B.grad.clone()

    want = run("torch")
    got = run(kernels)
    for w, g in zip(want, got):
        assert ((g - w).abs().max() / w.abs().max()).item() <= 1e-5
    undropped = run("torch", train=False)[0]
    assert not torch.allclose(undropped, want[0], atol=1e-3)
