"""Zero-shot baseline: the yes/no parser on hand-written answers, and the evaluation end to end on the
demo base model, its numbers recomputed here from the returned predictions and the raw eval file."""

import argparse
import json
from collections import Counter

import pytest
import torch
import yaml

from distributed import REPO
from mtpeft.config import load_config
from mtpeft.errors import ConfigError
from mtpeft.tasks import zero_shot as zs

ROOT = REPO
DEMO_MODEL = str(ROOT / "mtpeft" / "assets" / "demo" / "base_model")
N = 12


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # a 1M-parameter model: thread hand-offs cost more than they save on a shared 2-core machine
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def defect_task():
    return next(t for t in load_config(ROOT / "configs" / "demo.yaml").tasks if t.name == "defect")


def raw_labels(path: str, n: int) -> list[int]:
    with open(path) as fh:
        return [int(json.loads(line)["target"]) for line in fh][:n]


@pytest.mark.parametrize("answer,expected", [
    ("Yes.", 1), ("yes,", 1), ("YES", 1), (" yes", 1), ("Yes, it is vulnerable", 1), ("**Yes**", 1),
    ("No", 0), ("no.", 0), ("No, the functions differ.", 0), ("\n  no", 0),
    ("true", 1), ("False", 0), ("1", 1), ("0", 0), ("1.", 1),
    ("Answer: yes", 1), ("answer: No", 0), ("The answer is no", 0), ("The answer is: Yes.", 1), ("A: yes", 1),
    ("not sure", None), ("I don't know", None), ("know", None), ("unknown", None), ("nothing", None),
    ("Yesterday", None), ("Nope", 0), ("10", None), ("", None), ("...", None),
    ("yes or no", None), ("Yes/No", None), ("The answer is", None), ("maybe yes", None),
])
def test_parse_yes_no_table(answer, expected):
    assert zs.parse_yes_no(answer) == expected


def test_loglik_end_to_end_matches_predictions_and_an_unbatched_reference(defect_task):
    metrics = zs.zero_shot_eval(DEMO_MODEL, [defect_task], max_examples=N, mode="loglik", max_seq_len=160,
                                batch_size=5)
    m = metrics["defect"]
    assert set(m) >= {"kind", "metric", "value", "chance", "f1", "examples", "unparsed_rate", "predictions"}
    assert (m["kind"], m["metric"], m["examples"], m["unparsed_rate"]) == ("classify", "accuracy", N, 0.0)
    labels = raw_labels(defect_task.eval, N)
    preds = m["predictions"]
    assert len(preds) == N and set(preds) <= {0, 1}
    assert m["value"] == pytest.approx(sum(p == y for p, y in zip(preds, labels)) / N)
    assert m["chance"] == pytest.approx(Counter(labels).most_common(1)[0][1] / N)

    # reference: each example alone (no padding, no prefix sharing), float64 log-softmax
    model, tok = zs.load_causal_lm(DEMO_MODEL)
    examples = [{"text": json.loads(line)["func"]} for line in open(defect_task.eval)][:N]
    reserve = max(len(zs.answer_ids(tok, f)) for f in zs.YES_FORMS + zs.NO_FORMS)
    forms = zs.YES_FORMS + zs.NO_FORMS
    prompts = [zs.prompt_ids(defect_task, ex, tok, 160, reserve) for ex in examples]
    assert all(len(p) + reserve <= 160 for p in prompts)
    batched = zs.answers_loglik(model, prompts, [zs.answer_ids(tok, f) for f in forms], tok.pad_token_id)
    expected = []
    for i, prompt in enumerate(prompts):
        ref = []
        for form in forms:
            answer = zs.answer_ids(tok, form)
            with torch.no_grad():
                lp = model(input_ids=torch.tensor([prompt + answer])).logits[0].double().log_softmax(-1)
            ref.append(sum(float(lp[len(prompt) + j - 1, t]) for j, t in enumerate(answer)))
        assert batched[:, i].tolist() == pytest.approx(ref, abs=1e-4)
        ref = torch.tensor(ref, dtype=torch.float64)
        expected.append(int(ref[:len(zs.YES_FORMS)].logsumexp(0) > ref[len(zs.YES_FORMS):].logsumexp(0)))
    assert preds == expected


def test_generate_mode_counts_unparsed_as_wrong(defect_task, monkeypatch):
    canned = ["Yes.", "no", "not sure", "The answer is no", "unknown", "YES", "1", "know", "No, it is safe", "0",
              "yes or no", "false"]
    parsed = [1, 0, None, 0, None, 1, 1, None, 0, 0, None, 0]
    calls = iter(range(N))

    def fake_answers(model, tok, prompts, max_new_tokens):
        return [canned[next(calls)] for _ in prompts]

    monkeypatch.setattr(zs, "_generated_answers", fake_answers)
    m = zs.zero_shot_eval(DEMO_MODEL, [defect_task], max_examples=N, mode="generate", batch_size=5)["defect"]
    labels = raw_labels(defect_task.eval, N)
    assert m["predictions"] == parsed
    assert m["unparsed_rate"] == pytest.approx(4 / N)
    assert m["value"] == pytest.approx(sum(p is not None and p == y for p, y in zip(parsed, labels)) / N)
    assert [s["answer"] for s in m["samples"]] == canned[:5]


def test_cli_run_real_generation_with_a_task_list(tmp_path, capsys):
    tasks = [{"name": "defect", "kind": "classify", "format": "devign",
              "train": str(ROOT / "mtpeft/assets/demo/tasks/devign_train.jsonl"),
              "eval": str(ROOT / "mtpeft/assets/demo/tasks/devign_eval.jsonl")},
             {"name": "gen", "kind": "generate", "format": "conala",
              "train": str(ROOT / "mtpeft/assets/demo/tasks/conala_train.jsonl"),
              "eval": str(ROOT / "mtpeft/assets/demo/tasks/conala_eval.jsonl")}]
    (tmp_path / "tasks.yaml").write_text(yaml.safe_dump(tasks))
    parser = argparse.ArgumentParser()
    zs.add_arguments(parser)
    out = tmp_path / "zs.json"
    args = parser.parse_args(["--zero-shot", DEMO_MODEL, "--tasks", str(tmp_path / "tasks.yaml"), "--mode", "generate",
                              "--max-examples", "6", "--max-new-tokens", "4", "--out", str(out)])
    assert zs.run(args) == 0
    m = json.loads(out.read_text())
    assert list(m) == ["defect"]  # the generation task is skipped
    preds = m["defect"]["predictions"]
    labels = raw_labels(tasks[0]["eval"], 6)
    assert m["defect"]["value"] == pytest.approx(sum(p is not None and p == y for p, y in zip(preds, labels)) / 6)
    assert m["defect"]["unparsed_rate"] == pytest.approx(sum(p is None for p in preds) / 6)
    assert "skipped (not classification): gen" in capsys.readouterr().out
    args.task = ["nope"]
    with pytest.raises(ConfigError, match="--task nope: not in"):
        zs.run(args)
    with pytest.raises(ConfigError, match="needs --tasks"):
        zs.run(parser.parse_args(["--zero-shot", DEMO_MODEL]))
