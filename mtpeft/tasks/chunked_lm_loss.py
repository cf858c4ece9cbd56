"""Token cross-entropy through the LM head, chunk by chunk, so the fp32 logits of a whole batch never
exist at once (in the manner of Liger-Kernel's fused linear cross-entropy; here the chunks are
recomputed in backward by activation checkpointing, which also works on ZeRO-3's gathered head).

At Qwen2.5-Coder's 152k vocabulary, seq 2048 and micro-batch 4, full fp32 logits are ~5 GB before
their gradient; a chunk of c tokens holds ``c·V`` of them. The result equals the full loss and its
gradient (tested in float64)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

AUTO_CHUNK_TOKENS = 1024
AUTO_ABOVE_BYTES = 256 * 2**20  # chunk when a batch's fp32 logits would exceed this


def resolve_chunk(setting: int, tokens: int, vocab: int) -> int:
    """Tokens per chunk for ``train.logits_chunk``: N > 0 as given, -1 full logits, 0 automatic
    (chunks of ``AUTO_CHUNK_TOKENS`` once the full fp32 logits would pass ``AUTO_ABOVE_BYTES``)."""
    if setting > 0:
        return setting
    if setting == 0 and 4 * tokens * vocab > AUTO_ABOVE_BYTES:
        return AUTO_CHUNK_TOKENS
    return 0


def _chunk_ce(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module) -> torch.Tensor:
    logits = head(hidden)
    if logits.dtype in (torch.float16, torch.bfloat16):  # the softmax in fp32, as the full loss does
        logits = logits.float()
    return F.cross_entropy(logits, labels, ignore_index=-100, reduction="none")


def token_cross_entropy(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module, chunk: int) -> torch.Tensor:
    """Per-token losses ``[B, T]`` of ``head(hidden)`` against ``labels`` (-100 ignored), ``chunk``
    tokens at a time; only each chunk's logits are ever alive, in forward and in backward."""
    flat_h, flat_y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    parts = [checkpoint(_chunk_ce, flat_h[i:i + chunk], flat_y[i:i + chunk], head, use_reentrant=False)
             for i in range(0, flat_h.shape[0], chunk)]
    return torch.cat(parts).view(labels.shape)
