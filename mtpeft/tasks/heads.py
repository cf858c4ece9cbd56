"""Per-task heads on top of the shared backbone, as in the code-analysis study.

Classification: Linear(h→h/2) → ReLU → Dropout → Linear(→1), trained with BCE on one logit.
Retrieval and clustering (POJ-104): Linear(h→d) then L2 normalisation, so a dot product is a cosine
similarity.
Generation and program synthesis have no head of their own: they read the backbone's LM head.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ClassificationHead(nn.Module):
    def __init__(self, hidden: int, dropout: float):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden // 2)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden // 2, 1)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.out(self.dropout(F.relu(self.dense(pooled)))).squeeze(-1)


class RetrievalHead(nn.Module):
    def __init__(self, hidden: int, dim: int = 512):
        super().__init__()
        self.proj = nn.Linear(hidden, dim)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(pooled), dim=-1)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens: decoder models have no [CLS] and their last token sees only the left."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
