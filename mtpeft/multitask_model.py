"""MultitaskModel: one frozen backbone carrying the shared PEFT module, plus a small head per task.

Every task reads the same backbone; only the head differs. Classification and retrieval pool the
backbone's last hidden states (mean over real tokens); generation reads the LM head directly.
Methods that rewrite the backbone's inputs (prompt, prefix) do it through ``input_module``; methods
whose weights depend on the task (mtl_lora) read the task set by ``set_task``, which every public
entry point calls first, so the same task reaches every layer on every rank.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from mtpeft.errors import ConfigError
from mtpeft.tasks.heads import mean_pool
from mtpeft.tasks.kinds import KINDS
from mtpeft.tuners.keyed_dropout import DropoutKeys


class MultitaskModel(nn.Module):
    def __init__(self, backbone: nn.Module, tasks: list, hidden: int, input_module: Optional[nn.Module] = None,
                 selector=None, is_encoder: bool = False):
        super().__init__()
        self.backbone = backbone
        self.input_module = input_module
        self.is_encoder = is_encoder
        self.selector = selector
        heads = {}
        for t in tasks:
            head = KINDS[t.kind].make_head(hidden, t.head_dropout)
            if head is not None:
                heads[t.name] = head
        self.heads = nn.ModuleDict(heads)
        self.generation_tasks = [t.name for t in tasks if KINDS[t.kind].uses_lm_head]
        self.dropout_keys = DropoutKeys()  # read by the KeyedDropout modules key_dropouts put in place

    def set_task(self, task: Optional[str]) -> None:
        """Select the task whose per-task tuner weights the next forward uses (no-op for shared-only methods)."""
        if self.selector is not None:
            self.selector.set(task)

    def encoder(self) -> nn.Module:
        return self.backbone.base_model

    def backbone_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[dict, int]:
        """Keyword arguments for the backbone, and how many virtual positions lead its outputs."""
        self.dropout_keys.next_pass()
        if self.input_module is None:
            return {"input_ids": input_ids, "attention_mask": attention_mask}, 0
        kwargs = self.input_module(input_ids, attention_mask, self.backbone.get_input_embeddings(),
                                   not self.is_encoder)
        return kwargs, self.input_module.virtual

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        kwargs, virtual = self.backbone_inputs(input_ids, attention_mask)
        hidden = self.encoder()(**kwargs).last_hidden_state[:, virtual:]
        return mean_pool(hidden, attention_mask)

    def classify(self, task: str, input_ids, attention_mask) -> torch.Tensor:
        self.set_task(task)
        return self.heads[task](self.pooled(input_ids, attention_mask))

    def embed(self, task: str, input_ids, attention_mask) -> torch.Tensor:
        self.set_task(task)
        return self.heads[task](self.pooled(input_ids, attention_mask))

    def lm_logits(self, input_ids, attention_mask, task: Optional[str] = None) -> torch.Tensor:
        """Logits over the real positions; ``task`` defaults to the only generation task, if one."""
        if self.is_encoder:
            raise ConfigError("generation tasks need a decoder backbone (a causal LM); this backbone is an encoder")
        if task is None and len(self.generation_tasks) == 1:
            task = self.generation_tasks[0]
        self.set_task(task)
        kwargs, virtual = self.backbone_inputs(input_ids, attention_mask)
        return self.backbone(**kwargs).logits[:, virtual:]

    def lm_hidden(self, input_ids, attention_mask, task: Optional[str] = None) -> torch.Tensor:
        """The final (normed) hidden states the LM head reads, over the real positions."""
        if task is None and len(self.generation_tasks) == 1:
            task = self.generation_tasks[0]
        self.set_task(task)
        kwargs, virtual = self.backbone_inputs(input_ids, attention_mask)
        return self.encoder()(**kwargs).last_hidden_state[:, virtual:]

    def plain_lm_head(self) -> Optional[nn.Module]:
        """The LM head if ``logits = head(hidden)`` exactly (no logit scaling or soft-capping), else None:
        only then may the loss apply it chunk by chunk."""
        head = self.backbone.get_output_embeddings() if not self.is_encoder else None
        cfg = self.backbone.config
        scaled = any(getattr(cfg, k, None) not in (None, 1.0) for k in
                     ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale"))
        return head if isinstance(head, nn.Linear) and not scaled else None

    def forward(self, kind, task: str, batch: dict, ctx) -> torch.Tensor:
        """One task's loss on one micro-batch; ``kind`` is that task's kind object. The batch's
        ``row_keys`` (set by the trainer) key the dropout masks of its rows."""
        self.set_task(task)
        self.dropout_keys.begin(batch.get("row_keys"))
        try:
            return kind.loss(self, task, batch, ctx)
        finally:
            self.dropout_keys.begin(None)  # autograd keeps the masks; nothing later may read these keys
