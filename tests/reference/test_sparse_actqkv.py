"""ActQKV (arXiv 2502.13542): activation-bias probe query, block retrieval, entropy cut-off.

Independent references: the deviations, representatives and cosines recomputed token by token
with Python loops, the pooled statistics from ``np.mean``/``np.var`` of the concatenated
queries, block rankings by Python's ``sorted``, and the full-cache engine for the dense case.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from _sparse_views import SMALL, random_view, sets
from hypothesis import given, settings
from hypothesis import strategies as st

from qkv.errors import ParameterError
from qkv.lab import decoder as dec
from qkv.lab import engine
from qkv.reference.sparse import ActQKV, actqkv
from qkv.reference.sparse.actqkv_probe import (
    _read_mask_slots,
    activation_bias,
    activation_weights,
    block_representatives,
    block_scores,
    dynamic_k,
    probe_query,
    query_stats,
)


def test_catalog_id_and_official_defaults():
    assert actqkv is ActQKV
    s = ActQKV()
    got = (s.n_init, s.n_local, s.block_size, s.top_k, s.min_k, s.repr_topk)
    assert got == (64, 512, 32, 46, 32, 4)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), W=st.integers(1, 6), F=st.integers(1, 5))
def test_activation_bias_matches_a_loop(seed, W, F):
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((2, W, F)) * rng.uniform(0.1, 5, F)
    stats = query_stats(rng.standard_normal((2, 7, F)))
    dev = activation_bias(h, stats)
    for b in range(2):
        vbar = sum(stats.var[b]) / F
        for i in range(W):
            want = (
                sum(
                    (h[b, i, f] - stats.mean[b, f]) ** 2 / (stats.var[b, f] + vbar / 100)
                    for f in range(F)
                )
                / F
            )
            assert math.isclose(dev[b, i], want, rel_tol=1e-10)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), sizes=st.lists(st.integers(1, 5), min_size=1, max_size=4))
def test_running_statistics_equal_the_pooled_ones(seed, sizes):
    rng = np.random.default_rng(seed)
    windows = [rng.standard_normal((2, n, 3)) * 4 + 1 for n in sizes]
    stats = query_stats(windows[0])
    for w in windows[1:]:
        stats = stats.update(w)
    allq = np.concatenate(windows, axis=1)
    assert stats.count == allq.shape[1]
    np.testing.assert_allclose(stats.mean, allq.mean(axis=1), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.var, allq.var(axis=1), rtol=1e-10, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), pairs=st.integers(1, 4), F=st.integers(1, 6))
def test_uniform_activation_gives_uniform_weights_and_the_mean_probe(seed, pairs, F):
    # tokens mu + c and mu - c: every token deviates from the window statistics equally
    rng = np.random.default_rng(seed)
    mu, c = rng.standard_normal((1, 1, F)), rng.standard_normal((1, 1, F)) + 0.1
    signs = rng.permutation(np.repeat([1.0, -1.0], pairs))[None, :, None]
    h = mu + signs * c  # (1, 2 * pairs, F)
    w = activation_weights(activation_bias(h, query_stats(h)))
    np.testing.assert_allclose(w, 1 / (2 * pairs), rtol=1e-12)
    np.testing.assert_allclose(probe_query(h, w), h.mean(axis=1), atol=1e-12)


def test_identical_tokens_give_uniform_weights_not_nan():
    h = np.ones((1, 4, 3))
    w = activation_weights(activation_bias(h, query_stats(h)))
    np.testing.assert_array_equal(w, 0.25)


def test_an_anchor_token_dominates_the_probe():
    rng = np.random.default_rng(0)
    h = rng.standard_normal((1, 8, 16)) * 0.1
    h[0, 5] += 4.0  # the anchor
    w = activation_weights(activation_bias(h, query_stats(h)))
    assert np.argmax(w[0]) == 5 and w[0, 5] > 0.5
    assert math.isclose(w.sum(), 1.0)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    T=st.integers(1, 13),
    bs=st.integers(1, 5),
    r=st.integers(1, 6),
)
def test_representatives_are_the_mean_of_the_most_important_keys(seed, T, bs, r):
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((1, T, 3))
    imp = rng.integers(0, 3, (1, T)).astype(float)  # ties: the earlier key wins
    reps = block_representatives(keys, imp, block_size=bs, repr_topk=r)
    assert reps.shape == (1, -(-T // bs), 3)
    for b in range(reps.shape[1]):
        members = range(b * bs, min((b + 1) * bs, T))
        best = sorted(members, key=lambda j: (-imp[0, j], j))[:r]
        np.testing.assert_allclose(reps[0, b], keys[0, best].mean(axis=0), atol=1e-12)


def test_block_scores_are_cosines():
    rng = np.random.default_rng(1)
    reps, probe = rng.standard_normal((2, 5, 4)), rng.standard_normal((2, 4))
    reps[1, 2] = 0
    s = block_scores(reps, probe)
    for b in range(2):
        for n in range(5):
            a, p = reps[b, n], probe[b]
            na = math.sqrt(sum(x * x for x in a))
            want = 0.0 if na == 0 else sum(a * p) / (na * math.sqrt(sum(p * p)))
            assert math.isclose(s[b, n], want, abs_tol=1e-12)


def test_peaked_scores_give_min_k_and_flat_scores_give_top_k():
    peaked = np.array([[50.0, 0, 0, 0, 0, 0, 0, 0]])
    flat = np.full((1, 8), 0.3)
    k, eta = dynamic_k(peaked, min_k=2, top_k=7)
    assert k[0] == 2 and eta[0] < 1e-12
    k, eta = dynamic_k(flat, min_k=2, top_k=7)
    assert k[0] == 7 and math.isclose(eta[0], 1.0)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), nb=st.integers(2, 12), t=st.floats(0.05, 5))
def test_cut_off_follows_the_normalised_entropy(seed, nb, t):
    s = np.random.default_rng(seed).uniform(-1, 1, (3, nb))
    k, eta = dynamic_k(s, min_k=1, top_k=nb, temperature=t)
    for b in range(3):
        z = [math.exp(x / t) for x in s[b]]
        p = [x / sum(z) for x in z]
        h = -sum(x * math.log(x) for x in p if x > 0) / math.log(nb)
        assert math.isclose(eta[b], h, rel_tol=1e-9, abs_tol=1e-12)
        assert k[b] == 1 + round(h * (nb - 1))
    # sharper (smaller temperature) never reads more blocks
    k_sharp, _ = dynamic_k(s, min_k=1, top_k=nb, temperature=t / 10)
    assert np.all(k_sharp <= k)


def _official_like(**kw):
    base = dict(n_init=2, n_local=3, block_size=4, top_k=3, min_k=1, repr_topk=2)
    return ActQKV(**{**base, **kw})


def test_selection_is_sinks_local_and_the_best_scored_blocks():
    rng = np.random.default_rng(2)
    v = random_view(rng, C=40, length=37)  # middle: slots 2..33, 8 blocks of 4
    sel = _official_like()
    slots = sel.select(0, v)
    assert (slots == slots[:, :1]).all()  # every head reads the same set
    # recompute the scores independently (window = the current query)
    B, H = v.queries.shape[:2]
    keys = np.repeat(v.keys, H // v.keys.shape[1], axis=1)
    for b, got in enumerate(sets(slots[:, 0])):
        probe = v.queries[b, :, 0].reshape(-1)
        logits = np.einsum("hd,hcd->hc", v.queries[b, :, 0], keys[b, :, :37]) / math.sqrt(8)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        imp = (p / p.sum(-1, keepdims=True)).sum(0)
        scores = []
        for blk in range(8):
            members = range(2 + 4 * blk, 6 + 4 * blk)
            best = sorted(members, key=lambda j: (-imp[j], j))[:2]
            rep = np.mean([keys[b, :, j].reshape(-1) for j in best], axis=0)  # heads concatenated
            scores.append(rep @ probe / (np.linalg.norm(rep) * np.linalg.norm(probe)))
        k = sel.chosen_k[b][1]
        top = sorted(range(8), key=lambda i: -scores[i])[:k]
        want = {0, 1, 34, 35, 36} | {2 + 4 * i + j for i in top for j in range(4)}
        assert got == want


def test_reading_every_block_is_the_full_cache():
    v = random_view(np.random.default_rng(3), C=30)
    k = np.array([7, 7])  # all 7 blocks of the middle 2..27
    slots = _read_mask_slots(np.zeros((2, 7)), k, 30, 30, _official_like(block_size=4))
    assert all(s == set(range(30)) for s in sets(slots))
    flat = _official_like(top_k=7, min_k=1, temperature=1e6).select(0, v)
    assert all(s == set(range(30)) for s in sets(flat))


@pytest.fixture(scope="module")
def model():
    return dec.init_weights(SMALL, seed=5)


def test_all_blocks_selected_equals_full_attention_in_the_engine(model):
    prompt = np.random.default_rng(0).integers(0, SMALL.vocab, size=(2, 40))
    full = engine.generate(model, prompt, 4)
    sel = ActQKV(n_init=2, n_local=4, block_size=4, top_k=10, min_k=1, temperature=1e6)
    got = engine.generate(model, prompt, 4, selector=sel)
    # the scoring path ran, choosing every block: 9, 9 and 10 of them at lengths 41, 42, 43
    assert [k for _, k, _ in sel.chosen_k] == [9] * 6 + [9] * 6 + [10] * 6
    np.testing.assert_allclose(got.logits, full.logits, rtol=1e-5, atol=1e-5)


def test_runs_sparse_in_the_engine_with_a_window(model):
    prompt = np.random.default_rng(1).integers(0, SMALL.vocab, size=(1, 70))
    sel = ActQKV(n_init=2, n_local=6, block_size=4, top_k=4, min_k=2, window=3)
    g = engine.generate(model, prompt, 6, selector=sel)
    assert g.tokens.shape == (1, 6)
    assert {layer for layer, _, _ in sel.chosen_k} == {0, 1, 2}
    assert all(2 <= k <= 4 for _, k, _ in sel.chosen_k)
    assert sel._state["layers"][0]["h"].shape[2] == 3  # the window holds the last 3 queries
    assert sel._state["layers"][0]["stats"].count == 5  # every decoded query pooled


def test_kv_eval_knows_actqkv():
    from qkv.lab import kv_eval

    assert isinstance(kv_eval.METHODS["actqkv"](32), ActQKV)


def test_top_k_above_the_blocks_is_rejected():
    with pytest.raises(ParameterError, match="top_k: expected at most the 4 blocks"):
        dynamic_k(np.zeros((1, 4)), min_k=1, top_k=5)


@pytest.mark.parametrize("field", ["block_size", "top_k", "min_k", "repr_topk", "window"])
def test_non_positive_counts_are_rejected(field):
    with pytest.raises(ParameterError, match=field):
        ActQKV(**{field: 0})


def test_block_size_below_one_is_rejected_by_the_pure_function():
    with pytest.raises(ParameterError, match="block_size"):
        block_representatives(np.zeros((1, 4, 2)), np.zeros((1, 4)), block_size=0, repr_topk=1)


def test_min_k_above_top_k_and_bad_temperature_are_rejected():
    with pytest.raises(ParameterError, match="min_k: expected at most top_k=3"):
        ActQKV(top_k=3, min_k=4)
    for t in (0.0, -1.0, float("nan"), True):
        with pytest.raises(ParameterError, match="temperature"):
            ActQKV(temperature=t)


def test_non_finite_queries_and_scores_are_rejected():
    h = np.zeros((1, 3, 2))
    h[0, 1, 0] = np.nan
    with pytest.raises(ParameterError, match="queries: expected finite"):
        query_stats(h)
    with pytest.raises(ParameterError, match="scores: expected finite"):
        dynamic_k(np.array([[0.0, np.inf]]), min_k=1, top_k=2)


def test_heads_holding_different_tokens_are_rejected():
    v = random_view(np.random.default_rng(6), C=20)
    v.indices[0, 1, -1] = -1
    with pytest.raises(ParameterError, match="same tokens"):
        _official_like().select(0, v)
