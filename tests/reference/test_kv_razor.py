"""RazorAttention (arXiv 2407.15891): retrieval heads by echo/induction, compensation token.

Independent references: attention maps built by hand with known echo/induction mass, explicit
loops over the (i, j) pairs, a full-cache :func:`qkv.sdpa`, and the lab engine.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qkv
from qkv.errors import ParameterError, ShapeError
from qkv.lab import decoder as dec
from qkv.lab import engine
from qkv.reference.kv import CacheView, Razor, razor
from qkv.reference.kv.razor_policy import (
    compensated_attention,
    head_scores,
    per_kv_head,
    repeated_tokens,
    retrieval_heads,
)


def view(n=30, B=1, H=4, Hkv=2, D=8, seed=0, keys=None):
    rng = np.random.default_rng(seed)
    idx = np.broadcast_to(np.arange(n), (B, Hkv, n)).copy()
    return CacheView(
        keys=rng.standard_normal((B, Hkv, n, D)) if keys is None else keys,
        values=rng.standard_normal((B, Hkv, n, D)),
        indices=idx,
        positions=idx.copy(),
        next_position=np.full((B, Hkv), n),
        n_tokens=n,
        queries=rng.standard_normal((B, H, 1, D)),
    )


def test_catalog_id_and_defaults():
    assert razor is Razor
    p = Razor()
    assert (p.local_capacity, p.n_sink, p.weighting, p.recent) == (256, 4, "count", 251)


def test_repeated_tokens_layout():
    t = repeated_tokens(np.random.default_rng(0), period=5, repeats=3, low=60, high=128, bos=1)
    assert t.shape == (16,) and t[0] == 1
    assert (t[1:6] == t[6:11]).all() and (t[6:11] == t[11:]).all()
    assert t[1:].min() >= 60 and t[1:].max() < 128


def test_scores_of_ideal_echo_and_induction_heads():
    T, R = 6, 3
    S = 1 + T * R
    maps = np.zeros((3, S, S))
    for i in range(S):
        maps[2, i, 0] = 1.0  # a sink head
        if i > T:
            maps[0, i, i - T] = 1.0  # echo: the previous copy of the same token
            maps[1, i, i - T + 1] = 1.0  # induction: the token after it
        else:
            maps[0, i, 0] = maps[1, i, 0] = 1.0
    echo, ind = head_scores(maps, T)
    assert echo.argmax() == 0 and ind.argmax() == 1
    assert echo[2] == 0 and ind[2] == 0


@settings(max_examples=25, deadline=None)
@given(T=st.integers(1, 5), R=st.integers(2, 3), seed=st.integers(0, 99))
def test_scores_match_a_loop_over_pairs(T, R, seed):
    S = 1 + T * R
    a = np.tril(np.random.default_rng(seed).random((2, S, S)))
    a /= a.sum(-1, keepdims=True)
    echo, ind = head_scores(a, T)
    pairs = [(i, j) for i in range(1, S) for j in range(1, i) if (i - j) % T == 0]
    np.testing.assert_allclose(echo, [np.mean([h[i, j] for i, j in pairs]) for h in a])
    np.testing.assert_allclose(ind, [np.mean([h[i, j + 1] for i, j in pairs]) for h in a])


def test_retrieval_heads_take_top_shares():
    echo = np.array([[0.9, 0.1], [0.2, 0.3]])
    ind = np.array([[0.0, 0.1], [0.8, 0.7]])
    assert retrieval_heads(echo, ind, echo_ratio=0.01, induction_ratio=0.14) == ((0, 0), (1, 0))
    assert retrieval_heads(echo, ind, echo_ratio=0.0, induction_ratio=0.5) == ((1, 0), (1, 1))
    assert per_kv_head(np.array([[1, 5, 2, 0]]), 2).tolist() == [[5, 2]]


def test_nothing_changes_when_the_cache_fits():
    c = view(n=20)
    kept = Razor(local_capacity=20).compress(0, c)
    np.testing.assert_array_equal(kept.indices, c.indices)
    np.testing.assert_array_equal(kept.keys, c.keys)
    assert (kept.extra["log_weight"] == 0).all() and (kept.extra["dropped"] == 0).all()


@pytest.mark.parametrize("weighting", ["count", "mean"])
def test_layout_and_compensation_token_is_the_mean_of_dropped(weighting):
    c = view(n=30, seed=1)
    kept = Razor(retrieval=((0, 1),), local_capacity=8, n_sink=2, weighting=weighting).compress(
        0, c
    )
    row = kept.indices[0, 0]
    assert row.tolist()[:8] == [0, 1, 2, 25, 26, 27, 28, 29]
    dropped = list(range(2, 25))
    np.testing.assert_allclose(kept.keys[0, 0, 2], c.keys[0, 0, dropped].mean(0))
    np.testing.assert_allclose(kept.values[0, 0, 2], c.values[0, 0, dropped].mean(0))
    np.testing.assert_array_equal(kept.keys[0, 0, 3:8], c.keys[0, 0, 25:])
    np.testing.assert_array_equal(kept.indices[0, 1], np.arange(30))  # retrieval head: all
    np.testing.assert_array_equal(kept.keys[0, 1], c.keys[0, 1])
    want = np.log(23) if weighting == "count" else 0.0
    assert kept.extra["dropped"].tolist() == [[23, 0]]
    np.testing.assert_allclose(kept.extra["log_weight"][0, 0, 2], want)
    assert np.count_nonzero(kept.extra["log_weight"]) == (weighting == "count")


@settings(max_examples=25, deadline=None)
@given(n=st.integers(9, 30), cap=st.integers(4, 8), seed=st.integers(0, 99))
def test_count_weighting_is_exact_when_dropped_keys_are_equal(n, cap, seed):
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((1, 2, n, 8))
    keys[:, :, 2 : n - (cap - 3)] = keys[:, :, 2:3]  # every dropped key the same
    c = view(n=n, keys=keys, seed=seed)
    q = rng.standard_normal((1, 4, 3, 8))
    full = qkv.sdpa(q, np.repeat(c.keys, 2, 1), np.repeat(c.values, 2, 1))
    kept = Razor(local_capacity=cap, n_sink=2).compress(0, c)
    np.testing.assert_allclose(compensated_attention(q, kept), full, rtol=1e-10, atol=1e-12)
    plain = Razor(local_capacity=cap, n_sink=2, weighting="mean").compress(0, c)
    if n - cap > 0:  # more than one token dropped: the plain mean token under-weights them
        assert not np.allclose(compensated_attention(q, plain), full)


def test_runs_in_the_engine():
    model = dec.init_weights(dec.DecoderConfig(n_layers=2, d_model=64, d_ff=96, max_len=96), 1)
    p = np.random.default_rng(0).integers(0, 128, size=50)
    policy = Razor(retrieval=((1, 0),), local_capacity=12)
    g = engine.generate(model, p, 3, policy=policy)
    lengths = g.cache.lengths()[:, 0]  # (L, Hkv) after 2 decoded tokens
    assert lengths.tolist() == [[14, 14], [52, 14]]


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"local_capacity": 5, "n_sink": 4}, "local_capacity"),
        ({"local_capacity": 0}, "local_capacity"),
        ({"n_sink": -1}, "n_sink"),
        ({"weighting": "sum"}, "weighting"),
        ({"retrieval": ((0,),)}, "retrieval"),
        ({"retrieval": ((0, -1),)}, "retrieval"),
    ],
)
def test_bad_hyperparameters(kw, match):
    with pytest.raises(ParameterError, match=match):
        Razor(**kw)


def test_bad_head_search_and_cache():
    with pytest.raises(ParameterError, match="echo_ratio"):
        retrieval_heads(np.zeros((2, 2)), np.zeros((2, 2)), echo_ratio=1.5)
    with pytest.raises(ShapeError, match="echo, induction"):
        retrieval_heads(np.zeros((2, 2)), np.zeros((2, 3)))
    with pytest.raises(ShapeError, match="attention"):
        head_scores(np.zeros((4, 5)), 2)
    c = view(n=20)
    with pytest.raises(ParameterError, match="retrieval"):
        Razor(retrieval=((0, 5),), local_capacity=8).compress(0, c)
    wrong = CacheView(c.keys, c.values, c.indices[0], c.positions, c.next_position, 20, c.queries)
    with pytest.raises(ShapeError, match="Razor: cache indices"):
        Razor(local_capacity=8).compress(0, wrong)
