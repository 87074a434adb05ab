"""QuoTA (arXiv 2503.08689): segment budgets by query relevance, then top tokens per segment.

Independent references: window attention recomputed by explicit loops in float64, the
budget rule's stated properties (sum, floor, even split, proportionality), and the full-cache
engine when nothing is evicted.
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
from qkv.reference.kv import CacheView, QuoTA, quota
from qkv.reference.kv.quota_policy import split_budget

SMALL = dec.DecoderConfig(n_layers=2, d_model=64, d_ff=96, n_kv_heads=2, max_len=128)


def view(B=1, Hkv=2, group=2, n=40, D=6, seed=0):
    rng = np.random.default_rng(seed)
    idx = np.broadcast_to(np.arange(n), (B, Hkv, n)).copy()
    return CacheView(
        keys=rng.standard_normal((B, Hkv, n, D)) * 1.5,
        values=rng.standard_normal((B, Hkv, n, D)),
        indices=idx,
        positions=idx.copy(),
        next_position=np.full((B, Hkv), n),
        n_tokens=n,
        queries=rng.standard_normal((B, Hkv * group, n, D)),
    )


def votes_loop(c: CacheView, window: int) -> np.ndarray:
    """Attention each slot gets from the last ``window`` queries, summed over the group."""
    B, H, _, D = c.queries.shape
    Hkv, C = c.keys.shape[1:3]
    out = np.zeros((B, Hkv, C))
    for b in range(B):
        for h in range(H):
            g = h // (H // Hkv)
            for t in range(c.n_tokens - window, c.n_tokens):
                slots = [j for j in range(C) if 0 <= c.indices[b, g, j] <= t]
                s = np.array([c.queries[b, h, t] @ c.keys[b, g, j] for j in slots]) / np.sqrt(D)
                e = np.exp(s - s.max())
                out[b, g, slots] += e / e.sum()
    return out


sizes_st = st.lists(st.integers(1, 12), min_size=1, max_size=8)


@settings(max_examples=25, deadline=None)
@given(
    sizes=sizes_st,
    data=st.data(),
    total=st.integers(0, 100),
    floor=st.integers(0, 3),
)
def test_split_sums_to_the_total_within_sizes_and_floor(sizes, data, total, floor):
    S = len(sizes)
    rel = np.array(data.draw(st.lists(st.floats(0, 5), min_size=S, max_size=S)))
    k = split_budget(rel, np.array(sizes), total, floor)
    assert k.sum() == min(total, sum(sizes))
    assert (k >= 0).all() and (k <= np.array(sizes)).all()
    f = min(floor, min(total, sum(sizes)) // S)
    assert (k >= np.minimum(f, sizes)).all()


@settings(max_examples=25, deadline=None)
@given(S=st.integers(2, 8), total=st.integers(0, 60), floor=st.integers(0, 2))
def test_equal_relevance_splits_evenly(S, total, floor):
    k = split_budget(np.full(S, 0.3), np.full(S, 100), total, floor)
    assert k.sum() == total and k.max() - k.min() <= 1
    assert (np.diff(k) <= 0).all()  # the extra tokens go to the earlier segments


def test_zero_relevance_gets_the_floor_and_shares_are_proportional():
    rel = np.array([0.0, 3.0, 1.0, 0.0, 4.0])
    k = split_budget(rel, np.full(5, 50), 40, 2)
    assert k[0] == 2 and k[3] == 2 and k.sum() == 40
    # the 30 tokens above the floors go 3 : 1 : 4, within one token of the exact shares
    np.testing.assert_allclose(k[[1, 2, 4]] - 2, 30 * rel[[1, 2, 4]] / 8, atol=1)
    # a full segment's excess goes to the others in proportion
    k = split_budget(np.array([10.0, 1.0, 1.0]), np.array([4, 20, 20]), 20, 0)
    assert k.tolist() == [4, 8, 8]
    # all relevant segments full: the rest is spread over the others
    k = split_budget(np.array([1.0, 0.0, 0.0]), np.array([3, 20, 20]), 13, 0)
    assert k.tolist() == [3, 5, 5]
    # a floor the budget cannot cover is lowered to total // S
    assert split_budget(np.array([0.0, 0.0, 5.0]), np.full(3, 9), 4, 2).tolist() == [1, 1, 2]


def test_relevance_and_kept_set_match_loops():
    c = view(B=2, n=40, seed=6)
    policy = quota(budget=16, window=4, segment=8, floor=1)
    assert isinstance(policy, QuoTA)
    votes = votes_loop(c, 4)  # (2, 2, 40)
    rel = np.stack([votes[..., s * 8 : (s + 1) * 8].sum(-1) for s in range(5)], -1)  # 36 -> 5
    rel[..., 4] = votes[..., 32:36].sum(-1)  # the last segment stops at the window
    np.testing.assert_allclose(policy.relevance(c), rel, rtol=1e-12)
    budgets = policy.budgets(c)
    kept = policy.compress(0, c)
    for b in range(2):
        for g in range(2):
            k = split_budget(rel[b, g], np.array([8, 8, 8, 8, 4]), 12, 1)
            np.testing.assert_array_equal(budgets[b, g], k)
            want = list(range(36, 40))
            for s in range(5):
                seg = range(s * 8, min(s * 8 + 8, 36))
                want += sorted(seg, key=lambda j: (-votes[b, g, j], j))[: k[s]]
            got = kept.indices[b, g][kept.indices[b, g] >= 0].tolist()
            assert got == sorted(want) and len(got) == 16


def test_budget_covering_the_prompt_changes_nothing():
    model = dec.init_weights(SMALL, seed=4)
    prompt = np.random.default_rng(2).integers(0, SMALL.vocab, size=30)
    full = engine.generate(model, prompt, 4)
    kept = engine.generate(model, prompt, 4, policy=QuoTA(budget=30, window=8, segment=4))
    np.testing.assert_array_equal(full.logits, kept.logits)


def test_compresses_on_a_model_to_the_budget():
    model = dec.init_weights(SMALL, seed=5)
    prompt = np.random.default_rng(3).integers(0, SMALL.vocab, size=70)
    _, cache = engine.prefill(model, prompt, policy=QuoTA(budget=24, window=6, segment=8))
    for layer in cache.layers:
        assert layer.lengths.tolist() == [[24, 24]]
        assert set(range(64, 70)) <= set(layer.indices[0, 1].tolist())


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"budget": 16, "window": 16}, "budget: expected more than window=16"),
        ({"budget": 4, "window": 16}, "budget"),
        ({"window": 0}, "window"),
        ({"segment": 0}, "segment: expected an integer >= 1"),
        ({"floor": -1}, "floor"),
        ({"floor": 1.5}, "floor"),
    ],
)
def test_bad_hyperparameters(kw, match):
    with pytest.raises(ParameterError, match=match):
        QuoTA(**kw)


def test_wrong_cache_layout():
    c = view(n=40)
    policy = QuoTA(budget=16, window=4, segment=8)
    short = replace(c, queries=c.queries[:, :, :2])  # fewer queries than the window
    bad = [*misshapen(c), short]
    for cache in bad:
        with pytest.raises(ShapeError, match="QuoTA: cache"):
            policy.compress(0, cache)


def test_registered_in_kv_eval():
    from qkv.lab import kv_eval

    policy = kv_eval.METHODS["quota"](32)
    assert isinstance(policy, QuoTA) and policy.budget == 32
