"""Host side of ``neighborhood_fwd.cu``: argument packing, launch geometry, launch.

Everything here but :func:`neighborhood_forward` is plain Python and NumPy, so the packing is
tested (against the kernel's PTX signature) on machines without a GPU.

Status: the kernel compiles (nvcc -arch=sm_90) but has not yet run on a GPU.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from qkv import _arrays, _outputs
from qkv.backends.cupy import _launch
from qkv.errors import Unsupported
from qkv.reference.local.neighborhood_attention import NeighborhoodDims

#: Queries per block: one warp each (``kWarps`` in the kernel).
WARPS = 4
#: Input dtypes the kernel takes, with their entry-point suffix.
ELEMENTS = {"float16": "f16", "float32": "f32"}
MAX_HEAD_DIM = 256


def _padded(values: tuple, fill: int) -> tuple[int, ...]:
    """Per-axis values padded in front to three axes, as ints."""
    return tuple(int(x) for x in (fill,) * (3 - len(values)) + tuple(values))


def kernel_name(dtype: str) -> str:
    """The entry point for inputs of ``dtype``; ``Unsupported`` for other dtypes."""
    element = ELEMENTS.get(dtype)
    if element is None:
        raise Unsupported(f"dtype {dtype}: the CuPy neighborhood kernel takes float16 and float32")
    return f"qkv_neighborhood_fwd_{element}"


def launch_grid(dims: NeighborhoodDims) -> tuple[int, int, int]:
    """One warp per ``(b, h, n)`` row, ``WARPS`` rows per block."""
    rows = dims.B * dims.H * dims.N
    if rows >= 2**31 or max(dims.D, dims.Dv) > MAX_HEAD_DIM:
        raise Unsupported(
            f"sizes beyond the kernel's limits (B*H*N={rows}, D={dims.D}, Dv={dims.Dv}; "
            f"head dims up to {MAX_HEAD_DIM})"
        )
    return (-(-rows // WARPS), 1, 1)


def neighborhood_arguments(
    dims: NeighborhoodDims, q: Any, k: Any, v: Any, out: Any, lse: Any, *, scale: float
) -> tuple:
    """The kernel's arguments, in the order and C types of ``QKV_NEIGHBORHOOD_PARAMS``.

    ``q (B, H, N, D)``, ``k (B, Hkv, N, D)``, ``v (B, Hkv, N, Dv)`` (tokens flattened), ``out``
    and ``lse`` contiguous.
    """
    strides = (_launch.element_strides(x)[:3] for x in (q, k, v))
    axes = (
        *_padded(dims.spatial, 1),
        *_padded(dims.kernel_size, 1),
        *_padded(dims.dilation, 1),
        *_padded(dims.stride, 1),
        *_padded(dims.causal, 0),
    )
    return (
        q,
        k,
        v,
        out,
        lse,
        *(np.int32(n) for n in (dims.B, dims.H, dims.Hkv, dims.N, dims.D, dims.Dv)),
        *(np.int64(s) for triple in strides for s in triple),
        *(np.int32(n) for n in axes),
        np.float32(scale * _launch.LOG2E),
    )


def neighborhood_forward(
    q: Any, k: Any, v: Any, dims: NeighborhoodDims, *, scale: float | None
) -> tuple[Any, Any]:
    """Run the kernel on CuPy arrays ``q (B, H, *spatial, D)``, ...; returns
    ``out (B, H, *spatial, Dv)`` in the input dtype and ``lse (B, H, *spatial)`` float32.

    Raises ``Unsupported`` (before any work) for dtypes other than float16 and float32, head
    dims over 256 and sizes beyond the grid's limits.
    """
    name = kernel_name(_arrays.dtype_name(q))
    grid = launch_grid(dims)
    B, H, Hkv, spatial, D, Dv = dims[:6]
    N = dims.N
    with q.device as device:
        q3 = _launch._last_axis_contiguous(q.reshape(B, H, N, D))  # (B, H, N, D)
        k3 = _launch._last_axis_contiguous(k.reshape(B, Hkv, N, D))  # (B, Hkv, N, D)
        v3 = _launch._last_axis_contiguous(v.reshape(B, Hkv, N, Dv))  # (B, Hkv, N, Dv)
        out = _outputs.empty((B, H, N, Dv), like=q3)
        lse = _outputs.empty((B, H, N), like=q3, dtype=np.float32)
        scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
        args = neighborhood_arguments(dims, q3, k3, v3, out, lse, scale=scale)
        kernel = _launch._kernel(device.id, "neighborhood_fwd.cu", (), name, 0)
        kernel(grid, (WARPS * 32, 1, 1), args)
    return out.reshape(B, H, *spatial, Dv), lse.reshape(B, H, *spatial)
