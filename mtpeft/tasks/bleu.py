"""BLEU in the conventions papers report; ``BLEU_CONVENTIONS`` is the one registry of their names
(``tasks[i].bleu``), each with the sentence ``metrics.json`` states.

They differ in tokenization and smoothing, and the differences are not small on code (the same
fixture corpus in tests/tasks/test_bleu.py: 0.29 ``study`` vs 0.53 ``sacrebleu``), so a number is only
comparable with a paper's in that paper's convention.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Callable, NamedTuple, Sequence

import sacrebleu

from mtpeft.tasks.metrics import check_same_length


class Convention(NamedTuple):
    """A named scoring rule: ``score(predictions, references)`` gives a float in [0, 1] (BLEU) or a
    dict whose ``codebleu`` entry is one (CodeBLEU); ``summary`` is what metrics.json says of it."""

    score: Callable
    summary: str


def _ngrams(tokens: list[str], max_n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for n in range(1, max_n + 1) for i in range(len(tokens) - n + 1))


def _nmt_bleu(hyps: list[list[str]], refs: list[list[str]], smooth: bool, max_n: int = 4) -> float:
    """Google NMT's ``compute_bleu`` rule on token lists, one reference each: corpus-level clipped
    n-gram matches over the candidate's n-grams; ``smooth`` adds one to both sides of every order
    (unigrams too), else an order without a match makes the score 0; BP = exp(1 - r/c) when c ≤ r.
    The scripts divide by zero on an empty candidate or reference corpus; that scores 0 here."""
    matches, possible = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for hyp, gold in zip(hyps, refs):
        hyp_len, ref_len = hyp_len + len(hyp), ref_len + len(gold)
        for gram, count in (_ngrams(hyp, max_n) & _ngrams(gold, max_n)).items():
            matches[len(gram) - 1] += count
        for n in range(1, max_n + 1):
            possible[n - 1] += max(0, len(hyp) - n + 1)
    if hyp_len == 0 or ref_len == 0:
        return 0.0
    if smooth:
        log_p = math.fsum(math.log((m + 1.0) / (p + 1.0)) for m, p in zip(matches, possible)) / max_n
    else:
        precisions = [m / p if p > 0 else 0.0 for m, p in zip(matches, possible)]
        if min(precisions) <= 0:
            return 0.0
        log_p = math.fsum(math.log(p) for p in precisions) / max_n
    ratio = hyp_len / ref_len
    bp = 1.0 if ratio > 1.0 else math.exp(1 - 1.0 / ratio)
    return math.exp(log_p) * bp


def bleu_study(preds: Sequence[str], refs: Sequence[str], max_n: int = 4) -> float:
    """CodeXGLUE text-to-code ``bleu.py`` (Google NMT's ``compute_bleu`` with smooth=True), the
    code-generation study's evaluator: whitespace tokens, add-one smoothing on every order."""
    check_same_length(preds, refs, "bleu")
    return _nmt_bleu([p.split() for p in preds], [r.split() for r in refs], smooth=True, max_n=max_n)


_SYMBOL = re.compile(r"([^A-Za-z0-9_])")
_CAMEL = re.compile(r"([a-z])([A-Z])")


def conala_tokens(code: str) -> list[str]:
    """CoNaLa's tokenizer for BLEU (Wang Ling et al. 2016, used by the CoNaLa leaderboard): every
    character other than a letter, digit or underscore is a token of its own, a lower-to-upper
    case change splits a word (``camelCase`` → ``camel``, ``Case``), quotes of either kind become
    a backtick."""
    spaced = _CAMEL.sub(r"\1 \2", _SYMBOL.sub(r" \1 ", code))
    return spaced.replace('"', "`").replace("'", "`").split()


def bleu_conala(preds: Sequence[str], refs: Sequence[str]) -> float:
    """The CoNaLa leaderboard's ``conala_eval.py``: ``conala_tokens``, then Google NMT's
    ``compute_bleu`` without smoothing."""
    check_same_length(preds, refs, "bleu")
    return _nmt_bleu([conala_tokens(p) for p in preds], [conala_tokens(r) for r in refs], smooth=False)


def bleu_sacrebleu(preds: Sequence[str], refs: Sequence[str]) -> float:
    """sacrebleu's corpus BLEU with its defaults (13a tokenizer, exponential smoothing), / 100."""
    check_same_length(preds, refs, "bleu")
    return sacrebleu.corpus_bleu(list(preds), [list(refs)]).score / 100.0


BLEU_CONVENTIONS: dict[str, Convention] = {
    "study": Convention(bleu_study, "CodeXGLUE text-to-code bleu.py, the code-generation study's: whitespace "
                                    "tokens, add-one smoothing on every order"),
    "sacrebleu": Convention(bleu_sacrebleu, f"sacrebleu {sacrebleu.__version__} corpus BLEU, 13a tokenizer, "
                                            f"exp smoothing"),
    "conala": Convention(bleu_conala, "CoNaLa leaderboard conala_eval.py: Wang Ling et al.'s code tokenizer, "
                                      "no smoothing"),
}
