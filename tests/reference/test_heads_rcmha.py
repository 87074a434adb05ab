"""RCMHA, MDHA and RMHA (arXiv 2308.03429): ``qkv.reference.heads.relative_conv``.

Every numerical check is against a computation written differently: explicit Python loops over
queries, keys and taps in float64, PyTorch's ``Conv1d`` as the official code uses it, and
PyTorch's own scaled dot-product attention.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qkv
from qkv.errors import DTypeError, ParameterError, ShapeError
from qkv.reference.heads import mdha, rcmha, relative_attention, rmha
from qkv.reference.heads.relative_conv import (
    QKVConv,
    causal_depthwise_conv,
    fold_position_bias,
    identity_kernel,
    relative_terms,
    sinusoids,
    transformer_xl_table,
)

torch = pytest.importorskip("torch")


def make(B=1, H=2, Hkv=2, N=5, m=3, D=4, Dv=4, L=None, seed=0, dtype=np.float64):
    """Random ``q, k, v, r, u, b`` with ``M = m + N`` keys and tables of length ``L``."""
    rng = np.random.default_rng(seed)
    M = m + N
    L = M if L is None else L
    arrays = (
        rng.standard_normal((B, H, N, D)),
        rng.standard_normal((B, Hkv, M, D)),
        rng.standard_normal((B, Hkv, M, Dv)),
        rng.standard_normal((H, L, D)),
        rng.standard_normal((H, D)),
        rng.standard_normal((H, L)),
    )
    return tuple(a.astype(dtype) for a in arrays)


def conv_loop(x, weight, bias=None):
    """The causal depth-wise convolution as three nested loops over tokens, channels, taps."""
    B, H, L, C = x.shape
    K = weight.shape[1]
    y = np.zeros((B, H, L, C))
    for t in range(L):
        for c in range(C):
            total = 0.0 if bias is None else float(bias[c])
            for s in range(K):
                src = t - (K - 1) + s
                if src >= 0:
                    total += float(weight[c, s]) * x[:, :, src, c]
            y[:, :, t, c] = total
    return y


def attention_loop(q, k, v, r, u, b, scale=None):
    """Relative-score attention, one query and one key at a time (float64)."""
    B, H, N, D = q.shape
    Hkv, M = k.shape[1], k.shape[2]
    G = H // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = np.zeros((B, H, N, v.shape[-1]))
    for bb in range(B):
        for h in range(H):
            for i in range(N):
                pos = i + (M - N)  # absolute position of query i
                scores = []
                for j in range(pos + 1):
                    d = pos - j
                    content = float(np.dot(q[bb, h, i] + u[h], k[bb, h // G, j]))
                    position = float(np.dot(q[bb, h, i], r[h, d]))
                    scores.append(scale * (content + position + b[h, d]))
                top = max(scores)
                weights = [math.exp(s - top) for s in scores]
                total = sum(weights)
                for j, w in enumerate(weights):
                    out[bb, h, i] += (w / total) * v[bb, h // G, j]
    return out


# --------------------------------------------------------------------------- against loops


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 2),
    Hkv=st.integers(1, 2),
    G=st.integers(1, 3),
    N=st.integers(1, 7),
    m=st.sampled_from([0, 1, 4]),
    D=st.integers(1, 6),
    Dv=st.integers(1, 5),
    K=st.integers(1, 4),
    extra=st.integers(0, 3),
    scale=st.sampled_from([None, 0.3]),
    seed=st.integers(0, 2**16),
)
def test_relative_attention_with_convolutions_matches_loops(
    B, Hkv, G, N, m, D, Dv, K, extra, scale, seed
):
    """Convolution, relative shift, memory and grouped heads against explicit loops."""
    H = Hkv * G
    q, k, v, r, u, b = make(B, H, Hkv, N, m, D, Dv, L=m + N + extra, seed=seed)
    rng = np.random.default_rng(seed + 1)
    wq, wk, wv = (rng.standard_normal((c, K)) for c in (D, D, Dv))
    got = relative_attention(q, k, v, r, u, b, conv_q=wq, conv_k=wk, conv_v=wv, scale=scale)
    want = attention_loop(conv_loop(q, wq), conv_loop(k, wk), conv_loop(v, wv), r, u, b, scale)
    np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-12)


@settings(max_examples=15, deadline=None)
@given(N=st.integers(1, 6), m=st.integers(0, 3), seed=st.integers(0, 2**16))
def test_rcmha_with_conv_biases_matches_loops(N, m, seed):
    q, k, v, r, u, b = make(1, 2, 2, N, m, 3, 4, seed=seed)
    conv = QKVConv.random(3, 4, rng=np.random.default_rng(seed))
    want = attention_loop(
        conv_loop(q, conv.q, conv.q_bias),
        conv_loop(k, conv.k, conv.k_bias),
        conv_loop(v, conv.v, conv.v_bias),
        r,
        u,
        b,
    )
    np.testing.assert_allclose(rcmha(q, k, v, r, u, b, conv), want, rtol=1e-11, atol=1e-12)


def test_relative_terms_follow_the_distance():
    """Each term against its definition, entry by entry; hidden keys hold 0."""
    q, k, _, r, u, b = make(1, 2, 1, 4, 2, 3, 3, L=9)
    content, position, bias = relative_terms(q, k, r, u, b, scale=0.5)
    for h in range(2):
        for i in range(4):
            for j in range(6):
                d = i + 2 - j
                assert content[0, h, i, j] == pytest.approx(
                    0.5 * np.dot(q[0, h, i] + u[h], k[0, 0, j])
                )
                if d < 0:
                    assert position[0, h, i, j] == bias[0, h, i, j] == 0.0
                else:
                    assert position[0, h, i, j] == pytest.approx(0.5 * np.dot(q[0, h, i], r[h, d]))
                    assert bias[0, h, i, j] == pytest.approx(0.5 * b[h, d])


# --------------------------------------------------------------------------- properties


def causal_torch(q, k, v):
    """PyTorch's attention with an explicit bottom-right causal mask (float64)."""
    N, M = q.shape[2], k.shape[2]
    allowed = np.arange(M)[None, :] <= np.arange(N)[:, None] + (M - N)
    G = q.shape[1] // k.shape[1]
    t = [torch.from_numpy(np.ascontiguousarray(x)) for x in (q, k, v)]
    out = torch.nn.functional.scaled_dot_product_attention(
        t[0],
        t[1].repeat_interleave(G, 1),
        t[2].repeat_interleave(G, 1),
        attn_mask=torch.from_numpy(allowed),
    )
    return out.numpy()


@pytest.mark.parametrize("m", [0, 3])
@pytest.mark.parametrize("Hkv", [1, 2])
def test_rcmha_with_zero_tables_and_identity_kernels_is_causal_mha(m, Hkv):
    q, k, v, r, u, b = make(2, 4, Hkv, 7, m, 8, 5)
    zero = (np.zeros_like(r), np.zeros_like(u), np.zeros_like(b))
    got = rcmha(q, k, v, *zero, QKVConv.identity(8, 5))
    np.testing.assert_allclose(got, causal_torch(q, k, v), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(rmha(q, k, v, *zero), causal_torch(q, k, v), rtol=1e-12, atol=1e-13)


def conv_torch(x, weight, bias):
    """The official code's convolution: ``Conv1d(C, C, K, groups=C, padding=K-1)``, its last
    ``K - 1`` outputs dropped, over ``x (B, H, L, C)`` reshaped to ``(B*H, C, L)``."""
    B, H, L, C = x.shape
    K = weight.shape[1]
    xt = torch.from_numpy(x).reshape(B * H, L, C).transpose(1, 2)  # (B*H, C, L)
    y = torch.nn.functional.conv1d(
        xt, torch.from_numpy(weight)[:, None], torch.from_numpy(bias), padding=K - 1, groups=C
    )
    y = y[..., :L] if K > 1 else y  # drop the outputs that looked ahead
    return y.transpose(1, 2).reshape(B, H, L, C).numpy()


@pytest.mark.parametrize("K", [1, 2, 3, 5])
def test_conv_matches_the_official_conv1d(K):
    rng = np.random.default_rng(K)
    x = rng.standard_normal((2, 3, 9, 4))
    weight, bias = rng.standard_normal((4, K)), rng.standard_normal(4)
    np.testing.assert_allclose(
        causal_depthwise_conv(x, weight, bias), conv_torch(x, weight, bias), rtol=1e-12, atol=1e-13
    )


def test_mdha_is_causal_attention_on_the_convolved_streams():
    q, k, v, *_ = make(1, 2, 2, 6, 2, 4, 3)
    conv = QKVConv.random(4, 3, rng=np.random.default_rng(5))
    streams = [
        conv_torch(x, w, c)
        for x, w, c in (
            (q, conv.q, conv.q_bias),
            (k, conv.k, conv.k_bias),
            (v, conv.v, conv.v_bias),
        )
    ]
    np.testing.assert_allclose(mdha(q, k, v, conv), causal_torch(*streams), rtol=1e-12, atol=1e-13)


def test_rmha_equals_relative_attention_with_identity_kernels():
    q, k, v, r, u, b = make(1, 2, 1, 5, 2, 4, 4)
    eye = identity_kernel(4)
    got = relative_attention(q, k, v, r, u, b, conv_q=eye, conv_k=eye, conv_v=eye)
    np.testing.assert_array_equal(got, rmha(q, k, v, r, u, b))


@settings(max_examples=20, deadline=None)
@given(N=st.integers(2, 8), m=st.integers(0, 3), t=st.integers(0, 7), seed=st.integers(0, 999))
def test_a_later_token_never_changes_an_earlier_output(N, m, t, seed):
    """Change token ``t`` of the segment (its query, key and value): outputs before ``t``
    stay bit for bit, with biased convolutions on every stream."""
    t = t % N
    q, k, v, r, u, b = make(1, 2, 2, N, m, 4, 3, seed=seed)
    conv = QKVConv.random(4, 3, rng=np.random.default_rng(seed))
    before = rcmha(q, k, v, r, u, b, conv)
    q2, k2, v2 = q.copy(), k.copy(), v.copy()
    q2[:, :, t] += 10.0
    k2[:, :, m + t] -= 7.0
    v2[:, :, m + t] *= -3.0
    after = rcmha(q2, k2, v2, r, u, b, conv)
    np.testing.assert_array_equal(after[:, :, :t], before[:, :, :t])
    assert not np.allclose(after[:, :, t:], before[:, :, t:])


def test_memory_gives_the_last_rows_of_the_whole_sequence():
    """Transformer-XL's recurrence: a segment attending to cached keys and values equals the
    last rows of one pass over memory and segment together (keys convolved over both)."""
    q, k, v, r, u, b = make(1, 2, 2, 9, 0, 4, 4)
    eye = identity_kernel(4)
    w = np.random.default_rng(3).standard_normal((4, 3))
    whole = relative_attention(q, k, v, r, u, b, conv_q=eye, conv_k=w, conv_v=w)
    segment = relative_attention(q[:, :, 5:], k, v, r, u, b, conv_q=eye, conv_k=w, conv_v=w)
    np.testing.assert_allclose(segment, whole[:, :, 5:], rtol=1e-12, atol=1e-13)


def test_transformer_xl_fourth_term_folds_into_the_scalar_bias():
    """(q+u).k + q.R + v.R with Transformer-XL's v equals the labml form with b = v.R."""
    q, k, v, r, u, _ = make(1, 2, 2, 4, 2, 3, 3)
    v_pos = np.random.default_rng(9).standard_normal((2, 3))
    b = fold_position_bias(r, v_pos)
    scale = 1 / math.sqrt(3)
    for h in range(2):
        for i in range(4):
            for j in range(i + 3):
                d = i + 2 - j
                xl = np.dot(q[0, h, i] + u[h], k[0, h, j]) + np.dot(q[0, h, i] + v_pos[h], r[h, d])
                _, pos, bias = relative_terms(q, k, r, u, b)
                assert pos[0, h, i, j] + bias[0, h, i, j] == pytest.approx(
                    scale * (xl - np.dot(q[0, h, i] + u[h], k[0, h, j]))
                )


def test_transformer_xl_table_projects_sinusoids():
    rng = np.random.default_rng(0)
    w_r = rng.standard_normal((8, 2 * 3))
    table = transformer_xl_table(w_r, 5, 2)
    assert table.shape == (2, 5, 3)
    phi = sinusoids(5, 8)
    np.testing.assert_array_equal(phi[0], [0, 0, 0, 0, 1, 1, 1, 1])  # distance 0
    assert phi[3, 1] == pytest.approx(math.sin(3 * 10000 ** (-2 / 8)))
    for h in range(2):
        np.testing.assert_allclose(table[h], phi @ w_r[:, 3 * h : 3 * h + 3], rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_is_kept(dtype):
    args = make(dtype=dtype)
    eye = identity_kernel(4, dtype=dtype)
    assert relative_attention(*args, conv_q=eye).dtype == dtype
    assert rcmha(*args, QKVConv.identity(4, dtype=dtype)).dtype == dtype
    assert causal_depthwise_conv(args[0], eye).dtype == dtype


def test_large_logits_stay_finite():
    q, k, v, r, u, b = make()
    out = relative_attention(1e3 * q, 1e3 * k, v, r, u, 1e4 * b)
    assert np.isfinite(out).all()


# --------------------------------------------------------------------------- bad input

ENTRIES = [relative_attention, qkv.relative_attention]


@pytest.mark.parametrize("fn", ENTRIES, ids=["reference", "dispatched"])
def test_kernel_size_below_one(fn):
    q, k, v, r, u, b = make()
    with pytest.raises(ParameterError, match=r"conv_k: expected a kernel size K >= 1"):
        fn(q, k, v, r, u, b, conv_k=np.zeros((4, 0)))
    with pytest.raises(ParameterError, match="size: expected an integer >= 1"):
        identity_kernel(4, 0)
    with pytest.raises(ParameterError, match="kernel size K >= 1"):
        causal_depthwise_conv(q, np.zeros((4, 0)))


@pytest.mark.parametrize("fn", ENTRIES, ids=["reference", "dispatched"])
def test_relative_tables_shorter_than_the_distances(fn):
    q, k, v, r, u, b = make(N=5, m=3)  # M = 8: distances 0..7
    with pytest.raises(ShapeError, match=r"r: relative table of length L=7.*expected L >= 8"):
        fn(q, k, v, r[:, :7], u, b)
    with pytest.raises(ShapeError, match=r"b: relative table of length L=4"):
        fn(q, k, v, r, u, b[:, :4])


@pytest.mark.parametrize("fn", ENTRIES, ids=["reference", "dispatched"])
def test_mismatched_shapes(fn):
    q, k, v, r, u, b = make(H=2, Hkv=2, D=4, Dv=3)
    with pytest.raises(ShapeError, match=r"u: expected shape \(H=2, D=4\)"):
        fn(q, k, v, r, u[:, :3], b)
    with pytest.raises(ShapeError, match=r"r: expected shape \(H=2, L, D=4\)"):
        fn(q, k, v, r[:1], u, b)
    with pytest.raises(ShapeError, match=r"b: expected shape \(H=2, L\)"):
        fn(q, k, v, r, u, b[:1])
    with pytest.raises(ShapeError, match=r"conv_v: expected 3 channels"):
        fn(q, k, v, r, u, b, conv_v=np.ones((4, 3)))
    with pytest.raises(ShapeError, match=r"expected M >= N keys"):
        fn(q, k[:, :, :4], v[:, :, :4], r, u, b)
    with pytest.raises(ShapeError, match=r"k: expected head dim D=4"):
        fn(q, k[..., :3], v, r, u, b)
    with pytest.raises(ShapeError, match="divisible"):
        fn(np.concatenate([q, q[:, :1]], axis=1), k, v, r, u, b)
    with pytest.raises(DTypeError, match="expected one dtype"):
        fn(q, k, v, r.astype(np.float32), u, b)
    with pytest.raises(ShapeError, match=r"bias: expected shape \(4,\)"):
        causal_depthwise_conv(q, np.ones((4, 3)), np.ones(3))
