"""Backends of exact tensor (Kronecker) attention against the float64 NumPy reference.

The expected output is :func:`qkv.reference.forms.tensor_attention.tensor_brute_force` in
float64 (the equation as it reads, independent of the streaming kernels). Outputs are poisoned
(NaN-filled before a kernel runs), so an element a kernel forgets to write fails. Sections:

* numba: the streaming kernel, then the dispatched ops ``qkv.tensor`` and ``qkv.tensor_approx``;
* torch: the streaming torch form (values and gradients) and the Triton kernel under the
  interpreter (``cuda`` variants are marked ``gpu``);
* cupy: ``tensor_fwd.cu`` compiled with ``nvcc -arch=sm_90`` for the planned configurations,
  its arguments checked against the PTX signature; ``gpu`` tests compare it with the reference
  where a GPU is lent (compiled, not yet run on a GPU).
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


# --------------------------------------------------------------------------- torch and Triton

torch = pytest.importorskip("torch")

from qkv.backends import torch as torch_backend  # noqa: E402
from qkv.backends.torch import _attention as torch_attention  # noqa: E402
from qkv.backends.torch import _tensor as torch_tensor  # noqa: E402

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
# Small enough for the Triton interpreter: one token, odd sizes below one tile, grouped heads,
# and (with 16 x 16 tiles) several query tiles and second-key tiles with ragged ends.
TRITON_SHAPES = {
    "one-token": (1, 1, 1, 1, 1, 1, 1),
    "decode": (1, 2, 1, 1, 9, 16, 16),
    "odd": (1, 3, 3, 7, 5, 3, 5),
    "gqa": (1, 4, 2, 5, 11, 8, 6),
    "tiles": (1, 2, 1, 20, 18, 4, 4),
}


def as_tensors(inputs, dtype=None, device="cpu"):
    return tuple(torch.from_numpy(x).to(device=device, dtype=dtype) for x in inputs)


def value_scale(inputs):
    """``max|v1| * max|v2|``: every output lies within it (a convex combination of V1 ∘ V2)."""
    return float(np.abs(inputs[3]).max() * np.abs(inputs[4]).max())


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_torch_streamed_form_matches_the_float64_reference(shape, dtype, monkeypatch):
    """The streaming torch form, with blocks of first keys small enough to leave a ragged end."""
    B, H, _, N, M, D, Dv = shape
    tile = 3 * B * H * N * max(M, D, Dv)  # blocks of min(3, M) first keys
    monkeypatch.setattr(torch_tensor, "TILE_ELEMENTS", tile)
    inputs = make_inputs(shape, dtype, bound=0.8)
    golden = tensor_brute_force(*(x.astype(np.float64) for x in inputs), scale=0.9)
    tensors = as_tensors(inputs)
    out = torch_tensor._streamed(*tensors, 0.9)
    assert out.dtype == tensors[0].dtype and out.shape == golden.shape
    np.testing.assert_allclose(
        out.numpy(), golden, rtol=TOL[dtype], atol=TOL[dtype] * value_scale(inputs)
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["fp32", "fp64"])
def test_torch_at_large_scores(dtype):
    """Scores up to a few hundred: the row maxima keep every exponent <= 0 (tolerance as for
    numba at large scores)."""
    inputs = make_inputs((1, 2, 1, 9, 12, 6, 4), dtype, bound=4.0, seed=1)
    golden = tensor_brute_force(*(x.astype(np.float64) for x in inputs))
    out = torch_tensor._streamed(*as_tensors(inputs), 1.0).numpy()
    assert np.isfinite(out).all()
    tol = {np.float32: 1e-3, np.float64: 1e-10}[dtype]
    np.testing.assert_allclose(out, golden, rtol=tol, atol=tol * np.abs(golden).max())


def test_torch_gradients_match_finite_differences():
    """Autograd through the streaming form, several blocks of first keys (checkpointed)."""
    inputs = make_inputs((1, 2, 1, 3, 4, 2, 2), np.float64, seed=6)
    tensors = tuple(t.requires_grad_() for t in as_tensors(inputs))
    assert not torch_attention.kernel_applies(
        tensors[0], tensors[1], tensors[3], mask=None, return_weights=False
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch_tensor, "TILE_ELEMENTS", 2 * 2 * 3 * 4)  # blocks of 2 first keys
        assert torch.autograd.gradcheck(
            lambda *t: torch_backend.tensor(*t, scale=0.7), tensors, eps=1e-6, atol=1e-7
        )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", TRITON_SHAPES.values(), ids=TRITON_SHAPES.keys())
def test_triton_kernel_matches_the_float64_reference(shape, device):
    """Through the op (default tiles) and with 16 x 16 tiles. fp32 within 2e-5; fp16 (and bf16
    on CUDA) against the reference on the same rounded inputs: ``Q ∘ K1[i]``, ``P`` and the
    output are rounded to the dtype, a few of its ulps of ``max|v1| max|v2|`` at scores of
    order one."""
    device = triton_device_or_skip(device, "tensor")
    from qkv.backends.torch.triton.tensor import tensor_forward

    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if device.type == "cuda" else [])
    inputs = make_inputs(shape, np.float32, bound=0.8)
    golden = tensor_brute_force(*(x.astype(np.float64) for x in inputs), scale=0.9)
    for dtype in dtypes:
        tensors = as_tensors(inputs, dtype, device)
        assert torch_attention.kernel_applies(
            tensors[0], tensors[1], tensors[3], mask=None, return_weights=False,
            kernel_module="tensor",
        )  # fmt: skip
        with _outputs.poisoned():
            outs = [
                torch_backend.tensor(*tensors, scale=0.9),
                tensor_forward(*tensors, scale=0.9, block_q=16, block_k=16),
            ]
        rounded = tensor_brute_force(*(t.cpu().double().numpy() for t in tensors), scale=0.9)
        for out in outs:
            assert out.dtype == dtype and out.device.type == device.type
            got = out.cpu().double().numpy()
            if dtype == torch.float32:
                tol = 2e-5
                np.testing.assert_allclose(got, golden, rtol=tol, atol=tol * value_scale(inputs))
            else:
                eps = torch.finfo(dtype).eps
                assert np.abs(got - rounded).max() <= 8 * eps * value_scale(inputs)


def test_autograd_takes_the_streaming_form():
    """An input that requires grad rules the forward-only kernel out; the result has a graph."""
    q, k1, k2, v1, v2 = as_tensors(make_inputs(TRITON_SHAPES["odd"], np.float32))
    v2.requires_grad_()
    assert not torch_attention.kernel_applies(q, k2, v2, mask=None, return_weights=False)
    out = torch_backend.tensor(q, k1, k2, v1, v2)
    out.sum().backward()
    assert v2.grad is not None and torch.isfinite(v2.grad).all()


def test_dispatched_tensor_runs_natively_on_torch(monkeypatch):
    monkeypatch.setenv("QKV_STRICT", "1")
    _dispatch.reset_warnings()
    inputs = make_inputs((1, 4, 2, 6, 7, 4, 3), np.float64, seed=7)
    golden = tensor_brute_force(*inputs, scale=0.5)
    out = qkv.tensor(*inputs, scale=0.5, backend="torch")  # NumPy in, NumPy out
    assert isinstance(out, np.ndarray) and out.dtype == np.float64
    np.testing.assert_allclose(out, golden, rtol=1e-12, atol=1e-13)
    out = qkv.tensor(*as_tensors(inputs), scale=0.5, backend="torch")
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), golden, rtol=1e-12, atol=1e-13)


# --------------------------------------------------------------------------- cupy

from _helpers import needs_nvcc, nvcc, ptx_arg_type, ptx_params, triton_device_or_skip  # noqa: E402

from qkv import _checks  # noqa: E402
from qkv.backends import cupy as cupy_backend  # noqa: E402
from qkv.backends.cupy import _launch  # noqa: E402

SOURCE = _launch.KERNEL_DIR / "tensor_fwd.cu"
CUPY_OK, CUPY_WHY = cupy_backend.available()
requires_gpu = pytest.mark.skipif(not CUPY_OK, reason=f"cupy backend: {CUPY_WHY}")


@needs_nvcc
def test_cupy_arguments_match_the_kernel_signature(tmp_path):
    ptx = tmp_path / "k.ptx"
    nvcc(SOURCE, ptx, "--ptx", *_launch.tile_config(64, 64).defines())
    params = ptx_params(ptx)

    dims = _checks.AttentionDims(2, 4, 2, 70, 9, 64, 64)
    q, out = np.zeros((2, 4, 70, 64), np.float16), np.zeros((2, 4, 70, 64), np.float16)
    k = np.zeros((2, 2, 9, 64), np.float16)
    for element in ("f16", "f32"):
        plan = _launch.plan_tensor(dims, element, smem_limit=232448)
        assert plan.grid == (2, 4, 2) and plan.smem == plan.config.simt_smem
        args = _launch.tensor_arguments(dims, q, k, k, k, k, out, scale=0.5)
        assert [ptx_arg_type(a) for a in args] == params[plan.kernel]


def test_cupy_plan_declines_what_the_device_cannot_hold():
    dims = _checks.AttentionDims(1, 2, 1, 100, 100, 256, 256)
    with pytest.raises(Unsupported, match="shared memory"):
        _launch.plan_tensor(dims, "f32", smem_limit=48 * 1024)
    with pytest.raises(Unsupported, match="head dims"):
        _launch.plan_tensor(dims._replace(D=300), "f32", smem_limit=232448)
    with pytest.raises(Unsupported, match="grid"):
        _launch.plan_tensor(dims._replace(H=70000), "f32", smem_limit=232448)


def test_cupy_declines_before_any_gpu_work():
    with pytest.raises(Unsupported, match="float64"):
        cupy_backend.tensor(*make_inputs((1, 1, 1, 2, 3, 2, 2), np.float64))
    with pytest.raises(Unsupported, match="256"):
        cupy_backend.tensor(*make_inputs((1, 1, 1, 2, 3, 300, 2), np.float32))


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize(
    "shape", [*SHAPES.values(), (2, 8, 2, 130, 70, 64, 40)], ids=[*SHAPES.keys(), "large"]
)
def test_cupy_matches_the_float64_reference(shape):
    """fp32 within 2e-5; fp16 inputs (widened, fp32 arithmetic, fp16 output) against the
    reference on the same rounded inputs, within a few fp16 ulps of ``max|v1| max|v2|``."""
    import cupy

    for dtype in (np.float32, np.float16):
        inputs = make_inputs(shape, dtype, bound=0.8)
        golden = tensor_brute_force(*(x.astype(np.float64) for x in inputs), scale=0.9)
        with _outputs.poisoned():
            out = cupy_backend.tensor(*(cupy.asarray(x) for x in inputs), scale=0.9)
        assert isinstance(out, cupy.ndarray) and out.dtype == dtype
        got = cupy.asnumpy(out).astype(np.float64)
        bound = value_scale(inputs)
        tol = 2e-5 if dtype == np.float32 else 4 * 2.0**-10
        np.testing.assert_allclose(got, golden, rtol=tol, atol=tol * bound)


@pytest.mark.gpu
@requires_gpu
def test_dispatched_tensor_runs_natively_on_cupy(monkeypatch):
    """NumPy in, NumPy out, through the cupy kernel (strict: no reference fallback)."""
    monkeypatch.setenv("QKV_STRICT", "1")
    _dispatch.reset_warnings()
    inputs = make_inputs((1, 4, 2, 10, 12, 8, 8), np.float32, seed=8)
    golden = tensor_brute_force(*(x.astype(np.float64) for x in inputs), scale=0.5)
    out = qkv.tensor(*inputs, scale=0.5, backend="cupy")
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_allclose(out, golden, rtol=2e-5, atol=2e-5 * np.abs(golden).max())
