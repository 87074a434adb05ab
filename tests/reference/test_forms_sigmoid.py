"""Properties of the reference sigmoid attention (arXiv 2409.04431, FlashSigmoid semantics).

Each test compares with an independent computation (explicit float64 loops, torch in float64
written from the paper's formula) or a property the paper states.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from qkv.errors import ParameterError, ShapeError
from qkv.reference import core
from qkv.reference.forms.sigmoid_attention import default_bias, logistic, sigmoid

torch = pytest.importorskip("torch")


def arrays(rng, B=2, H=4, Hkv=2, N=7, M=9, D=8, Dv=None, dtype=np.float64):
    Dv = D if Dv is None else Dv
    q = rng.standard_normal((B, H, N, D)).astype(dtype)
    k = rng.standard_normal((B, Hkv, M, D)).astype(dtype)
    v = rng.standard_normal((B, Hkv, M, Dv)).astype(dtype)
    return q, k, v


def loop_sigmoid(q, k, v, allowed, scale, bias, slopes=None):
    """The equation one output row at a time: sum over visible keys of sigma(s_ij + b) v_j."""
    B, H, N, _ = q.shape
    M = k.shape[2]
    G = H // k.shape[1]
    out = np.zeros((B, H, N, v.shape[-1]))
    for b in range(B):
        for h in range(H):
            for i in range(N):
                for j in range(M):
                    if not allowed[b, h, i, j]:
                        continue
                    s = scale * float(q[b, h, i] @ k[b, h // G, j]) + bias
                    if slopes is not None:
                        s -= slopes[h] * abs(i + M - N - j)
                    out[b, h, i] += v[b, h // G, j] / (1.0 + math.exp(-s))
    return out


def visible(B, H, N, M, mask=None, causal=False):
    allowed = np.ones((B, H, N, M), dtype=bool)
    if mask is not None:
        allowed &= np.broadcast_to(mask, allowed.shape)
    if causal:
        allowed &= core.causal_allowed(N, M)
    return allowed


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("with_mask", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize(("N", "M"), [(7, 9), (9, 4), (1, 5)])
def test_zero_queries_and_keys_give_sigmoid_b_times_sum_of_visible_values(N, M, with_mask, causal):
    """q = k = 0: every visible weight is sigma(b), so O_i = sigma(b) * sum_{j visible} v_j."""
    rng = np.random.default_rng(0)
    q, k, v = arrays(rng, N=N, M=M)
    q, k = np.zeros_like(q), np.zeros_like(k)
    mask = rng.random((N, M)) < 0.6 if with_mask else None
    b = -1.3
    out = sigmoid(q, k, v, mask=mask, causal=causal, bias=b)
    allowed = visible(2, 4, N, M, mask, causal).astype(np.float64)  # (B, H, N, M)
    v_heads = np.repeat(v, 2, axis=1)  # (B, H, M, Dv)
    want = (1.0 / (1.0 + math.exp(-b))) * allowed @ v_heads
    np.testing.assert_allclose(out, want, rtol=1e-13, atol=1e-13)


def test_default_bias_is_minus_log_m():
    rng = np.random.default_rng(1)
    q, k, v = arrays(rng, M=13)
    assert default_bias(13) == -math.log(13)
    np.testing.assert_array_equal(sigmoid(q, k, v), sigmoid(q, k, v, bias=-math.log(13)))


@pytest.mark.parametrize("n", [64, 512, 4096])
def test_bias_minus_log_n_with_constant_values_gives_about_the_values(n):
    """The paper's point: with b = -log n each weight is about 1/n and the row sums to ~1."""
    rng = np.random.default_rng(2)
    q = 0.1 * rng.standard_normal((1, 1, 3, 16))
    k = 0.1 * rng.standard_normal((1, 1, n, 16))
    c = rng.standard_normal(5)
    v = np.broadcast_to(c, (1, 1, n, 5)).copy()
    out = sigmoid(q, k, v)  # default b = -log n
    np.testing.assert_allclose(out, np.broadcast_to(c, out.shape), rtol=0.03)
    # Without the bias the output grows like n / 2 (the paper's large initial norm).
    no_bias = sigmoid(q, k, v, bias=0.0)
    np.testing.assert_allclose(no_bias / (n / 2), np.broadcast_to(c, out.shape), rtol=0.03)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
def test_hidden_entries_contribute_exactly_nothing(mask_kind, causal):
    """Changing the values of keys a row cannot see leaves that row bit for bit unchanged."""
    rng = np.random.default_rng(3)
    B, H, Hkv, N, M = 1, 2, 1, 6, 8
    q, k, v = arrays(rng, B=B, H=H, Hkv=Hkv, N=N, M=M)
    keep = rng.random((N, M)) < 0.5
    keep[0] = False  # a fully masked row
    mask = keep if mask_kind == "bool" else np.where(keep, rng.standard_normal((N, M)), -np.inf)
    out, w = sigmoid(q, k, v, mask=mask, causal=causal, return_weights=True)
    allowed = visible(B, H, N, M, keep, causal)
    assert np.all(w[~allowed] == 0.0)
    assert np.all(w[allowed] > 0.0)
    np.testing.assert_array_equal(out[:, :, 0], 0.0)
    for i in range(N):
        hidden = ~allowed[0, 0, i]
        if not hidden.any():
            continue
        v2 = v.copy()
        v2[:, :, hidden] = 1e6 * rng.standard_normal(v2[:, :, hidden].shape)
        np.testing.assert_array_equal(
            sigmoid(q, k, v2, mask=mask, causal=causal)[:, :, i], out[:, :, i]
        )


@pytest.mark.parametrize("alibi", [False, True], ids=["plain", "alibi"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(("N", "M"), [(5, 5), (4, 11), (11, 4), (1, 3)])
def test_matches_brute_force_loops(N, M, causal, alibi):
    rng = np.random.default_rng(4)
    q, k, v = arrays(rng, N=N, M=M, Dv=3)
    mask = rng.random((2, 1, N, M)) < 0.7
    out = sigmoid(q, k, v, mask=mask, causal=causal, scale=0.4, bias=-0.7, alibi=alibi)
    slopes = core.alibi_slopes(4) if alibi else None
    want = loop_sigmoid(q, k, v, visible(2, 4, N, M, mask, causal), 0.4, -0.7, slopes)
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-12)


def test_grouped_heads_equal_repeated_kv_heads():
    rng = np.random.default_rng(5)
    q, k, v = arrays(rng, H=6, Hkv=2)
    grouped = sigmoid(q, k, v, causal=True)
    repeated = sigmoid(q, np.repeat(k, 3, axis=1), np.repeat(v, 3, axis=1), causal=True)
    np.testing.assert_allclose(grouped, repeated, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("alibi", [False, True], ids=["plain", "alibi"])
def test_matches_the_papers_formula_in_torch(alibi):
    """sigma(Q K^T / sqrt(d) + ALiBi + b) V with b = -log n, as apple/ml-sigmoid-attention's
    test reference writes it (scores += sigmoid_bias; torch.sigmoid), causal."""
    rng = np.random.default_rng(6)
    B, H, N, D = 2, 4, 10, 16
    q, k, v = arrays(rng, B=B, H=H, Hkv=H, N=N, M=N, D=D)
    tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
    scores = tq @ tk.transpose(-1, -2) / math.sqrt(D)  # (B, H, N, N)
    if alibi:
        slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)], dtype=torch.float64)
        pos = torch.arange(N, dtype=torch.float64)
        scores = scores - slopes[:, None, None] * (pos[:, None] - pos[None, :]).abs()
    scores = scores.masked_fill(~torch.ones(N, N, dtype=torch.bool).tril(), float("-inf"))
    want = torch.sigmoid(scores - math.log(N)) @ tv
    got = sigmoid(q, k, v, causal=True, alibi=alibi)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-12, atol=1e-12)


def test_large_logits_stay_finite_and_weights_saturate():
    rng = np.random.default_rng(7)
    q, k, v = arrays(rng)
    out, w = sigmoid(1e4 * q, 1e4 * k, v, return_weights=True)
    assert np.isfinite(out).all()
    assert ((w >= 0) & (w <= 1)).all()
    assert set(np.unique(np.round(w, 12))) <= {0.0, 1.0}
    assert logistic(np.array([-np.inf, -1e308, 0.0, 1e308, np.inf]))[[0, 2, 4]].tolist() == [
        0,
        0.5,
        1,
    ]


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_output_dtype_follows_the_input(dtype):
    rng = np.random.default_rng(8)
    q, k, v = arrays(rng, dtype=dtype)
    out, w = sigmoid(q, k, v, return_weights=True)
    assert out.dtype == w.dtype == np.dtype(dtype)
    assert out.shape == (2, 4, 7, 8) and w.shape == (2, 4, 7, 9)
    np.testing.assert_allclose(
        out, sigmoid(*(x.astype(np.float64) for x in (q, k, v))), rtol=0.02, atol=0.02
    )


@pytest.mark.parametrize("bias", [float("nan"), float("inf"), -np.inf, np.float32("nan")])
def test_non_finite_bias_is_a_clear_error(bias):
    q, k, v = arrays(np.random.default_rng(9))
    with pytest.raises(ParameterError, match="bias: expected a finite real number"):
        sigmoid(q, k, v, bias=bias)


@pytest.mark.parametrize("bad", [{"bias": "0.5"}, {"bias": True}, {"alibi": 1}, {"scale": -1.0}])
def test_other_bad_arguments(bad):
    q, k, v = arrays(np.random.default_rng(10))
    with pytest.raises(ParameterError):
        sigmoid(q, k, v, **bad)


def test_bad_shapes():
    q, k, v = arrays(np.random.default_rng(11), H=3, Hkv=2)
    with pytest.raises(ShapeError, match="divisible"):
        sigmoid(q, k, v)
