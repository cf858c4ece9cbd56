"""MultitaskModel: one frozen backbone carrying the shared PEFT module, plus a small head per task.

Every task reads the same backbone; only the head differs. Classification and retrieval pool the
backbone's last hidden states (mean over real tokens); generation reads the LM head directly.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from mtpeft.tasks.heads import make_head, mean_pool


class MultitaskModel(nn.Module):
    def __init__(self, backbone: nn.Module, tasks: list, hidden: int):
        super().__init__()
        self.backbone = backbone
        heads = {}
        for t in tasks:
            head = make_head(t.kind, hidden, t.head_dropout)
            if head is not None:
                heads[t.name] = head
        self.heads = nn.ModuleDict(heads)

    def encoder(self) -> nn.Module:
        return self.backbone.base_model

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return mean_pool(hidden, attention_mask)

    def classify(self, task: str, input_ids, attention_mask) -> torch.Tensor:
        return self.heads[task](self.pooled(input_ids, attention_mask))

    def embed(self, task: str, input_ids, attention_mask) -> torch.Tensor:
        return self.heads[task](self.pooled(input_ids, attention_mask))

    def lm_logits(self, input_ids, attention_mask) -> torch.Tensor:
        return self.backbone(input_ids=input_ids, attention_mask=attention_mask).logits

    def forward(self, kind, task: str, batch: dict, ctx) -> torch.Tensor:
        """One task's loss on one micro-batch; ``kind`` is that task's kind object."""
        return kind.loss(self, task, batch, ctx)
