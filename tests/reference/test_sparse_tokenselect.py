"""TokenSelect (arXiv 2411.02886): soft voting over heads, sinks + top-k + local, selection cache.

Independent references: the votes recomputed head by head with an explicit loop, the top-k
picked by Python's ``sorted``, and the full-cache engine run for the dense fallback.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from _sparse_views import SMALL, random_view, sets, view
from hypothesis import given, settings
from hypothesis import strategies as st

from qkv.errors import ParameterError
from qkv.lab import decoder as dec
from qkv.lab import engine
from qkv.reference.sparse import TokenSelect, tokenselect
from qkv.reference.sparse.decode_scores import head_scores
from qkv.reference.sparse.tokenselect_selector import soft_vote, tokenselect_slots


def loop_votes(q, keys, group, candidates):
    """Votes v_j, one head and one candidate at a time."""
    votes = dict.fromkeys(candidates, 0.0)
    for h in range(q.shape[0]):
        logits = {j: float(q[h] @ keys[h // group, j]) for j in candidates}
        top = max(logits.values())
        total = sum(math.exp(s - top) for s in logits.values())
        for j in candidates:
            votes[j] += math.exp(logits[j] - top) / total
    return votes


def test_catalog_id_and_official_defaults():
    assert tokenselect is TokenSelect
    s = TokenSelect()
    assert (s.n_init, s.n_local, s.top_k, s.threshold) == (128, 512, 2048, 0.9)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n_init=st.integers(0, 4),
    n_local=st.integers(1, 6),
    top_k=st.integers(1, 10),
)
def test_selection_is_sinks_local_and_the_best_voted(seed, n_init, n_local, top_k):
    rng = np.random.default_rng(seed)
    length = 30
    v = random_view(rng, C=34, length=length)
    slots = tokenselect_slots(
        head_scores(v), length, n_init=n_init, n_local=n_local, top_k=top_k
    )  # (B, S)
    for b, got in enumerate(sets(slots)):
        cand = range(n_init, length - n_local)
        votes = loop_votes(v.queries[b, :, 0], v.keys[b], 2, cand)
        best = sorted(cand, key=lambda j: -votes[j])[:top_k]
        want = set(range(n_init)) | set(best) | set(range(length - n_local, length))
        assert got == want
        assert len(got) == n_init + top_k + n_local


def test_soft_vote_sums_to_the_number_of_heads_and_ignores_non_candidates():
    rng = np.random.default_rng(1)
    s = rng.standard_normal((2, 5, 9)) * 30  # large logits: stable softmax needed
    s[..., :2] = -np.inf
    v = soft_vote(s)
    np.testing.assert_allclose(v.sum(-1), 5.0)
    assert (v[:, :2] == 0).all()
    assert np.isfinite(v).all()


def test_all_heads_read_the_same_slots():
    v = random_view(np.random.default_rng(2), C=50)
    out = TokenSelect(n_init=2, n_local=4, top_k=5, cache_selection=False).select(0, v)
    assert out.shape == (2, 4, 11)
    assert (out == out[:, :1]).all()


def test_selection_cache_reuses_the_top_k_for_similar_queries():
    rng = np.random.default_rng(3)
    keys = rng.standard_normal((1, 2, 41, 8))
    q = rng.standard_normal((1, 4, 1, 8))
    sel = TokenSelect(n_init=1, n_local=2, top_k=4, threshold=0.9)
    first = sel.select(0, view(q, keys, 40))
    # next step: one more token, a nearly identical query, but new keys in the middle that the
    # fresh vote would prefer; the cached top-k must be kept
    keys2 = keys.copy()
    keys2[0, :, 10] = 50 * q[0, ::2, 0]
    second = sel.select(0, view(q * 1.001, keys2, 41))
    middle = lambda s: {j for j in sets(s[:, 0])[0] if 1 <= j < 38}  # noqa: E731
    assert middle(second) == middle(first) and 10 not in middle(second)
    assert sel.hit_rate == 1.0
    # a dissimilar query misses and recomputes: slot 10 is now the clear favourite
    # a dissimilar query misses: the selection is the fresh one
    v3 = view(-q, np.concatenate([keys2, -keys2[:, :, :1]], 2), 42)
    third = sel.select(0, v3)
    assert sel.hit_rate == 0.5
    fresh = TokenSelect(n_init=1, n_local=2, top_k=4, cache_selection=False).select(0, v3)
    np.testing.assert_array_equal(third, fresh)


def test_cache_off_never_hits():
    rng = np.random.default_rng(4)
    keys = rng.standard_normal((1, 2, 41, 8))
    q = rng.standard_normal((1, 4, 1, 8))
    sel = TokenSelect(n_init=1, n_local=2, top_k=4, cache_selection=False)
    sel.select(0, view(q, keys, 40))
    sel.select(0, view(q, keys, 41))
    assert sel.hit_rate == 0.0


@pytest.fixture(scope="module")
def model():
    return dec.init_weights(SMALL, seed=5)


def test_budget_covering_the_cache_is_full_attention(model):
    prompt = np.random.default_rng(0).integers(0, SMALL.vocab, size=(2, 20))
    full = engine.generate(model, prompt, 5)
    sel = engine.generate(model, prompt, 5, selector=TokenSelect(n_init=4, n_local=8, top_k=12))
    np.testing.assert_allclose(sel.logits, full.logits, rtol=1e-5, atol=1e-5)


def test_runs_sparse_in_the_engine_and_reports_hits(model):
    prompt = np.random.default_rng(1).integers(0, SMALL.vocab, size=(1, 60))
    s = TokenSelect(n_init=2, n_local=8, top_k=8, threshold=-1.0)
    g = engine.generate(model, prompt, 6, selector=s)
    assert g.tokens.shape == (1, 6)
    # threshold -1: every step after the first reuses, per layer (5 steps x 3 layers lookups)
    assert s.hit_rate == 1.0 and s._state["lookups"] == 4 * 3


@pytest.mark.parametrize("threshold", [1.5, -1.01, "0.9", True])
def test_threshold_outside_minus_one_one_is_rejected(threshold):
    with pytest.raises(ParameterError, match="threshold"):
        TokenSelect(threshold=threshold)


def test_top_k_above_the_cache_is_rejected():
    v = random_view(np.random.default_rng(5), C=20)
    with pytest.raises(ParameterError, match="top_k: expected at most the 14 keys"):
        tokenselect_slots(head_scores(v), 20, n_init=2, n_local=4, top_k=15)


@pytest.mark.parametrize("field", ["top_k", "n_local"])
def test_non_positive_counts_are_rejected(field):
    with pytest.raises(ParameterError, match=field):
        TokenSelect(**{field: 0})


def test_heads_holding_different_tokens_are_rejected():
    v = random_view(np.random.default_rng(6), C=20)
    v.indices[0, 1, -1] = -1
    with pytest.raises(ParameterError, match="same tokens"):
        TokenSelect(n_init=1, n_local=1, top_k=2).select(0, v)
