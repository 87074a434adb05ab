"""Packed asymmetric KV quantisation (``qkv.quantize`` / ``qkv.dequantize``) against loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qkv
from qkv.errors import DTypeError, ParameterError, ShapeError
from qkv.reference.kv.quantization import bits_per_element, pack, storage_bits, unpack


def loop_codes(x, bits, axis, group):
    """Codes, scales and zeros by explicit loops over groups (float64, Python arithmetic)."""
    B, H, N, D = x.shape
    L = 2**bits - 1
    codes = np.zeros(x.shape, dtype=np.int64)
    gn, gd = (1, group or D) if axis == "token" else (group or N, 1)
    scale = np.zeros((B, H, N // gn, D // gd))
    zero = np.zeros_like(scale)
    for b, h, i, j in np.ndindex(*scale.shape):
        block = x[b, h, i * gn : (i + 1) * gn, j * gd : (j + 1) * gd]
        lo, hi = float(block.min()), float(block.max())
        s = (hi - lo) / L
        scale[b, h, i, j], zero[b, h, i, j] = s, lo
        for (r, c), val in np.ndenumerate(block):
            codes[b, h, i * gn + r, j * gd + c] = (
                0 if s == 0 else min(L, math.floor((val - lo) / s + 0.5))
            )
    return codes, scale, zero


CONFIGS = [
    (b, a, g)
    for b in (2, 4, 8)
    for a, g in (("token", None), ("token", 4), ("channel", None), ("channel", 3))
]


@pytest.mark.parametrize("bits,axis,group", CONFIGS)
def test_codes_equal_loops_and_error_within_half_step(bits, axis, group):
    x = np.random.default_rng(bits).standard_normal((2, 2, 6, 8)) * 3
    packed, scale, zero = qkv.quantize(x, bits=bits, axis=axis, group_size=group)
    codes, s_want, z_want = loop_codes(x, bits, axis, group)
    np.testing.assert_array_equal(unpack(packed, bits, 8), codes)
    np.testing.assert_allclose(scale, s_want, rtol=1e-15)
    np.testing.assert_array_equal(zero, z_want)
    assert packed.dtype == np.uint8 and packed.shape == (2, 2, 6, 8 * bits // 8)
    x_hat = qkv.dequantize(packed, scale, zero, bits=bits, axis=axis)
    step = np.broadcast_to(
        np.repeat(np.repeat(scale, 6 // scale.shape[2], 2), 8 // scale.shape[3], 3), x.shape
    )
    assert np.all(np.abs(x_hat - x) <= step / 2 * (1 + 1e-9) + 1e-15)


@settings(max_examples=25, deadline=None)
@given(bits=st.sampled_from([2, 4, 8]), d=st.integers(1, 19), seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip(bits, d, seed):
    codes = np.random.default_rng(seed).integers(0, 2**bits, (3, d)).astype(np.uint8)
    packed = pack(codes, bits)
    assert packed.shape == (3, math.ceil(d * bits / 8))
    np.testing.assert_array_equal(unpack(packed, bits, d), codes)
    # the first code sits in the low bits of the first byte
    assert (packed[:, 0] & (2**bits - 1) == codes[:, 0]).all()


def test_extremes_exact_constant_groups_and_dtype():
    x = np.random.default_rng(1).standard_normal((1, 1, 5, 8)).astype(np.float32)
    x[0, 0, 2] = 0.75  # a constant token
    packed, scale, zero = qkv.quantize(x, bits=2)
    x_hat = qkv.dequantize(packed, scale, zero, bits=2)
    assert x_hat.dtype == np.float32 and scale.dtype == np.float32
    np.testing.assert_array_equal(x_hat[0, 0, 2], x[0, 0, 2])
    np.testing.assert_array_equal(x_hat.min(axis=-1), x.min(axis=-1))  # min is code 0 exactly
    np.testing.assert_allclose(x_hat.max(axis=-1), x.max(axis=-1), rtol=1e-6)


def test_odd_dim_needs_dim_to_unpack():
    x = np.random.default_rng(2).standard_normal((1, 2, 4, 5))
    packed, scale, zero = qkv.quantize(x, bits=4)
    assert packed.shape[-1] == 3
    x_hat = qkv.dequantize(packed, scale, zero, bits=4, dim=5)
    assert np.abs(x_hat - x).max() <= scale.max() / 2 + 1e-12
    with pytest.raises(ShapeError, match="packed: 5 codes of 4 bits take 3 bytes, got 2"):
        qkv.dequantize(packed[..., :2], scale, zero, bits=4, dim=5)


def test_storage_accounting():
    # token-wise 4 bits over D = 128: 4 + 2 * 16 / 128 = 4.25 bits per element
    assert bits_per_element((1, 1, 64, 128), bits=4) == 4.25
    # channel-wise 2 bits over groups of 32 tokens: 2 + 2 * 16 / 32 = 3
    assert bits_per_element((2, 3, 64, 16), bits=2, axis="channel", group_size=32) == 3.0
    # padding counts: D = 5 at 4 bits takes 3 bytes = 24 bits per token
    x = np.zeros((1, 1, 4, 5))
    packed, scale, zero = qkv.quantize(x, bits=4)
    assert storage_bits(packed, scale, zero) == 4 * 24 + 2 * 4 * 16
    assert bits_per_element(x.shape, bits=4) == (4 * 24 + 2 * 4 * 16) / 20


@pytest.mark.parametrize("bits", [0, 1, 3, 16, 4.0, True])
def test_bits_outside_2_4_8(bits):
    x = np.zeros((1, 1, 4, 8))
    with pytest.raises(ParameterError, match=r"bits: expected one of \(2, 4, 8\)"):
        qkv.quantize(x, bits=bits)
    with pytest.raises(ParameterError, match="bits"):
        qkv.dequantize(np.zeros((1, 1, 4, 4), np.uint8), x[..., :1], x[..., :1], bits=bits)


def test_group_size_must_divide():
    x = np.zeros((1, 1, 6, 8))
    with pytest.raises(
        ParameterError,
        match=r"group_size: expected a positive divisor of the head dim D \(8\), got 3",
    ):
        qkv.quantize(x, group_size=3)
    with pytest.raises(ParameterError, match=r"token count N \(6\), got 4"):
        qkv.quantize(x, axis="channel", group_size=4)
    with pytest.raises(ParameterError, match="group_size"):
        qkv.quantize(x, group_size=0)


def test_other_bad_input():
    with pytest.raises(ParameterError, match="axis"):
        qkv.quantize(np.zeros((1, 1, 2, 4)), axis="head")
    with pytest.raises(ShapeError, match=r"x: expected a non-empty \(B, H, N, D\)"):
        qkv.quantize(np.zeros((2, 4)))
    with pytest.raises(DTypeError, match="x: expected one of"):
        qkv.quantize(np.zeros((1, 1, 2, 4), dtype=np.int32))
    with pytest.raises(DTypeError, match="packed: expected a uint8"):
        qkv.dequantize(np.zeros((1, 1, 2, 2)), np.zeros((1, 1, 2, 1)), np.zeros((1, 1, 2, 1)))
    with pytest.raises(ShapeError, match="zero: expected the shape"):
        qkv.dequantize(
            np.zeros((1, 1, 2, 2), np.uint8), np.zeros((1, 1, 2, 1)), np.zeros((1, 1, 2, 2))
        )
