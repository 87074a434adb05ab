"""sink_metric: key importance and sink rate against explicit loops, and its bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qkv
from qkv.errors import DTypeError, ParameterError, ShapeError
from qkv.reference.analysis import sink_metric


def causal_weights(rng: np.random.Generator, lead: tuple[int, ...], T: int) -> np.ndarray:
    """Random causal row-stochastic weights (..., T, T), float64."""
    x = rng.exponential(size=(*lead, T, T)) * np.tril(np.ones((T, T)))
    return x / x.sum(-1, keepdims=True)


def loop_importance(A: np.ndarray, causal: bool) -> np.ndarray:
    T = A.shape[-1]
    out = np.zeros(A.shape[:-1])
    for idx in np.ndindex(A.shape[:-2]):
        for k in range(T):
            rows = range(k, T) if causal else range(T)
            out[(*idx, k)] = sum(A[(*idx, i, k)] for i in rows) / len(rows)
    return out


@settings(max_examples=25, deadline=None)
@given(
    T=st.integers(1, 9), heads=st.integers(1, 4), seed=st.integers(0, 2**16), causal=st.booleans()
)
def test_importance_matches_loop(T, heads, seed, causal):
    rng = np.random.default_rng(seed)
    if causal:
        A = causal_weights(rng, (2, heads), T)
    else:
        A = rng.dirichlet(np.ones(T), size=(2, heads, T))
    m = sink_metric(A, causal=causal)
    np.testing.assert_allclose(m.importance, loop_importance(A, causal), rtol=1e-12)


def test_rate_counts_heads_above_epsilon():
    T = 6
    A = np.tile(np.tril(np.ones((T, T))) / np.arange(1, T + 1)[:, None], (3, 4, 1, 1))
    # head (0, 1): every row puts 0.9 on token 0 (rest spread); importance of token 0 = 0.9*5/6+1/6
    sink = np.tril(np.ones((T, T))) * 0.1 / np.maximum(np.arange(T), 1)[:, None]
    sink[:, 0] = 0.9
    sink[0, 0] = 1.0
    A[0, 1] = sink
    m = sink_metric(A, epsilon=0.5)
    expected = np.zeros((3, 4), dtype=bool)
    expected[0, 1] = True
    # uniform causal rows give token 0 importance mean(1/(i+1)) = H_6/6 = 0.408 < 0.5
    assert m.rate == pytest.approx(1 / 12)
    np.testing.assert_array_equal(m.is_sink, expected)


def test_first_token_sink_of_the_lab_decoder():
    from qkv.lab import decoder as dec

    weights = dec.load()
    tokens = np.random.default_rng(0).integers(10, 100, size=(1, 64))
    _, A = dec.forward(weights, tokens, return_attention=True)  # (L, B, H, T, T)
    m = sink_metric(A.astype(np.float64))
    assert m.importance.shape == (4, 1, 8, 64)
    # the importance of every key is in [0, 1] and the sink set is consistent with the rate
    assert 0 <= m.importance.min() and m.importance.max() <= 1 + 1e-6
    assert m.rate == pytest.approx(m.is_sink.mean())


def test_sigmoid_weights_need_row_stochastic_false():
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((1, 2, 8, 4)) for _ in range(3))
    _, P = qkv.sigmoid(q, k, v, causal=True, return_weights=True)
    with pytest.raises(ParameterError, match="row-stochastic"):
        sink_metric(P)
    m = sink_metric(P, row_stochastic=False)
    np.testing.assert_allclose(m.importance, loop_importance(P, True), rtol=1e-12)


@pytest.mark.parametrize("epsilon", [0.0, 1.0, -0.1, 1.5, True])
def test_epsilon_outside_unit_interval(epsilon):
    A = causal_weights(np.random.default_rng(0), (1,), 4)
    with pytest.raises(ParameterError, match="epsilon"):
        sink_metric(A, epsilon=epsilon)


def test_token_out_of_range():
    A = causal_weights(np.random.default_rng(0), (1,), 4)
    with pytest.raises(ParameterError, match="token"):
        sink_metric(A, token=4)


def test_not_row_stochastic():
    A = causal_weights(np.random.default_rng(0), (2,), 5)
    A[1, 3, 0] += 0.01
    with pytest.raises(ParameterError, match="row-stochastic"):
        sink_metric(A)


def test_causal_leak_and_negative_and_shape_and_dtype():
    A = causal_weights(np.random.default_rng(0), (1,), 4)
    leaky = np.full((4, 4), 0.25)
    with pytest.raises(ParameterError, match="causal"):
        sink_metric(leaky)
    sink_metric(leaky, causal=False)  # fine bidirectionally
    negative = A.copy()
    negative[0, 2, :2] = [1.5, -0.5]
    with pytest.raises(ParameterError, match="non-negative"):
        sink_metric(negative)
    with pytest.raises(ShapeError, match="attn"):
        sink_metric(A[..., :3])
    with pytest.raises(DTypeError, match="attn"):
        sink_metric((A > 0).astype(np.int64))
