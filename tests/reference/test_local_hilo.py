"""Properties of the reference HiLo attention (LITv2; Pan, Cai, Zhuang, arXiv 2205.13213).

Independent computations: the official layer's forward pass written in torch from input
features and projection weights (which pools the *input* before projecting), full softmax
attention, explicit per-window loops, and torch's ``avg_pool2d``.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qkv
from qkv.reference.local.davit import window_attention
from qkv.reference.local.hilo_attention import avg_pool, dispatched_hilo, hilo, lofi_heads

torch = pytest.importorskip("torch")
F = torch.nn.functional


def softmax(s):
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def maps(rng, B=2, H=4, Hs=4, Ws=6, D=3, Dv=3):
    q = rng.standard_normal((B, H, Hs, Ws, D))
    k = rng.standard_normal((B, H, Hs, Ws, D))
    v = rng.standard_normal((B, H, Hs, Ws, Dv))
    return q, k, v


def mhsa(q, k, v):
    B, H, Hs, Ws, D = q.shape
    flat = [x.reshape(B, H, Hs * Ws, -1) for x in (q, k, v)]
    out = softmax(flat[0] @ flat[1].swapaxes(-1, -2) / np.sqrt(D)) @ flat[2]
    return out.reshape(B, H, Hs, Ws, -1)


def official_hilo(x, weights, heads, alpha, s):
    """The official HiLo forward (no output projections) in torch, from features x (B, Hs, Ws, C).

    Returns the concatenated head outputs as (B, heads, Hs, Ws, head_dim)."""
    B, Hs, Ws, C = x.shape
    hd = C // heads
    lo = int(heads * alpha) if s > 1 else heads
    hi = heads - lo
    t = torch.from_numpy(x)
    parts = []
    if hi:
        w_qkv, b_qkv = (torch.from_numpy(a) for a in weights["h_qkv"])
        xw = t.reshape(B, Hs // s, s, Ws // s, s, C).transpose(2, 3)
        qkv_ = F.linear(xw, w_qkv, b_qkv).reshape(B, -1, s * s, 3, hi, hd).permute(3, 0, 1, 4, 2, 5)
        attn = ((qkv_[0] @ qkv_[1].transpose(-2, -1)) * hd**-0.5).softmax(dim=-1)
        o = (attn @ qkv_[2]).transpose(2, 3).reshape(B, Hs // s, Ws // s, s, s, hi * hd)
        parts.append(o.transpose(2, 3).reshape(B, Hs, Ws, hi * hd))
    if lo:
        (w_q, b_q), (w_kv, b_kv) = (
            (torch.from_numpy(a) for a in weights[n]) for n in ("l_q", "l_kv")
        )
        q = F.linear(t, w_q, b_q).reshape(B, Hs * Ws, lo, hd).permute(0, 2, 1, 3)
        pooled = F.avg_pool2d(t.permute(0, 3, 1, 2), s, s).reshape(B, C, -1).permute(0, 2, 1)
        kv = F.linear(pooled, w_kv, b_kv).reshape(B, -1, 2, lo, hd).permute(2, 0, 3, 1, 4)
        attn = ((q @ kv[0].transpose(-2, -1)) * hd**-0.5).softmax(dim=-1)
        parts.append((attn @ kv[1]).transpose(1, 2).reshape(B, Hs, Ws, lo * hd))
    out = torch.cat(parts, dim=-1).numpy()
    return out.reshape(B, Hs, Ws, heads, hd).transpose(0, 3, 1, 2, 4)


@pytest.mark.parametrize(
    ("heads", "alpha", "s"),
    [(4, 0.5, 2), (4, 0.25, 2), (2, 0.5, 3), (4, 0.0, 2), (4, 1.0, 2), (4, 0.5, 1)],
)
def test_hilo_equals_the_official_layer_that_pools_the_input(heads, alpha, s):
    rng = np.random.default_rng(int(alpha * 8) + 10 * s)
    B, Hs, Ws, C = 2, 6, 6, 4 * heads
    hd = C // heads
    x = rng.standard_normal((B, Hs, Ws, C))
    lo = heads if s == 1 else int(heads * alpha)
    hi = heads - lo

    def linear(n_out):
        return rng.standard_normal((n_out, C)) / np.sqrt(C), rng.standard_normal(n_out)

    weights = {"h_qkv": linear(3 * hi * hd), "l_q": linear(lo * hd), "l_kv": linear(2 * lo * hd)}

    def heads_of(y, n):  # (B, Hs, Ws, n * hd) -> (B, n, Hs, Ws, hd)
        return y.reshape(B, Hs, Ws, n, hd).transpose(0, 3, 1, 2, 4)

    w, b = weights["h_qkv"]
    hq, hk, hv = (heads_of(y, hi) for y in np.split(x @ w.T + b, 3, axis=-1))
    lq = heads_of(x @ weights["l_q"][0].T + weights["l_q"][1], lo)
    w, b = weights["l_kv"]
    lk, lv = (heads_of(y, lo) for y in np.split(x @ w.T + b, 2, axis=-1))  # full-resolution k, v
    q, k, v = (np.concatenate(p, axis=1) for p in ((hq, lq), (hk, lk), (hv, lv)))
    out = hilo(q, k, v, alpha=alpha, window=s)
    np.testing.assert_allclose(out, official_hilo(x, weights, heads, alpha, s), atol=1e-12)


def test_all_lofi_heads_at_window_one_is_multi_head_self_attention():
    q, k, v = maps(np.random.default_rng(0))
    np.testing.assert_allclose(hilo(q, k, v, alpha=1.0, window=1), mhsa(q, k, v), atol=1e-12)
    # at s = 1 every head is Lo-Fi whatever alpha says, as in the official code
    np.testing.assert_allclose(hilo(q, k, v, alpha=0.5, window=1), mhsa(q, k, v), atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(s=st.integers(1, 3), nh=st.integers(1, 3), nw=st.integers(1, 3), seed=st.integers(0, 99))
def test_all_hifi_heads_is_window_attention(s, nh, nw, seed):
    q, k, v = maps(np.random.default_rng(seed), B=1, H=2, Hs=s * nh, Ws=s * nw)
    alpha = 1.0 if s == 1 else 0.0  # at s = 1 the heads are Lo-Fi (and a 1 x 1 window is s = 1)
    out = hilo(q, k, v, alpha=alpha, window=s)
    expected = mhsa(q, k, v) if s == 1 else window_attention(q, k, v, window=s)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)


def test_head_split_hifi_first_then_lofi_on_pooled_keys():
    q, k, v = maps(np.random.default_rng(1), H=4, Hs=4, Ws=6)
    out = hilo(q, k, v, alpha=0.75, window=2)  # 3 Lo-Fi heads, 1 Hi-Fi head
    np.testing.assert_allclose(out[:, :1], window_attention(q[:, :1], k[:, :1], v[:, :1], window=2))

    def torch_pool(x):  # (B, H, Hs, Ws, d) -> (B, H, Hs/2 * Ws/2, d)
        t = torch.from_numpy(x).permute(0, 1, 4, 2, 3).flatten(0, 1)  # (B*H, d, Hs, Ws)
        pooled = F.avg_pool2d(t, 2).flatten(2).transpose(1, 2)  # (B*H, n, d)
        return pooled.reshape(x.shape[0], x.shape[1], -1, x.shape[-1]).numpy()

    ql = q[:, 1:].reshape(2, 3, 24, 3)
    kp, vp = torch_pool(k[:, 1:]), torch_pool(v[:, 1:])
    expected = softmax(ql @ kp.swapaxes(-1, -2) / np.sqrt(3)) @ vp
    np.testing.assert_allclose(out[:, 1:].reshape(2, 3, 24, 3), expected, atol=1e-12)
    np.testing.assert_allclose(avg_pool(k, 2).reshape(2, 4, 6, 3), torch_pool(k), atol=1e-12)


def test_lofi_head_count():
    assert lofi_heads(8, 0.5, 2) == 4
    assert lofi_heads(8, 0.0, 2) == 0
    assert lofi_heads(8, 0.25, 1) == 8


def test_float32_stays_float32():
    q, k, v = (x.astype(np.float32) for x in maps(np.random.default_rng(2)))
    assert hilo(q, k, v).dtype == np.float32


def test_dispatched_matches_the_reference_on_numba():
    pytest.importorskip("numba")
    q, k, v = maps(np.random.default_rng(3), H=4, Hs=8, Ws=8, D=8, Dv=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", qkv.FallbackWarning)  # sdpa runs natively
        out = dispatched_hilo(*(x.astype(np.float32) for x in (q, k, v)), backend="numba")
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, hilo(q, k, v), rtol=1e-5, atol=1e-5)


def test_dispatched_returns_the_callers_array_type():
    q, k, v = maps(np.random.default_rng(4))
    out = qkv.hilo(*(torch.from_numpy(x) for x in (q, k, v)))
    assert isinstance(out, torch.Tensor)
    np.testing.assert_allclose(out.numpy(), hilo(q, k, v), atol=1e-12)


BAD = {
    "alpha above 1": (dict(alpha=1.5), qkv.ParameterError, r"in \[0, 1\]"),
    "alpha below 0": (dict(alpha=-0.25), qkv.ParameterError, r"in \[0, 1\]"),
    "fractional Lo-Fi head count": (dict(alpha=0.3), qkv.ParameterError, "fractional head"),
    "alpha not a number": (dict(alpha="half"), qkv.ParameterError, "alpha"),
    "window larger than the map": (dict(window=5), qkv.ParameterError, "larger than the map"),
    "window not dividing the map": (dict(window=3), qkv.ShapeError, "divisible by the window"),
    "zero window": (dict(window=0), qkv.ParameterError, "window"),
    "bad scale": (dict(scale=0.0), qkv.ParameterError, "scale"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
@pytest.mark.parametrize("fn", [hilo, dispatched_hilo], ids=["reference", "dispatched"])
def test_bad_input(case, fn):
    kwargs, error, message = BAD[case]
    q, k, v = maps(np.random.default_rng(5))  # 4 heads on a 4 x 6 map
    with pytest.raises(error, match=message):
        fn(q, k, v, **kwargs)


def test_grouped_kv_heads_are_rejected():
    q, k, v = maps(np.random.default_rng(6))
    with pytest.raises(qkv.ShapeError, match="splits the heads"):
        hilo(q, k[:, :2], v[:, :2])
