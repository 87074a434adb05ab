"""Host side of the CuPy kernels: tile configuration, launch geometry, argument packing, launch.

The kernels live in ``kernels/*.cu``, with device helpers they share in ``kernels/common.cuh``
(inlined by :func:`kernel_source`), and are compiled by NVRTC (through ``cupy.RawModule``) the
first time a configuration is used; CuPy also caches the binaries on disk. Everything in this
module except :func:`flash_forward`, :func:`rope_forward` and the compile cache is plain Python
and NumPy, so the planning and packing logic is tested on machines without a GPU.

Status: the kernels compile (nvcc -arch=sm_90 and NVRTC) but have not yet run on a GPU;
``make gpu-check`` is what checks them.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qkv import _arrays, _checks, _outputs
from qkv.errors import Unsupported

KERNEL_DIR = Path(__file__).with_name("kernels")
THREADS = 128  # every flash kernel runs 4 warps per block
MMA_BLOCK_Q = 64  # query rows per block of the fp16 kernel: 4 warps x 16
MAX_HEAD_DIM = 256
MIN_CAPABILITY = 80  # mma.sync m16n8k16, ldmatrix and cp.async need sm_80 or newer
LOG2E = 1.4426950408889634
#: Inputs the flash kernels take, by dtype name, with their entry-point suffix.
FLASH_ELEMENTS = {"float16": "f16", "float32": "f32"}
ROPE_ELEMENTS = {"float16": "f16", "float32": "f32", "float64": "f64"}
#: A null device pointer, for the optional pointer arguments.
NULL = np.uint64(0)

# Split-KV (flash-decoding) heuristic: when the query tiles alone give fewer blocks than
# multiprocessors, cut the keys into splits so that about TARGET_WAVES blocks per multiprocessor
# exist, each split keeping at least MIN_TILES_PER_SPLIT key tiles.
TARGET_WAVES = 4
MIN_TILES_PER_SPLIT = 4
MAX_SPLITS = 128
ROPE_THREADS = 256


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


@dataclass(frozen=True)
class TileConfig:
    """One compiled configuration of ``flash_fwd.cu`` (its ``-D`` options).

    ``head_dim`` and ``value_dim`` are ``D`` and ``Dv`` rounded up to a multiple of 16 (the
    fp16 kernel's mma k-step and ldmatrix width); the padding is zero-filled in shared memory, so
    it changes no result. Wide heads (over 128) take smaller key tiles to stay within registers.
    """

    head_dim: int
    value_dim: int
    mma_block_k: int
    simt_block_q: int
    simt_block_k: int

    @property
    def mma_smem(self) -> int:
        """Bytes of shared memory of the fp16 kernel: Q, K and V tiles, rows padded by 8."""
        pitch_qk, pitch_v = self.head_dim + 8, self.value_dim + 8
        return 2 * (MMA_BLOCK_Q * pitch_qk + self.mma_block_k * (pitch_qk + pitch_v))

    @property
    def simt_smem(self) -> int:
        """Bytes of shared memory of the fp32 kernel: Q, K (odd pitch), V and P tiles."""
        bq, bk = self.simt_block_q, self.simt_block_k
        pitch_qk = self.head_dim + 1
        return 4 * (bq * pitch_qk + bk * pitch_qk + bk * self.value_dim + bq * (bk + 1))

    def defines(self) -> tuple[str, ...]:
        """The compile options that select this configuration (checked by static_asserts)."""
        return (
            f"-DQKV_HEAD_DIM={self.head_dim}",
            f"-DQKV_VALUE_DIM={self.value_dim}",
            f"-DQKV_MMA_BLOCK_K={self.mma_block_k}",
            f"-DQKV_SIMT_BLOCK_Q={self.simt_block_q}",
            f"-DQKV_SIMT_BLOCK_K={self.simt_block_k}",
            f"-DQKV_MMA_SMEM={self.mma_smem}",
            f"-DQKV_SIMT_SMEM={self.simt_smem}",
        )


def tile_config(D: int, Dv: int) -> TileConfig:
    """The configuration for head dims ``D`` (queries, keys) and ``Dv`` (values), each <= 256."""
    if not (1 <= D <= MAX_HEAD_DIM and 1 <= Dv <= MAX_HEAD_DIM):
        raise Unsupported(
            f"head dims up to {MAX_HEAD_DIM} (got D={D}, Dv={Dv}); larger heads run on the reference"
        )
    head_dim, value_dim = _round_up(D, 16), _round_up(Dv, 16)
    wide = max(head_dim, value_dim) > 128
    return TileConfig(
        head_dim=head_dim,
        value_dim=value_dim,
        mma_block_k=32 if wide else 64,
        simt_block_q=32 if wide else 64,
        simt_block_k=32 if wide else 64,
    )


@dataclass(frozen=True)
class FlashPlan:
    """How one flash call is launched.

    The forward kernel runs ``grid = (n_qtiles * splits, H, B)`` blocks of ``THREADS`` threads
    with ``smem`` bytes of dynamic shared memory; block ``x`` handles query tile
    ``x % n_qtiles`` against keys ``[s * keys_per_split, (s + 1) * keys_per_split)``,
    ``s = x // n_qtiles``. With ``splits > 1`` a combine kernel then merges the partial results,
    one block per ``(b, h, n)`` row.
    """

    kernel: str
    combine: str
    config: TileConfig
    block_q: int
    block_k: int
    smem: int
    n_qtiles: int
    splits: int
    keys_per_split: int
    vec16: bool
    grid: tuple[int, int, int]


def plan_flash(
    dims: _checks.AttentionDims,
    element: str,
    *,
    sm_count: int,
    smem_limit: int,
    vec16: bool = False,
) -> FlashPlan:
    """Tile sizes, split count and grid for ``flash_fwd_<element>`` on a device.

    ``sm_count`` is the device's multiprocessor count, ``smem_limit`` its opt-in shared memory
    per block; ``vec16`` says the fp16 rows may be copied in 16-byte chunks. Raises
    ``Unsupported`` for head dims over 256, grids beyond CUDA's limits, or tiles that do not fit
    the device's shared memory.
    """
    B, H, _, N, M, D, Dv = dims
    config = tile_config(D, Dv)
    if element == "f16":
        block_q, block_k, smem = MMA_BLOCK_Q, config.mma_block_k, config.mma_smem
    else:
        block_q, block_k, smem = config.simt_block_q, config.simt_block_k, config.simt_smem
    if smem > smem_limit:
        raise Unsupported(
            f"the {element} kernel for D={D}, Dv={Dv} needs {smem} bytes of shared memory per "
            f"block and this GPU allows {smem_limit}"
        )
    if H > 65535 or B > 65535 or max(N, M) >= 2**31 - block_k:
        raise Unsupported(f"sizes beyond the CUDA grid's limits (B={B}, H={H}, N={N}, M={M})")
    n_qtiles = -(-N // block_q)
    key_tiles = -(-M // block_k)
    blocks = n_qtiles * H * B
    splits = 1
    if blocks < sm_count and key_tiles >= 2 * MIN_TILES_PER_SPLIT:
        splits = min(
            -(-TARGET_WAVES * sm_count // blocks), key_tiles // MIN_TILES_PER_SPLIT, MAX_SPLITS
        )
    tiles_per_split = -(-key_tiles // splits)
    splits = -(-key_tiles // tiles_per_split)  # no empty trailing split
    return FlashPlan(
        kernel=f"qkv_flash_fwd_{element}",
        combine=f"qkv_flash_combine_{element}",
        config=config,
        block_q=block_q,
        block_k=block_k,
        smem=smem,
        n_qtiles=n_qtiles,
        splits=splits,
        keys_per_split=tiles_per_split * block_k,
        vec16=vec16 and element == "f16",
        grid=(n_qtiles * splits, H, B),
    )


def element_strides(x: Any) -> tuple[int, ...]:
    """Strides of a NumPy or CuPy array in elements (CuPy, like NumPy, counts bytes)."""
    return tuple(s // x.itemsize for s in x.strides)


def data_pointer(x: Any) -> int:
    """The address of a NumPy or CuPy array's first element."""
    interface = getattr(x, "__cuda_array_interface__", None) or x.__array_interface__
    return int(interface["data"][0])


def rows_aligned16(*arrays: Any) -> bool:
    """Whether every row of these fp16 arrays starts on a 16-byte boundary and is a whole
    number of 16-byte chunks, so the kernel may copy them with 16-byte ``cp.async``."""
    return all(
        data_pointer(x) % 16 == 0
        and x.shape[-1] % 8 == 0
        and all(s % 8 == 0 for s in element_strides(x)[:-1])
        for x in arrays
    )


def additive_bias(mask: Any, xp: Any) -> Any:
    """The mask as a float32 additive bias of rank 4 (a view where possible).

    Bool masks (True = attend) become 0 / -inf in their own, unbroadcast shape; float masks are
    cast to float32, the precision the reference adds them in for fp16 and fp32 inputs. Leading
    axes of size 1 are prepended up to ``(B, H, N, M)``'s rank.
    """
    if _arrays.dtype_name(mask) == "bool":
        bias = xp.where(mask, np.float32(0.0), np.float32(-np.inf)).astype(np.float32, copy=False)
    else:
        bias = mask.astype(np.float32, copy=False)
    return bias.reshape((1,) * (4 - bias.ndim) + tuple(bias.shape))


def bias_strides(bias: Any) -> tuple[int, int, int, int]:
    """Element strides of a rank-4 bias over ``(B, H, N, M)``, 0 along broadcast axes."""
    B, H, N, M = (
        0 if n == 1 else s for n, s in zip(bias.shape, element_strides(bias), strict=True)
    )
    return B, H, N, M


def flash_arguments(
    plan: FlashPlan,
    dims: _checks.AttentionDims,
    q: Any,
    k: Any,
    v: Any,
    bias: Any | None,
    out: Any,
    lse: Any,
    part_out: Any | None,
    part_lse: Any | None,
    *,
    scale: float,
    causal: bool,
) -> tuple:
    """The forward kernel's arguments, in the order and C types of ``QKV_FLASH_PARAMS``.

    Arrays are passed as device pointers; ``None`` becomes a null pointer. Integers are
    ``int`` (``np.int32``) or ``long long`` (``np.int64``) exactly as the kernel declares them.
    """
    B, H, Hkv, N, M, D, Dv = dims
    qs, ks, vs = element_strides(q)[:3], element_strides(k)[:3], element_strides(v)[:3]
    ms = bias_strides(bias) if bias is not None else (0, 0, 0, 0)
    return (
        q,
        k,
        v,
        NULL if bias is None else bias,
        out,
        lse,
        NULL if part_out is None else part_out,
        NULL if part_lse is None else part_lse,
        *(np.int32(n) for n in (B, H, Hkv, N, M, D, Dv)),
        *(np.int64(s) for s in (*qs, *ks, *vs, *ms)),
        np.float32(scale * LOG2E),
        np.int32(causal),
        np.int32(plan.vec16),
        np.int32(plan.splits),
        np.int32(plan.keys_per_split),
    )


def combine_arguments(plan: FlashPlan, part_out: Any, part_lse: Any, out: Any, lse: Any) -> tuple:
    """The combine kernel's arguments: partials, final output and lse, rows, Dv, splits."""
    rows = math.prod(lse.shape)
    return (
        part_out,
        part_lse,
        out,
        lse,
        np.int64(rows),
        np.int32(out.shape[-1]),
        np.int32(plan.splits),
    )


def rope_arguments(
    x: Any, out: Any, positions: Any | None, theta: Any, offset: int, pairing: str
) -> tuple:
    """The rope kernel's arguments, in the order and C types of ``QKV_ROPE_PARAMS``.

    ``positions`` is an int64 array of shape ``(N,)`` (shared by the batch: stride 0) or
    ``(B, N)``, or ``None`` for ``offset + n``.
    """
    B, H, N, D = x.shape
    batch_stride = N if positions is not None and positions.ndim == 2 else 0
    return (
        x,
        out,
        NULL if positions is None else positions,
        theta,
        np.int64(batch_stride),
        np.int64(offset),
        *(np.int32(n) for n in (B, H, N, D)),
        np.int32(pairing == "half"),
    )


# --------------------------------------------------------------------------- on the GPU


def kernel_source(source: str) -> str:
    """The text of ``kernels/<source>`` as NVRTC compiles it: ``#include "common.cuh"`` replaced
    by that header's text, so no include path is needed and CuPy's compile cache, which keys on
    the source text, sees changes to the header."""
    code = (KERNEL_DIR / source).read_text()
    header = (KERNEL_DIR / "common.cuh").read_text()
    return code.replace('#include "common.cuh"\n', header)


@functools.cache
def _module(source: str, defines: tuple[str, ...]) -> Any:
    import cupy

    return cupy.RawModule(code=kernel_source(source), options=("--std=c++17", *defines))


@functools.cache
def _kernel(device: int, source: str, defines: tuple[str, ...], name: str, smem: int) -> Any:
    """A compiled kernel with its dynamic shared-memory limit raised to ``smem`` (per device)."""
    kernel = _module(source, defines).get_function(name)
    if smem:
        kernel.max_dynamic_shared_size_bytes = smem
    return kernel


# cudaDeviceAttr values (CUDA runtime API), read with cupy.cuda.runtime.deviceGetAttribute.
_ATTR_SM_COUNT = 16  # cudaDevAttrMultiProcessorCount
_ATTR_MAJOR = 75  # cudaDevAttrComputeCapabilityMajor
_ATTR_MINOR = 76  # cudaDevAttrComputeCapabilityMinor
_ATTR_SMEM_OPTIN = 97  # cudaDevAttrMaxSharedMemoryPerBlockOptin


@functools.cache
def _device_limits(device: int) -> tuple[int, int, int]:
    """Compute capability (as 80, 90, ...), multiprocessor count, opt-in shared memory per block."""
    from cupy.cuda import runtime

    def get(attribute: int) -> int:
        return int(runtime.deviceGetAttribute(attribute, device))

    return (
        10 * get(_ATTR_MAJOR) + get(_ATTR_MINOR),
        get(_ATTR_SM_COUNT),
        get(_ATTR_SMEM_OPTIN),
    )


def _last_axis_contiguous(x: Any) -> Any:
    import cupy

    return x if x.strides[-1] == x.itemsize else cupy.ascontiguousarray(x)


def flash_forward(
    q: Any, k: Any, v: Any, *, mask: Any, causal: bool, scale: float | None
) -> tuple[Any, Any]:
    """Run the flash kernel on CuPy arrays; returns ``out (B, H, N, Dv)`` and ``lse (B, H, N)``.

    Raises ``Unsupported`` (before any work) for dtypes other than float16 and float32, head
    dims over 256, GPUs older than sm_80 and sizes beyond the grid's limits.
    """
    element = FLASH_ELEMENTS.get(_arrays.dtype_name(q))
    if element is None:
        raise Unsupported(
            f"dtype {_arrays.dtype_name(q)}: the CuPy flash kernels take float16 and float32"
        )
    dims = _checks.attention(q, k, v, mask=mask, causal=causal, scale=scale)
    tile_config(dims.D, dims.Dv)  # head dims over 256: Unsupported before touching the GPU
    import cupy

    with q.device as device:
        capability, sm_count, smem_limit = _device_limits(device.id)
        if capability < MIN_CAPABILITY:
            raise Unsupported(f"compute capability {capability / 10:.1f}; the kernels need 8.0+")
        q, k, v = (_last_axis_contiguous(x) for x in (q, k, v))
        plan = plan_flash(
            dims,
            element,
            sm_count=sm_count,
            smem_limit=smem_limit,
            vec16=element == "f16" and rows_aligned16(q, k, v),
        )
        bias = None if mask is None else additive_bias(mask, cupy)
        B, H, _, N, _, D, Dv = dims
        out = _outputs.empty((B, H, N, Dv), like=q, dtype=q.dtype)
        lse = _outputs.empty((B, H, N), like=q, dtype=np.float32)
        part_out = part_lse = None
        if plan.splits > 1:
            part_out = cupy.empty((plan.splits, B, H, N, Dv), dtype=np.float32)
            part_lse = cupy.empty((plan.splits, B, H, N), dtype=np.float32)
        args = flash_arguments(
            plan,
            dims,
            q,
            k,
            v,
            bias,
            out,
            lse,
            part_out,
            part_lse,
            scale=1.0 / math.sqrt(D) if scale is None else float(scale),
            causal=bool(causal),
        )
        defines = plan.config.defines()
        kernel = _kernel(device.id, "flash_fwd.cu", defines, plan.kernel, plan.smem)
        kernel(plan.grid, (THREADS, 1, 1), args, shared_mem=plan.smem)
        if plan.splits > 1:
            combine = _kernel(device.id, "flash_fwd.cu", defines, plan.combine, 0)
            combine_args = combine_arguments(plan, part_out, part_lse, out, lse)
            combine((B * H * N, 1, 1), (THREADS, 1, 1), combine_args)
    return out, lse


def rope_forward(x: Any, *, positions: Any | None, offset: int, base: float, pairing: str) -> Any:
    """Run the rope kernel on a CuPy array ``x (B, H, N, D)``; returns a new array."""
    from qkv.reference.core import rope_frequencies

    _checks.rope_call(x, positions=positions, offset=offset, pairing=pairing)
    element = ROPE_ELEMENTS.get(_arrays.dtype_name(x))
    if element is None:
        raise Unsupported(
            f"dtype {_arrays.dtype_name(x)}: the CuPy rope kernel takes float16, float32, float64"
        )
    import cupy

    with x.device as device:
        x = cupy.ascontiguousarray(x)
        B, H, N, D = x.shape
        theta = cupy.asarray(rope_frequencies(D, base))  # float64 (D/2,)
        if positions is not None:
            positions = cupy.ascontiguousarray(positions, dtype=np.int64)
        out = _outputs.empty(x.shape, like=x)
        args = rope_arguments(x, out, positions, theta, int(offset), pairing)
        kernel = _kernel(device.id, "rope.cu", (), f"qkv_rope_{element}", 0)
        blocks = min(-(-(B * H * N * (D // 2)) // ROPE_THREADS), 2**20)
        kernel((blocks, 1, 1), (ROPE_THREADS, 1, 1), args)
    return out


# --------------------------------------------------------------------------- sigmoid attention


@dataclass(frozen=True)
class SimtPlan:
    """How one call of a fp32-arithmetic (SIMT) kernel is launched (``sigmoid_fwd.cu``,
    ``tensor_fwd.cu``).

    ``grid = (n_qtiles, H, B)`` blocks of ``THREADS`` threads with ``smem`` bytes of dynamic
    shared memory; each block handles one query tile (sigmoid: against every key it may see,
    costliest tile first; tensor: against all ``M**2`` key pairs). The tiles and the
    shared-memory layout are the fp32 (SIMT) ones of :func:`tile_config`, for fp16 inputs too.
    """

    kernel: str
    config: TileConfig
    smem: int
    grid: tuple[int, int, int]


def plan_simt(name: str, dims: _checks.AttentionDims, element: str, *, smem_limit: int) -> SimtPlan:
    """Tiles and grid for ``qkv_<name>_fwd_<element>``; ``Unsupported`` for head dims over 256,
    tiles beyond the device's shared memory or sizes beyond the grid's limits."""
    B, H, _, N, M, D, Dv = dims
    config = tile_config(D, Dv)
    if config.simt_smem > smem_limit:
        raise Unsupported(
            f"the {name} kernel for D={D}, Dv={Dv} needs {config.simt_smem} bytes of shared "
            f"memory per block and this GPU allows {smem_limit}"
        )
    if H > 65535 or B > 65535 or max(N, M) >= 2**31 - config.simt_block_k:
        raise Unsupported(f"sizes beyond the CUDA grid's limits (B={B}, H={H}, N={N}, M={M})")
    return SimtPlan(
        kernel=f"qkv_{name}_fwd_{element}",
        config=config,
        smem=config.simt_smem,
        grid=(-(-N // config.simt_block_q), H, B),
    )


plan_sigmoid = functools.partial(plan_simt, "sigmoid")
plan_tensor = functools.partial(plan_simt, "tensor")


def sigmoid_arguments(
    dims: _checks.AttentionDims,
    q: Any,
    k: Any,
    v: Any,
    mask_bias: Any | None,
    slopes: Any | None,
    out: Any,
    *,
    scale: float,
    bias: float,
    causal: bool,
) -> tuple:
    """The sigmoid kernel's arguments, in the order and C types of ``QKV_SIGMOID_PARAMS``.

    ``mask_bias`` is the rank-4 float32 additive mask of :func:`additive_bias` (or ``None``),
    ``slopes`` the float32 ALiBi slopes ``(H,)`` (or ``None``); ``None`` becomes a null pointer.
    """
    B, H, Hkv, N, M, D, Dv = dims
    qs, ks, vs = element_strides(q)[:3], element_strides(k)[:3], element_strides(v)[:3]
    ms = bias_strides(mask_bias) if mask_bias is not None else (0, 0, 0, 0)
    return (
        q,
        k,
        v,
        NULL if mask_bias is None else mask_bias,
        NULL if slopes is None else slopes,
        out,
        *(np.int32(n) for n in (B, H, Hkv, N, M, D, Dv)),
        *(np.int64(s) for s in (*qs, *ks, *vs, *ms)),
        np.float32(scale),
        np.float32(bias),
        np.int32(causal),
    )


def sigmoid_forward(
    q: Any,
    k: Any,
    v: Any,
    *,
    mask: Any,
    causal: bool,
    scale: float | None,
    bias: float,
    alibi: bool,
) -> Any:
    """Run the sigmoid kernel on CuPy arrays; returns ``out (B, H, N, Dv)``.

    ``bias`` is the scalar $b$ (already defaulted to $-\\log M$ by the caller). Raises
    ``Unsupported`` (before any work) for dtypes other than float16 and float32, head dims over
    256, GPUs older than sm_80 and sizes beyond the grid's limits.
    """
    from qkv.reference.core import alibi_slopes

    element = FLASH_ELEMENTS.get(_arrays.dtype_name(q))
    if element is None:
        raise Unsupported(
            f"dtype {_arrays.dtype_name(q)}: the CuPy sigmoid kernel takes float16 and float32"
        )
    dims = _checks.attention(q, k, v, mask=mask, causal=causal, scale=scale)
    tile_config(dims.D, dims.Dv)  # head dims over 256: Unsupported before touching the GPU
    import cupy

    with q.device as device:
        capability, _, smem_limit = _device_limits(device.id)
        if capability < MIN_CAPABILITY:
            raise Unsupported(f"compute capability {capability / 10:.1f}; the kernels need 8.0+")
        plan = plan_sigmoid(dims, element, smem_limit=smem_limit)
        q, k, v = (_last_axis_contiguous(x) for x in (q, k, v))
        B, H, _, N, _, D, Dv = dims
        out = _outputs.empty((B, H, N, Dv), like=q, dtype=q.dtype)
        args = sigmoid_arguments(
            dims,
            q,
            k,
            v,
            None if mask is None else additive_bias(mask, cupy),
            cupy.asarray(alibi_slopes(H), dtype=np.float32) if alibi else None,
            out,
            scale=1.0 / math.sqrt(D) if scale is None else float(scale),
            bias=bias,
            causal=bool(causal),
        )
        kernel = _kernel(device.id, "sigmoid_fwd.cu", plan.config.defines(), plan.kernel, plan.smem)
        kernel(plan.grid, (THREADS, 1, 1), args, shared_mem=plan.smem)
    return out


# --------------------------------------------------------------------------- tensor attention


def tensor_arguments(
    dims: _checks.AttentionDims,
    q: Any,
    k1: Any,
    k2: Any,
    v1: Any,
    v2: Any,
    out: Any,
    *,
    scale: float,
) -> tuple:
    """The tensor kernel's arguments, in the order and C types of ``QKV_TENSOR_PARAMS``:
    the five inputs and the output as device pointers, the sizes, the batch/head/token element
    strides of each input, and ``scale * log2(e)``."""
    strides = (element_strides(x)[:3] for x in (q, k1, k2, v1, v2))
    return (
        q,
        k1,
        k2,
        v1,
        v2,
        out,
        *(np.int32(n) for n in dims),
        *(np.int64(s) for triple in strides for s in triple),
        np.float32(scale * LOG2E),
    )


def tensor_forward(q: Any, k1: Any, k2: Any, v1: Any, v2: Any, *, scale: float) -> Any:
    """Run the tensor kernel on CuPy arrays; returns ``out (B, H, N, Dv)`` in the input dtype.

    ``q (B, H, N, D)``, ``k1``/``k2 (B, Hkv, M, D)``, ``v1``/``v2 (B, Hkv, M, Dv)``. Raises
    ``Unsupported`` (before any work) for dtypes other than float16 and float32, head dims over
    256, GPUs older than sm_80 and sizes beyond the grid's limits.
    """
    element = FLASH_ELEMENTS.get(_arrays.dtype_name(q))
    if element is None:
        raise Unsupported(
            f"dtype {_arrays.dtype_name(q)}: the CuPy tensor kernel takes float16 and float32"
        )
    dims = _checks.tensor_call(q, k1, k2, v1, v2, scale=scale)
    tile_config(dims.D, dims.Dv)  # head dims over 256: Unsupported before touching the GPU
    with q.device as device:
        capability, _, smem_limit = _device_limits(device.id)
        if capability < MIN_CAPABILITY:
            raise Unsupported(f"compute capability {capability / 10:.1f}; the kernels need 8.0+")
        plan = plan_tensor(dims, element, smem_limit=smem_limit)
        q, k1, k2, v1, v2 = (_last_axis_contiguous(x) for x in (q, k1, k2, v1, v2))
        B, H, _, N, _, _, Dv = dims
        out = _outputs.empty((B, H, N, Dv), like=q, dtype=q.dtype)
        args = tensor_arguments(dims, q, k1, k2, v1, v2, out, scale=float(scale))
        kernel = _kernel(device.id, "tensor_fwd.cu", plan.config.defines(), plan.kernel, plan.smem)
        kernel(plan.grid, (THREADS, 1, 1), args, shared_mem=plan.smem)
    return out
