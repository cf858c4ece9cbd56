"""Code generation from a natural-language instruction, through the backbone's LM head.

Prompt format of the code-generation study: ``### Instruction:\\n{nl}\\n### Response:\\n``; the loss
covers the response (and its end-of-sequence token) only. Each example's loss is the mean over its
own response tokens and the batch loss the mean over examples, so the loss of a global batch does not
depend on how it is split across ranks (DESIGN contract 2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mtpeft.tasks.classification import bos
from mtpeft.tasks.chunked_lm_loss import resolve_chunk, token_cross_entropy
from mtpeft.tasks.beam_search import beam_search_uncached
from mtpeft.tasks.bleu import BLEU_CONVENTIONS
from mtpeft.tasks.codebleu import CODEBLEU_CONVENTIONS
from mtpeft.tasks.metrics import em_at_k, exact_match
from mtpeft.tasks.task_kind import TaskKind

PROMPT = "### Instruction:\n{nl}\n### Response:\n"


EM_AT = (1, 2, 5, 10)  # the code-generation study's EM@k


class Generate(TaskKind):
    name = "generate"
    metric = "exact_match"
    uses_lm_head = True

    def __init__(self, max_new_tokens: int = 32, logits_chunk: int = 0, num_beams: int = 1,
                 bleu: str = "study", codebleu: str = "codexglue"):
        self.max_new_tokens = max_new_tokens
        self.logits_chunk = logits_chunk  # train.logits_chunk: 0 automatic, -1 full logits, N tokens
        self.num_beams = num_beams  # evaluation: 1 greedy; k > 1 beam search, EM@k for k in EM_AT
        self.bleu = bleu  # a name in BLEU_CONVENTIONS (config validation checks it)
        self.codebleu = codebleu  # a name in CODEBLEU_CONVENTIONS

    @classmethod
    def from_config(cls, task, train) -> "Generate":
        return cls(max_new_tokens=task.max_new_tokens, logits_chunk=train.logits_chunk, num_beams=task.num_beams,
                   bleu=task.bleu, codebleu=task.codebleu)

    def predict_rows(self, model, task: str, rows: list[dict], tok, max_len: int, synced: bool) -> list:
        """Each row's candidates, best first: one with greedy decoding, ``num_beams`` with beam search."""
        return self.candidates(model, [self.prompt_ids(r, tok, max_len) for r in rows], tok, synced=synced, task=task)

    def eval_extras(self, preds: list, examples: list[dict]) -> dict:
        return {"samples": [{"reference": e["target"], "prediction": _best(p)} for p, e in list(zip(preds, examples))[:5]]}

    def encode(self, ex: dict, tok, max_len: int) -> dict:
        prompt = bos(tok) + tok(PROMPT.format(nl=ex["prompt"]), add_special_tokens=False)["input_ids"]
        target = tok(ex["target"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        prompt = prompt[-max(1, max_len - len(target)):] if len(prompt) + len(target) > max_len else prompt
        ids = (prompt + target)[:max_len]
        return {"ids": ids, "prompt_len": len(prompt)}

    def collate(self, items: list[dict], pad_id: int) -> dict:
        width = max(len(it["ids"]) for it in items)
        ids = torch.full((len(items), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for i, it in enumerate(items):
            n = len(it["ids"])
            ids[i, :n] = torch.tensor(it["ids"])
            mask[i, :n] = 1
            labels[i, it["prompt_len"]:n] = ids[i, it["prompt_len"]:n]
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def loss(self, model, task: str, batch: dict, ctx) -> torch.Tensor:
        labels = batch["labels"][:, 1:]
        head = model.plain_lm_head() if hasattr(model, "plain_lm_head") else None
        chunk = resolve_chunk(self.logits_chunk, labels.numel(), head.out_features) if head is not None else 0
        if chunk:
            hidden = model.lm_hidden(batch["input_ids"], batch["attention_mask"], task=task)[:, :-1]
            per_token = token_cross_entropy(hidden, labels, head, chunk)
        else:
            logits = model.lm_logits(batch["input_ids"], batch["attention_mask"], task=task)[:, :-1].float()
            per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                        ignore_index=-100, reduction="none").view(labels.shape)
        counts = (labels != -100).sum(1).clamp_min(1)
        return (per_token.sum(1) / counts).mean()

    def prompt_ids(self, ex: dict, tok, max_len: int) -> list[int]:
        ids = bos(tok) + tok(PROMPT.format(nl=ex["prompt"]), add_special_tokens=False)["input_ids"]
        return ids[-(max_len - self.max_new_tokens):] if len(ids) > max_len - self.max_new_tokens else ids

    @torch.no_grad()
    def generate(self, model, prompts: list[list[int]], tok, synced: bool, task: str | None = None) -> list[str]:
        """The best candidate of each prompt (greedy, or the top beam)."""
        return [c[0] for c in self.candidates(model, prompts, tok, synced, task)]

    @torch.no_grad()
    def candidates(self, model, prompts: list[list[int]], tok, synced: bool, task: str | None = None
                   ) -> list[list[str]]:
        """Greedy decoding (``num_beams`` 1) or beam search, best first; ``synced`` keeps every ZeRO-3
        rank stepping until all are done.

        Tuners that rewrite the inputs (prompt, prefix) decode through ``model.lm_logits`` so the virtual
        tokens are in every step; the others use the backbone's cached ``generate``."""
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding: new tokens line up at the right edge
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        k = self.num_beams
        if getattr(model, "input_module", None) is not None:
            if k > 1:
                rows = beam_search_uncached(model, ids, mask, tok, self.max_new_tokens, k, synced, task)
                return [[tok.decode(r, skip_special_tokens=True).strip() for r in beams] for beams in rows]
            new = self._greedy(model, ids, mask, tok, synced, task)
        else:
            if hasattr(model, "set_task"):
                model.set_task(task if task is not None else _only(model.generation_tasks))
            out = model.backbone.generate(input_ids=ids, attention_mask=mask, max_new_tokens=self.max_new_tokens,
                                          do_sample=False, num_beams=k, num_return_sequences=k,
                                          pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                          synced_gpus=synced)
            new = out[:, width:]
        texts = [tok.decode(row, skip_special_tokens=True).strip() for row in new]
        return [texts[i * k:(i + 1) * k] for i in range(len(prompts))]

    def _greedy(self, model, ids, mask, tok, synced: bool, task: str | None) -> torch.Tensor:
        return decode_uncached(model, ids, mask, tok, self.max_new_tokens, synced, task,
                               lambda logits: logits.argmax(-1))

    def score(self, preds: list, examples: list[dict]) -> dict:
        """Exact match of the best candidate (the headline), EM@k over the beams, BLEU and CodeBLEU of
        the best candidate in the configured conventions; an empty prediction is the chance baseline."""
        refs = [e["target"] for e in examples]
        cands = [p if isinstance(p, list) else [p] for p in preds]
        best, empty = [c[0] for c in cands], [""] * len(refs)
        bleu, codebleu = BLEU_CONVENTIONS[self.bleu], CODEBLEU_CONVENTIONS[self.codebleu]
        out = {"metric": self.metric, "value": exact_match(best, refs), "chance": exact_match(empty, refs),
               "bleu": bleu.score(best, refs), "chance_bleu": bleu.score(empty, refs)}
        beams = max(len(c) for c in cands)
        out.update({f"em@{k}": em_at_k(cands, refs, k) for k in EM_AT if k <= beams})
        out["codebleu"] = codebleu.score(best, refs)["codebleu"]
        out["convention"] = (f"{'greedy decoding' if beams == 1 else f'beam search, {beams} beams'}; exact match "
                             f"after newlines and tabs become spaces (the code-generation study's); of the best "
                             f"candidate, BLEU {self.bleu} ({bleu.summary}) and CodeBLEU {self.codebleu} "
                             f"({codebleu.summary})")
        return out


def _best(pred) -> str:
    return pred[0] if isinstance(pred, list) else pred


def _only(names: list[str]) -> str | None:
    return names[0] if len(names) == 1 else None


def decode_uncached(model, ids, mask, tok, max_new_tokens: int, synced: bool, task, pick) -> torch.Tensor:
    """Decode through ``model.lm_logits`` without a cache (each step re-reads the whole sequence:
    O(n²), for eval only), for tuners that rewrite the inputs (prompt, prefix). ``pick`` maps the
    last position's logits [batch, vocab] to next tokens; finished rows only get padding, and with
    ``synced`` every ZeRO-3 rank keeps stepping until all are done."""
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    new = []
    for _ in range(max_new_tokens):
        nxt = pick(model.lm_logits(ids, mask, task=task)[:, -1].float().cpu())
        nxt = torch.where(done, torch.full_like(nxt, tok.pad_token_id), nxt)
        new.append(nxt)
        done |= nxt == tok.eos_token_id
        ids = torch.cat([ids, nxt[:, None].to(ids.device)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        if done.all() and not synced:
            break
    return torch.stack(new, dim=1)
