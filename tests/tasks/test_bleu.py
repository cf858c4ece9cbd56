"""BLEU conventions against the scripts they follow, and their config key.

STUDY_BLEU was printed once (2026-11-30) by the real CodeXGLUE ``Text-Code/text-to-code/evaluator/
bleu.py`` (identical to the code-generation study's ``evaluator/bleu.py``, martin-wey/peft-llm-code
before 2bcca0c): ``compute_bleu([[r.split()] ...], [h.split() ...], 4, smooth=True)[0]`` on
tests/fixtures/codegen_pairs.json written one sample a line with newlines and tabs made spaces, as
the study's test.py writes its files; "all" is the whole corpus, i the i-th pair alone.
"""

import json
import math
from pathlib import Path

import pytest
import sacrebleu

from mtpeft.tasks.bleu import BLEU_CONVENTIONS, bleu_conala, bleu_sacrebleu, bleu_study, conala_tokens

FIXTURE = json.loads((Path(__file__).parents[1] / "fixtures" / "codegen_pairs.json").read_text())
PREDS = [p["prediction"] for p in FIXTURE["pairs"]]
REFS = [p["reference"] for p in FIXTURE["pairs"]]

STUDY_BLEU = {
    "all": 0.2910420569237681, 0: 0.6147881529512643, 1: 0.11380295453101374, 2: 0.22089591134157885,
    3: 0.09147827112247602, 4: 0.7598356856515925, 5: 0.7598356856515925, 6: 0.2948993986902436,
    7: 0.537284965911771, 8: 1.0, 9: 0.6479121525090147,
    "no_data_flow": 0.9036020036098448,
}


def test_study_bleu_equals_the_codexglue_script():
    assert bleu_study(PREDS, REFS) == pytest.approx(STUDY_BLEU["all"], rel=1e-12)
    for i, (p, r) in enumerate(zip(PREDS, REFS)):
        assert bleu_study([p], [r]) == pytest.approx(STUDY_BLEU[i], rel=1e-12), i
    nf = FIXTURE["no_data_flow"]
    got = bleu_study([p["prediction"] for p in nf], [p["reference"] for p in nf])
    assert got == pytest.approx(STUDY_BLEU["no_data_flow"], rel=1e-12)


def test_study_bleu_smooths_unigrams_too_and_scores_empty_as_zero():
    # "a b" vs "a c": 1..4-gram matches 1/2, 0/1, 0/0, 0/0, each plus one: (2/3 · 1/2 · 1 · 1)^(1/4);
    # the script printed 0.7598356856515925
    assert bleu_study(["a b"], ["a c"]) == pytest.approx((2 / 3 * 1 / 2) ** 0.25)
    assert bleu_study(["a b"], ["a c"]) == pytest.approx(0.7598356856515925, rel=1e-12)
    # no token right: (1/2 · 1 · 1 · 1)^(1/4), the script's 0.8408964152537145 (NLTK-style BLEU gives 0)
    assert bleu_study(["bar"], ["foo"]) == pytest.approx(0.8408964152537145, rel=1e-12)
    assert bleu_study([""], ["a b"]) == 0.0  # the script divides by zero here


def test_sacrebleu_convention_by_hand():
    # 13a tokens a b c d vs a b c e: 3/4, 2/3, 1/2 and no 4-gram match: exp smoothing gives 1/(2·1)
    assert bleu_sacrebleu(["a b c d"], ["a b c e"]) == pytest.approx((3 / 4 * 2 / 3 * 1 / 2 * 1 / 2) ** 0.25)
    assert bleu_sacrebleu(PREDS, REFS) == pytest.approx(sacrebleu.corpus_bleu(PREDS, [REFS]).score / 100)
    assert not math.isclose(bleu_sacrebleu(PREDS, REFS), bleu_study(PREDS, REFS), rel_tol=0.1)


def test_conala_tokens_by_hand():
    """The CoNaLa leaderboard's rule: symbols alone, camelCase split at a lower-to-upper change,
    both quote kinds a backtick, whitespace only separates."""
    assert conala_tokens("df.groupBy('a')[\"b\"]  +=1") == [
        "df", ".", "group", "By", "(", "`", "a", "`", ")", "[", "`", "b", "`", "]", "+", "=", "1"]
    assert conala_tokens("HTTPServer my_var2\tx") == ["HTTPServer", "my_var2", "x"]  # upper-to-upper: no split


def test_conala_bleu_equals_sacrebleu_on_its_tokens():
    """An independent implementation of the same rule: sacrebleu on the CoNaLa tokens joined by
    spaces, its own tokenizer off, no smoothing (the leaderboard's compute_bleu(smooth=False))."""
    def reference(preds, refs):
        joined = lambda xs: [" ".join(conala_tokens(x)) for x in xs]  # noqa: E731
        return sacrebleu.corpus_bleu(joined(preds), [joined(refs)], tokenize="none", smooth_method="none",
                                     force=True).score / 100
    assert bleu_conala(PREDS, REFS) == pytest.approx(reference(PREDS, REFS), rel=1e-12)
    for p, r in zip(PREDS, REFS):
        assert bleu_conala([p], [r]) == pytest.approx(reference([p], [r]), rel=1e-12, abs=1e-15)
    assert bleu_conala(["bar"], ["foo"]) == 0.0 and bleu_conala([""], ["a b"]) == 0.0  # no smoothing
    assert not math.isclose(bleu_conala(PREDS, REFS), bleu_study(PREDS, REFS), rel_tol=0.05)


def test_config_takes_every_bleu_and_codebleu_convention_and_names_them_on_a_typo(tmp_path, capsys):
    from distributed import tiny_config
    from mtpeft.cli import main
    from mtpeft.config import load_config
    from mtpeft.errors import ConfigError
    from mtpeft.tasks.codebleu import CODEBLEU_CONVENTIONS
    from mtpeft.tasks.kinds import make_kind

    path = tiny_config(tmp_path)
    default = [t for t in load_config(path).tasks if t.name == "codegen"][0]
    assert (default.bleu, default.codebleu) == ("study", "codexglue")
    for key, registry in (("bleu", BLEU_CONVENTIONS), ("codebleu", CODEBLEU_CONVENTIONS)):
        for name in registry:
            cfg = load_config(path, [f"tasks.codegen.{key}={name}"])
            task = [t for t in cfg.tasks if t.name == "codegen"][0]
            assert getattr(make_kind(task, cfg.train), key) == name
        with pytest.raises(ConfigError) as err:
            load_config(path, [f"tasks.codegen.{key}=bleurt"])
        msg = str(err.value)
        assert f"tasks[3].{key} must be one of {', '.join(registry)}, got 'bleurt'" in msg and "\n" not in msg
        assert main(["train", str(path), "--set", f"tasks.codegen.{key}=bleurt"]) == 2  # the CLI's error path
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and f"tasks[3].{key} must be one of" in lines[0]
