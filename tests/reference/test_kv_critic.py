"""CRITIC (arXiv 2504.01281): token importance from window attention, sinks and window kept.

Independent references: the importance recomputed by explicit loops in float64 from the raw
cache, the kept set rebuilt from that, and the full-cache engine when nothing is evicted.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from _kv_layouts import misshapen
from hypothesis import given, settings
from hypothesis import strategies as st

from qkv.errors import ParameterError, ShapeError
from qkv.lab import decoder as dec
from qkv.lab import engine
from qkv.reference.kv import CacheView, Critic, critic

SMALL = dec.DecoderConfig(n_layers=2, d_model=64, d_ff=96, n_kv_heads=2, max_len=128)


def view(B=1, Hkv=2, group=2, n=24, D=6, seed=0, empty_tail=0):
    """A float64 cache of ``n`` prompt tokens; the last ``empty_tail`` slots of KV head 0
    are emptied (an earlier eviction)."""
    rng = np.random.default_rng(seed)
    idx = np.broadcast_to(np.arange(n), (B, Hkv, n)).copy()
    if empty_tail:
        idx[:, 0, n - empty_tail :] = -1
    return CacheView(
        keys=rng.standard_normal((B, Hkv, n, D)) * 1.5,
        values=rng.standard_normal((B, Hkv, n, D)) * rng.uniform(0.2, 3, (B, Hkv, n, 1)),
        indices=idx,
        positions=np.maximum(idx, 0),
        next_position=np.full((B, Hkv), n),
        n_tokens=n,
        queries=rng.standard_normal((B, Hkv * group, n, D)),
    )


def importance_loop(c: CacheView, window: int) -> np.ndarray:
    """Mean attention each slot receives from the last ``window`` queries, per KV head."""
    B, H, _, D = c.queries.shape
    Hkv, C = c.keys.shape[1], c.keys.shape[2]
    group = H // Hkv
    out = np.zeros((B, Hkv, C))
    for b in range(B):
        for h in range(H):
            g = h // group
            for t in range(c.n_tokens - window, c.n_tokens):
                slots = [j for j in range(C) if 0 <= c.indices[b, g, j] <= t]
                s = np.array([c.queries[b, h, t] @ c.keys[b, g, j] / np.sqrt(D) for j in slots])
                e = np.exp(s - s.max())
                out[b, g, slots] += e / e.sum() / (window * group)
    return out


def kept_tokens(kept, b, g):
    return kept.indices[b, g][kept.indices[b, g] >= 0].tolist()


@pytest.mark.parametrize("importance", ["attention", "output"])
def test_importance_and_kept_set_match_loops(importance):
    c = view(B=2, seed=3, empty_tail=3)
    policy = critic(budget=11, window=4, n_sink=2, importance=importance)
    assert isinstance(policy, Critic)
    want = importance_loop(c, 4)
    if importance == "output":
        want = want * np.sqrt((c.values**2).sum(-1))
    got = policy.importance_of(c)
    np.testing.assert_allclose(np.where(c.valid, got, 0), np.where(c.valid, want, 0), rtol=1e-12)
    assert np.isneginf(got[~c.valid]).all()
    kept = policy.compress(0, c)
    for b in range(2):
        for g in range(2):
            tokens = [t for t in c.indices[b, g] if t >= 0]
            always = [t for t in tokens if t < 2 or t >= 20]  # head 0 lost tokens 21-23
            middle = [t for t in tokens if 2 <= t < 20]
            top = sorted(middle, key=lambda t: (-want[b, g, t], t))[: 11 - len(always)]
            assert kept_tokens(kept, b, g) == sorted([*always, *top])


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(6, 30),
    group=st.integers(1, 3),
    n_sink=st.integers(0, 3),
    window=st.integers(1, 5),
    extra=st.integers(1, 30),
    seed=st.integers(0, 2**16),
)
def test_sinks_and_window_always_kept_and_budget_exact(n, group, n_sink, window, extra, seed):
    window = min(window, n)
    budget = n_sink + window + extra
    c = view(group=group, n=n, seed=seed)
    kept = Critic(budget=budget, window=window, n_sink=n_sink).compress(0, c)
    for g in range(2):
        got = kept_tokens(kept, 0, g)
        assert len(got) == min(budget, n) and got == sorted(set(got))
        assert set(range(min(n_sink, n))) | set(range(n - window, n)) <= set(got)
        # kept keys and values are the cache's own rows
        np.testing.assert_array_equal(kept.keys[0, g, : len(got)], c.keys[0, g, got])
        np.testing.assert_array_equal(kept.values[0, g, : len(got)], c.values[0, g, got])


def test_budget_covering_the_prompt_changes_nothing():
    model = dec.init_weights(SMALL, seed=4)
    prompt = np.random.default_rng(2).integers(0, SMALL.vocab, size=30)
    full = engine.generate(model, prompt, 4)
    kept = engine.generate(model, prompt, 4, policy=Critic(budget=40, window=8, n_sink=4))
    np.testing.assert_array_equal(full.logits, kept.logits)


def test_compresses_on_the_lab_model_to_the_budget():
    model = dec.init_weights(SMALL, seed=5)
    prompt = np.random.default_rng(3).integers(0, SMALL.vocab, size=60)
    _, cache = engine.prefill(model, prompt, policy=Critic(budget=20, window=6, n_sink=2))
    for layer in cache.layers:
        assert layer.lengths.tolist() == [[20, 20]]
        assert {0, 1, *range(54, 60)} <= set(layer.indices[0, 0].tolist())


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"budget": 20, "window": 16, "n_sink": 4}, r"budget: expected more than n_sink \+ window"),
        ({"budget": 10, "window": 16}, "budget"),
        ({"window": 0}, "window: expected an integer >= 1"),
        ({"n_sink": -1}, "n_sink"),
        ({"budget": 2.5}, "budget"),
        ({"importance": "entropy"}, "importance: expected one of"),
    ],
)
def test_bad_hyperparameters(kw, match):
    with pytest.raises(ParameterError, match=match):
        Critic(**kw)


def test_wrong_cache_layout():
    c = view(n=20)
    policy = Critic(budget=10, window=4, n_sink=2)
    short = replace(c, queries=c.queries[:, :, :2])  # fewer queries than the window
    bad = [*misshapen(c), short]
    for cache in bad:
        with pytest.raises(ShapeError, match="Critic: cache"):
            policy.compress(0, cache)
    with pytest.raises(TypeError, match="CacheView"):
        policy.compress(0, {"keys": c.keys})


def test_registered_in_kv_eval():
    from qkv.lab import kv_eval

    policy = kv_eval.METHODS["critic"](16)
    assert isinstance(policy, Critic) and policy.budget == 16 and policy.window < 12
