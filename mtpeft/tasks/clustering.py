"""Program clustering (POJ-104): programs solving the same problem should embed close together.

Training is supervised contrastive (Khosla et al., 2020), InfoNCE with several positives: every
program of the global micro-batch (anchors and their same-class partners from
``loading.add_positive_partners``, all-gathered across ranks with autograd as ``retrieval`` does) is
a candidate, and each anchor's positives are the other candidates with its label:

    ℓ_i = -1/|P(i)| Σ_{p∈P(i)} log( exp(s_ip/τ) / Σ_{a≠i} exp(s_ia/τ) )

The loss is Σ ℓ_i over anchors with a positive divided by their count in the *global* batch (each
rank returns world · local-sum / global-count, and data-parallel averaging takes the mean), so
2 ranks × b and 1 rank × 2b give the same loss (DESIGN contract 2). τ is ``train.retrieval_temperature``.

Evaluation embeds every eval program and reports MAP@R (CodeXGLUE's metric) against the MAP@R a
uniformly random ranking has in expectation (closed form in ``chance_map_at_r``).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

import torch
import torch.distributed as dist

from mtpeft.tasks.classification import bos, pad
from mtpeft.tasks.heads import RetrievalHead
from mtpeft.tasks.metrics import map_at_r
from mtpeft.tasks.task_kind import TaskKind


class Cluster(TaskKind):
    name = "cluster"
    metric = "map_at_r"
    pass_masks = ("attention_mask", "positive_mask")  # anchors and partners: one pass's cost each

    def __init__(self, temperature: float = 0.05):
        self.temperature = temperature

    @classmethod
    def from_config(cls, task, train) -> "Cluster":
        return cls(temperature=train.retrieval_temperature)

    @classmethod
    def make_head(cls, hidden: int, dropout: float) -> RetrievalHead:
        return RetrievalHead(hidden)

    def encode(self, ex: dict, tok, max_len: int) -> dict:
        ids = bos(tok) + tok(ex["text"], add_special_tokens=False)["input_ids"][: max_len - 1]
        partner = ex.get("positive") or ex["text"]
        pos = bos(tok) + tok(partner, add_special_tokens=False)["input_ids"][: max_len - 1]
        return {"ids": ids, "pos": pos, "label": int(ex["label"])}

    def collate(self, items: list[dict], pad_id: int) -> dict:
        """Anchors and partners padded to one width, so the loss embeds them in one forward."""
        ids, mask = pad([it["ids"] for it in items] + [it["pos"] for it in items], pad_id)
        b = len(items)
        return {"input_ids": ids[:b], "attention_mask": mask[:b], "positive_ids": ids[b:], "positive_mask": mask[b:],
                "labels": torch.tensor([it["label"] for it in items], dtype=torch.long)}

    def loss(self, model, task: str, batch: dict, ctx) -> torch.Tensor:
        both = torch.cat([batch["input_ids"], batch["positive_ids"]])
        both_mask = torch.cat([batch["attention_mask"], batch["positive_mask"]])
        z = model.embed(task, both, both_mask).float()
        labels = torch.cat([batch["labels"], batch["labels"]]).to(z.device)
        z_all, labels_all, offset = z, labels, 0
        if ctx.world > 1:
            import torch.distributed.nn.functional as dist_nn

            z_all = torch.cat(dist_nn.all_gather(z), dim=0)
            gathered = [torch.empty_like(labels) for _ in range(ctx.world)]
            dist.all_gather(gathered, labels)
            labels_all = torch.cat(gathered)
            offset = ctx.rank * z.shape[0]
        return global_supcon(z, labels, z_all, labels_all, offset, ctx.world, self.temperature)

    @torch.no_grad()
    def predict(self, model, task: str, batch: dict) -> list:
        z = model.embed(task, batch["input_ids"], batch["attention_mask"]).float()
        return z.cpu().tolist()

    def score(self, preds: list, examples: list[dict]) -> dict:
        labels = [int(e["label"]) for e in examples]
        return {"metric": self.metric, "value": map_at_r(torch.tensor(preds, dtype=torch.float64), labels),
                "chance": chance_map_at_r(labels),
                "convention": "POJ-104 MAP@R over every other eval item by dot product, ties ranked "
                              "pessimistically (other labels first)"}


def global_supcon(z: torch.Tensor, labels: torch.Tensor, z_all: torch.Tensor, labels_all: torch.Tensor,
                  offset: int, world: int, temperature: float) -> torch.Tensor:
    """This rank's share of the global loss: world · Σ_local ℓ_i / (anchors with a positive, globally)."""
    return supcon_sum(z, labels, z_all, labels_all, offset, temperature) * world \
        / max(1, anchors_with_positive(labels_all))


def anchors_with_positive(labels: torch.Tensor) -> int:
    counts = Counter(labels.tolist())
    return sum(c for c in counts.values() if c > 1)


def supcon_sum(z: torch.Tensor, labels: torch.Tensor, z_all: torch.Tensor, labels_all: torch.Tensor,
               offset: int, temperature: float) -> torch.Tensor:
    """Σ ℓ_i over the local anchors ``z`` (rows offset.. of ``z_all``) that have a positive."""
    logits = z @ z_all.T / temperature
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[torch.arange(z.shape[0]), torch.arange(z.shape[0]) + offset] = True
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positive = (labels[:, None] == labels_all[None, :]) & ~self_mask
    n_pos = positive.sum(1)
    per_anchor = -(log_prob.masked_fill(~positive, 0.0)).sum(1) / n_pos.clamp_min(1)
    return (per_anchor * (n_pos > 0)).sum()


def expected_random_ap_at_r(relevant: int, others: int) -> float:
    """E[AP@R] when the ``others`` candidates are in uniformly random order and ``relevant`` (= R) are hits.

    AP@R = (1/R) Σ_{j≤R} hit_j · H_j / j with H_j the hits in the top j. Position j is a hit with
    probability R/M (M = others); given that, the j-1 positions above hold (j-1)(R-1)/(M-1) hits in
    expectation, so E[hit_j · H_j] = (R/M)(1 + (j-1)(R-1)/(M-1)) and
    E[AP@R] = (1/M) Σ_{j≤R} (1/j + (R-1)/(M-1) · (j-1)/j) = (1/M) (H_R + (R-1)/(M-1) · (R - H_R)).
    """
    r, m = relevant, others
    if not 1 <= r <= m:
        raise ValueError(f"expected_random_ap_at_r: need 1 <= R <= M, got R={r}, M={m}")
    harmonic = math.fsum(1.0 / j for j in range(1, r + 1))
    spread = (r - 1) / (m - 1) * (r - harmonic) if m > 1 else 0.0
    return (harmonic + spread) / m


def chance_map_at_r(labels: Sequence[int]) -> float:
    """MAP@R of random embeddings in expectation, over the items ``map_at_r`` scores (R > 0)."""
    counts = Counter(labels)
    n = len(labels)
    aps = [expected_random_ap_at_r(counts[y] - 1, n - 1) for y in labels if counts[y] > 1]
    if not aps:
        raise ValueError("chance_map_at_r: every label is unique, so no item has a relevant neighbour")
    return math.fsum(aps) / len(aps)
