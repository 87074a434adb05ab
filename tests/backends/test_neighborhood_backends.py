"""Neighborhood attention on every backend against the float64 NumPy reference.

* numba: the fused per-query kernel over 1-D/2-D/3-D grids with dilation, stride, causal axes,
  grouped heads, both dtypes, weights and log-sum-exp;
* torch: the gather path (and its gradients, against finite differences) and the Triton kernel
  under the interpreter (``cuda`` variants are marked ``gpu``);
* cupy: ``neighborhood_fwd.cu`` compiled with ``nvcc -arch=sm_90``, its arguments checked
  against the PTX signature; ``gpu`` tests compare it with the reference where a GPU is lent
  (compiled, not yet run on a GPU);
* the conformance kit's drawn cases (``qkv.testing.ops_local``) on the CPU backends, and the
  scaling benchmark's ``--quick`` mode (it runs; no timing is asserted).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _helpers import needs_nvcc, nvcc, ptx_arg_type, ptx_params, triton_device_or_skip

from qkv import _dispatch, _outputs
from qkv.backends import cupy as cupy_backend
from qkv.backends import numba as numba_backend
from qkv.backends.cupy import _neighborhood as cupy_neighborhood
from qkv.backends.cupy._launch import KERNEL_DIR
from qkv.errors import Unsupported
from qkv.reference.local.neighborhood_attention import check_neighborhood, neighborhood

ROOT = Path(__file__).resolve().parents[2]

# (spatial, B, H, Hkv, D, Dv, kwargs)
CASES = {
    "1d-dilated": ((19,), 2, 2, 1, 8, 8, {"kernel_size": 5, "dilation": 3}),
    "1d-causal-stride": ((17,), 1, 4, 2, 16, 5, {"kernel_size": 4, "stride": 3, "causal": True}),
    "2d-mixed": (
        (9, 11),
        1,
        3,
        3,
        8,
        8,
        {"kernel_size": (3, 4), "dilation": (2, 1), "stride": (2, 3), "causal": (False, True)},
    ),
    "3d": ((4, 5, 6), 1, 2, 1, 4, 3, {"kernel_size": (2, 3, 3), "dilation": (2, 1, 2)}),
}
TOL = {np.float32: 2e-5, np.float64: 1e-12}


def make_inputs(case, dtype, seed=0):
    spatial, B, H, Hkv, D, Dv, _ = case
    rng = np.random.default_rng(seed)
    q = 1.5 * rng.standard_normal((B, H, *spatial, D))
    k = rng.standard_normal((B, Hkv, *spatial, D))
    v = rng.standard_normal((B, Hkv, *spatial, Dv))
    return tuple(x.astype(dtype) for x in (q, k, v))


def golden(q, k, v, **kw):
    return neighborhood(*(np.asarray(x, dtype=np.float64) for x in (q, k, v)), **kw)


def assert_close(got, want, tol, name="out"):
    got = np.asarray(got, dtype=np.float64)
    assert not np.isnan(got).any(), f"{name}: NaN (an unwritten element?)"
    scale = max(float(np.abs(want).max()), 1.0)
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * scale, err_msg=name)


def call_checked(module, q, k, v, **kw):
    """A backend's ``neighborhood`` after the public boundary's checks, with poisoned outputs."""
    check_neighborhood(q, k, v, **kw)
    with _outputs.poisoned():
        return module.neighborhood(q, k, v, **kw)


# --------------------------------------------------------------------------- numba

needs_numba = pytest.mark.skipif(
    not numba_backend.available()[0], reason=f"numba: {numba_backend.available()[1]}"
)


@needs_numba
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_numba_matches_reference(case, dtype):
    q, k, v = make_inputs(case, dtype)
    kw = {**case[-1], "scale": 0.4}
    out, w, lse = call_checked(numba_backend, q, k, v, return_weights=True, return_lse=True, **kw)
    want, want_w, want_lse = golden(q, k, v, return_weights=True, return_lse=True, **kw)
    assert out.dtype == w.dtype == lse.dtype == np.dtype(dtype)
    assert_close(out, want, TOL[dtype])
    assert_close(w, want_w, TOL[dtype], "weights")
    assert_close(lse, want_lse, TOL[dtype], "lse")
    assert_close(call_checked(numba_backend, q, k, v, **kw), want, TOL[dtype])


@needs_numba
def test_numba_long_sequence_and_large_logits():
    """Many work chunks, and logits of 1e3 (the row maximum is subtracted before exp)."""
    rng = np.random.default_rng(1)
    q = 1e3 * rng.standard_normal((1, 2, 700, 8))
    k, v = rng.standard_normal((2, 1, 2, 700, 8))
    kw = {"kernel_size": 13, "dilation": 2}
    assert_close(call_checked(numba_backend, q, k, v, **kw), golden(q, k, v, **kw), 1e-12)


@needs_numba
def test_numba_declines_half_precision():
    q, k, v = make_inputs(CASES["1d-dilated"], np.float16)
    with pytest.raises(Unsupported, match="float32 and float64"):
        numba_backend.neighborhood(q, k, v, kernel_size=3)


# --------------------------------------------------------------------------- torch

torch = pytest.importorskip("torch")

from qkv.backends import torch as torch_backend  # noqa: E402
from qkv.backends.torch import _attention as torch_attention  # noqa: E402


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_torch_gather_path_matches_reference(case, dtype):
    q, k, v = (torch.from_numpy(x) for x in make_inputs(case, dtype))
    kw = case[-1]
    out, w, lse = call_checked(torch_backend, q, k, v, return_weights=True, return_lse=True, **kw)
    want, want_w, want_lse = golden(q, k, v, return_weights=True, return_lse=True, **kw)
    assert out.dtype == w.dtype == q.dtype
    assert_close(out.numpy(), want, TOL[dtype])
    assert_close(w.numpy(), want_w, TOL[dtype], "weights")
    assert_close(lse.numpy(), want_lse, TOL[dtype], "lse")


def test_torch_gradients_match_finite_differences():
    """Autograd through the gathered neighbours, a causal axis, dilation and grouped heads."""
    case = ((4, 4), 1, 2, 1, 2, 2, {})
    q, k, v = (torch.from_numpy(x).requires_grad_() for x in make_inputs(case, np.float64))
    kw = {"kernel_size": (2, 3), "dilation": (2, 1), "causal": (True, False), "stride": (1, 2)}

    def f(q, k, v):
        return torch_backend.neighborhood(q, k, v, **kw)

    assert torch.autograd.gradcheck(f, (q, k, v))


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
TRITON_CASES = {
    "1d-dilated": ((19,), 1, 2, 1, 8, 8, {"kernel_size": 5, "dilation": 3}),
    "1d-causal-stride": ((17,), 1, 2, 1, 16, 5, {"kernel_size": 4, "stride": 3, "causal": True}),
    "2d": ((6, 7), 1, 1, 1, 8, 8, {"kernel_size": (3, 2), "dilation": (2, 1), "stride": (1, 2)}),
    "3d-causal": ((3, 4, 4), 1, 1, 1, 4, 4, {"kernel_size": 2, "causal": (True, False, True)}),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", TRITON_CASES.values(), ids=TRITON_CASES.keys())
def test_triton_kernel_matches_reference(case, device):
    device = triton_device_or_skip(device, "neighborhood")
    kw = case[-1]
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if device.type == "cuda" else [])
    for dtype in dtypes:
        q, k, v = (
            torch.from_numpy(x).to(device=device, dtype=dtype)
            for x in make_inputs(case, np.float32)
        )
        flat = [t.reshape(*t.shape[:2], -1, t.shape[-1]) for t in (q, k, v)]
        assert torch_attention.kernel_applies(
            *flat, mask=None, return_weights=False, kernel_module="neighborhood"
        )
        out, lse = call_checked(torch_backend, q, k, v, return_lse=True, scale=0.3, **kw)
        assert out.dtype == dtype and lse.dtype == torch.float32
        want, want_lse = golden(*(t.cpu() for t in (q, k, v)), return_lse=True, scale=0.3, **kw)
        got = out.cpu().double().numpy()
        if dtype == torch.float32:
            assert_close(got, want, 2e-5)
        else:  # the output is rounded to the dtype: a few of its ulps of |O|
            eps = torch.finfo(dtype).eps
            assert np.abs(got - want).max() <= 8 * eps * max(np.abs(want).max(), 1.0)
        assert_close(lse.cpu().numpy(), want_lse, 2e-5, "lse")


# --------------------------------------------------------------------------- cupy

SOURCE = KERNEL_DIR / "neighborhood_fwd.cu"
CUPY_OK, CUPY_WHY = cupy_backend.available()
requires_gpu = pytest.mark.skipif(not CUPY_OK, reason=f"cupy backend: {CUPY_WHY}")


@needs_nvcc
def test_cupy_arguments_match_the_kernel_signature(tmp_path):
    ptx = tmp_path / "k.ptx"
    nvcc(SOURCE, ptx, "--ptx")
    params = ptx_params(ptx)

    q = np.zeros((2, 4, 6, 7, 64), np.float16)
    k = v = np.zeros((2, 2, 6, 7, 64), np.float16)
    dims = check_neighborhood(q, k, v, kernel_size=(3, 5), dilation=(2, 1), causal=(True, False))
    flat = [x.reshape(*x.shape[:2], 42, 64) for x in (q, k, v)]
    out, lse = np.zeros((2, 4, 42, 64), np.float16), np.zeros((2, 4, 42), np.float32)
    args = cupy_neighborhood.neighborhood_arguments(dims, *flat, out, lse, scale=0.125)
    for dtype in ("float16", "float32"):
        assert [ptx_arg_type(a) for a in args] == params[cupy_neighborhood.kernel_name(dtype)]
    axes = [int(a) for a in args[20:35]]  # the grid and per-axis values, padded to three axes
    assert axes == [1, 6, 7, 1, 3, 5, 1, 2, 1, 1, 1, 1, 0, 1, 0]
    assert cupy_neighborhood.launch_grid(dims) == (2 * 4 * 42 // 4, 1, 1)


def test_cupy_declines_what_the_kernel_cannot_do():
    q, k, v = make_inputs(CASES["1d-dilated"], np.float32)
    with pytest.raises(Unsupported, match="return_weights"):
        cupy_backend.neighborhood(q, k, v, kernel_size=3, return_weights=True)
    with pytest.raises(Unsupported, match="float16 and float32"):
        cupy_neighborhood.kernel_name("float64")
    wide = np.zeros((1, 1, 8, 300))
    with pytest.raises(Unsupported, match="head dims up to 256"):
        cupy_neighborhood.launch_grid(check_neighborhood(wide, wide, wide, kernel_size=3))


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_cupy_matches_reference(case):
    import cupy

    kw = case[-1]
    for dtype, tol in ((np.float32, 2e-5), (np.float16, 4e-3)):
        q, k, v = make_inputs(case, dtype)
        args = [cupy.asarray(x) for x in (q, k, v)]
        out, lse = call_checked(cupy_backend, *args, return_lse=True, **kw)
        want, want_lse = golden(q, k, v, return_lse=True, **kw)
        assert out.dtype == dtype
        assert_close(cupy.asnumpy(out), want, tol)
        assert_close(cupy.asnumpy(lse), want_lse, 2e-5, "lse")


# --------------------------------------------------------------------------- conformance kit


@pytest.mark.parametrize(
    ("backend", "examples", "dtypes"),
    [("numba", 25, ("float32",)), ("torch", 8, ("float32", "float16"))],
)
def test_conformance_kit(backend, examples, dtypes):
    """The kit's drawn cases on the CPU backends (torch under ``TRITON_INTERPRET=1`` runs the
    Triton kernel where it applies, which is slow: fewer examples)."""
    if "neighborhood" not in _dispatch.OPS:
        pytest.skip("the neighborhood op is not registered in qkv yet")
    from qkv.testing import check_backend

    report = check_backend(backend, ops=["neighborhood"], max_examples=examples, dtypes=dtypes)
    assert report.ok, report


# --------------------------------------------------------------------------- benchmark


@needs_numba
def test_scaling_benchmark_quick_mode_runs(tmp_path):
    """``benchmarks/neighborhood.py --quick`` writes its JSON and PNG (sizes, not speed)."""
    out = tmp_path / "neighborhood.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "neighborhood.py"),
            "--quick",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert {row["layout"] for row in data["scaling"]} == {"1d", "2d"}
    assert all(row["ms"] > 0 for row in data["scaling"])
    assert {row["impl"] for row in data["versus_masked"]} >= {
        "numba neighborhood",
        "numba sdpa+mask",
    }
    assert out.with_suffix(".png").stat().st_size > 0
