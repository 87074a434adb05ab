"""HiP attention (arXiv 2406.09827): hierarchical tree search for top key blocks.

Independent references: brute-force top blocks where the tree search is provably exact (scores
that grow with the key index), dense attention by the full-cache engine run when the range
holds at most ``mask_k`` keys, and the cost bound ``2 m b_k`` per round over ``log2(B / m)``
rounds.
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
from qkv.reference.sparse import HiP, hip
from qkv.reference.sparse.hip_tree import hip_keys, hip_tree_search


def test_catalog_id_and_official_defaults():
    assert hip is HiP
    h = HiP()
    assert (h.mask_k, h.block_size_k, h.sliding_window) == (512, 1, 128)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    T=st.integers(1, 300),
    mask_k=st.integers(1, 40),
    bk=st.sampled_from([1, 2, 4]),
    nq=st.integers(1, 4),
)
def test_search_keeps_m_distinct_sorted_blocks_at_logarithmic_cost(seed, T, mask_k, bk, nq):
    rng = np.random.default_rng(seed)
    q, keys = rng.standard_normal((nq, 6)), rng.standard_normal((T, 6))
    blocks, cost = hip_tree_search(q, keys, mask_k=mask_k, block_size_k=bk)
    n_blocks, m = math.ceil(T / bk), math.ceil(mask_k / bk)
    assert len(blocks) == min(m, n_blocks) == len(set(blocks.tolist()))
    assert (np.diff(blocks) > 0).all() and blocks.min() >= 0 and blocks.max() < n_blocks
    probes = max(nq // 2, 1)
    rounds = math.ceil(math.log2(n_blocks / m)) + 1 if n_blocks > m else 0
    assert cost <= rounds * 2 * m * bk * probes


@settings(max_examples=25, deadline=None)
@given(T=st.integers(2, 400), mask_k=st.integers(1, 30), bk=st.sampled_from([1, 3]))
def test_search_is_exact_when_scores_grow_with_the_key_index(T, mask_k, bk):
    q = np.ones((1, 2))
    keys = np.stack([np.arange(T), np.zeros(T)], axis=1) / T  # q . k_j = j / T
    blocks, _ = hip_tree_search(q, keys, mask_k=mask_k, block_size_k=bk)
    n_blocks, m = math.ceil(T / bk), math.ceil(mask_k / bk)
    assert blocks.tolist() == list(range(max(n_blocks - m, 0), n_blocks))


@settings(max_examples=25, deadline=None)
@given(T=st.integers(0, 60), extra=st.integers(0, 20), window=st.integers(0, 10))
def test_range_within_mask_k_is_dense(T, extra, window):
    keys = np.random.default_rng(T).standard_normal((T + window, 4))
    got, cost = hip_keys(keys[:1], keys, mask_k=T + extra or 1, sliding_window=window)
    assert got.tolist() == list(range(T + window)) and cost == 0


def test_window_is_always_read():
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((200, 8))
    got, _ = hip_keys(rng.standard_normal((1, 8)), keys, mask_k=8, sliding_window=16)
    assert set(range(184, 200)) <= set(got.tolist()) and len(got) == 8 + 16


def test_selector_reads_per_head_sets_of_mask_k_plus_window():
    v = random_view(np.random.default_rng(1), C=60, length=50)
    out = HiP(mask_k=6, sliding_window=4).select(0, v)
    rows = sets(out)
    assert all(len(r) == 10 and set(range(46, 50)) <= r and max(r) < 50 for r in rows)
    assert len({frozenset(r) for r in rows}) > 1


@pytest.fixture(scope="module")
def model():
    return dec.init_weights(SMALL, seed=9)


def test_mask_k_covering_the_cache_is_full_attention(model):
    prompt = np.random.default_rng(0).integers(0, SMALL.vocab, size=(2, 20))
    full = engine.generate(model, prompt, 4)
    sel = engine.generate(model, prompt, 4, selector=HiP(mask_k=20, sliding_window=4))
    np.testing.assert_allclose(sel.logits, full.logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask_k", [0, -3, 2.5, True])
def test_mask_k_below_one_is_rejected(mask_k):
    with pytest.raises(ParameterError, match="mask_k"):
        HiP(mask_k=mask_k)
    with pytest.raises(ParameterError, match="mask_k"):
        hip_tree_search(np.ones((1, 2)), np.ones((5, 2)), mask_k=mask_k)


def test_negative_window_is_rejected():
    with pytest.raises(ParameterError, match="sliding_window"):
        HiP(sliding_window=-1)
