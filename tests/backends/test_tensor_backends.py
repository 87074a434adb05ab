"""Backends of exact tensor (Kronecker) attention against the float64 NumPy reference.

The expected output is :func:`qkv.reference.forms.tensor_attention.tensor_brute_force` in
float64 (the equation as it reads, independent of the streaming kernels). Outputs are poisoned
(NaN-filled before a kernel runs), so an element a kernel forgets to write fails. The last
tests go through the dispatched ops ``qkv.tensor`` and ``qkv.tensor_approx``.
"""

from __future__ import annotations

import numpy as np
import pytest

import qkv
from qkv import _dispatch, _outputs
from qkv.errors import ParameterError, ShapeError, Unsupported
from qkv.reference.forms.tensor_attention import tensor_brute_force

pytest.importorskip("numba")
pytest.importorskip("scipy")

from qkv.backends import numba as numba_backend
from qkv.backends.numba import _tensor

# (B, H, Hkv, N, M, D, Dv): one token, odd sizes, N != M, grouped heads, several row tiles and
# first-key blocks with ragged ends, and the paper's square case.
SHAPES = {
    "one-token": (1, 1, 1, 1, 1, 1, 1),
    "odd": (1, 3, 3, 7, 5, 3, 5),
    "n>m": (2, 2, 1, 37, 9, 4, 2),
    "n<m": (1, 4, 2, 3, 19, 8, 6),
    "tiles": (1, 2, 1, 70, 21, 16, 8),
    "square": (1, 1, 1, 33, 33, 32, 32),
}
TOL = {np.float32: 2e-5, np.float64: 1e-12}


def make_inputs(shape, dtype, bound=1.0, seed=0):
    """Queries and keys uniform in ``[-bound, bound]``, values standard normal, in ``dtype``."""
    B, H, Hkv, N, M, D, Dv = shape
    rng = np.random.default_rng(seed)
    q = rng.uniform(-bound, bound, (B, H, N, D))
    k1, k2 = rng.uniform(-bound, bound, (2, B, Hkv, M, D))
    v1, v2 = rng.standard_normal((2, B, Hkv, M, Dv))
    return tuple(x.astype(dtype) for x in (q, k1, k2, v1, v2))


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_numba_matches_the_float64_reference(shape, dtype):
    inputs = make_inputs(shape, dtype, bound=0.8)
    copies = [x.copy() for x in inputs]
    golden = tensor_brute_force(*(x.astype(np.float64) for x in inputs), scale=0.9)
    with _outputs.poisoned():
        out = numba_backend.tensor(*inputs, scale=0.9)
    assert out.dtype == dtype and out.shape == golden.shape
    scale = np.abs(inputs[3]).max() * np.abs(inputs[4]).max()  # outputs lie within max|v1 v2|
    np.testing.assert_allclose(out, golden, rtol=TOL[dtype], atol=TOL[dtype] * scale)
    for x, before in zip(inputs, copies, strict=True):
        np.testing.assert_array_equal(x, before)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["fp32", "fp64"])
def test_numba_at_large_scores(dtype):
    """Scores up to a few hundred: the running maximum keeps every exponent <= 0."""
    inputs = make_inputs((1, 2, 1, 9, 12, 6, 4), dtype, bound=4.0, seed=1)
    golden = tensor_brute_force(*(x.astype(np.float64) for x in inputs))
    out = numba_backend.tensor(*inputs)
    assert np.isfinite(out).all()
    # A score of several hundred is rounded to ~1e-5 absolute in float32, moving the weights
    # by as much relative: the output error scales with the largest score.
    tol = {np.float32: 1e-3, np.float64: 1e-10}[dtype]
    np.testing.assert_allclose(out, golden, rtol=tol, atol=tol * np.abs(golden).max())


def test_numba_reads_strided_inputs():
    q, k1, k2, v1, v2 = make_inputs((1, 2, 1, 6, 7, 4, 3), np.float64, seed=2)
    wide = np.repeat(k1, 2, axis=-1)[..., ::2]  # a non-contiguous view equal to k1
    np.testing.assert_allclose(
        numba_backend.tensor(q, wide, k2, v1, v2),
        tensor_brute_force(q, k1, k2, v1, v2),
        rtol=1e-12,
        atol=1e-13,
    )


def test_numba_declines_half_precision():
    inputs = make_inputs((1, 1, 1, 2, 3, 2, 2), np.float16)
    with pytest.raises(Unsupported, match="float16"):
        numba_backend.tensor(*inputs)


def test_numba_tiles_do_not_change_the_result(monkeypatch):
    inputs = make_inputs((1, 2, 1, 11, 13, 5, 3), np.float64, seed=3)
    golden = tensor_brute_force(*inputs)
    for bq, bi in [(1, 1), (4, 3), (64, 64)]:
        monkeypatch.setattr(_tensor, "BQ", bq)
        monkeypatch.setattr(_tensor, "BI", bi)
        with _outputs.poisoned():
            out = numba_backend.tensor(*inputs)
        np.testing.assert_allclose(out, golden, rtol=1e-12, atol=1e-13)


def test_dispatched_tensor_runs_natively_on_numba(monkeypatch):
    monkeypatch.setenv("QKV_STRICT", "1")  # a fallback to the reference would raise MissingOp
    _dispatch.reset_warnings()
    inputs = make_inputs((1, 4, 2, 10, 12, 8, 8), np.float32, seed=4)
    golden = tensor_brute_force(*(x.astype(np.float64) for x in inputs), scale=0.5)
    out = qkv.tensor(*inputs, scale=0.5, backend="numba")
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_allclose(out, golden, rtol=2e-5, atol=2e-5 * np.abs(golden).max())


def test_dispatched_torch_in_torch_out():
    torch = pytest.importorskip("torch")
    inputs = make_inputs((1, 2, 1, 5, 6, 4, 3), np.float32, seed=5)
    out = qkv.tensor(*(torch.from_numpy(x) for x in inputs), backend="numba")
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    golden = tensor_brute_force(*(x.astype(np.float64) for x in inputs))
    np.testing.assert_allclose(out.numpy(), golden, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_dispatched_bad_input_is_refused_before_any_backend(backend):
    q, k1, k2, v1, v2 = make_inputs((1, 2, 1, 3, 4, 3, 2), np.float32)
    with pytest.raises(ShapeError, match="k2: expected the shape of k1"):
        qkv.tensor(q, k1, k2[:, :, :3], v1, v2, backend=backend)
    with pytest.raises(ParameterError, match="degree: expected one of"):
        qkv.tensor_approx(q, k1, k2, v1, v2, degree=3, backend=backend)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["fp32", "fp64"])
def test_kernel_exponential_is_accurate_on_nonpositive_arguments(dtype):
    """Within 4 units in the last place of NumPy's exp wherever the result is a normal number;
    0 below (and for -inf), NaN for NaN."""
    from numba import njit

    @njit
    def apply(x, out):
        for i in range(x.shape[0]):
            out[i] = _tensor.exp_nonpositive(x[i])

    tiny = np.finfo(dtype).tiny  # the smallest normal number
    lowest = float(np.log(tiny))
    x = np.concatenate(
        [-np.geomspace(1e-30, -lowest, 20001), np.linspace(lowest - 5, 0, 20001), [0.0]]
    ).astype(dtype)
    out = np.empty_like(x)
    apply(x, out)
    expected = np.exp(x.astype(np.float64))
    normal = expected >= tiny
    ulp = np.finfo(dtype).eps
    assert (np.abs(out[normal] - expected[normal]) <= 4 * ulp * expected[normal]).all()
    assert (out[~normal] <= tiny).all()
    special = np.array([-np.inf, np.nan], dtype=dtype)
    apply(special, out[:2])
    assert out[0] == 0 and np.isnan(out[1])
