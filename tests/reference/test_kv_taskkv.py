"""Task-KV (arXiv 2501.15113): semantic distance of heads, full cache for heterogeneous heads.

Independent references: distances and window attention recomputed with explicit loops in
float64 from the raw cache, and the full-cache engine when nothing needs evicting.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qkv
from qkv.errors import ParameterError
from qkv.lab import decoder as dec
from qkv.lab import engine
from qkv.reference.kv import TaskKV, taskkv
from qkv.reference.kv.taskkv_policy import heterogeneous_heads, semantic_distance

SMALL = dec.DecoderConfig(n_layers=2, d_model=64, d_ff=96, n_kv_heads=4, max_len=128)


@pytest.fixture(scope="module")
def model():
    return dec.init_weights(SMALL, seed=9)


@settings(max_examples=25, deadline=None)
@given(h=st.integers(2, 6), w=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_semantic_distance_matches_a_loop(h, w, seed):
    o = np.random.default_rng(seed).standard_normal((1, h, w, 5))
    units = [o[0, i].sum(0) / np.sqrt(np.sum(o[0, i].sum(0) ** 2)) for i in range(h)]
    centre = sum(units) / h
    want = [math.dist(u, centre) for u in units]
    np.testing.assert_allclose(semantic_distance(o)[0], want, rtol=1e-10)


def test_identical_heads_are_at_the_centre_and_an_outlier_is_heterogeneous():
    base = np.random.default_rng(0).standard_normal((1, 1, 3, 6))
    o = np.repeat(base, 8, axis=1)  # (1, 8, 3, 6)
    np.testing.assert_allclose(semantic_distance(o), 0, atol=1e-12)
    o[:, 5] = -2.5 * base[:, 0]  # opposite direction, another scale
    far = heterogeneous_heads(semantic_distance(o), 4, 0.25)  # KV head 2 holds query head 5
    assert far.tolist() == [[False, False, True, False]]
    assert heterogeneous_heads(semantic_distance(o), 4, 0.5).sum() == 2


def window_mass_loop(c, queries, n, window):
    """Attention mass per (KV head, slot) from the last ``window`` queries, by loops."""
    H, Hkv = queries.shape[1], c.keys.shape[1]
    mass = np.zeros(c.indices.shape[1:])
    for h in range(H):
        g = h // (H // Hkv)
        for t in range(n - window, n):
            slots = [j for j in range(c.indices.shape[-1]) if 0 <= c.indices[0, g, j] <= t]
            s = np.array([queries[0, h, t] @ c.keys[0, g, j] for j in slots], dtype=np.float64)
            p = np.exp((s - s.max()) / np.sqrt(queries.shape[-1]))
            mass[g, slots] += p / p.sum()
    return mass


def test_kept_tokens_are_whole_far_heads_and_budget_elsewhere(model):
    prompt = np.random.default_rng(1).integers(0, SMALL.vocab, size=60)
    policy = taskkv(budget=20, n_sink=2, recent=6, ratio=0.25, window=5)
    assert isinstance(policy, TaskKV)
    _, full = engine.prefill(model, prompt)
    _, kept = engine.prefill(model, prompt, policy=policy)
    x = model.embed[prompt][None]
    for layer, (cf, ck) in enumerate(zip(full.layers, kept.layers, strict=True)):
        q, k, v = dec.project_qkv(SMALL, model.layers[layer], x, 0)  # (1, H, 60, Dh)
        mass = window_mass_loop(cf, q, 60, 5)  # (Hkv, 60)
        lengths = ck.lengths[0].tolist()
        assert sorted(lengths) == [20, 20, 20, 60]  # one heterogeneous KV head of four
        for g in range(4):
            got = ck.indices[0, g][ck.indices[0, g] >= 0].tolist()
            if lengths[g] == 60:
                assert got == list(range(60))
                continue
            middle = list(range(2, 54))
            top = sorted(middle, key=lambda t: -mass[g, t])[:12]
            assert got == sorted([0, 1, *top, *range(54, 60)])
        x = dec.finish_block(SMALL, model.layers[layer], x, qkv.sdpa(q, k, v, causal=True))


def test_budget_covering_the_prompt_changes_nothing(model):
    prompt = np.random.default_rng(2).integers(0, SMALL.vocab, size=30)
    full = engine.generate(model, prompt, 4)
    kept = engine.generate(model, prompt, 4, policy=TaskKV(budget=40, n_sink=4, recent=8))
    np.testing.assert_array_equal(full.logits, kept.logits)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"budget": 10, "n_sink": 4, "recent": 8}, "budget"),
        ({"ratio": 0.0}, "ratio"),
        ({"ratio": 1.5}, "ratio"),
        ({"window": 0}, "window"),
        ({"n_sink": -1}, "n_sink"),
    ],
)
def test_bad_hyperparameters(kw, match):
    with pytest.raises(ParameterError, match=match):
        TaskKV(**kw)
