"""Tensor (Kronecker) attention: the exact forms and the polynomial approximation.

Expected values come from independent computations (a per-query loop over every key pair,
softmax attention from ``qkv.reference.core``, the Taylor polynomial applied to materialised
scores) or from stated properties (symmetry, the error bound, convex combinations).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from qkv.errors import DTypeError, ParameterError, ShapeError
from qkv.reference import core
from qkv.reference.forms import tensor_attention
from qkv.reference.forms.tensor_attention import (
    monomials,
    score_radius,
    taylor_relative_error,
    tensor,
    tensor_approx,
    tensor_brute_force,
)

# (B, H, Hkv, N, M, D, Dv): one token, odd sizes, N != M, grouped heads, Dv != D.
SHAPES = {
    "one-token": (1, 1, 1, 1, 1, 1, 1),
    "odd": (1, 3, 3, 7, 5, 3, 4),
    "n>m": (2, 2, 1, 9, 4, 5, 2),
    "n<m": (1, 4, 2, 3, 11, 4, 6),
}


def make_inputs(shape, bound=1.0, seed=0, dtype=np.float64):
    """``q (B, H, N, D)``, ``k1``, ``k2 (B, Hkv, M, D)``, ``v1``, ``v2 (B, Hkv, M, Dv)``.

    Queries and keys uniform in ``[-bound, bound]`` (the paper's bounded entries), values
    standard normal.
    """
    B, H, Hkv, N, M, D, Dv = shape
    rng = np.random.default_rng(seed)
    q = rng.uniform(-bound, bound, (B, H, N, D))
    k1, k2 = rng.uniform(-bound, bound, (2, B, Hkv, M, D))
    v1, v2 = rng.standard_normal((2, B, Hkv, M, Dv))
    return tuple(x.astype(dtype) for x in (q, k1, k2, v1, v2))


def by_definition(q, k1, k2, v1, v2, scale=1.0):
    """``o_a = sum_ij softmax_ij(scale * sum_l q_al k1_il k2_jl) v1_i ∘ v2_j``, one query at a
    time, with einsum over every key pair."""
    B, H, N, _ = q.shape
    G = H // k1.shape[1]
    out = np.zeros((B, H, N, v1.shape[-1]))
    for b in range(B):
        for h in range(H):
            kv = h // G
            for a in range(N):
                s = scale * np.einsum("l,il,jl->ij", q[b, h, a], k1[b, kv], k2[b, kv])  # (M, M)
                p = np.exp(s - s.max())
                p /= p.sum()
                out[b, h, a] = np.einsum("ij,ie,je->e", p, v1[b, kv], v2[b, kv])
    return out


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_brute_force_and_streaming_match_the_definition(shape):
    inputs = make_inputs(shape, bound=1.5)
    expected = by_definition(*inputs, scale=0.8)
    np.testing.assert_allclose(tensor_brute_force(*inputs, scale=0.8), expected, atol=1e-13)
    np.testing.assert_allclose(tensor(*inputs, scale=0.8), expected, atol=1e-13)


def test_brute_force_equals_streaming_at_large_scores():
    """Scores of several hundred: both forms subtract the running maximum, no overflow."""
    inputs = make_inputs((1, 2, 1, 6, 9, 4, 3), bound=6.0, seed=3)
    streaming = tensor(*inputs)
    assert np.isfinite(streaming).all()
    np.testing.assert_allclose(streaming, tensor_brute_force(*inputs), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_unit_second_factor_reduces_to_softmax_attention(scale):
    """K2 = V2 = 1: S_{a,ij} = q_a . k1_i for every j and V1[i] ∘ 1 = V1[i]."""
    q, k1, k2, v1, v2 = make_inputs((2, 4, 2, 5, 7, 3, 4), bound=2.0)
    out = tensor(q, k1, np.ones_like(k2), v1, np.ones_like(v2), scale=scale)
    np.testing.assert_allclose(out, core.sdpa(q, k1, v1, scale=scale), atol=1e-13)


def test_swapping_the_two_key_value_pairs_leaves_the_output_unchanged():
    q, k1, k2, v1, v2 = make_inputs((1, 2, 2, 6, 8, 3, 5), bound=1.5, seed=1)
    np.testing.assert_allclose(tensor(q, k2, k1, v2, v1), tensor(q, k1, k2, v1, v2), atol=1e-13)


def test_float32_in_float32_out_close_to_float64():
    inputs = make_inputs((1, 2, 1, 5, 6, 4, 3), bound=1.0, seed=2)
    exact = tensor(*inputs)
    for fn in (tensor, tensor_brute_force, tensor_approx):
        out = fn(*(x.astype(np.float32) for x in inputs))
        assert out.dtype == np.float32
        reference = exact if fn is not tensor_approx else tensor_approx(*inputs)
        np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-5)


def test_monomials_expand_the_taylor_polynomial_of_a_dot_product():
    """sum_alpha x^alpha y^alpha / alpha! = sum_{t <= g} (x . y)^t / t!, with C(d + g, g) terms."""
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((2, 5, 3))
    for degree in (2, 4):
        phi = monomials(x, degree) * tensor_attention.monomial_table(3, degree)[1]  # (5, F)
        psi = monomials(y, degree)  # (5, F)
        assert phi.shape == (5, math.comb(3 + degree, degree))
        s = np.einsum("nd,nd->n", x, y)
        taylor = sum(s**t / math.factorial(t) for t in range(degree + 1))
        np.testing.assert_allclose(np.einsum("nf,nf->n", phi, psi), taylor, rtol=1e-12)


def taylor_attention_brute_force(q, k1, k2, v1, v2, degree):
    """The Taylor polynomial of exp applied to the materialised N x M^2 scores, normalised."""
    B, H, N, D = q.shape
    M = k1.shape[2]
    kk = (k1[:, :, :, None] * k2[:, :, None]).reshape(*k1.shape[:2], M * M, D)  # K1 ⊘ K2
    vv = (v1[:, :, :, None] * v2[:, :, None]).reshape(*v1.shape[:2], M * M, -1)  # V1 ⊘ V2
    G = H // k1.shape[1]
    kk, vv = np.repeat(kk, G, axis=1), np.repeat(vv, G, axis=1)
    s = q @ kk.swapaxes(-1, -2)  # (B, H, N, M^2)
    a = sum(s**t / math.factorial(t) for t in range(degree + 1))
    return (a @ vv) / a.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("degree", [2, 4, 6])
def test_approximation_equals_the_taylor_polynomial_of_the_scores(degree):
    """The low-rank factorisation is exact for the polynomial: only exp -> T_g approximates."""
    inputs = make_inputs((2, 4, 2, 5, 6, 3, 4), bound=1.0, seed=5)
    np.testing.assert_allclose(
        tensor_approx(*inputs, degree=degree),
        taylor_attention_brute_force(*inputs, degree),
        rtol=1e-11,
        atol=1e-12,
    )


def test_blocks_of_features_give_the_same_result(monkeypatch):
    inputs = make_inputs((1, 2, 1, 7, 9, 3, 2), bound=1.0, seed=6)
    whole = tensor_approx(*inputs, degree=4)
    monkeypatch.setattr(tensor_attention, "FEATURE_BLOCK_ELEMENTS", 100)  # 1-row blocks
    np.testing.assert_allclose(tensor_approx(*inputs, degree=4), whole, rtol=1e-13, atol=1e-14)


def approx_error(bound, degree, shape=(1, 2, 1, 16, 16, 4, 4), seed=7):
    inputs = make_inputs(shape, bound=bound, seed=seed)
    return float(np.abs(tensor_approx(*inputs, degree=degree) - tensor(*inputs)).max())


def test_approximation_error_shrinks_with_the_degree_at_small_entries():
    errors = [approx_error(0.6, degree) for degree in (2, 4, 6, 8)]
    assert all(a > 5 * b for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < 1e-7, errors


def test_approximation_error_grows_with_the_entry_bound():
    errors = [approx_error(bound, 4) for bound in (0.25, 0.5, 1.0, 1.5, 2.5)]
    assert all(a < b for a, b in itertools.pairwise(errors)), errors
    assert errors[0] < 1e-8 and errors[-1] > 1e-2, errors


@pytest.mark.parametrize("bound", [0.3, 0.6, 0.8])
def test_approximation_error_within_the_taylor_bound(bound):
    """|o~ - o| <= eps / (1 - eps) * max_ij |v1_i ∘ v2_j - o| with eps = e^R R^(g+1) / (g+1)!."""
    q, k1, k2, v1, v2 = make_inputs((1, 2, 2, 6, 7, 3, 3), bound=bound, seed=8)
    degree = 4
    exact, approx = tensor(q, k1, k2, v1, v2), tensor_approx(q, k1, k2, v1, v2, degree=degree)
    eps = taylor_relative_error(degree, score_radius(q, k1, k2))  # (B, H, N)
    assert eps.max() < 0.5
    vv = (v1[:, :, :, None] * v2[:, :, None]).reshape(1, 2, 1, 49, 3)  # V1 ⊘ V2, H = Hkv
    spread = np.abs(vv - exact[:, :, :, None]).max(axis=-2)  # (B, H, N, Dv)
    allowed = (eps / (1 - eps))[..., None] * spread
    assert (np.abs(approx - exact) <= allowed * (1 + 1e-9) + 1e-15).all()


def test_score_radius_bounds_every_score():
    q, k1, k2, _, _ = make_inputs((2, 4, 2, 5, 6, 3, 1), bound=2.0, seed=9)
    kk = np.repeat(k1[:, :, :, None] * k2[:, :, None], 2, axis=1).reshape(2, 4, 36, 3)
    s = 0.5 * np.abs(q @ kk.swapaxes(-1, -2)).max(axis=-1)  # (B, H, N): the largest |score|
    radius = score_radius(q, k1, k2, scale=0.5)
    assert radius.shape == (2, 4, 5)
    assert (s <= radius * (1 + 1e-12)).all()


def test_approximation_far_outside_its_range_stays_a_convex_combination():
    """Even degrees are positive everywhere: each row stays within the span of V1[i] ∘ V2[j]."""
    q, k1, k2, v1, v2 = make_inputs((1, 1, 1, 8, 6, 4, 3), bound=20.0, seed=10)
    for dtype in (np.float64, np.float32):
        out = tensor_approx(*(x.astype(dtype) for x in (q, k1, k2, v1, v2)), degree=2)
        vv = (v1[:, :, :, None] * v2[:, :, None]).reshape(1, 1, 36, 3)  # V1 ⊘ V2
        assert np.isfinite(out).all()
        assert (out >= vv.min(axis=2, keepdims=True) - 1e-4).all()
        assert (out <= vv.max(axis=2, keepdims=True) + 1e-4).all()
    assert np.abs(out - tensor(q, k1, k2, v1, v2)).max() > 0.1  # and inaccurate there


@pytest.mark.parametrize("fn", [tensor, tensor_brute_force, tensor_approx])
def test_bad_shapes_and_dtypes_name_the_argument(fn):
    q, k1, k2, v1, v2 = make_inputs((1, 2, 1, 3, 4, 3, 2))
    with pytest.raises(ShapeError, match="k2: expected the shape of k1"):
        fn(q, k1, k2[:, :, :3], v1, v2)
    with pytest.raises(ShapeError, match="v2: expected the shape of v1"):
        fn(q, k1, k2, v1, v2[..., :1])
    with pytest.raises(ShapeError, match="k1: expected head dim D=3"):
        fn(q, k1[..., :2], k2[..., :2], v1, v2)
    with pytest.raises(ShapeError, match="q, k1: expected query heads H divisible"):
        two_heads = [np.concatenate([x, x], axis=1) for x in (k1, k2, v1, v2)]  # Hkv = 2
        fn(np.concatenate([q, q[:, :1]], axis=1), *two_heads)  # H = 3
    with pytest.raises(ShapeError, match="q: expected rank 4"):
        fn(q[0], k1, k2, v1, v2)
    with pytest.raises(DTypeError, match="k2 float32"):
        fn(q, k1, k2.astype(np.float32), v1, v2)
    for scale in (0.0, -1.0, float("nan"), True):
        with pytest.raises(ParameterError, match="scale: expected a finite number > 0"):
            fn(q, k1, k2, v1, v2, scale=scale)


@pytest.mark.parametrize("degree", [1, 3, 0, -2, 14, 2.0, True, "4"])
def test_unsupported_degree_is_refused(degree):
    inputs = make_inputs((1, 1, 1, 2, 3, 2, 2))
    with pytest.raises(ParameterError, match="degree: expected"):
        tensor_approx(*inputs, degree=degree)


def test_too_many_features_are_refused():
    inputs = make_inputs((1, 1, 1, 2, 3, 64, 2))  # C(64 + 6, 6) = 131 million features
    with pytest.raises(ParameterError, match=r"degree: degree 6 at head dim D=64 needs C\(70, 6\)"):
        tensor_approx(*inputs, degree=6)
