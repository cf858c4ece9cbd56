"""Binary classification of one snippet (defect, flaky test) or of a cross-encoded pair (clone).

A pair is one input ``<s> a <sep> b`` so attention compares the two functions directly, as in the
code-analysis study; each side gets half of the token budget.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F

from mtpeft.tasks.heads import ClassificationHead
from mtpeft.tasks.metrics import accuracy, f1_binary
from mtpeft.tasks.task_kind import TaskKind


def bos(tok) -> list[int]:
    return [tok.bos_token_id] if tok.bos_token_id is not None else []


def pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


class Classify(TaskKind):
    name = "classify"
    metric = "accuracy"
    metrics = ("accuracy", "f1")  # the analysis study: F1 for clone and flaky tests, accuracy for defects

    def __init__(self, metric: str = "accuracy"):
        self.metric = metric

    @classmethod
    def from_config(cls, task, train) -> "Classify":
        return cls(metric=task.metric or cls.metric)

    @classmethod
    def make_head(cls, hidden: int, dropout: float) -> ClassificationHead:
        return ClassificationHead(hidden, dropout)

    def encode(self, ex: dict, tok, max_len: int) -> dict:
        ids = bos(tok) + tok(ex["text"], add_special_tokens=False)["input_ids"][: max_len - 1]
        return {"ids": ids, "label": int(ex["label"])}

    def collate(self, items: list[dict], pad_id: int) -> dict:
        ids, mask = pad([it["ids"] for it in items], pad_id)
        return {"input_ids": ids, "attention_mask": mask,
                "labels": torch.tensor([it["label"] for it in items], dtype=torch.float32)}

    def loss(self, model, task: str, batch: dict, ctx) -> torch.Tensor:
        logits = model.classify(task, batch["input_ids"], batch["attention_mask"])
        return F.binary_cross_entropy_with_logits(logits.float(), batch["labels"])

    @torch.no_grad()
    def predict(self, model, task: str, batch: dict) -> list:
        logits = model.classify(task, batch["input_ids"], batch["attention_mask"])
        return (logits.float() > 0).long().tolist()

    def score(self, preds: list, examples: list[dict]) -> dict:
        """Accuracy and F1 of the positive class, each beside what a constant answer scores (the
        majority class for accuracy; always "yes" for F1, 2p / (1 + p) at positive rate p); the
        task's ``metric`` is the headline."""
        labels = [int(e["label"]) for e in examples]
        majority = Counter(labels).most_common(1)[0][1] / len(labels)
        positive_rate = sum(1 for y in labels if y == 1) / len(labels)
        both = {"accuracy": (accuracy(preds, labels), majority),
                "f1": (f1_binary(preds, labels), 2 * positive_rate / (1 + positive_rate))}
        value, chance = both[self.metric]
        return {"metric": self.metric, "value": value, "chance": chance,
                "accuracy": both["accuracy"][0], "chance_accuracy": majority,
                "f1": both["f1"][0], "chance_f1": both["f1"][1]}


class PairClassify(Classify):
    name = "pair_classify"

    def encode(self, ex: dict, tok, max_len: int) -> dict:
        half = (max_len - 2) // 2
        a = tok(ex["text_a"], add_special_tokens=False)["input_ids"][:half]
        b = tok(ex["text_b"], add_special_tokens=False)["input_ids"][:half]
        sep = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
        return {"ids": bos(tok) + a + [sep] + b, "label": int(ex["label"])}
