"""Sigmoid attention on every backend against the float64 NumPy reference.

* numba: the tiled kernel (softmax step replaced by the logistic) over masks, causal, ALiBi,
  grouped heads, both dtypes, ragged small tiles, key splits (decoding) and weights;
* torch: the explicit path (and its gradients, against finite differences) and the Triton
  kernel under the interpreter (``cuda`` variants are marked ``gpu``);
* cupy: ``sigmoid_fwd.cu`` compiled with ``nvcc -arch=sm_90`` for every planned configuration,
  its arguments checked against the PTX signature; ``gpu`` tests compare it with the reference
  where a GPU is lent (compiled, not yet run on a GPU).
"""

from __future__ import annotations

import numpy as np
import pytest
from _helpers import needs_nvcc, nvcc, ptx_arg_type, ptx_params, triton_device_or_skip

from qkv import _checks, _dispatch, _outputs
from qkv.backends import cupy as cupy_backend
from qkv.backends import numba as numba_backend
from qkv.backends.cupy import _launch
from qkv.errors import Unsupported
from qkv.reference.forms.sigmoid_attention import sigmoid as reference

# (B, H, Hkv, N, M, D, Dv): one token, ragged sizes both ways, grouped heads, Dv != D.
SHAPES = {
    "decode": (1, 2, 1, 1, 9, 16, 16),
    "odd": (2, 3, 3, 7, 19, 8, 5),
    "gqa-n<m": (1, 4, 2, 13, 37, 16, 16),
    "n>m": (1, 2, 1, 21, 6, 16, 24),
}
MASKS = ["none", "bool", "additive"]
TOL = {np.float32: 2e-5, np.float64: 1e-12}


def make_inputs(shape, dtype, seed=0):
    B, H, Hkv, N, M, D, Dv = shape
    rng = np.random.default_rng(seed)
    q = 1.5 * rng.standard_normal((B, H, N, D))
    k = rng.standard_normal((B, Hkv, M, D))
    v = rng.standard_normal((B, Hkv, M, Dv))
    return tuple(x.astype(dtype) for x in (q, k, v))


def make_mask(kind, shape, seed=1):
    """A mask ``(B, 1, N, M)`` (bool) or ``(N, M)`` (additive) with query row 0 fully masked."""
    if kind == "none":
        return None
    B, _, _, N, M, _, _ = shape
    rng = np.random.default_rng(seed)
    allowed = rng.random((B, 1, N, M)) < 0.7
    allowed[:, :, 0] = False
    if kind == "bool":
        return allowed
    return np.where(allowed[0, 0], rng.standard_normal((N, M)), -np.inf)


def golden(q, k, v, **kw):
    return reference(*(np.asarray(x, dtype=np.float64) for x in (q, k, v)), **kw)


def assert_close(got, want, tol, name="out"):
    got = np.asarray(got, dtype=np.float64)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f"{name}: NaN")
    scale = max(float(np.abs(want[np.isfinite(want)]).max(initial=0.0)), 1.0)
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * scale, err_msg=name)


def call_checked(module, q, k, v, **kw):
    """A backend's ``sigmoid`` after the public boundary's checks, with poisoned outputs."""
    _checks.sigmoid_call(q, k, v, **kw)
    with _outputs.poisoned():
        return module.sigmoid(q, k, v, **kw)


# --------------------------------------------------------------------------- numba

needs_numba = pytest.mark.skipif(
    not numba_backend.available()[0], reason=f"numba: {numba_backend.available()[1]}"
)


@needs_numba
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_numba_matches_reference(shape, causal, mask_kind, dtype):
    q, k, v = make_inputs(shape, dtype)
    kw = {"mask": make_mask(mask_kind, shape), "causal": causal, "alibi": causal}
    out, w = call_checked(numba_backend, q, k, v, return_weights=True, **kw)
    want, want_w = golden(q, k, v, return_weights=True, **kw)
    assert out.dtype == w.dtype == np.dtype(dtype)
    assert_close(out, want, TOL[dtype])
    assert_close(w, want_w, TOL[dtype], "weights")
    assert_close(call_checked(numba_backend, q, k, v, **kw), want, TOL[dtype])


@needs_numba
@pytest.mark.parametrize("mask_kind", MASKS)
def test_numba_small_tiles_and_explicit_arguments(monkeypatch, mask_kind):
    """Ragged row and key tiles (some spanning two stacked heads), causal tile skipping."""
    from qkv.backends.numba import _attention

    monkeypatch.setattr(_attention, "BQ", 8)
    monkeypatch.setattr(_attention, "BK", 16)
    shape = (2, 4, 2, 37, 29, 8, 8)
    q, k, v = make_inputs(shape, np.float32)
    for causal in (False, True):
        kw = {"mask": make_mask(mask_kind, shape), "causal": causal, "scale": 0.3, "bias": 1.5}
        for alibi in (False, True):
            got = call_checked(numba_backend, q, k, v, alibi=alibi, **kw)
            assert_close(got, golden(q, k, v, alibi=alibi, **kw), TOL[np.float32])


@needs_numba
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_numba_decoding_splits_the_keys_and_sums_the_parts(monkeypatch, causal):
    """One query against many keys: fewer work items than threads, so the keys are split."""
    from qkv.backends.numba import _attention

    monkeypatch.setattr(_attention, "num_threads", lambda: 4)
    monkeypatch.setattr(_attention, "BK", 32)
    q, k, v = make_inputs((1, 1, 1, 1, 200, 16, 8), np.float64)
    got = call_checked(numba_backend, q, k, v, causal=causal)
    assert_close(got, golden(q, k, v, causal=causal), TOL[np.float64])


@needs_numba
def test_numba_nan_value_behind_the_causal_diagonal_propagates_as_in_the_reference():
    q, k, v = make_inputs((1, 1, 1, 6, 6, 4, 3), np.float32)
    v[0, 0, 4, 1] = np.nan  # hidden from rows 0-3, whose weight on it is 0 (0 * NaN = NaN)
    got = call_checked(numba_backend, q, k, v, causal=True)
    assert_close(got, golden(q, k, v, causal=True), TOL[np.float32])


@needs_numba
def test_numba_declines_half_precision():
    q, k, v = make_inputs(SHAPES["odd"], np.float16)
    with pytest.raises(Unsupported, match="float32 and float64"):
        numba_backend.sigmoid(q, k, v)


# --------------------------------------------------------------------------- torch

torch = pytest.importorskip("torch")

from qkv.backends import torch as torch_backend  # noqa: E402
from qkv.backends.torch import _attention as torch_attention  # noqa: E402


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_torch_explicit_path_matches_reference(shape, causal, mask_kind, dtype):
    q, k, v = (torch.from_numpy(x) for x in make_inputs(shape, dtype))
    mask = make_mask(mask_kind, shape)
    kw = {"causal": causal, "alibi": not causal}
    out, w = torch_backend.sigmoid(
        q, k, v, mask=None if mask is None else torch.from_numpy(mask), return_weights=True, **kw
    )
    want, want_w = golden(q, k, v, mask=mask, return_weights=True, **kw)
    assert out.dtype == q.dtype
    assert_close(out.numpy(), want, TOL[dtype])
    assert_close(w.numpy(), want_w, TOL[dtype], "weights")


def test_torch_gradients_match_finite_differences():
    """Autograd through masks, causal and ALiBi, including a row that sees no key."""
    q, k, v = (torch.from_numpy(x).requires_grad_() for x in make_inputs(SHAPES["odd"], np.float64))
    mask = torch.from_numpy(make_mask("additive", SHAPES["odd"]))

    def f(q, k, v):
        return torch_backend.sigmoid(q, k, v, mask=mask, causal=True, alibi=True, bias=-1.0)

    assert torch.autograd.gradcheck(f, (q, k, v))


# --------------------------------------------------------------------------- Triton

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
TRITON_CASES = {
    "decode": (1, 2, 1, 1, 9, 16, 16, False),
    "odd": (2, 3, 3, 7, 19, 16, 16, False),
    "causal-n<m": (1, 4, 2, 13, 37, 16, 16, True),
    "causal-n>m": (1, 2, 1, 21, 6, 16, 24, True),
}


@pytest.mark.parametrize("alibi", [False, True], ids=["plain", "alibi"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", TRITON_CASES.values(), ids=TRITON_CASES.keys())
def test_triton_kernel_matches_reference(case, device, alibi):
    device = triton_device_or_skip(device, "sigmoid")
    *shape, causal = case
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if device.type == "cuda" else [])
    for dtype in dtypes:
        q, k, v = (
            torch.from_numpy(x).to(device=device, dtype=dtype)
            for x in make_inputs(shape, np.float32)
        )
        assert torch_attention.kernel_applies(
            q, k, v, mask=None, return_weights=False, kernel_module="sigmoid"
        )
        with _outputs.poisoned():
            out = torch_backend.sigmoid(q, k, v, causal=causal, alibi=alibi, scale=0.3)
        assert out.dtype == dtype
        got = out.cpu().double().numpy()
        want = golden(*(t.cpu().double() for t in (q, k, v)), causal=causal, alibi=alibi, scale=0.3)
        if dtype == torch.float32:
            assert_close(got, want, 2e-5)
        else:  # P and the output are rounded to the dtype: a few of its ulps of |O|
            eps = torch.finfo(dtype).eps
            assert np.abs(got - want).max() <= 8 * eps * max(np.abs(want).max(), 1.0)


# --------------------------------------------------------------------------- cupy

SOURCE = _launch.KERNEL_DIR / "sigmoid_fwd.cu"
CUPY_OK, CUPY_WHY = cupy_backend.available()
requires_gpu = pytest.mark.skipif(not CUPY_OK, reason=f"cupy backend: {CUPY_WHY}")


@needs_nvcc
def test_cupy_arguments_match_the_kernel_signature(tmp_path):
    ptx = tmp_path / "k.ptx"
    nvcc(SOURCE, ptx, "--ptx", *_launch.tile_config(64, 64).defines())
    params = ptx_params(ptx)

    dims = _checks.AttentionDims(2, 4, 2, 5, 70, 64, 64)
    q, out = np.zeros((2, 4, 5, 64), np.float16), np.zeros((2, 4, 5, 64), np.float16)
    k = v = np.zeros((2, 2, 70, 64), np.float16)
    mask = np.zeros((1, 1, 5, 70), np.float32)
    slopes = np.zeros(4, np.float32)
    for element in ("f16", "f32"):
        plan = _launch.plan_sigmoid(dims, element, smem_limit=232448)
        assert plan.grid == (1, 4, 2)
        for m, s in ((mask, slopes), (None, None)):
            args = _launch.sigmoid_arguments(
                dims, q, k, v, m, s, out, scale=0.125, bias=-4.2, causal=True
            )
            assert [ptx_arg_type(a) for a in args] == params[plan.kernel]


def test_cupy_plan_declines_what_the_device_cannot_hold():
    dims = _checks.AttentionDims(1, 2, 1, 100, 100, 256, 256)
    with pytest.raises(Unsupported, match="shared memory"):
        _launch.plan_sigmoid(dims, "f32", smem_limit=48 * 1024)
    with pytest.raises(Unsupported, match="head dims"):
        _launch.plan_sigmoid(dims._replace(D=300), "f32", smem_limit=232448)


def test_cupy_declines_weights_before_any_gpu_work():
    q, k, v = make_inputs(SHAPES["odd"], np.float32)
    with pytest.raises(Unsupported, match="return_weights"):
        cupy_backend.sigmoid(q, k, v, return_weights=True)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", [*SHAPES.values(), (1, 8, 2, 300, 333, 128, 64)])
def test_cupy_matches_reference(shape, causal, mask_kind):
    import cupy

    for dtype, tol in ((np.float32, 2e-5), (np.float16, 2e-3)):
        q, k, v = make_inputs(shape, dtype)
        mask = make_mask(mask_kind, shape)
        kw = {"mask": mask, "causal": causal, "alibi": causal}
        args = [cupy.asarray(x) for x in (q, k, v)]
        gmask = None if mask is None else cupy.asarray(mask)
        got = cupy.asnumpy(call_checked(cupy_backend, *args, **{**kw, "mask": gmask}))
        assert got.dtype == dtype
        assert_close(got, golden(q, k, v, **kw), tol)


# --------------------------------------------------------------------------- conformance kit


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_conformance_kit(backend):
    """The kit's hypothesis cases (``qkv.testing.ops_sigmoid``) on the CPU backends."""
    if "sigmoid" not in _dispatch.OPS:
        pytest.skip("the sigmoid op is not registered in qkv yet")
    from qkv.testing import check_backend

    report = check_backend(backend, ops=["sigmoid"], max_examples=25)
    assert report.ok, report
