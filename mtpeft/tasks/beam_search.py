"""Beam search through ``model.lm_logits`` without a cache, for the tuners that rewrite the inputs
(prompt and prefix tuning put virtual tokens before every step's input, which a backbone's cached
``generate`` would not). Each step re-reads the whole sequence (O(n²): evaluation only).

Hypotheses are scored as transformers' beam search scores them: the sum of token log-probabilities
divided by the generated length (``length_penalty`` 1); a hypothesis that emits EOS is finished and
keeps its score. With ``synced`` every ZeRO-3 rank runs all ``max_new_tokens`` steps (the forward
passes gather parameters collectively).
"""

from __future__ import annotations

import torch


@torch.no_grad()
def beam_search_uncached(model, ids: torch.Tensor, mask: torch.Tensor, tok, max_new_tokens: int, beams: int,
                         synced: bool, task) -> list[list[list[int]]]:
    """For each prompt row of ``ids`` (left-padded, ``mask`` 1 on real tokens): ``beams`` token lists,
    best first."""
    b = ids.shape[0]
    ids, mask = ids.repeat_interleave(beams, 0), mask.repeat_interleave(beams, 0)
    scores = torch.full((b, beams), float("-inf"))
    scores[:, 0] = 0.0  # one live hypothesis per prompt at the start
    lengths = torch.zeros(b, beams)
    finished = torch.zeros(b, beams, dtype=torch.bool)
    new = torch.empty(b * beams, 0, dtype=torch.long)
    for _ in range(max_new_tokens):
        logp = torch.log_softmax(model.lm_logits(ids, mask, task=task)[:, -1].float().cpu(), dim=-1)
        vocab = logp.shape[-1]
        logp = logp.view(b, beams, vocab)
        # a finished hypothesis continues only with padding, at no cost, so it keeps its place
        stay = torch.full((vocab,), float("-inf"))
        stay[tok.pad_token_id] = 0.0
        logp = torch.where(finished[..., None], stay, logp)
        top, index = (scores[..., None] + logp).view(b, beams * vocab).topk(beams, dim=-1)
        origin, token = index // vocab, index % vocab
        rows = (origin + torch.arange(b)[:, None] * beams).view(-1)
        was_finished = finished.gather(1, origin)
        lengths = lengths.gather(1, origin) + (~was_finished).float()
        finished = was_finished | (token == tok.eos_token_id)
        scores = top
        new = torch.cat([new[rows], token.view(-1, 1)], dim=1)
        ids = torch.cat([ids[rows.to(ids.device)], token.view(-1, 1).to(ids.device)], dim=1)
        mask = torch.cat([mask[rows.to(mask.device)], torch.ones_like(mask[:, :1])], dim=1)
        if finished.all() and not synced:
            break
    normalised = scores / lengths.clamp_min(1)
    order = normalised.argsort(dim=1, descending=True)
    out = []
    for i in range(b):
        rows = [new[i * beams + j].tolist() for j in order[i].tolist()]
        out.append([[t for t in r if t != tok.pad_token_id] for r in rows])
    return out
