"""The retrieval task's MRR with tasks[i].top_k: CodeXGLUE AdvTest's top-100 rule, and the config key."""

import numpy as np
import pytest

from mtpeft.tasks.retrieval import Retrieve


def _advtest_mrr(q: np.ndarray, c: np.ndarray, top_k: int | None) -> float:
    """AdvTest's evaluator written out: each query submits its candidates sorted by score, the answer's
    rank in the submitted list counts 1/rank, 0 when it is not in the first top_k."""
    order = np.argsort(-(q @ c.T), axis=1)
    ranks = np.array([list(order[i]).index(i) + 1 for i in range(len(q))])
    keep = ranks <= (top_k or len(c))
    return float(np.mean(np.where(keep, 1.0 / ranks, 0.0)))


@pytest.mark.parametrize("top_k", [None, 100, 7])
def test_score_uses_top_k_like_advtest(top_k):
    rng = np.random.default_rng(3)
    q, c = rng.standard_normal((150, 8)), rng.standard_normal((150, 8))  # no ties, more than 100 candidates
    got = Retrieve(top_k=top_k).score([(qi.tolist(), ci.tolist()) for qi, ci in zip(q, c)], [{}] * 150)
    assert got["value"] == pytest.approx(_advtest_mrr(q, c, top_k), rel=1e-9)
    assert got["top_k"] == top_k and ("every rank" in got["convention"]) == (top_k is None)


def test_config_top_k_is_a_positive_integer_or_null(tmp_path):
    from distributed import tiny_config
    from mtpeft.config import load_config
    from mtpeft.errors import ConfigError
    from mtpeft.tasks.kinds import make_kind

    path = tiny_config(tmp_path)
    search = lambda cfg: [t for t in cfg.tasks if t.name == "search"][0]  # noqa: E731
    assert search(load_config(path)).top_k is None
    cfg = load_config(path, ["tasks.search.top_k=100"])
    assert make_kind(search(cfg), cfg.train).top_k == 100
    for bad in ("0", "-3", "true", "ten", "2.5"):
        with pytest.raises(ConfigError, match=r"tasks\[2\]\.top_k must be a positive integer or null"):
            load_config(path, [f"tasks.search.top_k={bad}"])
