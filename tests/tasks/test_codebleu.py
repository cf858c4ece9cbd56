"""CodeBLEU conventions against CodeXGLUE's calc_code_bleu.py and the codebleu package.

CODEXGLUE was printed once (2026-11-30) by the real ``Code-Code/code-to-code-trans/evaluator/CodeBLEU/
calc_code_bleu.py --lang python`` (the script the code-generation study ran; its copy differs only in
the printing) with py-tree-sitter 0.20.4 and, as ``parser/my-languages.so``, the compiled grammar of
the pinned tree-sitter-python 0.21.0, so that only the script's own rules are compared; input:
tests/fixtures/codegen_pairs.json one sample a line, newlines and tabs made spaces, as the study's
test.py writes its files; "all" is the "pairs" corpus, i its i-th pair alone, the others the
fixture's corpora of those names. Same values with
PYTHONHASHSEED 0 and 5. Tuples: (codebleu, ngram, weighted ngram, syntax, data flow).
With the grammar CodeXGLUE ships (an older one) the corpus scores 0.5027 (syntax 0.7172, data flow 0.6923).
"""

import json
from pathlib import Path

import pytest
from codebleu import calc_codebleu

from mtpeft.tasks.codebleu import COMPONENTS, codebleu_codexglue, codebleu_package

FIXTURE = json.loads((Path(__file__).parents[1] / "fixtures" / "codegen_pairs.json").read_text())
PREDS = [p["prediction"] for p in FIXTURE["pairs"]]
REFS = [p["reference"] for p in FIXTURE["pairs"]]
NO_FLOW_PREDS = [p["prediction"] for p in FIXTURE["no_data_flow"]]
NO_FLOW_REFS = [p["reference"] for p in FIXTURE["no_data_flow"]]

CODEXGLUE = {
    "all": (0.5090801711756867, 0.26308666911386425, 0.3382942565527381, 0.7349397590361446, 0.7),
    0: (0.7540663740773074, 0.5081327481546147, 0.5081327481546147, 1.0, 1.0),
    1: (0.175, 0, 0, 0.7, 0.0),
    2: (0.523297991032208, 0.043472087194499145, 0.04971987693433304, 1.0, 1.0),
    3: (0.2921224555482047, 0.01618861356572822, 0.027301208627090675, 0.375, 0.75),
    4: (0.3171138974055986, 0.1495348781221221, 0.11892071150027214, 1.0, 0),
    5: (0.10878056407226522, 0.1495348781221221, 0.11892071150027214, 0.16666666666666666, 0),
    6: (0.6416305106641064, 0.22894156860669912, 0.3375804740497263, 1.0, 1.0),
    7: (0.2892239241427606, 0.28574404296988, 0.29615165360116247, 0.375, 0.2),
    8: (0.3919286129883563, 0.316227766016838, 0.25148668593658713, 1.0, 0),
    9: (0.6555821121410068, 0.6132297420585351, 0.8757653731721587, 0.3333333333333333, 0.8),
    "no_data_flow": (0.27769705323679034, 0.08891397050194613, 0.021874242445215214, 1.0, 0),
    "floor_division": (0.5848767980963863, 0.4774095826015087, 0.48330973099615776, 0.5454545454545454,
                       0.8333333333333334),
    "soft_keywords": (0.7686424829558856, 0.537284965911771, 0.537284965911771, 1.0, 1.0),
}


def _tuple(out: dict) -> tuple:
    return (out["codebleu"], *(out[k] for k in COMPONENTS))


def test_codexglue_convention_equals_calc_code_bleu():
    assert _tuple(codebleu_codexglue(PREDS, REFS)) == pytest.approx(CODEXGLUE["all"], rel=1e-12)
    for i, (p, r) in enumerate(zip(PREDS, REFS)):
        assert _tuple(codebleu_codexglue([p], [r])) == pytest.approx(CODEXGLUE[i], rel=1e-12), i
    got = codebleu_codexglue(NO_FLOW_PREDS, NO_FLOW_REFS)
    assert _tuple(got) == pytest.approx(CODEXGLUE["no_data_flow"], rel=1e-12)
    # the script's Java comment rule cuts a sample at its first //; match, case, type weigh 0.2 there
    for corpus in ("floor_division", "soft_keywords"):
        pairs = FIXTURE[corpus]
        got = codebleu_codexglue([p["prediction"] for p in pairs], [p["reference"] for p in pairs])
        assert _tuple(got) == pytest.approx(CODEXGLUE[corpus], rel=1e-12), corpus


def test_package_convention_is_the_package_and_counts_a_missing_data_flow_as_one():
    assert codebleu_package(PREDS, REFS) == pytest.approx(calc_codebleu(REFS, PREDS, "python"))
    pkg, cx = codebleu_package(NO_FLOW_PREDS, NO_FLOW_REFS), CODEXGLUE["no_data_flow"]
    # the n-gram parts split on whitespace and agree with the script; no reference data flow: 0 there, 1 here
    assert (pkg["ngram_match_score"], pkg["weighted_ngram_match_score"]) == pytest.approx(cx[1:3], rel=1e-12)
    assert pkg["dataflow_match_score"] == 0 and pkg["codebleu"] == pytest.approx(cx[0] + 0.25, rel=1e-12)
    # identical code without data flow: 0.39 in the script (4 tokens: no 4-gram), 0.25 more here
    assert PREDS[8] == REFS[8]
    assert codebleu_package([PREDS[8]], [REFS[8]])["codebleu"] == pytest.approx(CODEXGLUE[8][0] + 0.25, rel=1e-12)


def test_codexglue_convention_reads_flattened_lines():
    """The script sees one line per sample: a ``//`` (its Java comment rule) ends the whole sample."""
    ref = "def f(a, b):\n    q = a // b\n    return q"
    assert codebleu_codexglue([ref], [ref]) == codebleu_codexglue([ref.replace("\n", " ")], [ref])
    cut = codebleu_codexglue(["def f(a, b):\n    q = a"], [ref])
    assert cut["syntax_match_score"] == codebleu_codexglue([ref], [ref])["syntax_match_score"]
