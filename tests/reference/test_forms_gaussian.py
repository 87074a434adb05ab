"""Multi-head Gaussian adaptive attention: the reference against loops and stated properties.

The independent computation is the released code's formula in plain Python loops in float64
(linear-domain Gaussians with their normalising constants, multiplied or mixed, divided by the
sum), which must equal the reference's log-domain softmax wherever nothing underflows.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from qkv.errors import DTypeError, ParameterError, ShapeError
from qkv.reference.forms.gaussian_attention import GaussianParams, gaussian, head_bounds


def loops(x, offsets, scales, logits, axis, mixture, eps=1e-8):
    """The code's GAAM, entry by entry: ``GaussianBlock.py`` ("product") or ``MHGAAM.py``."""
    xm = np.moveaxis(np.asarray(x, dtype=np.float64), axis, -1)
    out = np.zeros_like(xm)
    H, G = offsets.shape
    L = xm.shape[-1]
    size = L // H
    for index in np.ndindex(xm.shape[:-1]):
        row = xm[index]
        for h in range(H):
            start, stop = h * size, (L if h == H - 1 else (h + 1) * size)
            chunk = [float(v) for v in row[start:stop]]
            n = len(chunk)
            mean = sum(chunk) / n
            var = sum((v - mean) ** 2 for v in chunk) / (n - 1) + eps
            if mixture == "sum":
                a = [0.0] * G if logits is None else [float(v) for v in logits[h]]
                pi = [math.exp(v) / sum(math.exp(u) for u in a) for v in a]
            g = []
            for v in chunk:
                total = 1.0 if mixture == "product" else 0.0
                for i in range(G):
                    y = (v - mean - offsets[h, i]) / math.sqrt(var)
                    c = scales[h, i]
                    if mixture == "product":
                        total *= math.exp(-(y**2) / (2 * c**2)) / math.sqrt(2 * math.pi * c**2)
                    else:
                        total += pi[i] * math.exp(-(y**2) / (2 * c**2))
                g.append(total)
            s = sum(g)
            for j, v in enumerate(chunk):
                out[(*index, start + j)] = v * g[j] / s
    return np.moveaxis(out, -1, axis)


def params(H, G, mixture, seed, offset_scale=0.5):
    rng = np.random.default_rng(seed)
    p = GaussianParams.init(H, G, mixture=mixture, rng=rng)
    offsets = offset_scale * rng.standard_normal((H, G))
    logits = rng.standard_normal((H, G)) if mixture == "sum" else None
    return offsets, p.scales, logits


@pytest.mark.parametrize("mixture", ["product", "sum"])
@pytest.mark.parametrize(
    ("shape", "axis", "H", "G"),
    [((7,), 0, 1, 1), ((2, 12), -1, 3, 2), ((3, 11, 2), 1, 4, 3), ((2, 2, 3, 9), 2, 1, 5)],
)
def test_equals_loops(mixture, shape, axis, H, G):
    if shape[axis] < H:
        pytest.skip("fewer entries than heads")
    x = np.random.default_rng(1).standard_normal(shape)
    offsets, scales, logits = params(H, G, mixture, seed=2, offset_scale=0.1)
    scales = scales + 0.5  # keeps the linear-domain products of the loops from underflowing
    out = gaussian(x, offsets, scales, logits, axis=axis, mixture=mixture)
    np.testing.assert_allclose(out, loops(x, offsets, scales, logits, axis, mixture), atol=1e-12)


def test_sum_mixture_defaults_to_equal_weights():
    x = np.random.default_rng(3).standard_normal((4, 10))
    offsets, scales, _ = params(2, 3, "sum", seed=4)
    out = gaussian(x, offsets, scales, None, mixture="sum")
    np.testing.assert_allclose(out, loops(x, offsets, scales, None, -1, "sum"), atol=1e-12)


@pytest.mark.parametrize("mixture", ["product", "sum"])
def test_weights_sum_to_one_per_head(mixture):
    x = np.random.default_rng(5).standard_normal((3, 23, 2))
    offsets, scales, logits = params(4, 3, mixture, seed=6, offset_scale=3.0)
    out, w = gaussian(x, offsets, scales, logits, axis=1, mixture=mixture, return_weights=True)
    assert np.all(w >= 0)
    for start, stop in head_bounds(23, 4):
        np.testing.assert_allclose(w[:, start:stop].sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(out, x * w, atol=0)


def test_last_head_takes_the_remainder():
    assert head_bounds(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert head_bounds(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]


@pytest.mark.parametrize("mixture", ["product", "sum"])
def test_shift_invariance_of_the_weights(mixture):
    """y = (x - mu - delta) / sigma ignores a constant added to the slice, whatever delta."""
    x = np.random.default_rng(7).standard_normal((5, 16))
    offsets, scales, logits = params(2, 3, mixture, seed=8, offset_scale=1.0)
    _, w = gaussian(x, offsets, scales, logits, mixture=mixture, return_weights=True)
    out, w_shifted = gaussian(
        x + 3.25, offsets, scales, logits, mixture=mixture, return_weights=True
    )
    np.testing.assert_allclose(w_shifted, w, atol=1e-12)
    np.testing.assert_allclose(out, (x + 3.25) * w, atol=1e-12)


def test_scale_invariance_with_zero_offsets_only():
    x = np.random.default_rng(9).standard_normal((5, 16))
    _, scales, _ = params(2, 3, "product", seed=10)
    zero = np.zeros_like(scales)
    _, w = gaussian(x, zero, scales, return_weights=True)
    _, w_scaled = gaussian(7.0 * x, zero, scales, return_weights=True)
    np.testing.assert_allclose(w_scaled, w, atol=1e-8)
    offsets = np.ones_like(scales)
    _, w = gaussian(x, offsets, scales, return_weights=True)
    _, w_scaled = gaussian(7.0 * x, offsets, scales, return_weights=True)
    assert np.abs(w_scaled - w).max() > 1e-3  # an offset is in units of x: scale matters


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mixture", ["product", "sum"])
def test_zero_variance_gives_uniform_weights(dtype, mixture):
    """Documented: a constant slice gets w = 1/n (no NaN), even with large offsets."""
    x = np.full((2, 6), 1234.5678, dtype=dtype)
    x[1] = 0.0
    offsets, scales, logits = params(2, 3, mixture, seed=11, offset_scale=5.0)
    offsets, scales = offsets.astype(dtype), scales.astype(dtype)
    logits = None if logits is None else logits.astype(dtype)
    out, w = gaussian(x, offsets, scales, logits, mixture=mixture, return_weights=True)
    assert out.dtype == dtype and w.dtype == dtype
    np.testing.assert_array_equal(w, np.full_like(w, 1 / 3))
    np.testing.assert_allclose(out, x / 3, rtol=1e-6)


def test_large_offsets_do_not_underflow():
    """The code's linear-domain sum underflows here; the log-domain softmax does not."""
    x = np.random.default_rng(12).standard_normal((2, 8)) * 1e-3
    offsets = np.full((1, 2), 50.0)
    scales = np.full((1, 2), 0.1)
    out, w = gaussian(x, offsets, scales, return_weights=True)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(w.sum(axis=-1), 1.0, atol=1e-12)


def test_one_entry_heads_pass_through():
    x = np.random.default_rng(13).standard_normal((3, 4))
    offsets, scales, _ = params(4, 2, "product", seed=14)
    out, w = gaussian(x, offsets, scales, return_weights=True)
    np.testing.assert_array_equal(w, np.ones_like(w))
    np.testing.assert_array_equal(out, x)


def test_float32_stays_float32_and_input_is_untouched():
    x = np.random.default_rng(15).standard_normal((2, 9)).astype(np.float32)
    offsets, scales, _ = params(3, 2, "product", seed=16)
    before = x.copy()
    out = gaussian(x, offsets.astype(np.float32), scales.astype(np.float32))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(x, before)
    exact = gaussian(x.astype(np.float64), offsets, scales)
    np.testing.assert_allclose(out, exact, rtol=1e-4, atol=1e-6)


def test_init_matches_the_released_code():
    rng = np.random.default_rng(17)
    p = GaussianParams.init(3, 4, rng=rng)
    assert p.offsets.shape == p.scales.shape == (3, 4) and p.logits is None
    assert np.all(p.offsets == 0) and np.all(p.scales > 0)
    s = GaussianParams.init(3, 4, mixture="sum", rng=rng)
    assert np.all(s.scales == 2.0) and np.all(s.logits == 0)


# --------------------------------------------------------------------------- bad input


def good():
    x = np.zeros((2, 8))
    return x, np.zeros((2, 3)), np.ones((2, 3))


@pytest.mark.parametrize(
    ("change", "error", "names"),
    [
        (lambda x, o, c: (x, o, c[:, :2]), ShapeError, "scales"),
        (lambda x, o, c: (x, o[0], c), ShapeError, "offsets"),
        (lambda x, o, c: (x[:, :1], o, c), ShapeError, "x:"),
        (lambda x, o, c: (np.float64(1.0), o, c), TypeError, "x:"),
        (lambda x, o, c: (x.astype(np.float32), o, c), DTypeError, "expected one dtype"),
        (lambda x, o, c: (x.astype(np.int64), o, c), DTypeError, "x:"),
        (lambda x, o, c: (x, o, np.zeros_like(c)), ParameterError, "scales"),
        (lambda x, o, c: (x, o, c * np.inf), ParameterError, "scales"),
    ],
)
def test_bad_arrays(change, error, names):
    with pytest.raises(error, match=names):
        gaussian(*change(*good()))


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({"axis": 2}, "axis"),
        ({"axis": 1.0}, "axis"),
        ({"mixture": "mean"}, "mixture"),
        ({"eps": 0.0}, "eps"),
        ({"eps": float("nan")}, "eps"),
    ],
)
def test_bad_parameters(kwargs, names):
    with pytest.raises(ParameterError, match=names):
        gaussian(*good(), **kwargs)


def test_logits_are_for_the_sum_mixture_only():
    x, o, c = good()
    with pytest.raises(ParameterError, match="logits"):
        gaussian(x, o, c, np.zeros((2, 3)))
    with pytest.raises(ShapeError, match="logits"):
        gaussian(x, o, c, np.zeros((2, 4)), mixture="sum")


def test_a_non_finite_entry_reaches_only_its_heads_slice():
    x = np.ones((2, 8))
    x[0, 1] = np.inf
    out = gaussian(x, np.zeros((2, 2)), np.ones((2, 2)))
    expected = np.zeros((2, 8), dtype=bool)
    expected[0, :4] = True  # row 0, head 0 (entries 0-3)
    np.testing.assert_array_equal(np.isnan(out), expected)
