"""Program synthesis (APPS): write a program from a problem statement; scored by running its tests.

Training is ``generate``'s: the prompt (question, starter code and APPS's format hint, see
``formats.apps_prompt``) in the code-generation study's ``### Instruction:`` format, the target the
problem's first reference solution, the loss on the response only.

Evaluation draws ``SAMPLES`` programs per problem by temperature sampling and runs each against the
problem's tests in the sandbox (``pass_at_k.evaluate_problems``). The metric is unbiased pass@1;
pass@k for every k ≤ ``SAMPLES`` goes in the extras. Chance is 0.0: the empty program passes no test.
``TaskConfig`` has no key for the sample count, so it is the constant below — 5 keeps an eval of a
few hundred problems within minutes of sandbox time; raise it for pass@10/100 estimates.

The evaluator calls ``predict`` with no tokenizer, so the kind keeps the one ``encode`` last saw.
Under ZeRO-3 every rank must run the same number of forward passes: the evaluator pads the ranks'
shards to equal length, and ``generate(..., synced_gpus=True)`` keeps a rank that finished stepping
until all have.
"""

from __future__ import annotations

import re
import zlib
from collections import Counter

import torch
import torch.distributed as dist

from mtpeft.errors import ConfigError
from mtpeft.tasks.generation import Generate, decode_uncached
from mtpeft.tasks.pass_at_k import evaluate_problems
from mtpeft.tasks.task_kind import TaskKind

SAMPLES = 5  # programs drawn per problem at eval (pass@k needs k ≤ SAMPLES)
TEMPERATURE = 0.6  # between Chen et al.'s 0.2 (best pass@1) and 0.8 (best pass@100), for pass@1..5
TOP_P = 0.95
TEST_TIMEOUT_S = 4.0  # per test, in the sandbox
TEST_MEMORY_MB = 512


class ProgramSynthesis(TaskKind):
    name = "program_synthesis"
    metric = "pass@1"
    uses_lm_head = True

    @classmethod
    def from_config(cls, task, train) -> "ProgramSynthesis":
        return cls(max_new_tokens=task.max_new_tokens, seed=train.seed, logits_chunk=train.logits_chunk)

    def __init__(self, max_new_tokens: int = 512, samples: int = SAMPLES, seed: int = 0, logits_chunk: int = 0):
        self.gen = Generate(max_new_tokens=max_new_tokens, logits_chunk=logits_chunk)
        self.max_new_tokens = max_new_tokens
        self.samples = samples
        self.seed = seed
        self.tok = None

    def encode(self, ex: dict, tok, max_len: int) -> dict:
        self.tok = tok
        item = self.gen.encode(ex, tok, max_len)
        item["prompt"] = self.gen.prompt_ids(ex, tok, max_len)
        item["problem_id"] = str(ex.get("problem_id", ""))
        return item

    def collate(self, items: list[dict], pad_id: int) -> dict:
        batch = self.gen.collate(items, pad_id)
        width = max(len(it["prompt"]) for it in items)
        ids = torch.full((len(items), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, it in enumerate(items):  # left padding: new tokens line up at the right edge
            ids[i, width - len(it["prompt"]):] = torch.tensor(it["prompt"])
            mask[i, width - len(it["prompt"]):] = 1
        batch["prompt_ids"], batch["prompt_attention"] = ids, mask  # eval-only: no backbone pass in the loss
        batch["seed"] = zlib.crc32("\n".join(it["problem_id"] for it in items).encode()) ^ self.seed
        return batch

    def loss(self, model, task: str, batch: dict, ctx) -> torch.Tensor:
        return self.gen.loss(model, task, batch, ctx)

    @torch.no_grad()
    def predict(self, model, task: str, batch: dict) -> list[list[str]]:
        """``SAMPLES`` programs per problem; the sampling seed comes from the batch's problem ids."""
        if getattr(model, "is_encoder", False):
            raise ConfigError(f"task {task}: kind program_synthesis needs a decoder (causal LM) backbone")
        if self.tok is None:
            raise RuntimeError("ProgramSynthesis.predict before encode: the tokenizer is not known yet")
        tok = self.tok
        device = model.backbone.get_input_embeddings().weight.device
        ids, mask = batch["prompt_ids"].to(device), batch["prompt_attention"].to(device)
        synced = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):  # sampling must not move the training RNG
            torch.manual_seed(int(batch["seed"]))
            if getattr(model, "input_module", None) is not None:
                new = self._sample_uncached(model, task, ids, mask, synced)
            else:
                model.set_task(task)
                out = model.backbone.generate(
                    input_ids=ids, attention_mask=mask, do_sample=True, temperature=TEMPERATURE, top_p=TOP_P,
                    top_k=0, num_return_sequences=self.samples, max_new_tokens=self.max_new_tokens,
                    pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, synced_gpus=synced)
                new = out[:, ids.shape[1]:]
        texts = [extract_program(tok.decode(row.tolist(), skip_special_tokens=True)) for row in new.cpu()]
        return [texts[i * self.samples:(i + 1) * self.samples] for i in range(ids.shape[0])]

    def _sample_uncached(self, model, task, ids, mask, synced: bool) -> torch.Tensor:
        """Temperature + nucleus sampling through ``model.lm_logits`` (prompt/prefix tuners rewrite inputs)."""
        return decode_uncached(model, ids.repeat_interleave(self.samples, 0), mask.repeat_interleave(self.samples, 0),
                               self.tok, self.max_new_tokens, synced, task,
                               lambda logits: torch.multinomial(nucleus((logits / TEMPERATURE).softmax(-1), TOP_P),
                                                                1).squeeze(1))

    def score(self, preds: list, examples: list[dict]) -> dict:
        tested = [i for i, e in enumerate(examples) if e.get("input_output")]
        ks = list(range(1, self.samples + 1))
        out = {"metric": self.metric, "value": 0.0, "chance": 0.0, "samples_per_problem": self.samples,
               "problems_scored": len(tested), "problems_without_tests": len(examples) - len(tested)}
        if not tested:
            print(f"warning: none of the {len(examples)} eval problems has tests (input_output); pass@k is 0")
            return out
        result = evaluate_problems([examples[i] for i in tested], [preds[i] for i in tested], ks=ks,
                                   timeout_s=TEST_TIMEOUT_S, memory_mb=TEST_MEMORY_MB)
        out["value"] = result["pass@k"][1]
        out["pass@k"] = {str(k): v for k, v in result["pass@k"].items()}
        out["sample_status"] = dict(Counter(s for r in result["problems"] for s in r.statuses))
        out["samples"] = [{"problem_id": r.problem_id, "program": preds[i][0], "status": r.statuses[0]}
                          for i, r in zip(tested[:3], result["problems"]) if r.statuses]
        return out


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches ``top_p`` (Holtzman et al.)."""
    sorted_p, order = probs.sort(dim=-1, descending=True)
    keep = sorted_p.cumsum(-1) - sorted_p < top_p  # a token stays if the mass above it is below top_p
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)
    return kept / kept.sum(-1, keepdim=True)


_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL | re.IGNORECASE)


def extract_program(response: str) -> str:
    """The program in a response: the first fenced block if the model wrote markdown, else all of it."""
    m = _FENCE.search(response)
    return (m.group(1) if m else response).strip("\n")
