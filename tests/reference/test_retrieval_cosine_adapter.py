"""Cosine Adapter: order-preserving maps, prefix filters, gradients against finite differences."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qkv.errors import DTypeError, ParameterError, ShapeError
from qkv.reference.retrieval import (
    CosineAdapter,
    cosine_adapter,
    filter_relevant,
    fit_cosine_adapter,
)
from qkv.reference.retrieval.relevance_filter import (
    TRANSFORMS,
    adapter_gradient,
    adapter_loss,
    adapter_params,
    precision_recall,
)

transforms = st.sampled_from(sorted(TRANSFORMS))


def _unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _random_adapter(rng: np.random.Generator, d: int, transform: str, spread: float = 3.0):
    P = TRANSFORMS[transform]
    return CosineAdapter(rng.normal(0, spread, (d, P)), rng.normal(0, 1, P), transform)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), transform=transforms, K=st.integers(1, 40))
def test_mapping_keeps_the_cosine_order_and_the_filter_keeps_a_prefix(seed, transform, K):
    rng = np.random.default_rng(seed)
    Q, D = 4, 6
    e = _unit_rows(rng, Q, D)
    c = np.round(rng.uniform(-1, 1, (Q, K)), 2)  # rounding makes ties
    adapter = _random_adapter(rng, D, transform)
    r = cosine_adapter(e, c, adapter)
    assert r.shape == (Q, K) and np.all((r >= 0) & (r <= 1))
    for q in range(Q):
        order = np.argsort(-c[q], kind="stable")
        assert np.all(np.diff(r[q, order]) <= 0)  # mapped order == cosine order
        kept = filter_relevant(e, c, adapter, threshold=0.5)[q, order]
        # the kept set is a prefix of the cosine ranking: no dropped item before a kept one
        assert not np.any(~kept[:-1] & kept[1:])


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    transform=transforms,
    taus=st.lists(st.floats(0.01, 0.99), min_size=2, max_size=2),
)
def test_a_higher_threshold_keeps_a_subset(seed, transform, taus):
    rng = np.random.default_rng(seed)
    e, c = _unit_rows(rng, 5, 3), rng.uniform(-1, 1, (5, 12))
    adapter = _random_adapter(rng, 3, transform)
    low, high = sorted(taus)
    kept_low = filter_relevant(e, c, adapter, threshold=low)
    kept_high = filter_relevant(e, c, adapter, threshold=high)
    assert np.all(kept_low | ~kept_high)


def test_each_transform_against_a_scalar_loop():
    rng = np.random.default_rng(3)
    e, c = _unit_rows(rng, 3, 4), rng.uniform(-1, 1, (3, 5))
    for transform in TRANSFORMS:
        adapter = _random_adapter(rng, 4, transform, spread=1.0)
        r = cosine_adapter(e, c, adapter)
        for q in range(3):
            theta = [
                sum(e[q, i] * adapter.weight[i, j] for i in range(4)) + adapter.bias[j]
                for j in range(adapter.weight.shape[1])
            ]
            a, b = math.log1p(math.exp(theta[0])), theta[1]
            for d in range(5):
                u = (1 + c[q, d]) / 2
                f = {
                    "linear": c[q, d],
                    "sqrt": math.sqrt(u),
                    "quadratic": u**2,
                    "power": u ** math.log1p(math.exp(theta[-1])),
                }[transform]
                assert r[q, d] == pytest.approx(1 / (1 + math.exp(-(a * f + b))), rel=1e-12)


def test_dtype_is_kept_and_extreme_logits_stay_finite():
    rng = np.random.default_rng(0)
    e, c = _unit_rows(rng, 3, 4), rng.uniform(-1, 1, (3, 7))
    adapter = CosineAdapter(np.full((4, 2), 400.0), np.array([0.0, -300.0]))
    r64 = cosine_adapter(e, c, adapter)
    r32 = cosine_adapter(e.astype(np.float32), c.astype(np.float32), adapter)
    assert r64.dtype == np.float64 and r32.dtype == np.float32
    assert np.isfinite(r64).all() and np.isfinite(r32).all()
    edge = np.array([[-1.0 - 1e-7, 1.0 + 1e-7]])  # rounding just outside [-1, 1]
    for transform in ("sqrt", "power"):
        ad = _random_adapter(rng, 4, transform)
        assert np.isfinite(cosine_adapter(e[:1], edge, ad)).all()


@pytest.mark.parametrize("transform", sorted(TRANSFORMS))
def test_gradient_matches_central_differences(transform):
    rng = np.random.default_rng(1)
    e, c = _unit_rows(rng, 6, 3), rng.uniform(-0.9, 0.9, (6, 5))
    y = rng.random((6, 5)) < 0.4
    adapter = _random_adapter(rng, 3, transform, spread=0.5)
    grad_w, grad_b = adapter_gradient(adapter, e, c, y, weight_decay=0.1)
    h = 1e-6
    for grad, name in ((grad_w, "weight"), (grad_b, "bias")):
        base = getattr(adapter, name)
        for idx in np.ndindex(base.shape):
            plus, minus = base.copy(), base.copy()
            plus[idx] += h
            minus[idx] -= h

            def loss(x, name=name):
                kw = {"weight": adapter.weight, "bias": adapter.bias, name: x}
                return adapter_loss(
                    CosineAdapter(transform=transform, **kw), e, c, y, weight_decay=0.1
                )

            numeric = (loss(plus) - loss(minus)) / (2 * h)
            assert grad[idx] == pytest.approx(numeric, rel=1e-5, abs=1e-8)


def _query_dependent_task(seed: int, Q: int = 240, K: int = 30, D: int = 8):
    """Labels from a cutoff that moves with the query: what one global cutoff cannot fit."""
    rng = np.random.default_rng(seed)
    e = _unit_rows(rng, Q, D)
    c = rng.uniform(-0.2, 0.9, (Q, K))
    direction = rng.normal(size=D)
    cutoff = 0.35 + 0.3 * np.tanh(3 * e @ direction)  # (Q,)
    return e, c, c > cutoff[:, None]


@pytest.mark.parametrize("transform", sorted(TRANSFORMS))
def test_fit_learns_a_query_dependent_cutoff_that_beats_any_global_one(transform):
    e, c, y = _query_dependent_task(0)
    train, test = slice(0, 180), slice(180, None)
    adapter = fit_cosine_adapter(e[train], c[train], y[train], transform=transform, steps=300)
    _, _, f1 = precision_recall(filter_relevant(e[test], c[test], adapter), y[test])
    global_best = max(
        precision_recall(c[test] >= t, y[test])[2] for t in np.linspace(-0.2, 0.9, 221)
    )
    assert f1 > global_best + 0.03, (f1, global_best)
    assert np.all(adapter_params(adapter, e)[0] > 0)  # slopes stay positive


def test_fit_lowers_the_loss_and_is_deterministic():
    e, c, y = _query_dependent_task(1, Q=60)
    start = CosineAdapter(np.zeros((8, 2)), np.array([np.log(np.expm1(1.0)), 0.0]))
    first = fit_cosine_adapter(e, c, y, steps=100)
    again = fit_cosine_adapter(e, c, y, steps=100)
    assert adapter_loss(first, e, c, y) < 0.8 * adapter_loss(start, e, c, y)
    np.testing.assert_array_equal(first.weight, again.weight)


def test_precision_recall_by_counting():
    kept = np.array([[True, True, False], [False, False, False]])
    labels = np.array([[1, 0, 1], [0, 0, 1]])
    p, r, f1 = precision_recall(kept, labels)
    assert (p, r) == (0.5, 1 / 3) and f1 == pytest.approx(2 * 0.5 * (1 / 3) / (0.5 + 1 / 3))
    assert precision_recall(np.zeros((1, 2), bool), np.zeros((1, 2))) == (0.0, 0.0, 0.0)


# --------------------------------------------------------------------------- bad input

ADAPTER = CosineAdapter(np.zeros((4, 2)), np.zeros(2))
E = np.full((2, 4), 0.5)
C = np.zeros((2, 3))


def test_query_and_adapter_dimensions_that_differ():
    with pytest.raises(ShapeError, match=r"query_embeddings: expected dimension D=4.*got 5"):
        cosine_adapter(np.ones((2, 5)), C, ADAPTER)


def test_empty_document_list():
    with pytest.raises(ShapeError, match="empty document list"):
        cosine_adapter(E, np.zeros((2, 0)), ADAPTER)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_embeddings_and_scores(bad):
    e = E.copy()
    e[0, 1] = bad
    with pytest.raises(ParameterError, match="query_embeddings: expected finite"):
        cosine_adapter(e, C, ADAPTER)
    c = C.copy()
    c[1, 2] = bad
    with pytest.raises(ParameterError, match="scores: expected finite"):
        filter_relevant(E, c, ADAPTER)


def test_other_bad_inputs():
    with pytest.raises(ShapeError, match="scores: expected one row per query"):
        cosine_adapter(E, np.zeros((3, 3)), ADAPTER)
    with pytest.raises(DTypeError, match="expected one dtype"):
        cosine_adapter(E.astype(np.float32), C, ADAPTER)
    with pytest.raises(ParameterError, match=r"threshold: expected a number in \(0, 1\)"):
        filter_relevant(E, C, ADAPTER, threshold=1.0)
    with pytest.raises(ParameterError, match="transform: expected one of"):
        CosineAdapter(np.zeros((4, 2)), np.zeros(2), "cubic")
    with pytest.raises(ShapeError, match=r"expected \(D, 3\) and \(3,\)"):
        CosineAdapter(np.zeros((4, 2)), np.zeros(2), "power")
    with pytest.raises(ShapeError, match="labels: expected the shape"):
        fit_cosine_adapter(E, C, np.zeros((2, 2)))
    with pytest.raises(ParameterError, match="labels: expected bool or 0/1"):
        fit_cosine_adapter(E, C, np.full((2, 3), 2))
