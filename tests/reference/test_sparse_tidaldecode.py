"""TidalDecode (arXiv 2410.05076): dense first layers, per-head top-k selection layers, reuse.

Independent references: per-head top-k by Python's ``sorted`` over explicit dot products, and
the full-cache engine run when the budget covers the cache.
"""

from __future__ import annotations

import numpy as np
import pytest
from _sparse_views import SMALL, random_view, sets
from hypothesis import given, settings
from hypothesis import strategies as st

from qkv.errors import ParameterError
from qkv.lab import decoder as dec
from qkv.lab import engine
from qkv.reference.sparse import TidalDecode, tidaldecode
from qkv.reference.sparse.decode_scores import head_scores
from qkv.reference.sparse.tidal_selector import tidal_topk


def test_catalog_id_and_official_defaults():
    assert tidaldecode is TidalDecode
    t = TidalDecode()
    assert (t.top_k, t.sparse_layer_start, t.correction_layer) == (256, 2, 13)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), top_k=st.integers(1, 25), length=st.integers(25, 30))
def test_selection_layer_keeps_each_heads_best_logits(seed, top_k, length):
    v = random_view(np.random.default_rng(seed), C=32, length=length)
    got = sets(tidal_topk(head_scores(v), top_k))
    for i, row in enumerate(got):
        b, h = divmod(i, 4)
        logit = {j: float(v.queries[b, h, 0] @ v.keys[b, h // 2, j]) for j in range(length)}
        assert row == set(sorted(logit, key=lambda j: -logit[j])[:top_k])


def test_layers_dense_then_selected_then_reused():
    rng = np.random.default_rng(0)
    t = TidalDecode(top_k=5, sparse_layer_start=1, correction_layer=3)
    v0 = random_view(rng, C=30)
    assert (t.select(0, v0) == np.arange(30)).all()  # dense layer
    chosen = t.select(1, random_view(rng, C=30))
    assert chosen.shape == (2, 4, 5)
    assert len({tuple(r) for r in chosen.reshape(-1, 5)}) > 1  # heads choose independently
    np.testing.assert_array_equal(t.select(2, random_view(rng, C=30)), chosen)  # persistence
    v3 = random_view(rng, C=30)
    np.testing.assert_array_equal(t.select(3, v3), tidal_topk(head_scores(v3), 5))  # re-select
    np.testing.assert_array_equal(t.select(4, random_view(rng, C=30)), t.select(3, v3))


@pytest.fixture(scope="module")
def model():
    return dec.init_weights(SMALL, seed=7)


def test_budget_covering_the_cache_is_full_attention(model):
    prompt = np.random.default_rng(0).integers(0, SMALL.vocab, size=(2, 20))
    full = engine.generate(model, prompt, 5)
    t = TidalDecode(top_k=64, sparse_layer_start=1, correction_layer=2)
    np.testing.assert_allclose(
        engine.generate(model, prompt, 5, selector=t).logits, full.logits, rtol=1e-5, atol=1e-5
    )


def test_small_budget_runs_sparse_in_the_engine(model):
    prompt = np.random.default_rng(1).integers(0, SMALL.vocab, size=(1, 50))
    full = engine.generate(model, prompt, 4)
    g = engine.generate(model, prompt, 4, selector=TidalDecode(top_k=4, sparse_layer_start=1))
    assert g.tokens.shape == (1, 4)
    assert not np.allclose(g.logits[:, 1:], full.logits[:, 1:])  # decoding really is sparse
    np.testing.assert_array_equal(g.logits[:, 0], full.logits[:, 0])  # prefill is full


def test_top_k_above_the_cache_is_rejected():
    v = random_view(np.random.default_rng(2), C=20, length=12)
    with pytest.raises(ParameterError, match="top_k: expected at most the 12 keys"):
        tidal_topk(head_scores(v), 13)


def test_reuse_without_a_selection_on_this_cache_is_rejected():
    t = TidalDecode(top_k=3, sparse_layer_start=0, correction_layer=None)
    t.select(0, random_view(np.random.default_rng(3), C=20))
    with pytest.raises(ParameterError, match="reuses the selection"):
        t.select(1, random_view(np.random.default_rng(3), C=21))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"top_k": 0}, "top_k"),
        ({"sparse_layer_start": -1}, "sparse_layer_start"),
        ({"sparse_layer_start": 3, "correction_layer": 3}, "correction_layer"),
    ],
)
def test_bad_hyperparameters_are_rejected(kwargs, name):
    with pytest.raises(ParameterError, match=name):
        TidalDecode(**kwargs)


def test_count_reads_measures_the_fraction_of_the_cache_read():
    from qkv.reference.sparse.decode_scores import CountReads

    rng = np.random.default_rng(4)
    counted = CountReads(TidalDecode(top_k=6, sparse_layer_start=1, correction_layer=None))
    counted.select(0, random_view(rng, C=30))  # dense: 1
    counted.select(1, random_view(rng, C=30, length=24))  # 6 of 24: 0.25
    assert counted.fraction_read == pytest.approx((1 + 0.25) / 2)
