"""CodeBLEU components against hand-counted n-grams, AST subtrees and def-use edges."""

import ast
import math

import pytest

from mtpeft.errors import ConfigError
from mtpeft.tasks.codebleu import codebleu, dataflow_edges, weighted_ngram_match
from mtpeft.tasks.metrics import bleu


def test_identical_code_scores_one():
    code = "def f(a, b):\n    s = 0\n    for i in range(a):\n        s += i * b\n    return s\n"
    out = codebleu([code], [code])
    assert out == pytest.approx({"codebleu": 1.0, "ngram": 1.0, "weighted_ngram": 1.0, "syntax": 1.0, "dataflow": 1.0})


def test_hand_counted_components():
    ref, pred = "y = x + 1", "y = f(x)"
    out = codebleu([pred], [ref])
    # pred [y = f ( x )] vs ref [y = x + 1]: p1 = 3/6, p2 = (1+1)/(5+1), p3 = (0+1)/(4+1), p4 = (0+1)/(3+1)
    ngram = (0.5 * (2 / 6) * (1 / 5) * (1 / 4)) ** 0.25
    # recall over the reference: r1 = 3/5, r2 = (1+1)/(4+1), r3 = 1/(3+1), r4 = 1/(2+1)
    weighted = ((3 / 5) * (2 / 5) * (1 / 4) * (1 / 3)) ** 0.25
    # ref subtrees: Module, Assign, Name y, BinOp, Name x, Constant (6); pred shares only the 2 Names
    syntax = 2 / 6
    # ref edges: x comesFrom nothing, y computedFrom x; pred: f, x comesFrom nothing, y from (f, x)
    dataflow = 1 / 2
    assert out["ngram"] == pytest.approx(ngram)
    assert out["weighted_ngram"] == pytest.approx(weighted)
    assert out["syntax"] == pytest.approx(syntax)
    assert out["dataflow"] == pytest.approx(dataflow)
    assert out["codebleu"] == pytest.approx(0.25 * (ngram + weighted + syntax + dataflow))
    w = (0.1, 0.2, 0.3, 0.4)
    assert codebleu([pred], [ref], weights=w)["codebleu"] == pytest.approx(
        0.1 * ngram + 0.2 * weighted + 0.3 * syntax + 0.4 * dataflow
    )


def test_keywords_weigh_five():
    ref, pred = "return x if c else y", "return z if d else w"
    # reference unigrams: return/if/else weigh 5 each (15) + x, c, y (3) = 18; matched keywords = 15
    want = ((15 / 18) * (1 / 6) * (1 / 5) * (1 / 4)) ** 0.25
    assert weighted_ngram_match([pred], [ref]) == pytest.approx(want)
    # unweighted recall would have p1 = 3/6: strictly lower
    assert want > ((3 / 6) * (1 / 6) * (1 / 5) * (1 / 4)) ** 0.25


def test_renaming_keeps_dataflow_and_syntax():
    ref = "a = load()\nb = a + 1\nprint(b)"
    pred = "u = load()\nv = u + 1\nprint(v)"
    out = codebleu([pred], [ref])
    assert out["syntax"] == pytest.approx(1.0)
    assert out["dataflow"] == pytest.approx(1.0)
    assert out["ngram"] < 0.5


def test_dataflow_edges_hand_example():
    edges = dataflow_edges(ast.parse("x = a + 1\ny = x * 2"))
    # a -> 0, x -> 1, y -> 2
    assert dict(edges) == {
        (0, "comesFrom", ()): 1,
        (1, "computedFrom", (0,)): 1,
        (1, "comesFrom", (1,)): 1,
        (2, "computedFrom", (1,)): 1,
    }


def test_unparsable_candidate_scores_zero_structure():
    out = codebleu(["y = = x"], ["y = x + 1"])
    assert out["syntax"] == 0.0 and out["dataflow"] == 0.0
    assert out["ngram"] == pytest.approx(bleu(["y = = x"], ["y = x + 1"]))


def test_no_dataflow_renormalises_weights():
    out = codebleu(["1 - 2"], ["1 + 2"])
    assert out["dataflow"] is None
    # ref subtrees Module, Expr, BinOp, Constant, Constant: only the 2 Constants match
    assert out["syntax"] == pytest.approx(2 / 5)
    ng = ((2 / 3) * (1 / 3) * (1 / 2) * 1.0) ** 0.25
    assert out["ngram"] == pytest.approx(ng) and out["weighted_ngram"] == pytest.approx(ng)
    assert out["codebleu"] == pytest.approx((2 * ng + 0.4) / 3)
    assert math.isfinite(out["codebleu"])


def test_bad_settings_raise():
    with pytest.raises(ConfigError):
        codebleu(["x"], ["x"], lang="java")
    with pytest.raises(ConfigError):
        codebleu(["x"], ["x"], weights=(0, 0, 0, 0))
