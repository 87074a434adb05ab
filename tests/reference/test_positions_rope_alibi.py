"""Properties of RoPE x ALiBi with harmonic slopes (Fulu Li, arXiv 2410.18441).

Independent computations: an explicit loop over heads and query-key pairs that builds each
rotation as a dense block-diagonal matrix; the two limits of the factored form against
:func:`qkv.reference.core.rope` + :func:`~qkv.reference.core.sdpa` and
:func:`qkv.reference.core.alibi` + ``sdpa``; the factorisation of the weights; invariance to a
shift of every position.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qkv
from qkv.errors import ParameterError, ShapeError
from qkv.reference import core
from qkv.reference.positions.rope_alibi import (
    dispatched_rope_alibi_harmonic,
    harmonic_slopes,
    rope_alibi_harmonic,
)


def arrays(rng, B=2, H=4, Hkv=2, N=6, M=9, D=8, Dv=3, dtype=np.float64):
    q = rng.standard_normal((B, H, N, D)).astype(dtype)
    k = rng.standard_normal((B, Hkv, M, D)).astype(dtype)
    v = rng.standard_normal((B, Hkv, M, Dv)).astype(dtype)
    return q, k, v


def rotation(p, D, base=10000.0):
    """The dense D x D rotation of position p: a 2 x 2 block per feature pair."""
    R = np.zeros((D, D))
    for t in range(D // 2):
        theta = p * base ** (-2 * t / D)
        c, s = np.cos(theta), np.sin(theta)
        R[2 * t : 2 * t + 2, 2 * t : 2 * t + 2] = [[c, -s], [s, c]]
    return R


def brute_force(q, k, v, slopes, qp, kp, *, causal, use_rope=True, use_alibi=True):
    B, H, N, D = q.shape
    Hkv, M = k.shape[1], k.shape[2]
    out = np.zeros((B, H, N, v.shape[-1]))
    weights = np.zeros((B, H, N, M))
    for b in range(B):
        for h in range(H):
            g = h // (H // Hkv)
            for i in range(N):
                s = np.full(M, -np.inf)
                for j in range(M):
                    if causal and j > i + (M - N):
                        continue
                    qi, kj = q[b, h, i], k[b, g, j]
                    if use_rope:
                        qi, kj = rotation(qp[i], D) @ qi, rotation(kp[j], D) @ kj
                    s[j] = qi @ kj / np.sqrt(D)
                    if use_alibi:
                        s[j] -= slopes[h] * abs(qp[i] - kp[j])
                if np.isfinite(s).any():
                    w = np.exp(s - s.max())
                    weights[b, h, i] = w / w.sum()
                    out[b, h, i] = weights[b, h, i] @ v[b, g]
    return out, weights


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(("N", "M"), [(6, 9), (5, 5), (1, 4)])
def test_matches_the_explicit_loop(causal, N, M):
    q, k, v = arrays(np.random.default_rng(0), N=N, M=M)
    qp, kp = np.arange(N) + (M - N), np.arange(M)
    expected, expected_w = brute_force(q, k, v, harmonic_slopes(4), qp, kp, causal=causal)
    out, w = rope_alibi_harmonic(q, k, v, causal=causal, return_weights=True)
    np.testing.assert_allclose(out, expected, rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(w, expected_w, rtol=1e-11, atol=1e-12)


def test_explicit_positions_and_slopes_match_the_loop():
    rng = np.random.default_rng(1)
    q, k, v = arrays(rng, N=4, M=7)
    qp, kp = np.array([3, 8, 9, 20]), np.array([0, 2, 3, 5, 8, 13, 21])
    slopes = np.array([0.0, 0.3, 2.0, 0.05])
    expected, _ = brute_force(q, k, v, slopes, qp, kp, causal=False)
    out = rope_alibi_harmonic(q, k, v, slopes=slopes, q_positions=qp, k_positions=kp, causal=False)
    np.testing.assert_allclose(out, expected, rtol=1e-11, atol=1e-12)


def test_harmonic_slopes_are_the_harmonic_series():
    np.testing.assert_array_equal(harmonic_slopes(1), [1.0])
    np.testing.assert_allclose(harmonic_slopes(5), [1, 1 / 2, 1 / 3, 1 / 4, 1 / 5])


@pytest.mark.parametrize("causal", [True, False])
def test_without_alibi_it_is_rope_attention(causal):
    q, k, v = arrays(np.random.default_rng(2), N=6, M=9)
    rotated_q = core.rope(q, offset=9 - 6)  # queries sit at the last positions
    expected = core.sdpa(rotated_q, core.rope(k), v, causal=causal)
    out = rope_alibi_harmonic(q, k, v, use_alibi=False, causal=causal)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [True, False])
def test_without_rope_and_with_alibi_slopes_it_is_alibi(causal):
    H = 4
    q, k, v = arrays(np.random.default_rng(3), H=H, N=6, M=9)
    bias = core.alibi(H, 6, 9, symmetric=not causal)  # (H, N, M)
    expected = core.sdpa(q, k, v, mask=bias, causal=causal)
    out = rope_alibi_harmonic(q, k, v, use_rope=False, slopes=core.alibi_slopes(H), causal=causal)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)


def test_without_rope_it_is_alibi_with_harmonic_slopes():
    H = 6
    q, k, v = arrays(np.random.default_rng(4), H=H, Hkv=3, N=7, M=7, D=5)  # odd D: no rotation
    per_head = (1.0 / np.arange(1, H + 1)) / core.alibi_slopes(H)  # harmonic over geometric
    bias = core.alibi(H, 7, 7) * per_head[:, None, None]  # ALiBi's distances, slopes 1/h
    expected = core.sdpa(q, k, v, mask=bias, causal=True)
    out = rope_alibi_harmonic(q, k, v, use_rope=False)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)


def test_both_factors_off_is_plain_attention():
    q, k, v = arrays(np.random.default_rng(5))
    out = rope_alibi_harmonic(q, k, v, use_rope=False, use_alibi=False, causal=False)
    np.testing.assert_allclose(out, core.sdpa(q, k, v), rtol=1e-12, atol=1e-12)


def test_weights_factor_into_rope_weights_times_a_distance_decay():
    H, N = 4, 8
    q, k, v = arrays(np.random.default_rng(6), H=H, N=N, M=N)
    _, rope_only = rope_alibi_harmonic(q, k, v, use_alibi=False, return_weights=True)
    _, both = rope_alibi_harmonic(q, k, v, return_weights=True)
    distance = np.abs(np.arange(N)[:, None] - np.arange(N)[None, :])  # (N, N)
    decay = np.exp(-1.0 / np.arange(1, H + 1))[:, None, None] ** distance  # r_h^|i-j|
    product = rope_only * decay  # (B, H, N, N): the two factors, renormalised per row
    np.testing.assert_allclose(both, product / product.sum(-1, keepdims=True), rtol=1e-10)


@settings(max_examples=25, deadline=None)
@given(shift=st.integers(-1000, 1000), causal=st.booleans(), seed=st.integers(0, 2**16))
def test_a_common_shift_of_positions_changes_nothing(shift, causal, seed):
    rng = np.random.default_rng(seed)
    q, k, v = arrays(rng, B=1, N=5, M=7)
    qp, kp = np.sort(rng.integers(0, 50, 5)), np.sort(rng.integers(0, 50, 7))
    out = rope_alibi_harmonic(q, k, v, q_positions=qp, k_positions=kp, causal=causal)
    moved = rope_alibi_harmonic(
        q, k, v, q_positions=qp + shift, k_positions=kp + shift, causal=causal
    )
    np.testing.assert_allclose(moved, out, rtol=1e-9, atol=1e-10)


def test_dtype_kept_and_queries_that_see_nothing_give_zeros():
    q, k, v = arrays(np.random.default_rng(7), N=6, M=3, dtype=np.float32)
    out = rope_alibi_harmonic(q, k, v)  # causal, N > M: the first 3 queries see no key
    assert out.dtype == np.float32 and np.isfinite(out).all()
    np.testing.assert_array_equal(out[:, :, :3], 0.0)
    q64, k64, v64 = (x.astype(np.float64) for x in (q, k, v))
    np.testing.assert_allclose(out, rope_alibi_harmonic(q64, k64, v64), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_dispatched_on_numba_matches_the_reference(dtype):
    q, k, v = arrays(np.random.default_rng(8), N=9, M=9, dtype=dtype)
    slopes = np.array([1.0, 0.25, 0.5, 2.0])
    expected = rope_alibi_harmonic(q, k, v, slopes=slopes)
    out = dispatched_rope_alibi_harmonic(q, k, v, slopes=slopes, backend="numba")
    assert isinstance(out, np.ndarray) and out.dtype == dtype
    tol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(out, expected, rtol=tol, atol=tol)
    assert qkv.rope_alibi_harmonic is dispatched_rope_alibi_harmonic


def test_dispatched_returns_the_array_type_it_was_given():
    q, k, v = arrays(np.random.default_rng(9))
    out = qkv.rope_alibi_harmonic(*(torch.from_numpy(x) for x in (q, k, v)), causal=False)
    assert isinstance(out, torch.Tensor)
    np.testing.assert_allclose(out.numpy(), rope_alibi_harmonic(q, k, v, causal=False))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(q_positions=np.arange(5)), ShapeError, "q_positions: expected integer positions"),
        (dict(k_positions=np.arange(10)), ShapeError, r"k_positions: .* shape \(9,\)"),
        (dict(k_positions=np.arange(9.0)), ShapeError, "k_positions: expected integer"),
        (dict(slopes=np.array([1.0, np.nan, 0.5, 0.1])), ParameterError, "slopes: expected finite"),
        (dict(slopes=np.array([1.0, np.inf, 0.5, 0.1])), ParameterError, "slopes: expected finite"),
        (dict(slopes=np.array([1.0, -0.5, 0.5, 0.1])), ParameterError, "slopes: .* >= 0"),
        (dict(slopes=np.ones(3)), ShapeError, r"slopes: expected 4 real numbers"),
        (dict(use_rope="yes"), ParameterError, "use_rope: expected a bool"),
        (dict(base=0.5), ParameterError, "base: expected a finite number > 1"),
    ],
)
def test_bad_input(kwargs, error, match):
    q, k, v = arrays(np.random.default_rng(10), N=6, M=9)
    with pytest.raises(error, match=match):
        rope_alibi_harmonic(q, k, v, **kwargs)
    with pytest.raises(error, match=match):
        qkv.rope_alibi_harmonic(q, k, v, **kwargs)


def test_odd_head_dim_needs_rope_off():
    q, k, v = arrays(np.random.default_rng(11), D=5)
    with pytest.raises(ShapeError, match="even head dim D"):
        rope_alibi_harmonic(q, k, v)
    assert rope_alibi_harmonic(q, k, v, use_rope=False).shape == (2, 4, 6, 3)
