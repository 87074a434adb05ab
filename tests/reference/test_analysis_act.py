"""act: hidden-sink calibration against an explicit loop, its properties and bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qkv.errors import ParameterError
from qkv.reference.analysis import act
from qkv.reference.analysis.act_calibration import act_decoder_attention, act_encoder_attention


def weights_with_sinks(rng: np.random.Generator, heads: int, T: int, causal: bool) -> np.ndarray:
    """Random row-stochastic weights (heads, T, T) with a few heavy columns."""
    x = rng.exponential(size=(heads, T, T))
    heavy = rng.random((heads, 1, T)) < 0.3
    x = x * np.where(heavy, 20.0, 1.0)
    if causal:
        x = x * np.tril(np.ones((T, T)))
    return x / x.sum(-1, keepdims=True)


def loop_act(A: np.ndarray, beta: float, tau: float, causal: bool) -> np.ndarray:
    """One head at a time, one row at a time, straight from the official update."""
    out = A.copy()
    for h in range(A.shape[0]):
        T = A.shape[-1]
        sinks = [j for j in range(T) if A[h, :, j].sum() / (T - j if causal else T) > tau]
        S = sinks[1:]  # the first sink is left alone
        for i in range(T):
            rest = [j for j in range(T) if j not in S]
            mass_rest = sum(A[h, i, j] for j in rest)
            if mass_rest == 0:
                continue
            avail = (1 - beta) * sum(A[h, i, j] for j in S)
            for j in S:
                out[h, i, j] = beta * A[h, i, j]
            for j in rest:
                out[h, i, j] = A[h, i, j] + avail * A[h, i, j] / mass_rest
    return out


@settings(max_examples=25, deadline=None)
@given(
    T=st.integers(1, 10),
    heads=st.integers(1, 3),
    seed=st.integers(0, 2**16),
    beta=st.floats(0, 1),
    tau=st.floats(0.02, 0.5),
    causal=st.booleans(),
)
def test_matches_loop_and_rows_sum_to_one(T, heads, seed, beta, tau, causal):
    A = weights_with_sinks(np.random.default_rng(seed), heads, T, causal)
    out = act(A, beta=beta, threshold=tau, causal=causal)
    np.testing.assert_allclose(out, loop_act(A, beta, tau, causal), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(out.sum(-1), 1.0, rtol=1e-12)
    assert out.dtype == A.dtype and (out >= 0).all()
    if causal:
        assert not np.triu(out, 1).any()


def test_beta_one_is_the_identity_and_first_sink_is_kept():
    rng = np.random.default_rng(3)
    A = weights_with_sinks(rng, 4, 12, True)
    np.testing.assert_array_equal(act(A, beta=1.0), A)
    # a head with its only sink at token 0: nothing changes
    T = 8
    B = np.tril(np.ones((T, T))) * 0.02
    B[:, 0] = 0
    B = B + np.eye(T)[0][None, :] * (1 - B.sum(-1, keepdims=True))
    np.testing.assert_allclose(act(B[None]), B[None], rtol=0, atol=0)


def test_float32_stays_float32():
    A = weights_with_sinks(np.random.default_rng(5), 2, 9, True).astype(np.float32)
    out = act(A)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.sum(-1), 1.0, atol=1e-6)


def test_decoder_attention_beta_one_reproduces_the_model():
    from qkv.lab import decoder as dec

    w = dec.load()
    tokens = np.random.default_rng(0).integers(10, 100, size=(1, 40))
    plain = dec.forward(w, tokens)
    fn = act_decoder_attention({1: (0, 7), 2: (3,)}, n_layers=4, n_heads=8, beta=1.0)
    np.testing.assert_allclose(dec.forward(w, tokens, attention=fn), plain, atol=2e-4)
    moved = dec.forward(
        w, tokens, attention=act_decoder_attention({2: tuple(range(8))}, n_layers=4, n_heads=8)
    )
    assert np.isfinite(moved).all()


def test_encoder_attention_calibrates_real_tokens_only():
    import qkv

    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((2, 3, 6, 4)) for _ in range(3))
    mask = np.ones((2, 1, 1, 6), dtype=bool)
    mask[1, ..., 4:] = False
    out = act_encoder_attention(beta=0.4, threshold=0.1)(q, k, v, mask=mask)
    _, P = qkv.sdpa(q[1:, :, :4], k[1:, :, :4], v[1:, :, :4], return_weights=True)
    expected = act(P, causal=False) @ v[1:, :, :4]
    np.testing.assert_allclose(out[1:, :, :4], expected, rtol=1e-10)


@pytest.mark.parametrize("threshold", [0.0, 1.0, -1.0, 2.0])
def test_threshold_outside_unit_interval(threshold):
    A = weights_with_sinks(np.random.default_rng(0), 1, 5, True)
    with pytest.raises(ParameterError, match="threshold"):
        act(A, threshold=threshold)


@pytest.mark.parametrize("beta", [-0.1, 1.1])
def test_beta_outside_closed_unit_interval(beta):
    A = weights_with_sinks(np.random.default_rng(0), 1, 5, True)
    with pytest.raises(ParameterError, match="beta"):
        act(A, beta=beta)


def test_not_row_stochastic():
    A = weights_with_sinks(np.random.default_rng(0), 1, 5, True) * 0.9
    with pytest.raises(ParameterError, match="row-stochastic"):
        act(A)


@pytest.mark.parametrize("heads", [{4: (0,)}, {1: (8,)}, {0: (-1,)}])
def test_head_indices_out_of_range(heads):
    with pytest.raises(ParameterError, match="heads"):
        act_decoder_attention(heads, n_layers=4, n_heads=8)
