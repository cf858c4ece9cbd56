"""Zero-shot baseline: ask an untrained causal LM the classification tasks as yes/no questions.

This is the floor a fine-tune has to clear beside the majority-class chance: what the base model
already knows when asked in plain words. Two ways to read its answer:

- ``loglik`` (the default): compare log P(" yes" | prompt) with log P(" no" | prompt), each summed over
  the answer's tokens and pooled over its capitalisations (" yes"/" Yes"). Every example gets an
  answer, and small models, which often ramble or echo the question instead of answering, are
  still measured on what they believe rather than on whether they follow the format.
- ``generate``: greedy-decode a few tokens and parse them with ``parse_yes_no``; an answer that is not
  a recognisable yes or no counts as wrong and is reported as ``unparsed_rate``.

The metrics dict per task has the shape ``trainer.evaluate`` writes (kind, metric, value, chance,
extras), so the baseline sits in the same table as the fine-tuned runs.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

from mtpeft.command_parser import whole_number
from mtpeft.config import RunConfig, TaskConfig, from_dict, load_config
from mtpeft.errors import ConfigError
from mtpeft.model_load_errors import MODEL_LOAD_ERRORS, one_line
from mtpeft.failed_writes import writing
from mtpeft.output_folder import check_output_file
from mtpeft.tasks.classification import Classify
from mtpeft.tasks.loading import load_split
from mtpeft.yaml_files import YamlFileProblem, read_yaml

CLASSIFICATION_KINDS = ("classify", "pair_classify")
MODES = ("loglik", "generate")

# The question each benchmark asks; "yes" is label 1 in every one of them.
QUESTIONS = {
    "devign": "Does this function contain a security vulnerability?",
    "flaky": "Is this test flaky, that is, can it both pass and fail without any change to the code?",
    "bigclonebench": "Do these two functions implement the same functionality?",
    "bigclonebench_codexglue": "Do these two functions implement the same functionality?",
}
KIND_QUESTIONS = {
    "classify": "Does this code have the defect this task is about?",
    "pair_classify": "Do these two pieces of code implement the same functionality?",
}
YES_FORMS = (" yes", " Yes")
NO_FORMS = (" no", " No")
ANSWER_CUE = "Answer:"

_YES_WORDS = frozenset({"yes", "true", "1", "yeah", "yep"})
_NO_WORDS = frozenset({"no", "false", "0", "nope"})
# words an answer may open with before the verdict: "Answer: yes", "The answer is no", "A: yes"
_LEAD_INS = frozenset({"answer", "the", "is", "final", "my", "a", "it", "so", "output", "response", "assistant"})


def parse_yes_no(text: str) -> int | None:
    """1 for yes, 0 for no, None when the answer does not start with a verdict.

    Case-folded words (punctuation dropped), lead-ins skipped, then the FIRST word decides; nothing is
    searched for inside words or further on, so "not sure" and "I don't know" are unparsed (not "no"),
    "unknown" and "nothing" are unparsed, and an echoed "yes or no" / "yes/no" is unparsed too.
    """
    words = re.findall(r"[a-z0-9]+", text.casefold())
    i = 0
    while i < len(words) and words[i] in _LEAD_INS:
        i += 1
    if i == len(words):
        return None
    verdict = 1 if words[i] in _YES_WORDS else 0 if words[i] in _NO_WORDS else None
    if verdict is None:
        return None
    following = words[i + 1] if i + 1 < len(words) else ""
    opposite = _NO_WORDS if verdict == 1 else _YES_WORDS
    if following == "or" or following in opposite:
        return None
    return verdict


def question_for(task: TaskConfig) -> str:
    return QUESTIONS.get(task.format, KIND_QUESTIONS[task.kind])


def prompt_ids(task: TaskConfig, example: dict, tok, max_len: int, reserve: int) -> list[int]:
    """The question prompt as token ids; the code is cut so prompt + ``reserve`` answer tokens fit."""
    def ids(s: str) -> list[int]:
        return tok(s, add_special_tokens=False)["input_ids"]

    head = [tok.bos_token_id] if tok.bos_token_id is not None else []
    tail = ids(f"\n\nQuestion: {question_for(task)} Answer yes or no.\n{ANSWER_CUE}")
    if task.kind == "pair_classify":
        label_a, label_b = ids("Function 1:\n"), ids("\n\nFunction 2:\n")
        budget = max(2, max_len - reserve - len(head) - len(tail) - len(label_a) - len(label_b)) // 2
        return head + label_a + ids(example["text_a"])[:budget] + label_b + ids(example["text_b"])[:budget] + tail
    budget = max(1, max_len - reserve - len(head) - len(tail))
    return head + ids(example["text"])[:budget] + tail


def answer_ids(tok, form: str) -> list[int]:
    """Tokens of ``form`` as they follow the answer cue (tokenizers merge a leading space differently)."""
    cue = tok(ANSWER_CUE, add_special_tokens=False)["input_ids"]
    full = tok(ANSWER_CUE + form, add_special_tokens=False)["input_ids"]
    if full[: len(cue)] == cue and len(full) > len(cue):
        return full[len(cue):]
    return tok(form, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def answers_loglik(model, prompts: list[list[int]], answers: list[list[int]], pad_id: int) -> torch.Tensor:
    """log P(answer | prompt), summed over the answer's tokens, as float64 [answers, prompts].

    Answers that share all but their last token share one forward pass over prompt + that prefix, so
    single-token answers (" yes" and " no" in most code LLMs' vocabularies) cost one pass in all.
    """
    out = torch.zeros(len(answers), len(prompts), dtype=torch.float64)
    groups: dict[tuple, list[int]] = {}
    for a, answer in enumerate(answers):
        groups.setdefault(tuple(answer[:-1]), []).append(a)
    device = next(model.parameters()).device
    for prefix, members in groups.items():
        seqs = [p + list(prefix) for p in prompts]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):  # right padding: positions of the real tokens start at 0
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        logp = logits.double().log_softmax(-1).cpu()
        for i, p in enumerate(prompts):
            for a in members:
                for j, token in enumerate(answers[a]):
                    out[a, i] += logp[i, len(p) + j - 1, token]
    return out


def _loglik_predictions(model, tok, prompts: list[list[int]]) -> list[int]:
    forms = YES_FORMS + NO_FORMS
    scores = answers_loglik(model, prompts, [answer_ids(tok, f) for f in forms], tok.pad_token_id)
    yes = scores[: len(YES_FORMS)].logsumexp(0)
    no = scores[len(YES_FORMS):].logsumexp(0)
    return (yes > no).long().tolist()


@torch.no_grad()
def _generated_answers(model, tok, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
    width = max(len(p) for p in prompts)
    device = next(model.parameters()).device
    ids = torch.full((len(prompts), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding: the answers start at one column
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                         do_sample=False, num_beams=1, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return [tok.decode(row, skip_special_tokens=True) for row in out[:, width:].cpu()]


def load_causal_lm(model_name_or_path: str):
    from transformers import AutoModelForCausalLM

    from mtpeft.trainer.build import load_tokenizer

    tok = load_tokenizer(model_name_or_path)
    cuda = torch.cuda.is_available()
    try:
        model = AutoModelForCausalLM.from_pretrained(model_name_or_path, dtype=torch.bfloat16 if cuda else torch.float32)
    except MODEL_LOAD_ERRORS as exc:
        raise ConfigError(f"--zero-shot: cannot load a causal LM from {model_name_or_path!r} ({one_line(exc)})") from None
    return model.to("cuda" if cuda else "cpu").eval(), tok


def zero_shot_eval(model_name_or_path: str, tasks: list[TaskConfig], max_examples: int = 200,
                   max_new_tokens: int = 8, mode: str = "loglik", max_seq_len: int = 512,
                   batch_size: int = 8) -> dict:
    """Metrics per classification task (others are skipped) of the untrained model, on each eval split.

    ``max_examples`` > 0 keeps the first examples of each split (0: the task's ``max_eval_examples``, or
    all); ``max_new_tokens`` is the answer length in ``generate`` mode.
    """
    if mode not in MODES:
        raise ConfigError(f"zero-shot mode must be one of {', '.join(MODES)}, got {mode!r}")
    chosen = [t for t in tasks if t.kind in CLASSIFICATION_KINDS]
    if not chosen:
        raise ConfigError("zero-shot: none of the tasks is a classification task (kind classify or pair_classify)")
    model, tok = load_causal_lm(model_name_or_path)
    reserve = max(max_new_tokens, *(len(answer_ids(tok, f)) for f in YES_FORMS + NO_FORMS)) if mode == "generate" \
        else max(len(answer_ids(tok, f)) for f in YES_FORMS + NO_FORMS)
    results = {}
    for task in chosen:
        limit = task.max_eval_examples if task.max_eval_examples and not max_examples else max_examples
        examples = load_split(task.eval, task.format, max_examples=limit).to_list()
        preds: list = []
        answers: list[str] = []
        for start in range(0, len(examples), batch_size):
            rows = examples[start:start + batch_size]
            prompts = [prompt_ids(task, r, tok, max_seq_len, reserve) for r in rows]
            if mode == "loglik":
                preds.extend(_loglik_predictions(model, tok, prompts))
            else:
                texts = _generated_answers(model, tok, prompts, max_new_tokens)
                answers.extend(texts)
                preds.extend(parse_yes_no(t) for t in texts)
        scored = [-1 if p is None else p for p in preds]  # unparsed: never equal to a label
        result = {"kind": task.kind, **Classify().score(scored, examples), "examples": len(examples), "mode": mode,
                  "unparsed_rate": sum(p is None for p in preds) / len(preds), "predictions": preds}
        if answers:
            result["samples"] = [{"answer": a, "parsed": p, "label": e["label"]}
                                 for a, p, e in zip(answers[:5], preds, examples)]
        results[task.name] = result
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``mtpeft eval --zero-shot``; none is required, so they sit beside ``eval RUN_DIR``'s own."""
    parser.add_argument("--zero-shot", dest="zero_shot", metavar="MODEL", default=None,
                        help="causal LM to prompt, untrained (a local folder or a hub id)")
    parser.add_argument("--tasks", default=None, metavar="CONFIG_OR_TASKS",
                        help="a RunConfig YAML (its tasks are used) or a YAML list of tasks")
    parser.add_argument("--task", action="append", default=[], metavar="NAME",
                        help="only this task (repeatable; default: every classification task)")
    parser.add_argument("--mode", choices=MODES, default="loglik",
                        help="loglik: compare P(yes) with P(no) (default, robust for small models); "
                             "generate: decode and parse the answer")
    parser.add_argument("--max-examples", type=whole_number(0, "0: the task's max_eval_examples, or all"), default=200, help="eval examples per task, the first ones (0: the task's max_eval_examples, or all)")
    parser.add_argument("--max-new-tokens", type=whole_number(1), default=8, help="answer length in generate mode")
    parser.add_argument("--max-seq-len", type=whole_number(2), default=512, help="prompt + answer tokens")
    parser.add_argument("--batch-size", type=whole_number(1), default=8)
    parser.add_argument("--out", default=None, help="also write the metrics as JSON here")


def load_tasks(path: str, model_name_or_path: str) -> list[TaskConfig]:
    """Tasks of a RunConfig YAML, or of a YAML list of task mappings (paths relative to the file)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--tasks {path}: file not found; pass a RunConfig YAML or a YAML list of tasks")
    try:
        raw = read_yaml(p)
    except YamlFileProblem as exc:
        raise ConfigError(f"--tasks {exc.where}: {exc.problem}") from None
    if isinstance(raw, list):
        cfg: RunConfig = from_dict({"model": {"name_or_path": model_name_or_path}, "tasks": raw},
                                   base_dir=p.resolve().parent, source=str(p))
    else:
        cfg = load_config(p)
    return cfg.tasks


def run(args: argparse.Namespace) -> int:
    from mtpeft.trainer.evaluate import format_table

    if not args.zero_shot or not args.tasks:
        raise ConfigError("eval --zero-shot MODEL needs --tasks CONFIG_OR_TASKS (a RunConfig YAML or a YAML task list)")
    tasks = load_tasks(args.tasks, args.zero_shot)
    if args.task:
        unknown = sorted(set(args.task) - {t.name for t in tasks})
        if unknown:
            raise ConfigError(f"--task {', '.join(unknown)}: not in {args.tasks} "
                              f"(tasks: {', '.join(t.name for t in tasks)})")
        tasks = [t for t in tasks if t.name in args.task]
    if args.out:  # before minutes of generation, not after
        check_output_file(Path(args.out), "--out")
    skipped = [t.name for t in tasks if t.kind not in CLASSIFICATION_KINDS]
    metrics = zero_shot_eval(args.zero_shot, tasks, max_examples=args.max_examples,
                             max_new_tokens=args.max_new_tokens, mode=args.mode, max_seq_len=args.max_seq_len,
                             batch_size=args.batch_size)
    print(f"zero-shot {args.zero_shot} ({args.mode} mode)")
    print(format_table(metrics))
    if args.mode == "generate":
        for name, m in metrics.items():
            print(f"{name}: unparsed answers {m['unparsed_rate']:.1%} (counted as wrong)")
    if skipped:
        print(f"skipped (not classification): {', '.join(skipped)}")
    if args.out:
        out, tmp = Path(args.out), Path(args.out + ".tmp")
        with writing(out, "nothing was written; free space on that disk (or name another --out) and rerun"):
            tmp.write_text(json.dumps(metrics, indent=2))
            tmp.replace(out)
        print(f"wrote {args.out}")
    return 0
