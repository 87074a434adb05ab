"""LeanVec (``qkv.reference.retrieval.leanvec``): projections, Frank-Wolfe, 8-bit search.

Independent computations: losses as explicit Frobenius norms of ``Q A B^T X^T - Q X^T``, the
Eckart-Young bound (no rank-``d`` product beats the truncated SVD of ``Q X^T``), principal
directions from the eigenvectors of the covariance, exact search as a per-query loop.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qkv
from qkv.errors import DTypeError, ParameterError, ShapeError
from qkv.reference.retrieval import LeanVec, leanvec
from qkv.reference.retrieval.leanvec_projection import (
    exact_search,
    leanvec_id,
    leanvec_ood,
    lvq_decode,
    lvq_dot,
    lvq_encode,
    ood_loss,
    recall_at,
)


def frobenius_loss(Q, X, A, B):
    return float(np.sum((Q @ A @ B.T @ X.T - Q @ X.T) ** 2))


def clustered(rng, N, D, *, shift=0.0):
    """Unit vectors around a few centres (a shifted copy plays out-of-distribution queries)."""
    centres = rng.standard_normal((6, D))
    x = centres[rng.integers(0, 6, N)] + 0.6 * rng.standard_normal((N, D)) + shift
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def loop_search(queries, data, k):
    out = []
    for q in queries:
        scores = [float(np.dot(q, x)) for x in data]
        out.append(sorted(range(len(data)), key=lambda j: (-scores[j], j))[:k])
    return np.array(out)


def test_catalog_name_is_the_index():
    assert leanvec is LeanVec


@settings(max_examples=25, deadline=None)
@given(
    st.integers(2, 12),
    st.integers(1, 12),
    st.integers(3, 40),
    st.integers(3, 40),
    st.integers(0, 2**31),
)
def test_first_step_gives_orthonormal_columns(D, d, Nq, N, seed):
    d = min(d, D)
    rng = np.random.default_rng(seed)
    fit = leanvec_ood(rng.standard_normal((Nq, D)), rng.standard_normal((N, D)), d, max_steps=1)
    eye = np.eye(d)
    np.testing.assert_allclose(fit.query_matrix.T @ fit.query_matrix, eye, atol=1e-10)
    np.testing.assert_allclose(fit.data_matrix.T @ fit.data_matrix, eye, atol=1e-10)


@settings(max_examples=15, deadline=None)
@given(st.integers(4, 16), st.integers(1, 8), st.integers(0, 2**31))
def test_loss_is_the_frobenius_norm_nonnegative_and_decreasing(D, d, seed):
    d = min(d, D)
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((60, D))
    Q = rng.standard_normal((30, D)) * np.linspace(0.2, 2.0, D)  # another distribution
    fit = leanvec_ood(Q, X, d, rel_tol=0.0, max_steps=60)
    A, B = fit.query_matrix, fit.data_matrix
    scale = frobenius_loss(Q, X, 0 * A, B)  # ||Q X^T||^2
    assert fit.losses[-1] == pytest.approx(frobenius_loss(Q, X, A, B), rel=1e-8, abs=1e-9 * scale)
    assert np.all(fit.losses >= -1e-9 * scale)
    # Eckart-Young: no rank-d product does better than the truncated SVD of Q X^T
    s = np.linalg.svd(Q @ X.T, compute_uv=False)
    assert fit.losses[-1] >= np.sum(s[d:] ** 2) - 1e-8 * scale
    # the first A is arbitrary (it saw B = 0, a zero gradient); from the second step on the
    # loss does not increase
    assert np.all(np.diff(fit.losses[1:]) <= 1e-6 * fit.losses[1] + 1e-9 * scale)


def test_frank_wolfe_reaches_the_optimum_when_queries_are_the_data():
    rng = np.random.default_rng(3)
    X = rng.standard_normal((300, 24)) * np.linspace(0.3, 3.0, 24)
    lam = np.linalg.eigvalsh(X.T @ X)[::-1]
    optimum = np.sum(lam[6:] ** 2)  # Eckart-Young on X X^T
    fit = leanvec_ood(X, X, 6)  # stops early, by the relative tolerance
    assert len(fit.losses) < 500
    assert optimum <= fit.losses[-1] <= 1.05 * optimum
    assert optimum <= leanvec_ood(X, X, 6, rel_tol=0.0).losses[-1] <= 1.001 * optimum


def test_stopping_rule():
    rng = np.random.default_rng(4)
    X, Q = rng.standard_normal((80, 10)), rng.standard_normal((40, 10))
    fit = leanvec_ood(Q, X, 3, rel_tol=1e-3)
    changes = np.abs(np.diff(fit.losses)) / fit.losses[:-1]
    assert changes[-1] < 1e-3 and np.all(changes[1:-1] >= 1e-3)
    assert len(leanvec_ood(Q, X, 3, rel_tol=0.0, max_steps=7).losses) == 7


@pytest.mark.parametrize("D", [1, 5, 17])
def test_pca_with_full_dimension_gives_zero_loss(D):
    rng = np.random.default_rng(D)
    X = rng.standard_normal((40, D))
    P, _ = leanvec_id(X, D)
    assert ood_loss(X.T @ X, X.T @ X, P, P) == pytest.approx(0.0, abs=1e-9 * np.sum((X @ X.T) ** 2))
    assert frobenius_loss(X, X, P, P) == pytest.approx(0.0, abs=1e-9 * np.sum((X @ X.T) ** 2))


def test_pca_directions_are_the_top_eigenvectors_of_the_covariance():
    rng = np.random.default_rng(5)
    X = rng.standard_normal((500, 8)) * np.array([5, 4, 3, 2, 1, 0.5, 0.2, 0.1]) + 7.0
    P, mu = leanvec_id(X, 3)
    np.testing.assert_allclose(mu, X.mean(axis=0))
    w, V = np.linalg.eigh(np.cov(X, rowvar=False))
    top = V[:, np.argsort(w)[::-1][:3]]  # (D, 3)
    np.testing.assert_allclose(np.abs(P.T @ top), np.eye(3), atol=1e-8)


def test_pca_with_fewer_vectors_than_d_still_gives_an_orthonormal_basis():
    X = np.random.default_rng(6).standard_normal((3, 9))
    P, _ = leanvec_id(X, 6)
    np.testing.assert_allclose(P.T @ P, np.eye(6), atol=1e-10)


@settings(max_examples=25, deadline=None)
@given(
    st.integers(1, 20), st.integers(1, 30), st.sampled_from([1e-3, 1.0, 1e3]), st.integers(0, 99)
)
def test_lvq_codes_round_to_half_a_step(N, d, magnitude, seed):
    rng = np.random.default_rng(seed)
    y = magnitude * rng.standard_normal((N, d))
    y[0] = y[0, 0]  # a constant vector
    codes, scales, offsets = lvq_encode(y)
    assert codes.dtype == np.uint8 and codes.shape == (N, d)
    assert codes.min(initial=0) >= 0 and codes.max(initial=0) <= 255
    error = np.abs(lvq_decode(codes, scales, offsets) - y)  # (N, d)
    assert np.all(error <= scales[:, None] / 2 * (1 + 1e-9) + 1e-12 * magnitude)
    assert scales[0] == 0 and np.all(error[0] == 0)
    np.testing.assert_allclose(y.min(axis=1), offsets)


def test_lvq_dot_equals_the_factored_form():
    rng = np.random.default_rng(7)
    q = rng.standard_normal((5, 12))
    codes = rng.integers(0, 256, (30, 12)).astype(np.uint8)
    scales, offsets = rng.random(30), rng.standard_normal(30)
    want = np.empty((5, 30))
    for i in range(5):
        for j in range(30):
            want[i, j] = offsets[j] * q[i].sum() + scales[j] * np.dot(q[i], codes[j].astype(float))
    np.testing.assert_allclose(lvq_dot(q, codes, scales, offsets), want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(qkv.lvq_dot(q, codes, scales, offsets), want, rtol=1e-12)


@pytest.mark.parametrize("kind", ["id", "ood"])
def test_reranking_every_vector_is_exact_search(kind):
    rng = np.random.default_rng(8)
    X = clustered(rng, 120, 16)
    Q = clustered(rng, 9, 16, shift=0.5)
    index = LeanVec.build(X, 4, kind=kind, queries=clustered(rng, 50, 16, shift=0.5))
    found = index.search(Q, 7, candidates=120)
    np.testing.assert_array_equal(found.indices, loop_search(Q, X, 7))
    np.testing.assert_array_equal(exact_search(Q, X, 7), loop_search(Q, X, 7))
    assert found.multiply_adds == 120 * 4 + 120 * 16


def test_exact_search_breaks_ties_by_index():
    X = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    index = LeanVec.build(X, 2)
    q = np.array([[1.0, 0.0]])
    np.testing.assert_array_equal(exact_search(q, X, 3), [[0, 1, 3]])
    np.testing.assert_array_equal(index.search(q, 3, candidates=4).indices, [[0, 1, 3]])


def test_recall_grows_with_candidates_and_ood_beats_id_on_ood_queries():
    """Data vary most along axes 0-15, queries only along 8-15: PCA keeps the wrong axes."""
    rng = np.random.default_rng(9)
    D = 32
    X = rng.standard_normal((600, D)) * np.r_[np.full(8, 3.0), np.full(8, 1.0), np.full(16, 0.3)]

    def queries(n):
        q = 0.1 * rng.standard_normal((n, D))
        q[:, 8:16] += rng.standard_normal((n, 8))
        return q

    train, test = queries(200), queries(60)
    truth = exact_search(test, X, 10)
    ood = LeanVec.build(X, 8, kind="ood", queries=train)
    id_ = LeanVec.build(X, 8, kind="id")
    for index in (ood, id_):
        recalls = [
            recall_at(index.search(test, 10, candidates=c).indices, truth) for c in (10, 40, 160)
        ]
        assert recalls == sorted(recalls)
        assert recall_at(index.search(test, 10, candidates=600).indices, truth) == 1.0
    first_ood = recall_at(ood.search(test, 10).candidates, truth)
    first_id = recall_at(id_.search(test, 10).candidates, truth)
    assert first_ood > 0.5 > 0.2 > first_id


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_is_kept(dtype):
    rng = np.random.default_rng(10)
    X, Q = rng.standard_normal((50, 8)).astype(dtype), rng.standard_normal((20, 8)).astype(dtype)
    for index in (LeanVec.build(X, 3), LeanVec.build(X, 3, kind="ood", queries=Q)):
        assert index.query_matrix.dtype == dtype and index.scales.dtype == dtype
        assert index.codes.dtype == np.uint8
        assert (
            qkv.lvq_dot(Q @ index.query_matrix, index.codes, index.scales, index.offsets).dtype
            == dtype
        )
    assert leanvec_ood(Q, X, 3).losses.dtype == np.float64


# ----------------------------------------------------------------------- bad input


def test_bad_input():
    rng = np.random.default_rng(11)
    X, Q = rng.standard_normal((30, 8)), rng.standard_normal((5, 8))
    index = LeanVec.build(X, 4)
    with pytest.raises(ShapeError, match="queries: expected 8 columns"):
        index.search(rng.standard_normal((5, 6)), 3)
    with pytest.raises(ShapeError, match="queries: expected 8 columns"):
        leanvec_ood(rng.standard_normal((5, 6)), X, 3)
    with pytest.raises(ParameterError, match=r"k: expected at most 30 \(the number of data"):
        index.search(Q, 31)
    with pytest.raises(ParameterError, match="k: expected at most 30"):
        exact_search(Q, X, 31)
    with pytest.raises(ParameterError, match="candidates: expected at least k = 5"):
        index.search(Q, 5, candidates=3)
    with pytest.raises(ParameterError, match=r"d: expected at most 8 \(the full dimension"):
        LeanVec.build(X, 9)
    with pytest.raises(ParameterError, match="d: expected at most 8"):
        leanvec_ood(Q, X, 9)
    with pytest.raises(ParameterError, match="d: expected an integer >= 1"):
        leanvec_id(X, 0)
    bad = X.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ParameterError, match="data: expected finite values, got 1 NaN"):
        LeanVec.build(bad, 3)
    with pytest.raises(ParameterError, match="queries: expected finite values"):
        index.search(np.full((2, 8), np.inf), 3)
    with pytest.raises(ParameterError, match="queries: LeanVec-OOD learns from training"):
        LeanVec.build(X, 3, kind="ood")
    with pytest.raises(ParameterError, match="kind: expected 'id' or 'ood'"):
        LeanVec.build(X, 3, kind="eig")
    with pytest.raises(DTypeError, match="queries, data: expected one dtype"):
        index.search(Q.astype(np.float32), 3)
    with pytest.raises(ShapeError, match="data: expected rank 2"):
        LeanVec.build(X[0], 3)
    with pytest.raises(ParameterError, match="rel_tol"):
        leanvec_ood(Q, X, 3, rel_tol=2.0)


def test_bad_lvq_dot_input():
    rng = np.random.default_rng(12)
    q, scales, offsets = rng.standard_normal((2, 4)), rng.random(6), rng.random(6)
    codes = rng.integers(0, 256, (6, 4)).astype(np.uint8)
    with pytest.raises(DTypeError, match="codes: expected a uint8 array"):
        qkv.lvq_dot(q, codes.astype(np.int64), scales, offsets)
    with pytest.raises(ShapeError, match=r"codes: expected .* d = 4 as queries"):
        qkv.lvq_dot(q, codes[:, :3], scales, offsets)
    with pytest.raises(ShapeError, match=r"scales: expected \(6,\) as codes"):
        qkv.lvq_dot(q, codes, scales[:5], offsets)
    with pytest.raises(DTypeError, match="expected one dtype"):
        qkv.lvq_dot(q, codes, scales.astype(np.float32), offsets)
