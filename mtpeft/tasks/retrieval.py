"""Code search: a natural-language query retrieves its code among all candidates.

Training uses in-batch InfoNCE over the *global* micro-batch: candidate embeddings are all-gathered
(with autograd) across ranks, so 2 ranks × b and 1 rank × 2b see the same negatives (DESIGN
contract 2). Evaluation ranks every query against every eval candidate and reports MRR.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mtpeft.tasks.classification import bos, pad
from mtpeft.tasks.heads import RetrievalHead
from mtpeft.tasks.metrics import chance_mrr, mrr
from mtpeft.tasks.task_kind import TaskKind


class Retrieve(TaskKind):
    name = "retrieve"
    metric = "mrr"
    pass_masks = ("query_mask", "code_mask")  # queries and code are embedded in two passes

    def __init__(self, temperature: float = 0.05, top_k: int | None = None):
        self.temperature = temperature
        self.top_k = top_k  # MRR over each query's top-k list (CodeXGLUE AdvTest: 100); None: every rank

    @classmethod
    def from_config(cls, task, train) -> "Retrieve":
        return cls(temperature=train.retrieval_temperature, top_k=task.top_k)

    @classmethod
    def make_head(cls, hidden: int, dropout: float) -> RetrievalHead:
        return RetrievalHead(hidden)


    def encode(self, ex: dict, tok, max_len: int) -> dict:
        q = bos(tok) + tok(ex["query"], add_special_tokens=False)["input_ids"][: max_len - 1]
        c = bos(tok) + tok(ex["code"], add_special_tokens=False)["input_ids"][: max_len - 1]
        return {"query": q, "code": c}

    def collate(self, items: list[dict], pad_id: int) -> dict:
        q, qm = pad([it["query"] for it in items], pad_id)
        c, cm = pad([it["code"] for it in items], pad_id)
        return {"query_ids": q, "query_mask": qm, "code_ids": c, "code_mask": cm}

    def loss(self, model, task: str, batch: dict, ctx) -> torch.Tensor:
        q = model.embed(task, batch["query_ids"], batch["query_mask"]).float()
        c = model.embed(task, batch["code_ids"], batch["code_mask"]).float()
        offset = 0
        if ctx.world > 1:
            import torch.distributed.nn.functional as dist_nn

            c = torch.cat(dist_nn.all_gather(c), dim=0)
            offset = ctx.rank * q.shape[0]
        target = torch.arange(q.shape[0]) + offset
        return F.cross_entropy(q @ c.T / self.temperature, target)

    @torch.no_grad()
    def predict(self, model, task: str, batch: dict) -> list:
        q = model.embed(task, batch["query_ids"], batch["query_mask"]).float()
        c = model.embed(task, batch["code_ids"], batch["code_mask"]).float()
        return [(qi.tolist(), ci.tolist()) for qi, ci in zip(q, c)]

    def score(self, preds: list, examples: list[dict]) -> dict:
        q = torch.tensor([p[0] for p in preds])
        c = torch.tensor([p[1] for p in preds])
        n, k = len(preds), self.top_k
        ranks = "every rank counted" if k is None else f"only the top-{k} list scored (later ranks count 0)"
        return {"metric": self.metric, "value": mrr(q @ c.T, list(range(n)), top_k=k), "chance": chance_mrr(n, k),
                "top_k": k,
                "convention": f"MRR of the paired code among all {n} eval candidates, {ranks}, "
                              f"ties averaged over their orders (a collapsed encoder scores chance)"}
