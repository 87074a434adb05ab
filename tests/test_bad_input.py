"""Bad input at the public boundary: a clear error naming the argument, on every backend.

The checks run in the dispatcher before any backend, so each case is tried through every
built-in backend that can run here; the caller's arrays must come out unchanged.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import qkv
from qkv import _dispatch

BACKENDS = [
    name
    for name in ("reference", "numba", "torch", "cupy")
    if _dispatch.availability(_dispatch.load(name))[0]
]


def good(dtype=np.float32):
    rng = np.random.default_rng(0)
    return (
        rng.standard_normal((1, 4, 5, 8)).astype(dtype),
        rng.standard_normal((1, 2, 6, 8)).astype(dtype),
        rng.standard_normal((1, 2, 6, 8)).astype(dtype),
    )


CASES = {
    "rank 3 query": (
        lambda q, k, v: dict(q=q[0], k=k, v=v),
        qkv.ShapeError,
        r"q: expected rank 4 \(B, H, N, D\), got shape \(4, 5, 8\)",
    ),
    "q/k head dims differ": (
        lambda q, k, v: dict(q=q, k=k[..., :7], v=v),
        qkv.ShapeError,
        "k: expected head dim D=8 as q, got 7",
    ),
    "H not a multiple of Hkv": (
        lambda q, k, v: dict(q=q[:, :3], k=k, v=v),
        qkv.ShapeError,
        "H=3, Hkv=2",
    ),
    "k and v token counts differ": (
        lambda q, k, v: dict(q=q, k=k, v=v[:, :, :4]),
        qkv.ShapeError,
        "v: expected M=6 tokens as k, got 4",
    ),
    "mask does not broadcast": (
        lambda q, k, v: dict(q=q, k=k, v=v, mask=np.ones((5, 5), bool)),
        qkv.ShapeError,
        r"mask: expected a shape broadcastable to \(B, H, N, M\)=\(1, 4, 5, 6\), got \(5, 5\)",
    ),
    "integer dtype": (
        lambda q, k, v: dict(q=q.astype(np.int32), k=k, v=v),
        qkv.DTypeError,
        "q: expected a floating dtype",
    ),
    "mixed dtypes": (
        lambda q, k, v: dict(q=q, k=k.astype(np.float64), v=v),
        qkv.DTypeError,
        "q, k, v: expected one dtype, got q float32, k float64, v float32",
    ),
    "empty sequence": (
        lambda q, k, v: dict(q=q[:, :, :0], k=k, v=v),
        qkv.ShapeError,
        "q: expected no empty axis",
    ),
    "integer mask": (
        lambda q, k, v: dict(q=q, k=k, v=v, mask=np.ones((5, 6), np.int64)),
        qkv.DTypeError,
        "mask: expected bool",
    ),
    "negative scale": (
        lambda q, k, v: dict(q=q, k=k, v=v, scale=-1.0),
        qkv.ParameterError,
        "scale: expected a finite number > 0",
    ),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("op", ["sdpa", "flash"])
def test_bad_input_gives_a_clear_error(op, case, backend):
    build, error, message = CASES[case]
    q, k, v = good()
    before = [a.copy() for a in (q, k, v)]
    kwargs = build(q, k, v)
    with pytest.raises(error, match=message):
        getattr(qkv, op)(
            kwargs.pop("q"), kwargs.pop("k"), kwargs.pop("v"), backend=backend, **kwargs
        )
    for a, b in zip((q, k, v), before, strict=True):
        np.testing.assert_array_equal(a, b)


def test_errors_are_value_errors_for_callers_that_catch_those():
    for error in (qkv.ShapeError, qkv.DTypeError, qkv.ParameterError, qkv.UnknownBackend):
        assert issubclass(error, ValueError)
    assert issubclass(qkv.BackendUnavailable, RuntimeError)


def test_bad_block_sizes_and_rope_arguments():
    q, k, v = good()
    with pytest.raises(qkv.ParameterError, match="block_q: expected an integer >= 1, got 0"):
        qkv.flash(q, k, v, block_q=0)
    with pytest.raises(qkv.ShapeError, match="x: expected an even head dim"):
        qkv.rope(q[..., :7])
    with pytest.raises(qkv.ShapeError, match=r"positions: expected integers of shape \(5,\)"):
        qkv.rope(q, positions=np.arange(4))
    with pytest.raises(qkv.ParameterError, match="pairing"):
        qkv.rope(q, pairing="interleaved")
    with pytest.raises(qkv.ParameterError, match="n_heads"):
        qkv.alibi(0, 4, 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_input_reaches_only_the_documented_rows(backend):
    q, k, v = good()
    q[0, 2, 1, 0] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", qkv.FallbackWarning)
        out = qkv.flash(q, k, v, backend=backend)
    nan_rows = np.isnan(out).any(-1)
    assert nan_rows[0, 2, 1] and nan_rows.sum() == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(6,), (1, 6), (5, 1), (4, 1, 1)])
def test_every_broadcastable_mask_shape_is_accepted(backend, shape):
    q, k, v = good()
    mask = np.random.default_rng(1).random(shape) > 0.3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", qkv.FallbackWarning)
        out = qkv.sdpa(q, k, v, mask=mask, backend=backend)
    want = qkv.sdpa(*(a.astype(np.float64) for a in (q, k, v)), mask=mask)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
