"""SAQ (``qkv.reference.kv.saq``): staircase quantisation of an MQA cache."""

from __future__ import annotations

import numpy as np
import pytest

from qkv.errors import ParameterError, ShapeError
from qkv.reference.kv import SAQ, CacheView, saq
from qkv.reference.kv.saq_policy import target_bits


def view(keys, values, n, extra=None):
    """A single-row cache of the first ``n`` tokens (slots in token order)."""
    idx = np.arange(n)[None, None]  # (1, Hkv, n)
    idx = np.broadcast_to(idx, (*keys.shape[:2], n)).copy()
    return CacheView(
        keys=keys[:, :, :n], values=values[:, :, :n], indices=idx, positions=idx.copy(),
        next_position=np.full(keys.shape[:2], n), n_tokens=n,
        queries=np.zeros((1, 1, 1, keys.shape[-1])), extra=extra or {},
    )  # fmt: skip


def data(N=40, D=8, Hkv=1, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((1, Hkv, N, D)), rng.standard_normal((1, Hkv, N, D))


def test_staircase_widths_by_age():
    # n = 37, S = 8: residual 32..36 full, 24..31 at 8 bits, 16..23 at 4, 0..15 at 2
    got = target_bits(np.arange(37), 37, 8, (8, 4, 2))
    want = np.array([2] * 16 + [4] * 8 + [8] * 8 + [0] * 5)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("n", [1, 7, 8, 23, 40])
def test_older_never_more_bits_and_residual_exact(n):
    k, v = data()
    kept = SAQ(segment=8).compress(0, view(k, v, n))
    bits = kept.extra["saq_bits"][0, 0].astype(int)
    precision = np.where(bits == 0, 99, bits)  # full precision above every width
    assert np.all(np.diff(precision) >= 0)  # token order: older first, never more bits
    residual = bits == 0
    assert residual.sum() == n % 8
    np.testing.assert_array_equal(kept.keys[0, 0, residual], k[0, 0, :n][residual])
    np.testing.assert_array_equal(kept.values[0, 0, residual], v[0, 0, :n][residual])
    for seg in range(n // 8):
        sl = slice(8 * seg, 8 * seg + 8)
        levels = 2 ** int(bits[sl][0])
        assert all(len(np.unique(kept.keys[0, 0, sl, j])) <= levels for j in range(8))


def test_whole_prompt_equals_streaming_token_by_token():
    k, v = data(N=30)
    policy = SAQ(segment=4)
    keys, values, extra = k[:, :, :0], v[:, :, :0], {}
    for n in range(1, 31):
        keys = np.concatenate([keys, k[:, :, n - 1 : n]], axis=2)
        values = np.concatenate([values, v[:, :, n - 1 : n]], axis=2)
        kept = policy.compress(0, view(keys, values, n, extra))
        keys, values, extra = kept.keys, kept.values, kept.extra
    once = policy.compress(0, view(k, v, 30))
    np.testing.assert_array_equal(keys, once.keys)
    np.testing.assert_array_equal(values, once.values)
    assert extra["quantized_bits"] == once.extra["quantized_bits"]


def test_requantised_error_grows_down_the_stairs():
    k, v = data(N=64, seed=2)
    kept = SAQ(segment=16).compress(0, view(k, v, 64))
    err = np.abs(kept.keys - k)[0, 0].reshape(4, 16, 8).max(axis=(1, 2))  # per segment
    assert err[0] > err[2] > err[3] and err[1] > err[2]  # 2, 2, 4, 8 bits


def test_storage_bits():
    k, v = data(N=20, D=8)
    kept = SAQ(segment=8).compress(0, view(k, v, 20))
    # residual 4 tokens x 16 dims x 16 bits; segment 8..15 at 8 bits, 0..7 at 4 bits
    seg = lambda w: 8 * 8 * w + 2 * 16 * 8 + 8 * 8 * w + 2 * 16 * 8  # noqa: E731
    assert kept.extra["quantized_bits"] == 4 * 16 * 16 + seg(8) + seg(4)


def test_wrong_layout_and_bad_hyperparameters():
    k, v = data(Hkv=2)
    with pytest.raises(ShapeError, match="one KV head, got 2"):
        SAQ(segment=4).compress(0, view(k, v, 10))
    SAQ(segment=4, require_mqa=False).compress(0, view(k, v, 10))  # per KV head
    with pytest.raises(ParameterError, match=r"stairs: expected one of \(2, 4, 8\), got 3"):
        saq(stairs=(8, 3))
    with pytest.raises(ParameterError, match="strictly decreasing"):
        saq(stairs=(2, 4))
    with pytest.raises(ParameterError, match="segment: expected an integer >= 1"):
        saq(segment=0)
