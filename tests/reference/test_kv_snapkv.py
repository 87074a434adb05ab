"""SnapKV (arXiv 2404.14469): observation-window votes, pooling, per-head top-k.

Independent references: an explicit per-head loop in float64 (softmax row by row, pooling by
hand), torch's ``avg_pool1d`` / ``max_pool1d``, and the lab engine's full-cache run.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from _kv_layouts import misshapen
from hypothesis import given, settings
from hypothesis import strategies as st

from qkv.errors import ParameterError, ShapeError
from qkv.lab import decoder as dec
from qkv.lab import engine
from qkv.reference.kv import CacheView, SnapKV, snapkv
from qkv.reference.kv.snapkv_policy import pool1d

CONFIG = dec.DecoderConfig(n_layers=2, d_model=64, d_ff=96, max_len=128)


@pytest.fixture(scope="module")
def model():
    return dec.init_weights(CONFIG, seed=5)


def view(n=40, B=1, H=4, Hkv=2, D=8, seed=0):
    rng = np.random.default_rng(seed)
    idx = np.broadcast_to(np.arange(n), (B, Hkv, n)).copy()
    return CacheView(
        keys=rng.standard_normal((B, Hkv, n, D)),
        values=rng.standard_normal((B, Hkv, n, D)),
        indices=idx,
        positions=idx.copy(),
        next_position=np.full((B, Hkv), n),
        n_tokens=n,
        queries=2 * rng.standard_normal((B, H, n, D)),
    )


def loop_votes(c: CacheView, w: int, kernel: int, pooling: str) -> np.ndarray:
    """Pooled prefix votes per query head, one row at a time (B = 1, full cache)."""
    _, H, n, D = c.queries.shape
    group = H // c.keys.shape[1]
    out = np.full((H, n), -np.inf)
    for h in range(H):
        k = c.keys[0, h // group]
        votes = np.zeros(n - w)
        for i in range(n - w, n):
            s = np.array([c.queries[0, h, i] @ k[j] / np.sqrt(D) for j in range(i + 1)])
            p = np.exp(s - s.max())
            votes += (p / p.sum())[: n - w]
        half = kernel // 2
        for j in range(n - w):
            lo, hi = j - half, j + half + 1
            part = votes[max(lo, 0) : min(hi, n - w)]
            out[h, j] = part.sum() / kernel if pooling == "avgpool" else part.max()
    return out


def test_catalog_id_and_defaults():
    assert snapkv is SnapKV
    p = SnapKV()
    assert (p.budget, p.window, p.kernel, p.pooling, p.gqa) == (2048, 32, 5, "avgpool", "query")
    assert not SnapKV.every_step  # prefill only


@pytest.mark.parametrize("pooling", ["avgpool", "maxpool"])
def test_votes_match_an_explicit_loop(pooling):
    c = view(n=30, seed=1)
    got = SnapKV(budget=12, window=6, kernel=5, pooling=pooling).votes(0, c)[0]
    np.testing.assert_allclose(got, loop_votes(c, 6, 5, pooling), rtol=1e-12, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 30),
    kernel=st.sampled_from([1, 3, 5, 7]),
    pooling=st.sampled_from(["avgpool", "maxpool"]),
    seed=st.integers(0, 99),
)
def test_pool_matches_torch(n, kernel, pooling, seed):
    x = np.random.default_rng(seed).standard_normal((2, n))
    t = torch.from_numpy(x)[:, None]
    fn = torch.nn.functional.avg_pool1d if pooling == "avgpool" else torch.nn.functional.max_pool1d
    want = fn(t, kernel, stride=1, padding=kernel // 2)[:, 0].numpy()
    np.testing.assert_allclose(pool1d(x, kernel, pooling), want, rtol=1e-12)


@pytest.mark.parametrize("gqa", ["mean", "query"])
def test_kept_tokens_are_the_window_and_the_top_votes(gqa):
    c = view(n=40, seed=2)
    w, budget = 5, 13
    kept = SnapKV(budget=budget, window=w, gqa=gqa, kernel=3).compress(0, c)
    ref = loop_votes(c, w, 3, "avgpool").reshape(2, 2, 40)  # (Hkv, group, n)
    for g in range(2):
        row = kept.indices[0, g]
        row = row[row >= 0]
        if gqa == "mean":
            top = np.argsort(-ref[g].mean(0), kind="stable")[: budget - w]
        else:
            top = np.concatenate([np.argsort(-r, kind="stable")[: budget - w] for r in ref[g]])
        want = np.union1d(top, np.arange(35, 40))
        np.testing.assert_array_equal(row, want)
        np.testing.assert_array_equal(kept.keys[0, g, : len(row)], c.keys[0, g, row])
    if gqa == "mean":
        assert (kept.indices >= 0).sum(-1).max() == budget


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(12, 40),
    w=st.integers(1, 8),
    extra=st.integers(1, 10),
    gqa=st.sampled_from(["mean", "query"]),
    pooling=st.sampled_from(["avgpool", "maxpool"]),
    seed=st.integers(0, 99),
)
def test_the_window_is_always_kept(n, w, extra, gqa, pooling, seed):
    c = view(n=n, seed=seed)
    kept = SnapKV(budget=w + extra, window=w, gqa=gqa, pooling=pooling).compress(0, c)
    for g in range(2):
        assert set(range(n - w, n)) <= set(kept.indices[0, g].tolist())
        count = (kept.indices[0, g] >= 0).sum()
        assert count <= (w + extra if gqa == "mean" else 2 * extra + w)
        assert count == min(n, w + extra) or gqa == "query"


@pytest.mark.parametrize("gqa", ["mean", "query"])
def test_budget_at_least_length_is_full_attention(model, gqa):
    p = np.random.default_rng(0).integers(0, CONFIG.vocab, size=24)
    full, c_full = engine.prefill(model, p)
    _, c_kept = engine.prefill(model, p, policy=SnapKV(budget=24, window=4, gqa=gqa))
    for a, b in zip(c_full.layers, c_kept.layers, strict=True):
        np.testing.assert_array_equal(a.indices, b.indices)
        np.testing.assert_array_equal(a.keys, b.keys)
    want, _ = engine.decode_step(model, c_full, np.array([7]))
    got, _ = engine.decode_step(model, c_kept, np.array([7]))
    np.testing.assert_array_equal(got, want)


def test_engine_compresses_after_prefill_only(model):
    p = np.random.default_rng(1).integers(0, CONFIG.vocab, size=60)
    g = engine.generate(model, p, 4, policy=SnapKV(budget=20, window=6, gqa="mean"))
    for layer in g.cache.layers:  # 20 kept, then 3 decoded tokens appended
        assert (layer.lengths == 23).all()
        assert set(range(54, 63)) <= set(layer.indices[0, 0].tolist())


def test_score_puts_the_window_first():
    c = view(n=20, seed=3)
    s = SnapKV(budget=8, window=4).score(0, c)
    assert np.isposinf(s[..., 16:]).all() and np.isfinite(s[..., :16]).all()


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"budget": 4, "window": 8}, "budget"),
        ({"budget": 8, "window": 8}, "budget"),
        ({"window": 0}, "window"),
        ({"kernel": 4}, "kernel"),
        ({"kernel": 0}, "kernel"),
        ({"kernel": 2.5}, "kernel"),
        ({"pooling": "sum"}, "pooling"),
        ({"gqa": "max"}, "gqa"),
    ],
)
def test_bad_hyperparameters(kw, match):
    with pytest.raises(ParameterError, match=match):
        SnapKV(**kw)


def test_wrong_cache_layout():
    c = view(n=20)
    policy = SnapKV(budget=8, window=4)
    short = replace(c, queries=c.queries[:, :, :2])  # fewer queries than the window
    bad = [*misshapen(c), short]
    for cache in bad:
        with pytest.raises(ShapeError, match="SnapKV: cache"):
            policy.compress(0, cache)
    with pytest.raises(TypeError, match="CacheView"):
        policy.compress(0, {"keys": c.keys})
