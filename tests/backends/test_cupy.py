"""The CuPy backend: its CUDA sources, its host-side planning, and (on a GPU) its results.

Three layers, so that a machine without a GPU still checks what it can:

* the ``.cu`` files compile with ``nvcc -arch=sm_90`` (and with NVRTC where its library is
  found), for the configurations the host planner asks for, and each kernel's parameter list in
  the PTX matches the arguments the launcher packs (skipped where nvcc is absent);
* the host logic (tile sizes, shared memory, split-KV plan, mask conversion, declined inputs,
  ``BackendUnavailable`` without a GPU) runs everywhere;
* ``@pytest.mark.gpu`` tests compare the kernels with the float64 reference; they run under
  ``make gpu-check`` (``-m gpu``) and skip, with the backend's reason, where it cannot run.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from _helpers import NVCC, needs_nvcc, nvcc, ptx_arg_type, ptx_params

import qkv
from qkv import _checks, _dispatch, _outputs
from qkv.backends import cupy as cupy_backend
from qkv.backends.cupy import _launch
from qkv.errors import Unsupported
from qkv.reference import core as reference

KERNELS = sorted(_launch.KERNEL_DIR.glob("*.cu"))
AVAILABLE, WHY = cupy_backend.available()
requires_gpu = pytest.mark.skipif(not AVAILABLE, reason=f"cupy backend: {WHY}")

# (D, Dv) pairs whose configurations the compile tests build: the default, odd and mixed sizes,
# and the widest heads.
HEAD_DIMS = [(64, 64), (40, 72), (128, 128), (256, 256), (64, 256)]


def _dims(B=1, H=2, Hkv=1, N=64, M=64, D=64, Dv=64) -> _checks.AttentionDims:
    return _checks.AttentionDims(B, H, Hkv, N, M, D, Dv)


# --------------------------------------------------------------------------- compiling


def _config_options(source: Path, D: int, Dv: int) -> tuple[str, ...]:
    return _launch.tile_config(D, Dv).defines() if source.name == "flash_fwd.cu" else ()


def test_every_kernel_source_is_listed() -> None:
    assert {p.name for p in KERNELS} == {
        "flash_fwd.cu",
        "kv.cu",
        "neighborhood_fwd.cu",
        "relative_fwd.cu",
        "rope.cu",
        "sigmoid_fwd.cu",
        "sparse_fwd.cu",
        "tensor_fwd.cu",
    }
    assert {p.name for p in _launch.KERNEL_DIR.glob("*.cuh")} == {"common.cuh"}


#: The kernels whose tiles ``_launch.plan_simt`` plans (one shared-memory layout rule).
SIMT_KERNELS = ("sigmoid_fwd.cu", "tensor_fwd.cu")


@needs_nvcc
@pytest.mark.parametrize("name", SIMT_KERNELS)
@pytest.mark.parametrize("D, Dv", [(64, 64), (3, 5), (40, 72), (128, 128), (256, 256), (8, 256)])
def test_simt_kernel_configurations_compile(name: str, D: int, Dv: int, tmp_path: Path) -> None:
    """Every planned tile configuration compiles (ptxas included, so malformed inline PTX fails
    here), and the kernel's static_assert accepts the host's shared-memory size."""
    source = _launch.KERNEL_DIR / name
    nvcc(source, tmp_path / "k.cubin", "-cubin", *_launch.tile_config(D, Dv).defines())


@needs_nvcc
@pytest.mark.parametrize("name", SIMT_KERNELS)
def test_simt_kernel_rejects_a_wrong_shared_memory_size(name: str, tmp_path: Path) -> None:
    options = [d for d in _launch.tile_config(64, 64).defines() if "SIMT_SMEM" not in d]
    result = nvcc(
        _launch.KERNEL_DIR / name, tmp_path / "k.ptx", "--ptx", *options,
        "-DQKV_SIMT_SMEM=1024", check=False,
    )  # fmt: skip
    assert result.returncode != 0 and "shared memory" in result.stderr


@pytest.mark.parametrize("source", KERNELS, ids=lambda p: p.name)
def test_launcher_inlines_the_shared_header(source: Path) -> None:
    """Every kernel includes common.cuh, and the text NVRTC gets has no #include left in it."""
    assert '#include "common.cuh"' in source.read_text()
    code = _launch.kernel_source(source.name)
    assert not re.search(r"^\s*#\s*include", code, re.MULTILINE)
    assert "namespace qkv_common {" in code


@needs_nvcc
@pytest.mark.parametrize("source", KERNELS, ids=lambda p: p.name)
def test_kernel_compiles_for_sm90(source: Path, tmp_path: Path) -> None:
    """ptxas runs too (-cubin), so malformed inline PTX fails here, not on the GPU."""
    nvcc(source, tmp_path / "k.cubin", "-cubin", *_config_options(source, 64, 64))


@needs_nvcc
@pytest.mark.parametrize("D, Dv", HEAD_DIMS[1:])
def test_flash_configurations_compile(D: int, Dv: int, tmp_path: Path) -> None:
    """Every planned configuration compiles, and its static_asserts accept the host's
    shared-memory sizes (a disagreement is a compile error)."""
    source = _launch.KERNEL_DIR / "flash_fwd.cu"
    nvcc(source, tmp_path / "k.cubin", "-cubin", *_config_options(source, D, Dv))


@needs_nvcc
def test_wrong_shared_memory_size_fails_to_compile(tmp_path: Path) -> None:
    source = _launch.KERNEL_DIR / "flash_fwd.cu"
    options = [*_launch.tile_config(64, 64).defines()[:-1], "-DQKV_SIMT_SMEM=1024"]
    result = subprocess.run(
        [NVCC, "-arch=sm_90", "--ptx", *options, "-o", str(tmp_path / "k.ptx"), str(source)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0
    assert "shared memory" in result.stderr


def _ptx_params(source: Path, tmp_path: Path) -> dict[str, list[str]]:
    """Each entry point's parameter types (``u64``, ``u32``, ``f32``...) from nvcc's PTX."""
    ptx = tmp_path / "k.ptx"
    nvcc(source, ptx, "--ptx", *_config_options(source, 64, 64))
    return ptx_params(ptx)


@needs_nvcc
def test_flash_arguments_match_kernel_signatures(tmp_path: Path) -> None:
    params = _ptx_params(_launch.KERNEL_DIR / "flash_fwd.cu", tmp_path)
    dims = _dims(B=2, H=4, Hkv=2, N=5, M=700, D=64, Dv=64)
    q = np.zeros((2, 4, 5, 64), np.float16)
    k = v = np.zeros((2, 2, 700, 64), np.float16)
    bias = np.zeros((1, 1, 5, 700), np.float32)
    out, lse = np.zeros((2, 4, 5, 64), np.float16), np.zeros((2, 4, 5), np.float32)
    for element in ("f16", "f32"):
        plan = _launch.plan_flash(dims, element, sm_count=132, smem_limit=232448)
        assert plan.splits > 1
        parts = np.zeros((plan.splits, 2, 4, 5, 64), np.float32), np.zeros((plan.splits, 2, 4, 5))
        for mask, partials in ((bias, parts), (None, (None, None))):
            args = _launch.flash_arguments(
                plan, dims, q, k, v, mask, out, lse, *partials, scale=0.125, causal=True
            )
            assert [ptx_arg_type(a) for a in args] == params[plan.kernel]
        combined = _launch.combine_arguments(plan, *parts, out, lse)
        assert [ptx_arg_type(a) for a in combined] == params[plan.combine]


@needs_nvcc
def test_rope_arguments_match_kernel_signatures(tmp_path: Path) -> None:
    params = _ptx_params(_launch.KERNEL_DIR / "rope.cu", tmp_path)
    x = np.zeros((2, 3, 5, 8), np.float32)
    theta = np.zeros(4)
    for positions in (None, np.arange(5), np.zeros((2, 5), np.int64)):
        args = _launch.rope_arguments(x, x, positions, theta, 3, "half")
        for element in ("f16", "f32", "f64"):
            assert [ptx_arg_type(a) for a in args] == params[f"qkv_rope_{element}"]


def _load_nvrtc() -> ctypes.CDLL | None:
    """libnvrtc from the system or from an ``nvidia-cuda-nvrtc`` wheel on ``sys.path``."""
    candidates = [ctypes.util.find_library("nvrtc")]
    for entry in map(Path, sys.path):
        candidates += sorted(map(str, entry.glob("nvidia/*/lib/libnvrtc.so*")))
    for candidate in filter(None, candidates):
        if "builtins" in candidate or ".alt." in candidate:
            continue
        for builtins in sorted(Path(candidate).parent.glob("libnvrtc-builtins.so*")):
            if ".alt." not in builtins.name:  # load it first: libnvrtc dlopens it by name
                ctypes.CDLL(str(builtins), mode=ctypes.RTLD_GLOBAL)
        try:
            return ctypes.CDLL(candidate)
        except OSError:
            continue
    return None


@pytest.fixture(scope="module")
def nvrtc() -> ctypes.CDLL:
    if AVAILABLE:
        pytest.skip("cupy runs here: the GPU tests compile the kernels through CuPy's own NVRTC")
    library = _load_nvrtc()
    if library is None:
        pytest.skip("libnvrtc not found (pip install nvidia-cuda-nvrtc)")
    return library


@pytest.mark.parametrize("source", KERNELS, ids=lambda p: p.name)
def test_kernel_compiles_with_nvrtc(source: Path, nvrtc: ctypes.CDLL) -> None:
    """The sources compile as CuPy compiles them: NVRTC, the launcher's text (common.cuh inlined)
    and options, no include paths."""
    program = ctypes.c_void_p()
    code = _launch.kernel_source(source.name).encode()
    created = nvrtc.nvrtcCreateProgram(
        ctypes.byref(program), code, source.name.encode(), 0, None, None
    )
    assert created == 0
    options = [
        b"-arch=compute_90",
        b"--std=c++17",
        *(o.encode() for o in _config_options(source, 64, 64)),
    ]
    status = nvrtc.nvrtcCompileProgram(
        program, len(options), (ctypes.c_char_p * len(options))(*options)
    )
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(program, log)
    nvrtc.nvrtcDestroyProgram(ctypes.byref(program))
    assert status == 0, log.value.decode()


# --------------------------------------------------------------------------- host logic


def test_tile_config_pads_head_dims_to_16() -> None:
    for D in (1, 15, 16, 17, 40, 64, 100, 128, 129, 255, 256):
        config = _launch.tile_config(D, D)
        assert config.head_dim % 16 == 0 and D <= config.head_dim < D + 16
        assert config.mma_block_k == (32 if config.head_dim > 128 else 64)
    with pytest.raises(Unsupported, match="256"):
        _launch.tile_config(257, 64)
    with pytest.raises(Unsupported, match="256"):
        _launch.tile_config(64, 300)


def test_shared_memory_fits_every_sm80_and_newer_gpu() -> None:
    """163 KB: the smallest opt-in shared memory per block among sm_80 and sm_90 data-centre GPUs
    (A100; H100 and H200 allow 227 KB)."""
    for D in range(8, 257, 8):
        for Dv in (8, D, 256):
            config = _launch.tile_config(D, Dv)
            assert max(config.mma_smem, config.simt_smem) <= 163 * 1024


def test_plan_covers_every_query_and_key_once() -> None:
    for N, M in ((1, 1), (1, 65536), (37, 53), (4096, 4096), (130, 70), (1, 4099)):
        for element in ("f16", "f32"):
            plan = _launch.plan_flash(
                _dims(B=1, H=2, N=N, M=M), element, sm_count=132, smem_limit=232448
            )
            assert plan.n_qtiles * plan.block_q >= N > (plan.n_qtiles - 1) * plan.block_q
            assert plan.keys_per_split % plan.block_k == 0
            # splits partition [0, M): none is empty, together they reach M
            assert (plan.splits - 1) * plan.keys_per_split < M <= plan.splits * plan.keys_per_split
            assert plan.grid == (plan.n_qtiles * plan.splits, 2, 1)


def test_plan_splits_keys_only_for_short_query_sets() -> None:
    decode = _launch.plan_flash(
        _dims(B=4, H=16, N=1, M=65536), "f16", sm_count=132, smem_limit=232448
    )
    assert decode.splits > 1
    assert decode.grid[0] * 4 * 16 >= 132  # at least one block per multiprocessor
    prefill = _launch.plan_flash(
        _dims(B=4, H=16, N=4096, M=4096), "f16", sm_count=132, smem_limit=232448
    )
    assert prefill.splits == 1 and prefill.keys_per_split >= 4096
    few_keys = _launch.plan_flash(_dims(N=1, M=100), "f32", sm_count=132, smem_limit=232448)
    assert few_keys.splits == 1


def test_plan_declines_what_the_device_cannot_hold() -> None:
    with pytest.raises(Unsupported, match="shared memory"):
        _launch.plan_flash(_dims(D=256, Dv=256), "f32", sm_count=132, smem_limit=48 * 1024)
    with pytest.raises(Unsupported, match="grid"):
        _launch.plan_flash(_dims(H=70000, Hkv=1), "f16", sm_count=132, smem_limit=232448)


def test_plan_uses_16_byte_copies_for_fp16_only() -> None:
    dims = _dims()
    assert _launch.plan_flash(dims, "f16", sm_count=1, smem_limit=10**6, vec16=True).vec16
    assert not _launch.plan_flash(dims, "f32", sm_count=1, smem_limit=10**6, vec16=True).vec16


def test_rows_aligned16() -> None:
    x = np.zeros((2, 3, 5, 64), np.float16)
    assert _launch.rows_aligned16(x)
    assert not _launch.rows_aligned16(np.zeros((2, 3, 5, 20), np.float16))  # 40-byte rows
    assert not _launch.rows_aligned16(x[..., 1:9])  # rows start 2 bytes in
    assert not _launch.rows_aligned16(
        np.zeros((2, 3, 5, 68), np.float16)[..., :64]
    )  # pitch 136 bytes


def test_additive_bias_from_bool_and_float_masks() -> None:
    keep = np.array([[True, False, True]])  # (1, 3): broadcasts over B, H and N
    bias = _launch.additive_bias(keep, np)
    assert bias.shape == (1, 1, 1, 3) and bias.dtype == np.float32
    np.testing.assert_array_equal(bias.ravel(), [0.0, -np.inf, 0.0])
    assert _launch.bias_strides(bias) == (0, 0, 0, 1)
    additive = np.array([[[0.5, -np.inf]]] * 2)  # (2, 1, 2) float64
    bias = _launch.additive_bias(additive, np)
    assert bias.shape == (1, 2, 1, 2) and bias.dtype == np.float32
    assert _launch.bias_strides(bias) == (0, 2, 0, 1)
    np.testing.assert_array_equal(bias[0, 1, 0], [0.5, -np.inf])
    full = _launch.additive_bias(np.zeros((2, 3, 4, 5), np.float32), np)
    assert _launch.bias_strides(full) == (60, 20, 5, 1)


def test_declined_inputs_raise_unsupported_before_any_gpu_work() -> None:
    x64 = np.zeros((1, 2, 3, 8))
    with pytest.raises(Unsupported, match="float64"):
        cupy_backend.flash(x64, x64, x64)
    x16 = np.zeros((1, 2, 3, 300), np.float16)
    with pytest.raises(Unsupported, match="256"):
        cupy_backend.sdpa(x16, x16, x16)
    x32 = np.zeros((1, 2, 3, 8), np.float32)
    with pytest.raises(Unsupported, match="return_weights"):
        cupy_backend.sdpa(x32, x32, x32, return_weights=True)


def test_bfloat16_tensors_are_declined_on_the_way_in() -> None:
    torch = pytest.importorskip("torch")
    with pytest.raises(Unsupported, match="bfloat16"):
        cupy_backend.asarray(torch.zeros(2, dtype=torch.bfloat16))


def test_import_needs_no_cupy() -> None:
    code = "import sys, qkv.backends.cupy; assert 'cupy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.skipif(AVAILABLE, reason="the cupy backend can run here")
def test_selecting_cupy_without_a_gpu_is_unavailable_with_a_fix() -> None:
    q = np.zeros((1, 2, 3, 8), np.float32)
    with pytest.raises(qkv.BackendUnavailable, match="fix:") as caught:
        qkv.sdpa(q, q, q, backend="cupy")
    assert "cupy" in str(caught.value)
    with pytest.raises(qkv.BackendUnavailable, match="fix:"), qkv.use_backend("cupy"):
        pass


def test_cupy_without_a_device_is_unavailable_with_a_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    """cupy installed but no GPU (cupy imports, then the runtime finds no device)."""

    def no_device() -> int:
        raise RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")

    runtime = types.SimpleNamespace(getDeviceCount=no_device)
    monkeypatch.setitem(
        sys.modules, "cupy", types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime))
    )
    monkeypatch.setattr(_dispatch, "_availability", {})  # forget the cached probe
    q = np.zeros((1, 2, 3, 8), np.float32)
    with pytest.raises(qkv.BackendUnavailable, match=r"no usable NVIDIA GPU.*fix:"):
        qkv.flash(q, q, q, backend="cupy")


# --------------------------------------------------------------------------- on a GPU

# (B, H, Hkv, N, M, D, Dv): one token; odd sizes; N > M with grouped heads; N < M with one KV
# head, a head dim that rules out 16-byte copies and Dv != D; decode (split keys); wide heads.
SHAPES = [
    (1, 1, 1, 1, 1, 16, 16),
    (2, 3, 3, 37, 53, 40, 40),
    (1, 4, 2, 130, 70, 64, 64),
    (2, 4, 1, 65, 300, 20, 36),
    (1, 2, 2, 1, 4099, 128, 128),
    (1, 2, 1, 200, 190, 256, 256),
    (1, 2, 2, 96, 64, 96, 200),
]


def _inputs(shape: tuple[int, ...], dtype: type, seed: int = 0) -> tuple[np.ndarray, ...]:
    B, H, Hkv, N, M, D, Dv = shape
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, H, N, D)).astype(dtype)
    k = rng.standard_normal((B, Hkv, M, D)).astype(dtype)
    v = rng.standard_normal((B, Hkv, M, Dv)).astype(dtype)
    return q, k, v


def _check_attention(out, lse, q, k, v, *, mask=None, causal=False, scale=None) -> None:
    """Compare with the float64 reference on the same (rounded) inputs.

    fp32: norm-wise relative error <= 1e-5. fp16: each output is a convex combination of value
    rows; rounding the probabilities to fp16 (unit roundoff 2^-11) and the output to fp16 adds
    at most 2^-11 max|v| each, so |error| <= 2^-10 max|v| plus fp32 accumulation slack.
    lse: within 1e-4 (1 + |lse|); -inf exactly where the reference has it (fully masked rows,
    whose outputs must be exactly zero).
    """
    golden, golden_lse = reference.sdpa(
        q.astype(np.float64),
        k.astype(np.float64),
        v.astype(np.float64),
        mask=mask,
        causal=causal,
        scale=scale,
        return_lse=True,
    )
    assert out.dtype == q.dtype and out.shape == golden.shape
    assert lse.dtype == np.float32 and lse.shape == golden_lse.shape
    out64 = out.astype(np.float64)
    assert np.isfinite(out64).all(), "unwritten (poisoned) or non-finite output"
    if q.dtype == np.float32:
        error = np.linalg.norm(out64 - golden) / max(np.linalg.norm(golden), 1e-30)
        assert error <= 1e-5, f"relative error {error:.2e}"
    else:
        bound = 2.0**-10 * np.abs(v.astype(np.float64)).max() + 1e-5
        error = np.abs(out64 - golden).max()
        assert error <= bound, f"max error {error:.2e} > {bound:.2e}"
    dead = np.isneginf(golden_lse)
    np.testing.assert_array_equal(np.isneginf(lse), dead)
    np.testing.assert_array_equal(out64[dead], 0.0)
    np.testing.assert_allclose(lse[~dead], golden_lse[~dead], rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_flash_matches_reference(causal: bool, dtype: type, shape: tuple[int, ...]) -> None:
    q, k, v = _inputs(shape, dtype)
    with _outputs.poisoned():
        out, lse = qkv.flash(q, k, v, causal=causal, return_lse=True, backend="cupy")
    assert isinstance(out, np.ndarray) and isinstance(lse, np.ndarray)  # NumPy in, NumPy out
    _check_attention(out, lse, q, k, v, causal=causal)


# Masks over (B, H, N, M) = (2, 4, 33, 47): bool with broadcasting and fully masked rows, an
# additive float mask with -inf entries, each alone and with causal.
def _masks(rng: np.random.Generator) -> dict[str, np.ndarray]:
    keys = rng.random((2, 1, 1, 47)) < 0.7  # per-batch key padding, broadcast over H and N
    rows = rng.random((33, 47)) < 0.5
    rows[[0, 5, 32]] = False  # fully masked rows
    bias = rng.standard_normal((4, 33, 47)) * 3.0
    bias[:, 7] = -np.inf  # a fully masked row through the additive form
    bias[rng.random((4, 33, 47)) < 0.2] = -np.inf
    return {"keys": keys, "rows": rows, "bias": bias.astype(np.float32), "bias64": bias}


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("name", ["keys", "rows", "bias", "bias64"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_masks_match_reference(causal: bool, dtype: type, name: str) -> None:
    rng = np.random.default_rng(1)
    mask = _masks(rng)[name]
    q, k, v = _inputs((2, 4, 2, 33, 47, 64, 64), dtype, seed=2)
    with _outputs.poisoned():
        out, lse = qkv.sdpa(q, k, v, mask=mask, causal=causal, return_lse=True, backend="cupy")
    _check_attention(out, lse, q, k, v, mask=mask, causal=causal)


@pytest.mark.gpu
@requires_gpu
def test_causal_with_more_queries_than_keys_zeroes_the_first_rows() -> None:
    """N > M: the first N - M queries see no key (bottom-right alignment)."""
    q, k, v = _inputs((1, 2, 2, 100, 30, 32, 32), np.float16, seed=3)
    out, lse = qkv.flash(q, k, v, causal=True, return_lse=True, backend="cupy")
    assert np.isneginf(lse[:, :, :70]).all() and (out[:, :, :70] == 0).all()
    _check_attention(out, lse, q, k, v, causal=True)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
def test_cupy_in_cupy_out_with_strided_inputs(dtype: type) -> None:
    """CuPy arrays stay on the device; (B, N, H, D) views transposed to (B, H, N, D) are read
    through their strides."""
    import cupy

    q, k, v = _inputs((2, 4, 2, 50, 70, 64, 48), dtype, seed=4)
    as_view = [
        cupy.asarray(np.ascontiguousarray(x.transpose(0, 2, 1, 3))).transpose(0, 2, 1, 3)
        for x in (q, k, v)
    ]
    scale = 0.3
    with _outputs.poisoned():
        out, lse = qkv.sdpa(*as_view, scale=scale, return_lse=True, backend="cupy")
    assert isinstance(out, cupy.ndarray) and isinstance(lse, cupy.ndarray)
    _check_attention(cupy.asnumpy(out), cupy.asnumpy(lse), q, k, v, scale=scale)


@pytest.mark.gpu
@requires_gpu
def test_declined_inputs_fall_back_to_the_reference() -> None:
    q, k, v = _inputs((1, 2, 1, 9, 11, 8, 8), np.float64, seed=5)
    _dispatch.reset_warnings()
    with pytest.warns(qkv.FallbackWarning, match="float64"):
        out = qkv.flash(q, k, v, backend="cupy")
    np.testing.assert_allclose(out, reference.sdpa(q, k, v), rtol=1e-12)
    q32, k32, v32 = (x.astype(np.float32) for x in (q, k, v))
    with pytest.warns(qkv.FallbackWarning, match="return_weights"):
        out, weights = qkv.sdpa(q32, k32, v32, return_weights=True, backend="cupy")
    assert weights.shape == (1, 2, 9, 11)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize(
    "dtype", [np.float16, np.float32, np.float64], ids=["fp16", "fp32", "fp64"]
)
@pytest.mark.parametrize("pairing", ["adjacent", "half"])
@pytest.mark.parametrize("where", ["offset", "shared", "per-batch"])
def test_rope_matches_reference(where: str, pairing: str, dtype: type) -> None:
    rng = np.random.default_rng(6)
    x = (rng.standard_normal((2, 3, 17, 64)) * 4).astype(dtype)
    kwargs: dict = {"offset": 1000}
    if where == "shared":
        kwargs = {"positions": rng.integers(0, 100_000, 17)}
    elif where == "per-batch":
        kwargs = {"positions": rng.integers(0, 100_000, (2, 17)).astype(np.int32)}
    with _outputs.poisoned():
        out = qkv.rope(x, pairing=pairing, backend="cupy", **kwargs)
    expected = reference.rope(x, pairing=pairing, **kwargs)
    assert out.dtype == x.dtype
    # The angle, cosine and sine are float64 on both sides (CUDA's to 2 ulp), the rotation is
    # rounded step for step: a few ulp of the working precision at most.
    ulp = {np.float16: 2.0**-10, np.float32: 2.0**-23, np.float64: 2.0**-52}[dtype]
    np.testing.assert_allclose(out, expected, rtol=0, atol=8 * ulp * np.abs(x).max())
