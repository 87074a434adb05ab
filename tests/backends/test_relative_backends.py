"""RCMHA's ``relative_attention`` (relative scores + fused depth-wise causal convolutions) on
every backend against the float64 NumPy reference.

* numba: the fused tiled kernel, both dtypes, with and without kernels, memory, grouped heads,
  small tiles (several key tiles, bands that start past distance 0);
* torch: the explicit path (and its gradients, against finite differences) and the Triton
  kernel under the interpreter, fp32 through the op and fp16 by a direct launch (``cuda``
  variants are marked ``gpu``);
* cupy: ``relative_fwd.cu`` compiled with ``nvcc -arch=sm_90``, its arguments checked against
  the PTX signature; a ``gpu`` test compares it with the reference where a GPU is lent
  (compiled, not yet run on a GPU);
* the conformance kit (``qkv.testing.ops_heads``) on numba and torch.
"""

from __future__ import annotations

import numpy as np
import pytest
from _helpers import needs_nvcc, nvcc, ptx_arg_type, ptx_params, triton_device_or_skip

from qkv import _outputs
from qkv.backends import cupy as cupy_backend
from qkv.backends import numba as numba_backend
from qkv.backends.cupy import _launch
from qkv.errors import Unsupported
from qkv.reference.heads.relative_conv import check_relative_attention
from qkv.reference.heads.relative_conv import relative_attention as reference

# (B, H, Hkv, N, m, D, Dv, K): one token, no memory, ragged sizes, grouped heads, Dv != D.
SHAPES = {
    "decode": (1, 2, 1, 1, 9, 16, 16, 3),
    "one-token": (1, 1, 1, 1, 0, 4, 4, 3),
    "odd": (2, 3, 3, 7, 0, 8, 5, 2),
    "gqa-memory": (1, 4, 2, 13, 24, 16, 16, 3),
    "long-taps": (1, 2, 1, 21, 5, 8, 12, 5),
}
TOL = {np.float32: 2e-5, np.float64: 1e-12}


def make_inputs(shape, dtype, *, convs=True, seed=0):
    """``(q, k, v, r, u, b)`` and the kernels (or ``{}``), tables two rows longer than needed."""
    B, H, Hkv, N, m, D, Dv, K = shape
    M = N + m
    rng = np.random.default_rng(seed)
    args = (
        rng.standard_normal((B, H, N, D)),
        rng.standard_normal((B, Hkv, M, D)),
        rng.standard_normal((B, Hkv, M, Dv)),
        0.5 * rng.standard_normal((H, M + 2, D)),
        rng.standard_normal((H, D)),
        rng.standard_normal((H, M + 2)),
    )
    kw = {}
    if convs:
        kw = {
            name: rng.uniform(-1, 1, (c, K))
            for name, c in (("conv_q", D), ("conv_k", D), ("conv_v", Dv))
        }
    return tuple(a.astype(dtype) for a in args), {n: w.astype(dtype) for n, w in kw.items()}


def golden(args, kw):
    def wide(x):
        return np.asarray(x, dtype=np.float64)

    return reference(*(wide(a) for a in args), **{n: wide(w) for n, w in kw.items()})


def assert_close(got, want, tol):
    got = np.asarray(got, dtype=np.float64)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(np.abs(want).max(), 1.0))


def call_checked(module, args, kw):
    check_relative_attention(*args, **kw)
    with _outputs.poisoned():
        return module.relative_attention(*args, **kw)


# --------------------------------------------------------------------------- numba

needs_numba = pytest.mark.skipif(
    not numba_backend.available()[0], reason=f"numba: {numba_backend.available()[1]}"
)


@needs_numba
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("convs", [True, False], ids=["conv", "plain"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_numba_matches_reference(shape, convs, dtype):
    args, kw = make_inputs(shape, dtype, convs=convs)
    got = call_checked(numba_backend, args, kw)
    assert got.dtype == np.dtype(dtype)
    assert_close(got, golden(args, kw), TOL[dtype])


@needs_numba
def test_numba_small_tiles(monkeypatch):
    """Several query and key tiles: bands that start past distance 0, rows that see none of a
    tile's keys, ragged last tiles."""
    from qkv.backends.numba import _relative

    monkeypatch.setattr(_relative, "BQ", 5)
    monkeypatch.setattr(_relative, "BK", 7)
    args, kw = make_inputs((2, 4, 2, 23, 11, 8, 6, 3), np.float64)
    assert_close(call_checked(numba_backend, args, kw), golden(args, kw), TOL[np.float64])
    assert_close(call_checked(numba_backend, args, {}), golden(args, {}), TOL[np.float64])


@needs_numba
def test_numba_declines_half_precision():
    args, kw = make_inputs(SHAPES["odd"], np.float16)
    with pytest.raises(Unsupported, match="float32 and float64"):
        numba_backend.relative_attention(*args, **kw)


# --------------------------------------------------------------------------- torch

torch = pytest.importorskip("torch")

from qkv.backends import torch as torch_backend  # noqa: E402
from qkv.backends.torch import _relative as torch_relative  # noqa: E402


def tensors(args, kw, **to):
    return (
        tuple(torch.from_numpy(a).to(**to) for a in args),
        {n: torch.from_numpy(w).to(**to) for n, w in kw.items()},
    )


@pytest.mark.parametrize("convs", [True, False], ids=["conv", "plain"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_torch_explicit_path_matches_reference(shape, convs):
    args, kw = make_inputs(shape, np.float64, convs=convs)
    targs, tkw = tensors(args, kw)
    assert not torch_relative.kernel_applies(*targs[:3])  # float64: the explicit path
    got = torch_backend.relative_attention(*targs, **tkw)
    assert got.dtype == torch.float64
    assert_close(got.numpy(), golden(args, kw), TOL[np.float64])


def test_torch_gradients_match_finite_differences():
    """Autograd through the convolutions, the gathered position term and the softmax."""
    args, kw = make_inputs((1, 2, 1, 4, 2, 3, 2, 3), np.float64)
    targs, tkw = tensors(args, kw)
    inputs = [t.requires_grad_() for t in (*targs, *tkw.values())]

    def f(q, k, v, r, u, b, wq, wk, wv):
        return torch_backend.relative_attention(q, k, v, r, u, b, conv_q=wq, conv_k=wk, conv_v=wv)

    assert torch.autograd.gradcheck(f, inputs)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_triton_kernel_matches_reference(shape, device):
    device = triton_device_or_skip(device, "relative")
    args, kw = make_inputs(shape, np.float32)
    targs, tkw = tensors(args, kw, device=device)
    assert torch_relative.kernel_applies(*targs, *tkw.values())
    with _outputs.poisoned():
        got = torch_backend.relative_attention(*targs, **tkw, scale=0.3)
    assert got.dtype == torch.float32
    wide = {n: w.astype(np.float64) for n, w in kw.items()}
    want = reference(*(a.astype(np.float64) for a in args), **wide, scale=0.3)
    assert_close(got.cpu().numpy(), want, 2e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_triton_half_precision_and_small_tiles(device):
    """fp16 (and bf16 on a GPU) by a direct launch, with 16 x 16 tiles so that the band and
    the skewed read cross several key tiles."""
    device = triton_device_or_skip(device, "relative")
    from qkv.backends.torch.triton.relative import relative_forward

    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if device.type == "cuda" else [])
    args, kw = make_inputs((1, 2, 1, 37, 20, 16, 16, 3), np.float32)
    for dtype in dtypes:
        targs, tkw = tensors(args, kw, device=device, dtype=dtype)
        with _outputs.poisoned():
            got = relative_forward(*targs, *tkw.values(), scale=0.25, block_q=16, block_k=16)
        want = reference(
            *(t.cpu().double().numpy() for t in targs),
            **{n: w.cpu().double().numpy() for n, w in tkw.items()},
            scale=0.25,
        )
        eps = torch.finfo(dtype).eps
        tol = 2e-5 if dtype == torch.float32 else 8 * eps
        assert got.dtype == dtype
        assert np.abs(got.cpu().double().numpy() - want).max() <= tol * max(np.abs(want).max(), 1)


# --------------------------------------------------------------------------- cupy

SOURCE = _launch.KERNEL_DIR / "relative_fwd.cu"
CUPY_OK, CUPY_WHY = cupy_backend.available()


@needs_nvcc
def test_cupy_arguments_match_the_kernel_signature(tmp_path):
    ptx = tmp_path / "k.ptx"
    nvcc(SOURCE, ptx, "--ptx", f"-I{_launch.KERNEL_DIR}")
    params = ptx_params(ptx)

    for dtype, element in ((np.float16, "f16"), (np.float32, "f32")):
        args, kw = make_inputs(SHAPES["gqa-memory"], dtype)
        out = np.zeros((1, 4, 13, 16), dtype)
        packed = cupy_backend.relative_arguments(*args, *kw.values(), out, scale=0.25)
        assert [ptx_arg_type(a) for a in packed] == params[f"qkv_relative_fwd_{element}"]


def test_cupy_declines_float64_before_any_gpu_work():
    args, kw = make_inputs(SHAPES["odd"], np.float64)
    with pytest.raises(Unsupported, match="float16, float32"):
        cupy_backend.relative_attention(*args, **kw)


@pytest.mark.gpu
@pytest.mark.skipif(not CUPY_OK, reason=f"cupy backend: {CUPY_WHY}")
@pytest.mark.parametrize("convs", [True, False], ids=["conv", "plain"])
@pytest.mark.parametrize("shape", [*SHAPES.values(), (1, 8, 2, 300, 200, 128, 64, 3)])
def test_cupy_matches_reference(shape, convs):
    import cupy

    for dtype, tol in ((np.float32, 2e-5), (np.float16, 2e-3)):
        args, kw = make_inputs(shape, dtype, convs=convs)
        gargs = [cupy.asarray(a) for a in args]
        gkw = {n: cupy.asarray(w) for n, w in kw.items()}
        got = cupy.asnumpy(call_checked(cupy_backend, gargs, gkw))
        assert got.dtype == dtype
        assert_close(got, golden(args, kw), tol)


# --------------------------------------------------------------------------- conformance kit


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_conformance_kit(backend):
    """The kit's hypothesis cases (``qkv.testing.ops_heads``) on the CPU backends."""
    from qkv.testing import check_backend

    report = check_backend(backend, ops=["relative_attention"], max_examples=25)
    assert report.ok, report.text()
