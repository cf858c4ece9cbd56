"""The cluster (POJ-104) and program_synthesis (APPS) kinds on the demo base model, in-process.

References: the supervised contrastive loss written as loops in float64, MAP@R's random expectation by
enumerating every ranking, pass@k from hand-counted passing samples, the LM loss from a float64
log-softmax of the backbone's own logits."""

import itertools
import os
import math

import numpy as np
import pytest
import torch

from builders import DEMO_BASE, FORMAT_FIXTURES, KINDS_MAX_LEN, kinds_config
from mtpeft.config import from_dict
from mtpeft.data.dist import DistContext
from mtpeft.errors import ConfigError
from mtpeft.tasks import program_synthesis as ps
from mtpeft.tasks.clustering import Cluster, chance_map_at_r, expected_random_ap_at_r, global_supcon
from mtpeft.tasks.kinds import make_kind
from mtpeft.tasks.loading import load_split
from mtpeft.tasks.metrics import map_at_r
from mtpeft.trainer.build import build_model, load_tokenizer

FIX = FORMAT_FIXTURES
DEMO_MODEL = str(DEMO_BASE)
MAX_LEN = KINDS_MAX_LEN


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a 1M-parameter model: threads only contend on a shared 2-core machine
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup():
    cfg = kinds_config()
    model = build_model(cfg, None)
    model.eval()  # no dropout: the references below recompute the same forward
    tok = load_tokenizer(cfg.model.name_or_path)
    kinds = {t.name: make_kind(t, cfg.train) for t in cfg.tasks}
    return cfg, model, tok, kinds


# ---- cluster -------------------------------------------------------------------------------------

def supcon_reference(z: np.ndarray, labels: list, tau: float) -> float:
    """Khosla et al.'s L_out, loops in float64: mean over anchors with a positive."""
    n = len(labels)
    losses = []
    for i in range(n):
        others = [a for a in range(n) if a != i]
        pos = [p for p in others if labels[p] == labels[i]]
        if not pos:
            continue
        denom = math.log(sum(math.exp(z[i] @ z[a] / tau) for a in others))
        losses.append(-sum(z[i] @ z[p] / tau - denom for p in pos) / len(pos))
    return sum(losses) / len(losses)


def test_supcon_matches_loops_and_is_independent_of_the_rank_split():
    g = torch.Generator().manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(12, 16, generator=g, dtype=torch.float64), dim=-1)
    labels = torch.tensor([3, 1, 3, 7, 1, 2, 3, 7, 5, 1, 2, 9])  # 5 and 9 have no positive
    ref = supcon_reference(z.numpy(), labels.tolist(), 0.1)
    one_rank = global_supcon(z, labels, z, labels, 0, 1, 0.1)
    assert float(one_rank) == pytest.approx(ref, rel=1e-12)
    # 3 ranks × 4 rows: each rank's share, averaged as data parallelism averages, is the same loss
    shares = [global_supcon(z[r * 4:(r + 1) * 4], labels[r * 4:(r + 1) * 4], z, labels, r * 4, 3, 0.1)
              for r in range(3)]
    assert float(sum(shares) / 3) == pytest.approx(ref, rel=1e-12)


def brute_force_ap_at_r(r: int, m: int) -> float:
    """E[AP@R] over every ordering of m candidates of which r are relevant (exact, by enumeration)."""
    total, count = 0.0, 0
    for order in itertools.permutations([1] * r + [0] * (m - r)):
        hits = np.array(order[:r], dtype=float)
        total += float((np.cumsum(hits) / np.arange(1, r + 1) * hits).sum() / r)
        count += 1
    return total / count


@pytest.mark.parametrize("r,m", [(1, 1), (1, 4), (2, 4), (3, 5), (2, 6), (4, 6), (6, 6)])
def test_random_ap_at_r_closed_form_equals_enumeration(r, m):
    assert expected_random_ap_at_r(r, m) == pytest.approx(brute_force_ap_at_r(r, m), rel=1e-12)


def test_chance_map_at_r_by_hand_and_against_random_embeddings():
    assert chance_map_at_r([1, 1, 2, 2, 3]) == pytest.approx(0.25)  # every scored item: 1 hit among 4
    assert chance_map_at_r([0, 0, 0, 1, 1]) == pytest.approx((3 * 5 / 12 + 2 * 1 / 4) / 5)
    labels = [0] * 4 + [1] * 3 + [2] * 2 + [3]
    rng = np.random.default_rng(0)
    trials = [map_at_r(rng.standard_normal((len(labels), 8)), labels) for _ in range(3000)]
    stderr = np.std(trials) / math.sqrt(len(trials))
    assert abs(np.mean(trials) - chance_map_at_r(labels)) < 4 * stderr


def test_cluster_kind_on_the_demo_model(setup):
    cfg, model, tok, kinds = setup
    kind = kinds["poj"]
    assert isinstance(kind, Cluster) and kind.temperature == cfg.train.retrieval_temperature
    rows = load_split(str(FIX / "poj104.jsonl"), "poj104").to_list()
    batch = kind.collate([kind.encode(r, tok, MAX_LEN) for r in rows], tok.pad_token_id)
    assert batch["input_ids"].shape == batch["positive_ids"].shape
    loss = model(kind, "poj", batch, DistContext())
    with torch.no_grad():
        za = model.embed("poj", batch["input_ids"], batch["attention_mask"]).double()
        zp = model.embed("poj", batch["positive_ids"], batch["positive_mask"]).double()
    z = torch.cat([za, zp]).numpy()
    y = batch["labels"].tolist() * 2
    assert float(loss.detach()) == pytest.approx(supcon_reference(z, y, kind.temperature), rel=1e-4)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in model.heads["poj"].parameters() for g in [g.grad])
    model.zero_grad(set_to_none=True)

    preds = kind.predict(model, "poj", batch)
    assert np.allclose(np.linalg.norm(np.array(preds), axis=1), 1.0, atol=1e-5)
    scored = kind.score(preds, rows)
    assert scored["metric"] == "map_at_r" and scored["chance"] == pytest.approx(0.25)
    assert scored["value"] == pytest.approx(map_at_r(np.array(preds), [r["label"] for r in rows]))
    # embeddings that separate the classes perfectly score 1
    perfect = [[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 1.0, 0], [0, 0, 1.0]]
    assert kind.score(perfect, rows)["value"] == 1.0


# ---- program synthesis ---------------------------------------------------------------------------

def test_program_synthesis_encoding_masks_the_prompt(setup):
    _, _, tok, kinds = setup
    kind = kinds["apps"]
    rows = load_split(str(FIX / "apps.jsonl"), "apps").to_list()
    item = kind.encode(rows[0], tok, MAX_LEN)
    prompt_text = "### Instruction:\nRead an integer n and print n + 1.\nUse Standard Input format\n### Response:\n"
    prompt = [tok.bos_token_id] + tok(prompt_text, add_special_tokens=False)["input_ids"]
    target = tok("n = int(input())\nprint(n + 1)", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert item["ids"] == prompt + target and item["prompt"] == prompt
    batch = kind.collate([item, kind.encode(rows[1], tok, MAX_LEN)], tok.pad_token_id)
    labels = batch["labels"][0]
    assert labels[: len(prompt)].eq(-100).all() and labels[len(prompt): len(prompt) + len(target)].tolist() == target
    # generation prompts are left-padded so every row's new tokens start at the same column
    assert batch["prompt_ids"][0, -len(prompt):].tolist() == prompt


def test_program_synthesis_loss_is_the_response_cross_entropy(setup):
    _, model, tok, kinds = setup
    kind = kinds["apps"]
    rows = load_split(str(FIX / "apps.jsonl"), "apps").to_list()[:2]
    items = [kind.encode(r, tok, MAX_LEN) for r in rows]
    batch = kind.collate(items, tok.pad_token_id)
    loss = kind.loss(model, "apps", batch, DistContext())
    per_example = []
    for it in items:
        with torch.no_grad():
            logits = model.lm_logits(torch.tensor([it["ids"]]), torch.ones(1, len(it["ids"]), dtype=torch.long),
                                     task="apps")[0].double()
        logp = logits.log_softmax(-1)
        nll = [-float(logp[j - 1, it["ids"][j]]) for j in range(it["prompt_len"], len(it["ids"]))]
        per_example.append(sum(nll) / len(nll))
    assert float(loss.detach()) == pytest.approx(sum(per_example) / len(per_example), rel=1e-4)


def test_program_synthesis_sampling_is_seeded_and_leaves_the_rng_alone(setup):
    _, model, tok, kinds = setup
    kind = kinds["apps"]
    rows = load_split(str(FIX / "apps.jsonl"), "apps").to_list()[:2]
    batch = kind.collate([kind.encode(r, tok, MAX_LEN) for r in rows], tok.pad_token_id)
    torch.manual_seed(123)
    first = kind.predict(model, "apps", batch)
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), after)  # sampling ran on a forked RNG
    assert kind.predict(model, "apps", batch) == first
    assert len(first) == 2 and all(len(s) == ps.SAMPLES and all(isinstance(x, str) for x in s) for s in first)
    # the uncached sampler (prompt/prefix tuners) draws SAMPLES continuations per prompt too
    new = kind._sample_uncached(model, "apps", batch["prompt_ids"], batch["prompt_attention"], synced=False)
    assert new.shape[0] == 2 * ps.SAMPLES and new.shape[1] <= kind.max_new_tokens


def test_program_synthesis_score_runs_the_tests(monkeypatch):
    monkeypatch.setattr(ps, "TEST_TIMEOUT_S", 1.0)  # the infinite loop below costs one timeout
    kind = ps.ProgramSynthesis(max_new_tokens=8)
    rows = load_split(str(FIX / "apps.jsonl"), "apps").to_list()
    right_stdin, wrong_stdin = "n = int(input())\nprint(n + 1)", "print(2)"  # print(2) passes test 1 only
    right_call = "class Solution:\n    def total(self, xs):\n        return sum(xs)"
    wrong_call = "class Solution:\n    def total(self, xs):\n        return len(xs)"
    preds = [[right_stdin, wrong_stdin, "while True: pass", right_stdin, "raise SystemExit(1)"],
             [wrong_call, wrong_call, right_call, wrong_call, "syntax error here"],
             ["print('hello')"] * 5]
    got = kind.score(preds, rows)
    # problem 0: 2 of 5 pass; problem 1: 1 of 5; problem 2 has no tests and is not scored
    p1 = (2 / 5 + 1 / 5) / 2
    p2 = ((1 - math.comb(3, 2) / math.comb(5, 2)) + (1 - math.comb(4, 2) / math.comb(5, 2))) / 2
    assert got["metric"] == "pass@1" and got["chance"] == 0.0
    assert got["value"] == pytest.approx(p1)
    assert got["pass@k"]["2"] == pytest.approx(p2) and got["pass@k"]["5"] == pytest.approx(1.0)
    assert (got["problems_scored"], got["problems_without_tests"]) == (2, 1)
    assert got["sample_status"]["pass"] == 3
    assert got["samples"][0] == {"problem_id": "0", "program": right_stdin, "status": "pass"}
    assert got["samples"][1] == {"problem_id": "1", "program": wrong_call, "status": "wrong"}


def test_extract_program_and_nucleus():
    assert ps.extract_program("Here:\n```python\nprint(1)\n```\nDone") == "print(1)"
    assert ps.extract_program("```\nx = 1\n") == "x = 1"
    assert ps.extract_program("print(2)\n") == "print(2)"
    kept = ps.nucleus(torch.tensor([[0.15, 0.5, 0.05, 0.3]]), 0.8)
    assert kept[0].tolist() == pytest.approx([0.0, 0.625, 0.0, 0.375])


def test_kinds_are_registered_and_checked_against_formats():
    cfg = kinds_config()
    assert [make_kind(t, cfg.train).name for t in cfg.tasks] == ["cluster", "program_synthesis"]
    raw = {"model": {"name_or_path": DEMO_MODEL},
           "tasks": [{"name": "poj", "kind": "retrieve", "format": "poj104",
                      "train": str(FIX / "poj104.jsonl"), "eval": str(FIX / "poj104.jsonl")}]}
    with pytest.raises(ConfigError, match="format poj104 gives cluster examples, but kind is retrieve"):
        from_dict(raw)


# ---- cluster loss across 2 real processes (gloo): the all-gather path of contract 2 -------------

class TinyEmbedder(torch.nn.Module):
    """Stands in for MultitaskModel.embed: mean-pooled embeddings, L2-normalised."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(40, 8)

    def embed(self, task, ids, mask):
        m = mask.unsqueeze(-1).float()
        return torch.nn.functional.normalize((self.emb(ids) * m).sum(1) / m.sum(1), dim=-1)


def cluster_items():
    g = torch.Generator().manual_seed(1)
    labels = [0, 1, 0, 2, 1, 3, 2, 0]
    return [{"ids": torch.randint(1, 40, (int(n),), generator=g).tolist(),
             "pos": torch.randint(1, 40, (int(m),), generator=g).tolist(), "label": y}
            for n, m, y in zip(torch.randint(2, 7, (8,), generator=g), torch.randint(2, 7, (8,), generator=g), labels)]


def _cluster_rank(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model, kind = TinyEmbedder(), Cluster(temperature=0.1)
    items = cluster_items()
    per = len(items) // world
    loss = kind.loss(model, "t", kind.collate(items[rank * per:(rank + 1) * per], 0), DistContext(rank, world))
    loss.backward()
    grad = model.emb.weight.grad
    dist.all_reduce(grad)  # data parallelism: the mean of the ranks' gradients
    value = loss.detach().clone()
    dist.all_reduce(value)
    if rank == 0:
        torch.save({"loss": value / world, "grad": grad / world}, out)
    dist.barrier()  # no rank tears gloo down while a peer still uses it
    dist.destroy_process_group()
    # gloo's threads can abort a normal interpreter exit ("terminate called without an active
    # exception", about 1 run in 3 here): the work is saved, so leave without finalizers
    os._exit(0)


@pytest.mark.distributed
def test_cluster_loss_and_gradient_are_the_same_on_two_ranks(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "two_ranks.pt")
    # fork: the children need nothing re-imported (spawn would re-import transformers: ~20 s on 2 cores)
    mp.start_processes(_cluster_rank, args=(2, port, out), nprocs=2, join=True, start_method="spawn")
    two = torch.load(out)
    model, kind = TinyEmbedder(), Cluster(temperature=0.1)
    loss = kind.loss(model, "t", kind.collate(cluster_items(), 0), DistContext(0, 1))
    loss.backward()
    assert float(two["loss"]) == pytest.approx(float(loss.detach()), rel=1e-5)
    torch.testing.assert_close(two["grad"], model.emb.weight.grad, rtol=1e-4, atol=1e-6)
