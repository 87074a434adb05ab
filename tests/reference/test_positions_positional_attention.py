"""Properties of positional attention (Back de Luca et al., arXiv 2410.01686).

Independent computations: the official layer's layout rebuilt in torch (one ``qk_proj`` linear
map of the positions split into per-head q and k, ``v_proj`` and ``o_proj`` of the model width,
``F.scaled_dot_product_attention`` without a mask); an explicit float64 loop; the properties the
paper states (weights independent of the input, output linear in it).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import qkv
from qkv.errors import DTypeError, ParameterError, ShapeError
from qkv.reference.positions.positional import (
    PositionalAttentionWeights,
    dispatched_positional_attention,
    positional_attention,
)


def layer(rng, H=3, P=5, d=6, hd=2, biases=True):
    w = PositionalAttentionWeights.random(rng, n_heads=H, pos_dim=P, d_model=d, head_dim=hd)
    if not biases:
        return w
    return PositionalAttentionWeights(
        w.w_q, w.w_k, w.w_v, w.w_o,
        b_q=rng.standard_normal((H, P)), b_k=rng.standard_normal((H, P)),
        b_v=rng.standard_normal((H, hd)), b_o=rng.standard_normal(w.w_o.shape[2]),
    )  # fmt: skip


def test_matches_the_official_layout_in_torch():
    rng = np.random.default_rng(0)
    B, N, H, hd = 4, 5, 3, 2
    d, P = H * hd, N  # one-hot positions, as the official experiments use
    qk_w, qk_b = rng.standard_normal((2 * P * H, P)), rng.standard_normal(2 * P * H)
    v_w, v_b = rng.standard_normal((d, d)), rng.standard_normal(d)
    o_w, o_b = rng.standard_normal((d, d)), rng.standard_normal(d)
    x, p = rng.standard_normal((B, N, d)), np.eye(N)
    # The official forward pass: qk from p only, split into heads, then q | k per head.
    t = torch.from_numpy
    qk = F.linear(t(p), t(qk_w), t(qk_b)).reshape(N, H, 2 * P).permute(1, 0, 2)  # (H, N, 2P)
    q, k = qk.chunk(2, dim=-1)
    v = F.linear(t(x), t(v_w), t(v_b)).reshape(B, N, H, hd).permute(0, 2, 1, 3)  # (B, H, N, hd)
    values = F.scaled_dot_product_attention(q, k, v)  # q, k broadcast over the batch
    expected = F.linear(values.permute(0, 2, 1, 3).reshape(B, N, d), t(o_w), t(o_b)).numpy()
    # The same numbers as per-head matrices.
    qk_t = qk_w.T.reshape(P, H, 2 * P)  # (P, H, 2P)
    weights = PositionalAttentionWeights(
        w_q=qk_t[:, :, :P].transpose(1, 0, 2),
        w_k=qk_t[:, :, P:].transpose(1, 0, 2),
        w_v=v_w.T.reshape(d, H, hd).transpose(1, 0, 2),
        w_o=o_w.T.reshape(H, hd, d),
        b_q=qk_b.reshape(H, 2 * P)[:, :P],
        b_k=qk_b.reshape(H, 2 * P)[:, P:],
        b_v=v_b.reshape(H, hd),
        b_o=o_b,
    )
    np.testing.assert_allclose(positional_attention(x, p, weights), expected, rtol=1e-10)


def loop(x, p, w, causal=False):
    B, N, _ = x.shape
    H, Dv = w.n_heads, w.w_v.shape[2]
    out = np.zeros((B, N, H * Dv))
    for b in range(B):
        for h in range(H):
            for i in range(N):
                qi = p[i] @ w.w_q[h] + w.b_q[h]
                s = np.array([qi @ (p[j] @ w.w_k[h] + w.b_k[h]) for j in range(N)])
                s /= np.sqrt(w.w_q.shape[2])
                if causal:
                    s[i + 1 :] = -np.inf
                a = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
                for j in range(N):
                    out[b, i, h * Dv : (h + 1) * Dv] += a[j] * (x[b, j] @ w.w_v[h] + w.b_v[h])
    return out @ w.w_o.reshape(H * Dv, -1) + w.b_o


@pytest.mark.parametrize("causal", [False, True])
def test_matches_the_explicit_loop(causal):
    rng = np.random.default_rng(1)
    w = layer(rng)
    x, p = rng.standard_normal((3, 7, 6)), rng.standard_normal((7, 5))
    out = positional_attention(x, p, w, causal=causal)
    np.testing.assert_allclose(out, loop(x, p, w, causal), rtol=1e-10, atol=1e-12)


def test_weights_are_the_same_for_any_input():
    rng = np.random.default_rng(2)
    w, p = layer(rng), np.eye(7, 5)
    _, a1 = positional_attention(rng.standard_normal((2, 7, 6)), p, w, return_weights=True)
    _, a2 = positional_attention(100 * rng.standard_normal((5, 7, 6)), p, w, return_weights=True)
    assert a1.shape == (3, 7, 7)
    np.testing.assert_array_equal(a1, a2)
    np.testing.assert_allclose(a1.sum(-1), 1.0)
    _, a3 = positional_attention(rng.standard_normal((2, 7, 6)), p, w, causal=True,
                                 return_weights=True)  # fmt: skip
    np.testing.assert_array_equal(np.triu(a3, 1), 0.0)


@settings(max_examples=25, deadline=None)
@given(a=st.floats(-10, 10), b=st.floats(-10, 10), seed=st.integers(0, 2**16))
def test_output_is_linear_in_the_input(a, b, seed):
    rng = np.random.default_rng(seed)
    w = layer(rng, biases=False)  # without value and output biases: linear, not just affine
    p = rng.standard_normal((6, 5))
    x1, x2 = rng.standard_normal((2, 6, 6)), rng.standard_normal((2, 6, 6))
    combined = positional_attention(a * x1 + b * x2, p, w)
    separate = a * positional_attention(x1, p, w) + b * positional_attention(x2, p, w)
    np.testing.assert_allclose(combined, separate, rtol=1e-9, atol=1e-9)


def test_batch_folding_equals_one_sample_at_a_time():
    rng = np.random.default_rng(3)
    w, p, x = layer(rng), rng.standard_normal((4, 5)), rng.standard_normal((5, 4, 6))
    whole = positional_attention(x, p, w)
    alone = np.concatenate([positional_attention(x[b : b + 1], p, w) for b in range(5)])
    np.testing.assert_allclose(whole, alone, rtol=1e-12, atol=1e-12)


def test_without_an_output_map_the_heads_are_concatenated():
    rng = np.random.default_rng(4)
    full = layer(rng)
    bare = PositionalAttentionWeights(full.w_q, full.w_k, full.w_v, b_q=full.b_q, b_k=full.b_k,
                                      b_v=full.b_v)  # fmt: skip
    x, p = rng.standard_normal((2, 4, 6)), rng.standard_normal((4, 5))
    heads = positional_attention(x, p, bare)  # (B, N, H d_v)
    assert heads.shape == (2, 4, 6)
    np.testing.assert_allclose(heads @ full.w_o.reshape(6, 6) + full.b_o,
                               positional_attention(x, p, full), rtol=1e-12)  # fmt: skip


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_dispatched_on_numba_matches_the_reference(dtype):
    rng = np.random.default_rng(5)
    w = layer(rng)
    x, p = rng.standard_normal((3, 8, 6)).astype(dtype), np.eye(8, 5, dtype=dtype)
    out = dispatched_positional_attention(x, p, w, backend="numba")
    assert out.dtype == dtype
    tol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(out, positional_attention(x, p, w), rtol=tol, atol=tol)
    tensor_out = qkv.positional_attention(torch.from_numpy(x), torch.from_numpy(p), w)
    assert isinstance(tensor_out, torch.Tensor)
    np.testing.assert_allclose(tensor_out.numpy(), out, rtol=tol, atol=tol)


def test_bad_input():
    rng = np.random.default_rng(6)
    w, x = layer(rng), rng.standard_normal((2, 7, 6))
    with pytest.raises(ShapeError, match=r"p: expected positional encodings \(N, d_p\) = \(7, 5\)"):
        positional_attention(x, rng.standard_normal((6, 5)), w)  # positions of the wrong length
    with pytest.raises(ShapeError, match="p: expected positional encodings"):
        qkv.positional_attention(x, rng.standard_normal((7, 4)), w)
    with pytest.raises(ShapeError, match="x: expected rank 3"):
        positional_attention(x[0], np.eye(7, 5), w)
    with pytest.raises(ShapeError, match="x: expected width d = 6"):
        positional_attention(x[..., :4], np.eye(7, 5), w)
    with pytest.raises(DTypeError, match="x, p: expected one dtype"):
        positional_attention(x, np.eye(7, 5, dtype=np.float32), w)
    with pytest.raises(TypeError, match="weights: expected a PositionalAttentionWeights"):
        positional_attention(x, np.eye(7, 5), {"w_q": w.w_q})
    with pytest.raises(ShapeError, match="w_k: expected"):
        PositionalAttentionWeights(w.w_q, w.w_k[:, :4], w.w_v)
    with pytest.raises(ShapeError, match="b_o: expected None without w_o"):
        PositionalAttentionWeights(w.w_q, w.w_k, w.w_v, b_o=np.zeros(6))


@pytest.mark.parametrize(
    ("kwargs", "match"), [(dict(scale=0.0), "scale"), (dict(causal=1), "causal")]
)
def test_bad_hyperparameters(kwargs, match):
    rng = np.random.default_rng(7)
    with pytest.raises(ParameterError, match=f"{match}: expected"):
        positional_attention(rng.standard_normal((1, 3, 6)), np.eye(3, 5), layer(rng), **kwargs)
