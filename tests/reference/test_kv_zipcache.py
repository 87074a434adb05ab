"""ZipCache (``qkv.reference.kv.zipcache``): normalised saliency from probes, mixed precision."""

from __future__ import annotations

import numpy as np
import pytest

from qkv.errors import ParameterError
from qkv.reference.kv import CacheView, ZipCache, zipcache
from qkv.reference.kv.zipcache_policy import normalized_scores, probe_queries


def make_cache(B=1, H=4, Hkv=2, N=12, D=8, seed=0):
    rng = np.random.default_rng(seed)
    idx = np.broadcast_to(np.arange(N), (B, Hkv, N)).copy()
    return CacheView(
        keys=rng.standard_normal((B, Hkv, N, D)),
        values=rng.standard_normal((B, Hkv, N, D)) * np.array([1, 1, 1, 1, 1, 1, 1, 20.0]),
        indices=idx,
        positions=idx.copy(),
        next_position=np.full((B, Hkv), N),
        n_tokens=N,
        queries=rng.standard_normal((B, H, N, D)),
    )


def causal_attention_loop(c):
    """Full causal attention weights ``(B, H, N, N)`` by an explicit loop."""
    B, H, N, D = c.queries.shape
    group = H // c.keys.shape[1]
    A = np.zeros((B, H, N, N))
    for b in range(B):
        for h in range(H):
            for i in range(N):
                s = [
                    c.queries[b, h, i] @ c.keys[b, h // group, j] / np.sqrt(D) for j in range(i + 1)
                ]
                e = np.exp(np.array(s) - max(s))
                A[b, h, i, : i + 1] = e / e.sum()
    return A


def test_all_probes_give_column_sum_over_visible_queries():
    c = make_cache()
    A = causal_attention_loop(c)  # (B, H, N, N)
    N = 12
    want = A.reshape(1, 2, 2, N, N).sum(axis=(2, 3)) / (2 * (N - np.arange(N)))
    got = normalized_scores(c, np.arange(N))
    np.testing.assert_allclose(got, want, rtol=1e-12)
    np.testing.assert_allclose(normalized_scores(c, np.arange(N), denominator="causal"), want)


def test_last_key_score_is_mean_attention_of_the_probes_that_see_it():
    c = make_cache(seed=3)
    A = causal_attention_loop(c)
    probes = np.array([2, 5, 10, 11])
    got = normalized_scores(c, probes)
    # only probe 11 sees key 11; key 3 is seen by probes 5, 10, 11
    np.testing.assert_allclose(got[0, :, 11], A[0, :, 11, 11].reshape(2, 2).mean(axis=1))
    np.testing.assert_allclose(got[0, :, 3], A[0, :, [5, 10, 11], 3].T.reshape(2, 6).mean(axis=1))
    # the official code divides by L - i instead (a group of 2 query heads per KV head)
    causal = normalized_scores(c, probes, denominator="causal")
    np.testing.assert_allclose(causal[0, :, 3], A[0, :, [5, 10, 11], 3].T.reshape(2, 6).sum(1) / 18)


def test_probes_recent_and_random():
    p = probe_queries(100, 0.05, np.random.default_rng(0))
    assert len(p) == 10 and set(range(95, 100)) <= set(p.tolist()) and (p[:5] < 95).all()
    np.testing.assert_array_equal(p, probe_queries(100, 0.05, np.random.default_rng(0)))
    np.testing.assert_array_equal(probe_queries(4, 1.0, np.random.default_rng(0)), np.arange(4))


def test_mixed_precision_levels_and_accounting():
    c = make_cache(N=20, D=8, seed=5)
    kept = ZipCache(unimportant_ratio=0.4, probe_fraction=0.25).compress(0, c)
    np.testing.assert_array_equal(kept.indices, c.indices)
    score = ZipCache(probe_fraction=0.25).score(0, c)
    for h in range(2):
        order = np.argsort(-score[0, h], kind="stable")
        for slots, levels in ((order[:12], 16), (order[12:], 4)):
            k = kept.keys[0, h, slots]
            # channel-wise keys: at most 2^bits distinct values per channel of a set
            assert all(len(np.unique(np.round(k[:, j], 12))) <= levels for j in range(8))
            lo, hi = c.keys[0, h, slots].min(0), c.keys[0, h, slots].max(0)
            assert np.all(np.abs(k - c.keys[0, h, slots]) <= (hi - lo) / (levels - 1) / 2 + 1e-12)
            # values: within half a step of the per-token range after the channel scaling
            cj = np.sqrt(np.abs(c.values[0, h, slots]).max(0))
            u = c.values[0, h, slots] / cj
            step = (u.max(1) - u.min(1)) / (levels - 1)
            assert np.all(np.abs(kept.values[0, h, slots] / cj - u) <= step[:, None] / 2 + 1e-9)
    # bits: keys 8 channels x 2 params per set, values 2 params per token + 8 factors per set
    per_head = (12 * 8 * 4 + 8 * 8 * 2) + 2 * (8 * 16 * 2) + 20 * 2 * 16 + 2 * 8 * 16
    per_head += 12 * 8 * 4 + 8 * 8 * 2  # value codes
    assert kept.extra["quantized_bits"] == 2 * per_head


def test_more_bits_smaller_error():
    c = make_cache(N=16, seed=7)
    errs = [
        np.abs(ZipCache(high_bits=b, low_bits=b).compress(0, c).keys - c.keys).max()
        for b in (2, 4, 8)
    ]
    assert errs[0] > errs[1] > errs[2]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"high_bits": 3}, r"high_bits: expected one of \(2, 4, 8\), got 3"),
        ({"low_bits": 16}, "low_bits: expected one of"),
        ({"low_bits": 8, "high_bits": 4}, "low_bits: expected at most high_bits"),
        ({"probe_fraction": 0.0}, r"probe_fraction: expected a fraction in \(0, 1\], got 0.0"),
        ({"probe_fraction": 1.5}, "probe_fraction"),
        ({"probe_fraction": -0.1}, "probe_fraction"),
        ({"unimportant_ratio": 1.2}, "unimportant_ratio"),
        ({"denominator": "rows"}, "denominator"),
    ],
)
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ParameterError, match=match):
        zipcache(**kwargs)


def test_runs_in_the_engine_on_the_lab_decoder():
    from qkv.lab import decoder as dec
    from qkv.lab import engine, tasks

    w = dec.load()
    ex = tasks.passkey(48, 0.5, np.random.default_rng(0))
    full = engine.generate(w, ex.prompt[None], len(ex.answer))
    g = engine.generate(
        w, ex.prompt[None], len(ex.answer), policy=ZipCache(high_bits=8, low_bits=8)
    )
    np.testing.assert_array_equal(g.tokens, full.tokens)
    assert all(c.extra["quantized_bits"] > 0 for c in g.cache.layers)
