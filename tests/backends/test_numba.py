"""The Numba backend against the float64 NumPy reference and its own contract.

Expected values are independent of the code under test: ``qkv.reference.core`` evaluated in
float64, or a stated property (finite output for fully masked rows, untouched inputs, the
documented NaN rules, the float16 fallback). Outputs are poisoned (NaN-filled before the kernel
runs), so an element a kernel forgets to write fails the comparison.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

pytest.importorskip("numba")
pytest.importorskip("scipy")

import qkv
from qkv import FallbackWarning, _dispatch, _outputs
from qkv.backends.numba import _attention
from qkv.reference import core

# (B, H, Hkv, N, M, D, Dv): one token, odd sizes, N > M, N < M, GQA ratios 1, 2 and 4, two
# row and key tiles of the default sizes (ragged last tiles), and a decode step.
SHAPES = {
    "one-token": (1, 1, 1, 1, 1, 4, 4),
    "odd": (2, 3, 3, 7, 5, 9, 11),
    "n>m": (1, 4, 2, 13, 6, 16, 16),
    "n<m": (2, 4, 1, 3, 11, 16, 8),
    "gqa1": (1, 4, 4, 6, 6, 8, 8),
    "gqa2": (1, 4, 2, 6, 6, 8, 8),
    "gqa4": (2, 4, 1, 6, 6, 8, 8),
    "tiles": (1, 2, 1, 150, 300, 16, 8),
    "decode": (1, 2, 1, 1, 600, 8, 8),
}
MASKS = ("none", "bool", "additive")
TOL = {np.float32: 1e-5, np.float64: 1e-12}


@pytest.fixture(autouse=True)
def _strict(monkeypatch):
    """Every call here must run on the Numba kernels: a fallback is an error."""
    monkeypatch.delenv("QKV_BACKEND", raising=False)
    monkeypatch.setenv("QKV_STRICT", "1")
    _dispatch.reset_warnings()
    with _outputs.poisoned():
        yield


def make_inputs(shape, dtype, seed=0):
    """Random ``q (B, H, N, D)``, ``k (B, Hkv, M, D)``, ``v (B, Hkv, M, Dv)`` of ``dtype``."""
    B, H, Hkv, N, M, D, Dv = shape
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, H, N, D)).astype(dtype)
    k = rng.standard_normal((B, Hkv, M, D)).astype(dtype)
    v = rng.standard_normal((B, Hkv, M, Dv)).astype(dtype)
    return q, k, v


def make_mask(kind, shape, seed=1):
    """A mask broadcastable to ``(B, H, N, M)`` whose query row 0 is fully masked (if ``N > 1``).

    ``bool``: True = attend, shape ``(B, 1, N, M)``; ``additive``: float64 ``(N, M)`` of finite
    biases with ``-inf`` entries.
    """
    if kind == "none":
        return None
    B, _, _, N, M, _, _ = shape
    rng = np.random.default_rng(seed)
    allowed = rng.random((B, 1, N, M)) < 0.7
    if N > 1:
        allowed[:, :, 0] = False
    if kind == "bool":
        return allowed
    bias = rng.normal(size=(N, M))
    bias[~allowed[0, 0]] = -np.inf
    return bias


def as64(*arrays):
    return [None if a is None else a.astype(np.float64) for a in arrays]


def assert_close(got, want, rtol, name="out"):
    """Same dtype-independent pattern of NaN and -inf; finite parts within ``rtol`` norm-wise
    and elementwise within ``rtol`` of the largest magnitude."""
    got64 = np.asarray(got, dtype=np.float64)
    np.testing.assert_array_equal(np.isnan(got64), np.isnan(want), err_msg=f"{name}: NaN")
    np.testing.assert_array_equal(np.isinf(got64), np.isinf(want), err_msg=f"{name}: inf")
    finite = np.isfinite(want)
    ref = want[finite]
    diff = got64[finite] - ref
    scale = max(float(np.linalg.norm(ref)), 1e-300)
    assert np.linalg.norm(diff) <= rtol * scale, f"{name}: norm-wise error too large"
    if ref.size:
        assert np.abs(diff).max() <= rtol * np.abs(ref).max() + rtol, f"{name}: elementwise"


@pytest.mark.parametrize("op", ["sdpa", "flash"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_matches_reference(op, dtype, mask_kind, causal, shape):
    q, k, v = make_inputs(shape, dtype)
    mask = make_mask(mask_kind, shape)
    want = core.sdpa(*as64(q, k, v), mask=mask, causal=causal, return_weights=True, return_lse=True)
    got = getattr(qkv, op)(
        q, k, v, mask=mask, causal=causal, return_weights=True, return_lse=True, backend="numba"
    )
    assert [g.dtype for g in got] == [np.dtype(dtype)] * 3
    for name, g, w in zip(("out", "weights", "lse"), got, want, strict=True):
        assert g.shape == w.shape
        assert_close(g, w, TOL[dtype], name)


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("shape", [(1, 4, 2, 37, 29, 8, 8), (2, 2, 1, 20, 45, 8, 4)])
def test_small_tiles(monkeypatch, shape, mask_kind):
    """Many ragged row and key tiles (some spanning two stacked heads), causal tile skipping."""
    monkeypatch.setattr(_attention, "BQ", 8)
    monkeypatch.setattr(_attention, "BK", 16)
    q, k, v = make_inputs(shape, np.float32)
    mask = make_mask(mask_kind, shape)
    for causal in (False, True):
        want = core.sdpa(
            *as64(q, k, v), mask=mask, causal=causal, return_weights=True, return_lse=True
        )
        got = qkv.flash(
            q, k, v, mask=mask, causal=causal, return_weights=True, return_lse=True, backend="numba"
        )
        for name, g, w in zip(("out", "weights", "lse"), got, want, strict=True):
            assert_close(g, w, TOL[np.float32], name)


@pytest.mark.parametrize(
    "returns",
    [{}, {"return_weights": True}, {"return_lse": True}],
    ids=["out", "weights", "lse"],
)
def test_result_layout(returns):
    """The result is ``O`` alone, or the tuple ``(O, P)`` / ``(O, lse)`` as asked."""
    shape = SHAPES["odd"]
    q, k, v = make_inputs(shape, np.float64)
    want = core.sdpa(q, k, v, scale=0.3, **returns)
    got = qkv.flash(q, k, v, scale=0.3, block_q=3, block_k=2, backend="numba", **returns)
    assert type(got) is type(want)
    for g, w in zip(got if returns else [got], want if returns else [want], strict=True):
        assert_close(g, w, TOL[np.float64])


def test_key_splits_merge_by_log_sum_exp(monkeypatch):
    """With more threads than work items the keys are split and the partial softmaxes merged."""
    monkeypatch.setattr(_attention, "num_threads", lambda: 8)
    shape = (1, 1, 1, 2, 1000, 16, 16)
    q, k, v = make_inputs(shape, np.float32)
    mask = make_mask("additive", shape)  # (N, M), row 0 fully masked
    for causal in (False, True):
        want = core.sdpa(*as64(q, k, v), mask=mask, causal=causal, return_lse=True)
        got = qkv.flash(q, k, v, mask=mask, causal=causal, return_lse=True, backend="numba")
        for g, w in zip(got, want, strict=True):
            assert_close(g, w, TOL[np.float32])


def test_large_logits_stay_finite():
    """Scores of order 1e4 must not overflow: the row maximum is subtracted before exp."""
    q, k, v = make_inputs(SHAPES["tiles"], np.float64)
    q *= 300.0
    want = core.sdpa(q, k, v, return_lse=True)
    got = qkv.flash(q, k, v, return_lse=True, backend="numba")
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, TOL[np.float64])


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["fp32", "fp64"])
def test_fully_masked_rows_are_zero_not_nan(dtype):
    shape = (1, 2, 2, 4, 5, 8, 8)
    q, k, v = make_inputs(shape, dtype)
    mask = np.ones((4, 5), bool)
    mask[1] = False
    out, weights, lse = qkv.sdpa(
        q, k, v, mask=mask, return_weights=True, return_lse=True, backend="numba"
    )
    assert not np.isnan(out).any() and not np.isnan(weights).any()
    assert (out[:, :, 1] == 0).all() and (weights[:, :, 1] == 0).all()
    assert np.isneginf(lse[:, :, 1]).all() and np.isfinite(np.delete(lse, 1, axis=2)).all()
    # causal with N > M: the first N - M queries see no key at all
    out, lse = qkv.flash(q, k[:, :, :2], v[:, :, :2], causal=True, return_lse=True, backend="numba")
    assert (out[:, :, :2] == 0).all() and np.isneginf(lse[:, :, :2]).all()
    assert np.isfinite(out).all()


@pytest.mark.parametrize("NM", [(6, 6), (7, 4), (3, 8)], ids=["n=m", "n>m", "n<m"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_nan_propagates_as_documented(where, causal, NM):
    """A NaN reaches exactly the outputs that the reference's docstring names (a NaN value
    reaches every row, also those that causality hides it from, since ``0 * NaN`` is NaN)."""
    N, M = NM
    q, k, v = make_inputs((1, 2, 1, N, M, 4, 4), np.float64)
    {"q": q[0, 1, 2], "k": k[0, 0, M // 2], "v": v[0, 0, M - 1]}[where][1] = np.nan
    mask = np.ones((N, M), bool)
    mask[0] = False  # a fully masked row stays shielded from NaN keys
    want = core.sdpa(q, k, v, mask=mask, causal=causal, return_weights=True, return_lse=True)
    got = qkv.sdpa(
        q, k, v, mask=mask, causal=causal, return_weights=True, return_lse=True, backend="numba"
    )
    for name, g, w in zip(("out", "weights", "lse"), got, want, strict=True):
        assert_close(g, w, TOL[np.float64], name)


def test_inputs_are_not_modified():
    q, k, v = make_inputs(SHAPES["gqa2"], np.float32)
    mask = make_mask("additive", SHAPES["gqa2"])
    before = [a.copy() for a in (q, k, v, mask)]
    qkv.flash(q, k, v, mask=mask, causal=True, return_weights=True, backend="numba")
    x = q.copy()
    qkv.rope(x, offset=3, backend="numba")
    for a, b in zip((q, k, v, mask), before, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(x, q)


def test_non_contiguous_and_read_only_inputs():
    """Strided views and read-only arrays are accepted (and copied only where needed)."""
    q, k, v = make_inputs((1, 4, 2, 12, 10, 8, 8), np.float32)
    qs, ks = q[:, :, ::2], k[:, :, ::2]  # (1, 4, 6, 8), (1, 2, 5, 8)
    vs = np.broadcast_to(v[:, :, ::2, :1], (1, 2, 5, 8))  # zero strides, read-only
    want = core.sdpa(*as64(qs, ks, vs))
    assert_close(qkv.sdpa(qs, ks, vs, backend="numba"), want, TOL[np.float32])


def test_float16_falls_back_to_the_reference(monkeypatch):
    monkeypatch.delenv("QKV_STRICT")
    q, k, v = make_inputs(SHAPES["odd"], np.float16)
    with pytest.warns(FallbackWarning, match="float16"):
        got = qkv.sdpa(q, k, v, backend="numba")
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, core.sdpa(q, k, v))
    with pytest.warns(FallbackWarning, match="float16"):
        qkv.rope(k[..., :8], backend="numba")


def test_torch_tensors_round_trip():
    """The dispatcher hands NumPy to the kernels and gives torch back."""
    torch = pytest.importorskip("torch")
    q, k, v = make_inputs(SHAPES["gqa2"], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        got = qkv.flash(*map(torch.from_numpy, (q, k, v)), causal=True, backend="numba")
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
    assert_close(got.numpy(), core.sdpa(*as64(q, k, v), causal=True), TOL[np.float32])


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("pairing", ["adjacent", "half"])
@pytest.mark.parametrize("where", ["offset", "positions-n", "positions-bn"])
def test_rope_matches_reference(dtype, pairing, where):
    B, H, N, D = 2, 3, 5, 8
    x = np.random.default_rng(0).standard_normal((B, H, N, D)).astype(dtype)
    kwargs = {
        "offset": {"offset": 7},
        "positions-n": {"positions": np.array([0, 4, 1, 9, 100], np.int32)},
        "positions-bn": {"positions": np.arange(B * N, dtype=np.int64).reshape(B, N) * 3},
    }[where]
    want = core.rope(x.astype(np.float64), pairing=pairing, base=500.0, **kwargs)
    got = qkv.rope(x, pairing=pairing, base=500.0, backend="numba", **kwargs)
    assert got.dtype == dtype
    assert_close(got, want, TOL[dtype])
