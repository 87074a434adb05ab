"""ZipVL (arXiv 2410.08584): per-layer dynamic ratio from the attention mass, drop or low bits.

Independent references: the probe attention recomputed by explicit loops in float64, the
smallest covering count found by trying every count, ZipCache's own normalised score, and the
bit count written out from the storage layout.
"""

from __future__ import annotations

import numpy as np
import pytest
from _kv_layouts import misshapen
from hypothesis import given, settings
from hypothesis import strategies as st

from qkv.errors import ParameterError, ShapeError
from qkv.lab import decoder as dec
from qkv.lab import engine, tasks
from qkv.reference.kv import CacheView, ZipVL, zipvl
from qkv.reference.kv.zipcache_policy import normalized_scores, probe_queries
from qkv.reference.kv.zipvl_policy import tokens_for_mass


def view(B=1, Hkv=2, group=2, n=24, D=8, seed=0, sharp=1.0):
    rng = np.random.default_rng(seed)
    idx = np.broadcast_to(np.arange(n), (B, Hkv, n)).copy()
    return CacheView(
        keys=rng.standard_normal((B, Hkv, n, D)) * sharp,
        values=rng.standard_normal((B, Hkv, n, D)),
        indices=idx,
        positions=idx.copy(),
        next_position=np.full((B, Hkv), n),
        n_tokens=n,
        queries=rng.standard_normal((B, Hkv * group, n, D)) * sharp,
    )


def probe_mass_loop(c: CacheView, probes) -> np.ndarray:
    """Attention summed over the probe rows and each group's query heads, by loops."""
    B, H, W, D = c.queries.shape
    Hkv, C = c.keys.shape[1:3]
    out = np.zeros((B, Hkv, C))
    for b in range(B):
        for h in range(H):
            g = h // (H // Hkv)
            for r in probes:
                t = c.n_tokens - W + r
                slots = [j for j in range(C) if 0 <= c.indices[b, g, j] <= t]
                s = np.array([c.queries[b, h, r] @ c.keys[b, g, j] for j in slots]) / np.sqrt(D)
                e = np.exp(s - s.max())
                out[b, g, slots] += e / e.sum()
    return out


def smallest_count(mass: np.ndarray, tau: float) -> int:
    """Try every count p = 1, 2, ... until the p largest entries reach tau of the total."""
    ordered = sorted(mass.tolist(), reverse=True)
    for p in range(1, len(ordered) + 1):
        if sum(ordered[:p]) >= tau * sum(ordered):
            return p
    return len(ordered)


@settings(max_examples=25, deadline=None)
@given(
    mass=st.lists(st.floats(0.0, 10.0), min_size=1, max_size=30).filter(lambda m: sum(m) > 0),
    tau=st.floats(0.05, 0.99),
)
def test_tokens_for_mass_is_the_smallest_covering_count(mass, tau):
    m = np.array(mass)
    assert tokens_for_mass(m, tau) == smallest_count(m, tau)


def test_one_hot_needs_one_token_and_count_is_monotone_in_tau():
    assert tokens_for_mass(np.eye(6)[2] * 3.0, 0.9) == 1
    m = np.random.default_rng(0).dirichlet(np.ones(40))
    counts = [int(tokens_for_mass(m, t)) for t in np.linspace(0.05, 1.0, 20)]
    assert counts == sorted(counts) and counts[-1] == 40


def test_mass_matches_loops_and_normalized_matches_zipcache():
    c = view(B=2, seed=4)
    policy = ZipVL(probe_fraction=0.2, seed=3)
    a, normalized = policy.mass(1, c)
    probes = probe_queries(24, 0.2, np.random.default_rng((3, 1)))
    np.testing.assert_allclose(a, probe_mass_loop(c, probes), rtol=1e-12)
    np.testing.assert_allclose(normalized, normalized_scores(c, probes), rtol=1e-12)


@settings(max_examples=25, deadline=None)
@given(
    tau=st.floats(0.1, 0.999),
    fraction=st.sampled_from([0.1, 0.25, 1.0]),
    sharp=st.sampled_from([0.3, 1.0, 3.0]),
    seed=st.integers(0, 2**16),
)
def test_accumulated_selection_keeps_at_least_tau_of_each_heads_mass(tau, fraction, sharp, seed):
    c = view(n=20, seed=seed, sharp=sharp)
    policy = ZipVL(tau=tau, probe_fraction=fraction, select="accumulated", seed=seed)
    kept = policy.compress(0, c)
    probes = probe_queries(20, fraction, np.random.default_rng((seed, 0)))
    a = probe_mass_loop(c, probes)  # (1, 2, 20)
    p = max(smallest_count(a[0, g], tau) for g in range(2))
    for g in range(2):
        got = kept.indices[0, g][kept.indices[0, g] >= 0]
        assert len(got) == p  # one count per layer, the largest any head needs
        assert a[0, g, got].sum() >= tau * a[0, g].sum() * (1 - 1e-12)


def test_normalized_selection_keeps_the_top_normalized_tokens():
    c = view(n=30, seed=8)
    policy = ZipVL(tau=0.8, probe_fraction=0.2)
    probes = probe_queries(30, 0.2, np.random.default_rng((0, 2)))
    a = probe_mass_loop(c, probes)
    seen = np.array([sum(2 for r in probes if r >= j) for j in range(30)])  # 2 heads a group
    norm = a / seen
    p = max(smallest_count(a[0, g], 0.8) for g in range(2))
    kept = policy.compress(2, c)
    for g in range(2):
        top = sorted(range(30), key=lambda j: (-norm[0, g, j], j))[:p]
        assert kept.indices[0, g][kept.indices[0, g] >= 0].tolist() == sorted(top)


@pytest.mark.parametrize("rest", ["drop", "quantize"])
def test_tau_one_keeps_everything(rest):
    c = view(n=16, seed=1, sharp=4.0)  # sharp attention: many tiny weights
    kept = ZipVL(tau=1.0, rest=rest, high_bits=8, low_bits=8).compress(0, c)
    np.testing.assert_array_equal(kept.indices, c.indices)
    if rest == "drop":
        np.testing.assert_array_equal(kept.keys, c.keys)


def test_mixed_precision_levels_and_exact_bits():
    c = view(n=20, D=8, seed=5)
    policy = ZipVL(tau=0.6, probe_fraction=0.25, rest="quantize")
    kept = policy.compress(0, c)
    important = policy.important(0, c)
    p = int(important[0, 0].sum())
    assert 0 < p < 20 and (important.sum(-1) == p).all()
    np.testing.assert_array_equal(kept.indices, c.indices)
    for g in range(2):
        for chosen, levels in ((important[0, g], 16), (~important[0, g], 4)):
            k = kept.keys[0, g, chosen]
            assert all(len(np.unique(np.round(k[:, j], 12))) <= levels for j in range(8))
            lo, hi = c.keys[0, g, chosen].min(0), c.keys[0, g, chosen].max(0)
            step = (hi - lo) / (levels - 1)
            assert np.all(np.abs(k - c.keys[0, g, chosen]) <= step / 2 + 1e-12)

    # per head and set of T tokens at b bits (D = 8): key codes T*8*b, key scale+zero per
    # channel 2*8*16; value codes T*8*b, value scale+zero per token 2*T*16, 8 channel factors
    def set_bits(T, b):
        return T * 8 * b + 2 * 8 * 16 + T * 8 * b + 2 * T * 16 + 8 * 16

    assert kept.extra["quantized_bits"] == 2 * (set_bits(p, 4) + set_bits(20 - p, 2))


def test_ratio_differs_by_layer_on_the_lab_model():
    w = dec.load()
    ex = tasks.passkey(128, 0.5, np.random.default_rng(0))
    _, cache = engine.prefill(w, ex.prompt, policy=ZipVL(tau=0.9))
    kept = [int(layer.lengths[0, 0]) for layer in cache.layers]
    assert all((layer.lengths == k).all() for layer, k in zip(cache.layers, kept, strict=True))
    assert len(set(kept)) > 1 and max(kept) < 132


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"tau": 0.0}, r"tau: expected a fraction in \(0, 1\], got 0.0"),
        ({"tau": 1.5}, "tau"),
        ({"tau": -0.2}, "tau"),
        ({"tau": "high"}, "tau"),
        ({"probe_fraction": 0.0}, "probe_fraction"),
        ({"probe_fraction": 2.0}, "probe_fraction"),
        ({"high_bits": 3}, r"high_bits: expected one of \(2, 4, 8\), got 3"),
        ({"low_bits": 16}, "low_bits: expected one of"),
        ({"low_bits": 8, "high_bits": 4}, "low_bits: expected at most high_bits"),
        ({"select": "raw"}, "select"),
        ({"rest": "evict"}, "rest"),
    ],
)
def test_bad_hyperparameters(kw, match):
    with pytest.raises(ParameterError, match=match):
        zipvl(**kw)


def test_wrong_cache_layout():
    c = view(n=20)
    policy = ZipVL()
    bad = misshapen(c)
    for cache in bad:
        with pytest.raises(ShapeError, match="ZipVL: cache"):
            policy.compress(0, cache)


def test_registered_in_kv_eval():
    from qkv.lab import kv_eval

    assert kv_eval.METHODS["zipvl"](32).rest == "drop"
    assert kv_eval.METHODS["zipvl-mixed"](32).rest == "quantize"
