"""``qkv.mixed_attention`` (attention over packed low-bit slots and floating slots) against a
loop that unpacks the codes bit by bit and takes the softmax in Python floats."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qkv
from qkv.errors import DTypeError, ParameterError, ShapeError


def make(seed, *, B=1, H=4, Hkv=2, N=2, Mq=6, Mf=3, D=6, Dv=5, bits=4, kax="channel", vax="token"):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, H, N, D))
    k = rng.standard_normal((B, Hkv, Mf, D))
    v = rng.standard_normal((B, Hkv, Mf, Dv))
    kq = qkv.quantize(rng.standard_normal((B, Hkv, Mq, D)), bits=bits, axis=kax)
    vq = qkv.quantize(rng.standard_normal((B, Hkv, Mq, Dv)), bits=bits, axis=vax)
    return (q, k, v, *kq, *vq), {"bits": bits, "key_axis": kax, "value_axis": vax}


def loop_dequantize(codes, scale, zero, bits, dim):
    """Element by element: code ``d`` sits at bits ``(d % per) * bits`` of byte ``d // per``;
    the group of element ``(n, d)`` is found from the scale's shape."""
    B, H, M, _ = codes.shape
    per = 8 // bits
    gn, gd = M // scale.shape[2], dim // scale.shape[3]
    out = np.zeros((B, H, M, dim))
    for b, h, n, d in np.ndindex(B, H, M, dim):
        c = (int(codes[b, h, n, d // per]) >> ((d % per) * bits)) & (2**bits - 1)
        out[b, h, n, d] = c * scale[b, h, n // gn, d // gd] + zero[b, h, n // gn, d // gd]
    return out


def loop_attention(args, bits, scale=None):
    q, k, v, kc, ks, kz, vc, vs, vz = args
    B, H, N, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[3]
    keys = np.concatenate([loop_dequantize(kc, ks, kz, bits, D), k], axis=2)
    vals = np.concatenate([loop_dequantize(vc, vs, vz, bits, Dv), v], axis=2)
    scale = D**-0.5 if scale is None else scale
    out, lse = np.zeros((B, H, N, Dv)), np.zeros((B, H, N))
    for b, h, i in np.ndindex(B, H, N):
        g = h // (H // Hkv)
        s = [scale * float(q[b, h, i] @ key) for key in keys[b, g]]
        top = max(s)
        w = np.array([np.exp(x - top) for x in s])
        out[b, h, i] = w @ vals[b, g] / w.sum()
        lse[b, h, i] = top + np.log(w.sum())
    return out, lse


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize(("kax", "vax"), [("channel", "token"), ("token", "channel")])
def test_matches_a_bitwise_loop(bits, kax, vax):
    args, kw = make(bits, bits=bits, kax=kax, vax=vax, D=7, Dv=5)  # odd dims: padded bytes
    out, lse = qkv.mixed_attention(*args, **kw, scale=0.7, return_lse=True)
    want, want_lse = loop_attention(args, bits, scale=0.7)
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-12)


@settings(max_examples=25, deadline=None)
@given(
    Mf=st.integers(0, 5),
    Mq=st.integers(1, 6),
    bits=st.sampled_from([2, 4, 8]),
    seed=st.integers(0, 2**16),
)
def test_slot_order_does_not_matter_and_8_bits_is_close_to_exact(Mf, Mq, bits, seed):
    args, kw = make(seed, Mq=Mq, Mf=Mf, bits=bits)
    q, k, v = args[:3]
    out = qkv.mixed_attention(*args, **kw)
    perm = np.random.default_rng(seed).permutation(Mf)
    again = qkv.mixed_attention(q, k[:, :, perm], v[:, :, perm], *args[3:], **kw)
    np.testing.assert_allclose(out, again, rtol=1e-12, atol=1e-12)
    # the same keys and values kept in float: 8-bit codes move the output by little
    rng = np.random.default_rng(seed + 1)
    kx, vx = rng.standard_normal((2, *k.shape[:2], Mq + Mf, k.shape[3]))
    exact = qkv.sdpa(q, kx, vx)
    kq = qkv.quantize(kx[:, :, :Mq], bits=8, axis="channel")
    vq = qkv.quantize(vx[:, :, :Mq], bits=8, axis="token")
    mixed = qkv.mixed_attention(q, kx[:, :, Mq:], vx[:, :, Mq:], *kq, *vq, bits=8)
    assert np.abs(mixed - exact).max() < 0.05


def test_float32_in_float32_out():
    args, kw = make(5)
    out = qkv.mixed_attention(
        *(a.astype(np.float32) if a.dtype == np.float64 else a for a in args), **kw
    )
    assert out.dtype == np.float32


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda a, kw: (a, {**kw, "bits": 3}), ParameterError, "bits"),
        (lambda a, kw: ((a[0][0], *a[1:]), kw), ShapeError, "q: expected a 4-d"),
        (lambda a, kw: ((a[0], np.repeat(a[1], 3, axis=1), *a[2:]), kw), ShapeError, "k:"),
        (lambda a, kw: ((*a[:2], a[2][:, :, :1], *a[3:]), kw), ShapeError, "v: expected"),
        (lambda a, kw: ((*a[:2], a[2].astype(np.float32), *a[3:]), kw), DTypeError, "v:"),
        (lambda a, kw: ((*a[:3], a[3].astype(np.int8), *a[4:]), kw), DTypeError, "k_codes"),
        (lambda a, kw: ((*a[:4], a[4][:, :, :, :2], *a[5:]), kw), ShapeError, "k_zero|k_scale"),
        (lambda a, kw: ((*a[:6], a[6][:, :, :4], *a[7:]), kw), ShapeError, "v_"),
        (lambda a, kw: (a, {**kw, "key_axis": "token"}), ShapeError, "k_scale"),
        (lambda a, kw: (a, {**kw, "value_axis": "head"}), ParameterError, "axis"),
        (lambda a, kw: (a, {**kw, "scale": 0.0}), ParameterError, "scale"),
    ],
)
def test_bad_input(change, error, match):
    args, kw = change(*make(6))
    with pytest.raises(error, match=match):
        qkv.mixed_attention(*args, **kw)
