"""What a task kind is: the one interface the trainer, the model, evaluation and the profiler use,
so none of them tests a kind's name.

A kind turns dataset examples into batches (``encode``, ``collate``), a batch into a loss, eval
examples into predictions and predictions into ``metrics.json``'s numbers; it says whether it needs
a task head (``make_head``) or decodes through the LM head (``uses_lm_head``), which backbone passes
a batch costs (``backbone_passes``: FLOPs) and how many real tokens it holds (``token_count``:
tokens/s), both read off the masks it names in ``pass_masks``. Adding a kind is one file with a
``TaskKind`` subclass plus one line in ``tasks/kinds.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from mtpeft.config import TaskConfig, TrainConfig


class TaskKind:
    name = ""              # ``tasks[i].kind`` in a RunConfig, and the registry key
    metric = ""            # the headline number in metrics.json (the default of tasks[i].metric)
    metrics: tuple = ()    # what tasks[i].metric may choose; () = only ``metric``
    uses_lm_head = False   # trains and predicts through the backbone's LM head: needs a decoder
    examples_like = ""     # another kind whose dataset formats this one reads ("" = its own)
    pass_masks = ("attention_mask",)  # the batch's mask of each backbone pass the loss makes

    @classmethod
    def from_config(cls, task: TaskConfig, train: TrainConfig) -> TaskKind:
        return cls()

    @classmethod
    def headline_metrics(cls) -> tuple:
        return cls.metrics or (cls.metric,)

    @classmethod
    def make_head(cls, hidden: int, dropout: float) -> Optional[nn.Module]:
        """The task's own head on the pooled hidden state; None for kinds that use the LM head."""
        return None

    @classmethod
    def example_kind(cls) -> str:
        """The kind of examples this kind reads: dataset formats declare theirs."""
        return cls.examples_like or cls.name

    def encode(self, example: dict, tok, max_len: int) -> dict:
        raise NotImplementedError

    def collate(self, items: list[dict], pad_id: int) -> dict:
        raise NotImplementedError

    def loss(self, model, task: str, batch: dict, ctx) -> torch.Tensor:
        raise NotImplementedError

    def predict(self, model, task: str, batch: dict) -> list:
        raise NotImplementedError

    def score(self, preds: list, examples: list[dict]) -> dict:
        """``{"metric": ..., "value": ..., "chance": ...}`` plus any secondary numbers."""
        raise NotImplementedError

    def predict_rows(self, model, task: str, rows: list[dict], tok, max_len: int, synced: bool) -> list:
        """Predictions for raw eval examples (what evaluation calls); ``synced``: several ZeRO-3 ranks
        must keep stepping together."""
        return self.predict(model, task, self.collate([self.encode(r, tok, max_len) for r in rows], tok.pad_token_id))

    def eval_extras(self, preds: list, examples: list[dict]) -> dict:
        """Extra entries for the task in metrics.json (e.g. a few generated samples)."""
        return {}

    def backbone_passes(self, batch: dict) -> list[tuple[int, int]]:
        """(rows, padded length) of every backbone pass ``loss`` makes on ``batch``."""
        return [tuple(int(s) for s in batch[k].shape) for k in self.pass_masks]

    def token_count(self, batch: dict) -> int:
        """Real (unpadded) tokens ``loss`` reads from ``batch``: log.jsonl's ``tokens``."""
        return int(sum(batch[k].sum() for k in self.pass_masks))
