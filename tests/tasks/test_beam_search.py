"""Beam search for evaluation: mtpeft's uncached beam search (the path prompt and prefix tuning take)
returns what transformers' cached beam search returns on the same LoRA model, left-padded prompts
included; the generation score reports EM@k over the beams, hand-checked."""

import pytest
import torch

from builders import DEMO_BASE, trained_like
from mtpeft.tasks.beam_search import beam_search_uncached
from mtpeft.tasks.generation import Generate


def test_uncached_beam_search_equals_transformers_beam_search(tmp_path):
    from mtpeft.trainer.build import load_tokenizer

    cfg, model = trained_like(tmp_path, "lora")
    tok = load_tokenizer(str(DEMO_BASE))
    prompts = [[1, 50, 60, 70, 80, 90], [1, 33, 44], [1, 200, 300, 400, 5, 6, 7]]
    theirs = Generate(max_new_tokens=8, num_beams=4).candidates(model, prompts, tok, synced=False, task="codegen")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    with torch.no_grad():
        rows = beam_search_uncached(model, ids, mask, tok, 8, 4, False, "codegen")
    ours = [[tok.decode(r, skip_special_tokens=True).strip() for r in beams] for beams in rows]
    assert ours == theirs
    assert all(len(set(c)) == 4 for c in ours)  # four distinct hypotheses per prompt


def test_prompt_tuning_decodes_beams_through_its_virtual_tokens(tmp_path):
    from mtpeft.trainer.build import load_tokenizer

    _, model = trained_like(tmp_path, "prompt")
    tok = load_tokenizer(str(DEMO_BASE))
    prompts = [[1, 50, 60, 70, 80, 90], [1, 33, 44]]
    greedy = Generate(max_new_tokens=8).candidates(model, prompts, tok, synced=False, task="codegen")
    beams = Generate(max_new_tokens=8, num_beams=3).candidates(model, prompts, tok, synced=False, task="codegen")
    assert [len(b) for b in beams] == [3, 3] and all(len(g) == 1 for g in greedy)
    # the top beam scores at least as well as greedy under the same model: check by log-probability
    def logprob(prompt, text_ids):
        ids = torch.tensor([prompt + text_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model.lm_logits(ids, torch.ones_like(ids), task="codegen").float(), -1)
        return sum(logp[0, len(prompt) - 1 + j, t].item() for j, t in enumerate(text_ids)) / max(len(text_ids), 1)

    for prompt, g, b in zip(prompts, greedy, beams):
        g_ids, b_ids = (tok(s, add_special_tokens=False)["input_ids"] for s in (g[0], b[0]))
        assert logprob(prompt, b_ids) >= logprob(prompt, g_ids) - 0.5  # retokenised text: a loose bound


def test_score_reports_em_at_k_over_beams_by_hand():
    examples = [{"target": "x = 1"}, {"target": "y = 2"}, {"target": "print(z)"}]
    preds = [["x = 1", "x=1"], ["y = 3", "y = 2\n"], ["print(y)", "print(x)"]]
    got = Generate(num_beams=2).score(preds, examples)
    assert got["value"] == pytest.approx(1 / 3) and got["em@1"] == pytest.approx(1 / 3)
    assert got["em@2"] == pytest.approx(2 / 3)  # "y = 2\n" matches once stripped (the study's flattening)
    assert "em@5" not in got and got["chance"] == 0.0
    assert 0.0 <= got["codebleu"] <= 1.0 and "beam search, 2 beams" in got["convention"]
    greedy = Generate().score(["x = 1", "q", "print(z)"], examples)
    assert greedy["value"] == pytest.approx(2 / 3) and set(k for k in greedy if k.startswith("em@")) == {"em@1"}
