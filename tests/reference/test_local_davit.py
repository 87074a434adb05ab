"""Properties of DaViT's channel attention and window attention (Ding et al., arXiv 2204.03645).

Independent computations: explicit loops over windows and channel groups in NumPy, torch
written the way the official code computes (padding, window partition, the code's roles of
q, k and v), and the paper's property that channel attention is equivariant to permuting the
tokens.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qkv
from qkv.reference.local import davit
from qkv.reference.local.davit import (
    channel_attention,
    channel_map,
    dispatched_channel_attention,
    dispatched_window_attention,
    merge_groups,
    split_groups,
    window_attention,
    window_partition,
    window_unpartition,
)

torch = pytest.importorskip("torch")
F = torch.nn.functional


def softmax(s):
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def maps(rng, B=2, H=2, Hkv=2, Hs=5, Ws=7, D=4, Dv=3):
    q = rng.standard_normal((B, H, Hs, Ws, D))
    k = rng.standard_normal((B, Hkv, Hs, Ws, D))
    v = rng.standard_normal((B, Hkv, Hs, Ws, Dv))
    return q, k, v


def windows_by_loop(q, k, v, wh, ww, scale=None):
    """Each real token attends to the real tokens of its window: slices clipped to the map."""
    B, H, Hs, Ws, D = q.shape
    G = H // k.shape[1]
    s = D**-0.5 if scale is None else scale
    out = np.zeros((*q.shape[:-1], v.shape[-1]))
    for b in range(B):
        for h in range(H):
            for top in range(0, Hs, wh):
                for left in range(0, Ws, ww):
                    rows, cols = slice(top, top + wh), slice(left, left + ww)
                    qs = q[b, h, rows, cols].reshape(-1, D)
                    ks = k[b, h // G, rows, cols].reshape(-1, D)
                    vs = v[b, h // G, rows, cols].reshape(-1, v.shape[-1])
                    o = softmax(s * qs @ ks.T) @ vs
                    out[b, h, rows, cols] = o.reshape(*q[b, h, rows, cols].shape[:2], -1)
    return out


def full_by_softmax(q, k, v, scale=None):
    B, H, Hs, Ws, D = q.shape
    G = H // k.shape[1]
    flat = [x.reshape(*x.shape[:2], Hs * Ws, -1) for x in (q, k, v)]
    kr, vr = np.repeat(flat[1], G, axis=1), np.repeat(flat[2], G, axis=1)
    s = D**-0.5 if scale is None else scale
    out = softmax(s * flat[0] @ kr.swapaxes(-1, -2)) @ vr
    return out.reshape(B, H, Hs, Ws, -1)


# --------------------------------------------------------------------------- window helpers


@pytest.mark.parametrize("window", [(1, 1), (2, 3), (4, 6), (2, 6)])
def test_partition_cuts_the_windows_row_major_and_unpartition_inverts_it(window):
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 6, 5))
    parts = window_partition(x, window)
    wh, ww = window
    nh, nw = 4 // wh, 6 // ww
    assert parts.shape == (2 * nh * nw, 3, wh * ww, 5)
    for b in range(2):
        for i in range(nh):
            for j in range(nw):
                block = x[b, :, i * wh : (i + 1) * wh, j * ww : (j + 1) * ww]
                np.testing.assert_array_equal(
                    parts[(b * nh + i) * nw + j], block.reshape(3, wh * ww, 5)
                )
    np.testing.assert_array_equal(window_unpartition(parts, window, (4, 6)), x)


def test_split_groups_takes_contiguous_channel_slices():
    x = np.random.default_rng(1).standard_normal((2, 5, 12))  # (B, N, C)
    grouped = split_groups(x, 3)
    assert grouped.shape == (2, 3, 5, 4)
    for g in range(3):
        np.testing.assert_array_equal(grouped[:, g], x[..., 4 * g : 4 * (g + 1)])
    np.testing.assert_array_equal(merge_groups(grouped), x)


# --------------------------------------------------------------------------- window attention


@settings(max_examples=25, deadline=None)
@given(
    Hs=st.integers(1, 7),
    Ws=st.integers(1, 7),
    wh=st.integers(1, 7),
    ww=st.integers(1, 7),
    heads=st.sampled_from([(1, 1), (2, 1), (4, 2)]),
    seed=st.integers(0, 2**16),
)
def test_window_attention_is_attention_inside_each_clipped_window(Hs, Ws, wh, ww, heads, seed):
    wh, ww = min(wh, Hs), min(ww, Ws)
    q, k, v = maps(np.random.default_rng(seed), H=heads[0], Hkv=heads[1], Hs=Hs, Ws=Ws)
    out = window_attention(q, k, v, window=(wh, ww))
    np.testing.assert_allclose(out, windows_by_loop(q, k, v, wh, ww), rtol=1e-12, atol=1e-12)


def test_a_window_covering_the_map_is_full_attention():
    q, k, v = maps(np.random.default_rng(2), H=4, Hkv=2)
    expected = full_by_softmax(q, k, v, scale=0.3)
    out = window_attention(q, k, v, window=(5, 7), scale=0.3)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)


def test_padding_never_leaks_into_real_tokens():
    """Real outputs do not move when the padded region would hold very different tokens."""
    rng = np.random.default_rng(3)
    q, k, v = maps(rng, Hs=5, Ws=5)
    out = window_attention(q, k, v, window=3)  # pads 5 x 5 to 6 x 6
    big = [
        np.pad(x, [(0, 0), (0, 0), (0, 1), (0, 1), (0, 0)], constant_values=50.0) for x in (q, k, v)
    ]
    cropped = window_attention(*big, window=3)[:, :, :5, :5]  # 6 x 6: no padding, loud border
    assert not np.allclose(cropped, out)  # the loud border does reach its windows...
    np.testing.assert_allclose(out, windows_by_loop(q, k, v, 3, 3), rtol=1e-12, atol=1e-12)


def official_window_attention(q, k, v, window):
    """The official SpatialBlock order in torch: zero-pad, partition, attend unmasked, crop."""
    B, H, Hs, Ws, D = q.shape
    pad_b, pad_r = -Hs % window, -Ws % window
    t = [F.pad(torch.from_numpy(x), (0, 0, 0, pad_r, 0, pad_b)) for x in (q, k, v)]
    Hp, Wp = Hs + pad_b, Ws + pad_r
    nh, nw = Hp // window, Wp // window

    def part(x):  # (B, H, Hp, Wp, d) -> (B * nW, H, w * w, d)
        x = x.view(B, H, nh, window, nw, window, -1).permute(0, 2, 4, 1, 3, 5, 6)
        return x.reshape(B * nh * nw, H, window * window, -1)

    qw, kw, vw = (part(x) for x in t)
    attn = ((qw * D**-0.5) @ kw.transpose(-2, -1)).softmax(dim=-1)
    out = (attn @ vw).view(B, nh, nw, H, window, window, -1).permute(0, 3, 1, 4, 2, 5, 6)
    return out.reshape(B, H, Hp, Wp, -1)[:, :, :Hs, :Ws].numpy()


def test_unmasked_padding_is_the_official_zero_padding():
    q, k, v = maps(np.random.default_rng(4), Hs=5, Ws=9)
    out = window_attention(q, k, v, window=4, mask_padding=False)
    np.testing.assert_allclose(out, official_window_attention(q, k, v, 4), rtol=1e-12, atol=1e-12)
    masked = window_attention(q, k, v, window=4)
    assert not np.allclose(out, masked)  # the zero keys do dilute the softmax


def test_window_attention_keeps_float32():
    q, k, v = (x.astype(np.float32) for x in maps(np.random.default_rng(5)))
    out = window_attention(q, k, v, window=3)
    assert out.dtype == np.float32
    assert out.shape == (2, 2, 5, 7, 3)


# --------------------------------------------------------------------------- channel attention


def channels_by_loop(q, k, v):
    """The paper, group by group: A = softmax(Q^T K / sqrt(Cg)), out = (A V^T)^T."""
    B, G = q.shape[:2]
    Cg = q.shape[-1]
    out = np.zeros_like(q)
    for b in range(B):
        for g in range(G):
            Q, K, V = (x[b, g].reshape(-1, Cg) for x in (q, k, v))  # (P, Cg)
            A = softmax(Q.T @ K / np.sqrt(Cg))  # (Cg, Cg)
            out[b, g] = (A @ V.T).T.reshape(q.shape[2:])
    return out


def official_channel_attention(x, w_qkv, groups):
    """The official ChannelAttention (no bias, no output projection) in torch."""
    B, N, C = x.shape
    qkv_ = (torch.from_numpy(x) @ torch.from_numpy(w_qkv).T).reshape(B, N, 3, groups, C // groups)
    q, k, v = qkv_.permute(2, 0, 3, 1, 4)
    k = k * (C // groups) ** -0.5
    attention = (k.transpose(-1, -2) @ v).softmax(dim=-1)
    out = (attention @ q.transpose(-1, -2)).transpose(-1, -2)
    return out.transpose(1, 2).reshape(B, N, C).numpy()


def test_channel_attention_is_the_paper_equation():
    q, k, v = (np.random.default_rng(6).standard_normal((2, 3, 10, 4)) for _ in range(3))
    np.testing.assert_allclose(channel_attention(q, k, v), channels_by_loop(q, k, v), atol=1e-12)


def test_the_official_code_is_the_paper_with_q_k_v_renamed():
    rng = np.random.default_rng(7)
    B, N, C, G = 2, 12, 8, 2
    x = rng.standard_normal((B, N, C))
    w_qkv = rng.standard_normal((3 * C, C)) / np.sqrt(C)
    q_code, k_code, v_code = (split_groups(x @ w.T, G) for w in np.split(w_qkv, 3))
    ours = channel_attention(k_code, v_code, q_code)  # the code's (q, k, v) = paper's (V, Q, K)
    np.testing.assert_allclose(
        merge_groups(ours), official_channel_attention(x, w_qkv, G), rtol=1e-12, atol=1e-12
    )


@settings(max_examples=25, deadline=None)
@given(N=st.integers(1, 12), Cg=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_channel_attention_is_equivariant_to_permuting_tokens(N, Cg, seed):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((1, 2, N, Cg)) for _ in range(3))
    perm = rng.permutation(N)
    out = channel_attention(q, k, v)
    permuted = channel_attention(q[:, :, perm], k[:, :, perm], v[:, :, perm])
    np.testing.assert_allclose(permuted, out[:, :, perm], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(
        channel_map(q[:, :, perm], k[:, :, perm]), channel_map(q, k), rtol=1e-10, atol=1e-12
    )


def test_channel_attention_on_a_map_flattens_the_tokens():
    q, k, v = maps(np.random.default_rng(8), Dv=4)
    flat = [x.reshape(2, 2, 35, 4) for x in (q, k, v)]
    out = channel_attention(q, k, v)
    assert out.shape == q.shape
    np.testing.assert_allclose(out.reshape(2, 2, 35, 4), channels_by_loop(*flat), atol=1e-12)
    assert np.allclose(channel_map(q, k).sum(axis=-1), 1.0)


def test_channel_attention_keeps_float32():
    q = np.random.default_rng(9).standard_normal((1, 2, 6, 3)).astype(np.float32)
    assert channel_attention(q, q, q).dtype == np.float32


# --------------------------------------------------------------------------- dispatch


def test_dispatched_forms_match_the_reference_on_numba():
    pytest.importorskip("numba")
    rng = np.random.default_rng(10)
    q, k, v = maps(rng, H=4, Hkv=2, Hs=9, Ws=10, D=8, Dv=8)
    f32 = [x.astype(np.float32) for x in (q, k, v)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", qkv.FallbackWarning)  # sdpa runs natively
        out = dispatched_window_attention(*f32, window=4, backend="numba")
        chan = dispatched_channel_attention(f32[0], f32[0], f32[0], backend="numba")
    assert out.dtype == np.float32 and chan.dtype == np.float32
    np.testing.assert_allclose(out, window_attention(q, k, v, window=4), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(chan, channel_attention(q, q, q), rtol=1e-5, atol=1e-5)


def test_dispatched_returns_the_callers_array_type():
    q, k, v = maps(np.random.default_rng(11))
    out = qkv.window_attention(*(torch.from_numpy(x) for x in (q, k, v)), window=3)
    assert isinstance(out, torch.Tensor)
    np.testing.assert_allclose(out.numpy(), window_attention(q, k, v, window=3), atol=1e-12)
    chan = qkv.channel_attention(*(torch.from_numpy(x) for x in (q, q, q)))
    assert isinstance(chan, torch.Tensor)


# --------------------------------------------------------------------------- bad input

WINDOW_BAD = {
    "window larger than the map": (dict(window=6), qkv.ParameterError, "larger than the map"),
    "window pair too wide": (dict(window=(2, 8)), qkv.ParameterError, "larger than the map"),
    "zero window": (dict(window=0), qkv.ParameterError, "window: expected an integer >= 1"),
    "window triple": (dict(window=(2, 2, 2)), qkv.ParameterError, "pair"),
    "negative scale": (dict(window=3, scale=-1.0), qkv.ParameterError, "scale"),
    "mask_padding not a bool": (dict(window=3, mask_padding=1), qkv.ParameterError, "mask_padding"),
}


@pytest.mark.parametrize("case", WINDOW_BAD, ids=list(WINDOW_BAD))
@pytest.mark.parametrize(
    "fn", [window_attention, dispatched_window_attention], ids=["reference", "dispatched"]
)
def test_window_attention_bad_input(case, fn):
    kwargs, error, message = WINDOW_BAD[case]
    q, k, v = maps(np.random.default_rng(12))
    with pytest.raises(error, match=message):
        fn(q, k, v, **kwargs)


def test_window_attention_rejects_wrong_maps_and_ranks():
    q, k, v = maps(np.random.default_rng(13))
    with pytest.raises(qkv.ShapeError, match="rank 5"):
        window_attention(q[:, :, 0], k, v, window=2)
    with pytest.raises(qkv.ShapeError, match=r"map \(Hs, Ws\)"):
        window_attention(q, k[:, :, :4], v, window=2)
    with pytest.raises(qkv.ShapeError, match="divisible"):
        window_attention(q[:, :1].repeat(3, axis=1), k, v, window=2)


def test_channel_groups_must_divide_the_channels():
    with pytest.raises(qkv.ParameterError, match="channel groups must divide"):
        split_groups(np.zeros((1, 4, 10)), 3)
    with pytest.raises(qkv.ParameterError, match="groups"):
        split_groups(np.zeros((1, 4, 10)), 0)


@pytest.mark.parametrize(
    "fn", [channel_attention, dispatched_channel_attention], ids=["reference", "dispatched"]
)
def test_channel_attention_bad_input(fn):
    q = np.zeros((1, 2, 6, 3))
    with pytest.raises(qkv.ShapeError, match="the shape of q"):
        fn(q, q[:, :, :5], q)
    with pytest.raises(qkv.ShapeError, match=r"\(B, G, N, Cg\)"):
        fn(q[0], q[0], q[0])
    with pytest.raises(qkv.DTypeError, match="one dtype"):
        fn(q, q.astype(np.float32), q)
    with pytest.raises(qkv.ParameterError, match="scale"):
        fn(q, q, q, scale=float("nan"))


def test_shared_window_helpers_are_exported_for_the_family():
    assert davit.window_pair(3) == (3, 3) and davit.window_pair((2, 5)) == (2, 5)
