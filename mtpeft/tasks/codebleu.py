"""CodeBLEU (Ren et al., 2020) for Python in the conventions papers report, on the PyPI ``codebleu``
package (its tree-sitter parser, NLTK-derived n-gram code and data-flow graph); ``CODEBLEU_CONVENTIONS``
is the one registry of their names (``tasks[i].codebleu``).

- ``codexglue``: CodeXGLUE's ``calc_code_bleu.py``, what the code-generation study ran, on its input
  files: one line per sample (newlines and tabs already spaces, see ``metrics.flatten``). The
  script strips comments with its Java rule (for Python: a ``//`` ends the line, ``#`` comments
  stay), knows no soft keywords (``match``, ``case``, ``type``) and scores a corpus without any
  reference data flow 0 on that component.
- ``package``: the package's ``calc_codebleu`` as is, on the multi-line code: Python comments and
  docstrings removed, soft keywords weighted, and a data-flow score of 0 counted as 1 (its
  ``dataflow_match_score or 1``; a candidate with no matching data flow gets full marks there).
"""

from __future__ import annotations

from typing import Sequence

from codebleu import bleu as ngram_bleu
from codebleu import calc_codebleu, syntax_match, weighted_ngram_match
from codebleu.codebleu import PACKAGE_DIR
from codebleu.dataflow_match import get_data_flow, normalize_dataflow
from codebleu.parser import DFG_python, remove_comments_and_docstrings
from codebleu.utils import get_tree_sitter_language
from tree_sitter import Parser

from mtpeft.tasks.bleu import Convention
from mtpeft.tasks.metrics import check_same_length, flatten

WEIGHTS = (0.25, 0.25, 0.25, 0.25)
SOFT_KEYWORDS = frozenset({"match", "case", "type"})  # in the package's keyword list, not CodeXGLUE's
COMPONENTS = ("ngram_match_score", "weighted_ngram_match_score", "syntax_match_score", "dataflow_match_score")


def _codexglue_keywords() -> set[str]:
    words = (PACKAGE_DIR / "keywords" / "python.txt").read_text(encoding="utf-8").split()
    return set(words) - SOFT_KEYWORDS


def _strip_java_comments(code: str) -> str:
    try:
        return remove_comments_and_docstrings(code, "java")
    except Exception:  # the script ignores any failure here and keeps the code as it is
        return code


def _dataflow_codexglue(refs: list[str], hyps: list[str], language) -> float:
    parser = Parser()
    parser.language = language
    match = total = 0
    for ref, hyp in zip(refs, hyps):
        cand = normalize_dataflow(get_data_flow(_strip_java_comments(hyp), [parser, DFG_python]))
        gold = normalize_dataflow(get_data_flow(_strip_java_comments(ref), [parser, DFG_python]))
        total += len(gold)
        for edge in gold:
            if edge in cand:
                match += 1
                cand.remove(edge)
    return match / total if total else 0.0


def codebleu_codexglue(preds: Sequence[str], refs: Sequence[str]) -> dict:
    """CodeXGLUE ``calc_code_bleu.py --lang python`` on the flattened samples: ``codebleu`` and its
    four components under the package's names."""
    check_same_length(preds, refs, "codebleu")
    hyps = [flatten(p).strip() for p in preds]
    golds = [flatten(r).strip() for r in refs]
    tok_hyps, tok_refs = [h.split() for h in hyps], [[g.split()] for g in golds]
    keywords = _codexglue_keywords()
    weighted_refs = [[[toks, {t: 1 if t in keywords else 0.2 for t in toks}] for toks in ref] for ref in tok_refs]
    language = get_tree_sitter_language("python")
    scores = {
        "ngram_match_score": ngram_bleu.corpus_bleu(tok_refs, tok_hyps),
        "weighted_ngram_match_score": weighted_ngram_match.corpus_bleu(weighted_refs, tok_hyps),
        # lang only picks the comment rule there ("java", as the script); the grammar is Python's
        "syntax_match_score": syntax_match.corpus_syntax_match([[g] for g in golds], hyps, "java",
                                                               tree_sitter_language=language),
        "dataflow_match_score": _dataflow_codexglue(golds, hyps, language),
    }
    scores = {k: float(v) for k, v in scores.items()}
    return {"codebleu": sum(w * scores[k] for w, k in zip(WEIGHTS, COMPONENTS)), **scores}


def codebleu_package(preds: Sequence[str], refs: Sequence[str]) -> dict:
    """The ``codebleu`` package's ``calc_codebleu(refs, preds, "python")``, unchanged."""
    check_same_length(preds, refs, "codebleu")
    out = calc_codebleu(list(refs), list(preds), "python", weights=WEIGHTS)
    return {k: float(v) for k, v in out.items()}


CODEBLEU_CONVENTIONS: dict[str, Convention] = {
    "codexglue": Convention(codebleu_codexglue, "CodeXGLUE calc_code_bleu.py on flattened samples, the "
                                                "code-generation study's"),
    "package": Convention(codebleu_package, "the codebleu package's calc_codebleu on the multi-line code, "
                                            "a data-flow score of 0 counted as 1"),
}
