"""``qkv.window_scores`` (SnapKV's observation-window scoring) against an explicit loop."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qkv
from qkv.errors import DTypeError, ParameterError, ShapeError


def make(seed, *, B=2, H=4, Hkv=2, W=3, C=17, D=8, empty=0.2):
    """Queries, keys and slot token indices: a shuffled-free cache with some empty slots."""
    rng = np.random.default_rng(seed)
    q = 2 * rng.standard_normal((B, H, W, D))
    k = rng.standard_normal((B, Hkv, C, D))
    idx = np.broadcast_to(np.arange(C), (B, Hkv, C)).copy()
    idx[rng.random(idx.shape) < empty] = -1
    return q, k, idx


def loop_scores(q, k, idx, n, kernel, pooling, scale=None):
    """Row by row in Python floats: causal softmax, column sums, pooling by hand."""
    B, H, W, D = q.shape
    Hkv, C = k.shape[1], k.shape[2]
    scale = D**-0.5 if scale is None else scale
    out = np.full((B, H, C), -np.inf)
    for b in range(B):
        for h in range(H):
            g = h // (H // Hkv)
            votes = np.zeros(C)
            for i in range(W):
                seen = [j for j in range(C) if 0 <= idx[b, g, j] <= n - W + i]
                if not seen:
                    continue
                s = {j: scale * float(q[b, h, i] @ k[b, g, j]) for j in seen}
                top = max(s.values())
                total = sum(np.exp(x - top) for x in s.values())
                for j in seen:
                    votes[j] += np.exp(s[j] - top) / total
            prefix = [0 <= idx[b, g, j] < n - W for j in range(C)]
            for j in range(C):
                if not prefix[j]:
                    continue
                near = [t for t in range(j - kernel // 2, j + kernel // 2 + 1) if 0 <= t < C]
                vals = [votes[t] for t in near if prefix[t]]
                out[b, h, j] = sum(vals) / kernel if pooling == "avgpool" else max(vals)
    return out


@pytest.mark.parametrize("pooling", ["avgpool", "maxpool"])
@pytest.mark.parametrize("kernel", [1, 5])
def test_matches_an_explicit_loop(pooling, kernel):
    q, k, idx = make(1)
    got = qkv.window_scores(q, k, idx, n_tokens=17, kernel=kernel, pooling=pooling, scale=0.4)
    want = loop_scores(q, k, idx, 17, kernel, pooling, scale=0.4)
    assert got.shape == want.shape and got.dtype == np.float64
    assert (np.isneginf(got) == np.isneginf(want)).all()
    np.testing.assert_allclose(got[np.isfinite(want)], want[np.isfinite(want)], rtol=1e-12)


@settings(max_examples=25, deadline=None)
@given(
    W=st.integers(1, 5),
    C=st.integers(1, 24),
    kernel=st.sampled_from([1, 3, 7]),
    seed=st.integers(0, 2**16),
)
def test_unpooled_votes_are_the_window_attention_mass(W, C, kernel, seed):
    """With ``kernel=1`` each query hands out at most 1 of attention, all of it to prefix
    slots when its own and later tokens are empty; avg pooling only spreads it (sum / k)."""
    q, k, idx = make(seed, W=W, C=C, empty=0.0)
    n = C + 1  # one more token than the cache holds: the last query's own key is not cached
    if n < W:
        return
    s1 = qkv.window_scores(q, k, idx, n_tokens=n, kernel=1)
    prefix = (idx >= 0) & (idx < n - W)
    mass = np.where(np.repeat(prefix, 2, axis=1), s1, 0.0).sum(-1)  # (B, H)
    assert (mass <= W + 1e-9).all() and (s1[np.isfinite(s1)] >= 0).all()
    pooled = qkv.window_scores(q, k, idx, n_tokens=n, kernel=kernel)
    inner = np.where(np.isfinite(pooled), pooled, 0.0).sum(-1)
    assert (inner <= mass + 1e-9).all()


def test_window_and_empty_slots_are_minus_inf_and_float32_stays_float32():
    q, k, idx = make(2)
    got = qkv.window_scores(q.astype(np.float32), k.astype(np.float32), idx, kernel=3)
    n = int(idx.max()) + 1
    off = np.repeat((idx < 0) | (idx >= n - 3), 2, axis=1)  # (B, H, C)
    assert got.dtype == np.float32
    assert np.isneginf(got[off]).all() and np.isfinite(got[~off]).all()


def test_large_logits_stay_finite():
    q, k, idx = make(3, empty=0.0)
    got = qkv.window_scores(1e3 * q, k, idx, kernel=5, pooling="maxpool")
    assert not np.isnan(got).any()


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda a: {**a, "q": a["q"][0]}, ShapeError, "q: expected a 4-d"),
        (lambda a: {**a, "k": a["k"][:, :, :, :3]}, ShapeError, "k: expected"),
        (lambda a: {**a, "k": np.repeat(a["k"], 3, axis=1)}, ShapeError, "divisor of H"),
        (lambda a: {**a, "k": a["k"].astype(np.float32)}, DTypeError, "k: expected q's dtype"),
        (lambda a: {**a, "q": a["q"].astype(np.int64)}, DTypeError, "q: expected one of"),
        (lambda a: {**a, "indices": a["indices"][..., 1:]}, ShapeError, "indices"),
        (lambda a: {**a, "indices": a["indices"] * 1.0}, ShapeError, "indices"),
        (lambda a: {**a, "n_tokens": 5}, ParameterError, "n_tokens"),
        (lambda a: {**a, "n_tokens": 2}, ParameterError, "n_tokens"),
        (lambda a: {**a, "kernel": 4}, ParameterError, "kernel: expected an odd"),
        (lambda a: {**a, "kernel": 0}, ParameterError, "kernel: expected a positive"),
        (lambda a: {**a, "pooling": "sum"}, ParameterError, "pooling"),
        (lambda a: {**a, "scale": -1.0}, ParameterError, "scale"),
    ],
)
def test_bad_input(change, error, match):
    q, k, idx = make(4)
    args = change({"q": q, "k": k, "indices": idx})
    with pytest.raises(error, match=match):
        qkv.window_scores(args.pop("q"), args.pop("k"), args.pop("indices"), **args)
