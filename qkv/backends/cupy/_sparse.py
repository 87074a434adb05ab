"""Host side of ``sparse_fwd.cu``: split plan, argument packing, launch and merge.

Everything here but :func:`sparse_forward` is plain Python and NumPy (:func:`merge_splits`
takes either array module), so the packing is tested against the kernel's PTX signature on
machines without a GPU.

Status: the kernel compiles (nvcc -arch=sm_90) but has not yet run on a GPU.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from qkv import _arrays, _outputs
from qkv.backends._split import split_slots
from qkv.backends.cupy import _launch
from qkv.errors import Unsupported

#: (row, split) pairs per block: one warp each (``kWarps`` in the kernel).
WARPS = 4
#: Input dtypes the kernel takes, with their entry-point suffix.
ELEMENTS = {"float16": "f16", "float32": "f32"}
MAX_HEAD_DIM = 256
#: Warps aimed at per launch, and the fewest slots one warp walks.
PROGRAMS, MIN_CHUNK = 4096, 32


def kernel_name(dtype: str) -> str:
    """The entry point for inputs of ``dtype``; ``Unsupported`` for other dtypes."""
    element = ELEMENTS.get(dtype)
    if element is None:
        raise Unsupported(
            f"dtype {dtype}: the CuPy sparse_attention kernel takes float16 and float32"
        )
    return f"qkv_sparse_fwd_{element}"


def launch_plan(rows: int, slots: int, D: int, Dv: int) -> tuple[int, int, tuple[int, int, int]]:
    """``(chunk, n_splits, grid)`` for ``rows = B * H * N`` rows of ``slots`` slots each."""
    if max(D, Dv) > MAX_HEAD_DIM:
        raise Unsupported(f"D={D}, Dv={Dv}: the kernel takes head dims up to {MAX_HEAD_DIM}")
    chunk, n_splits = split_slots(rows, slots, programs=PROGRAMS, min_chunk=MIN_CHUNK, multiple=1)
    if rows * n_splits >= 2**31 or slots >= 2**31:
        raise Unsupported(f"sizes beyond the kernel's limits (rows={rows}, S={slots})")
    return chunk, n_splits, (-(-rows * n_splits // WARPS), 1, 1)


def sparse_arguments(
    q: Any, k: Any, v: Any, idx: Any, part_o: Any, part_lse: Any, *, chunk: int, n_splits: int,
    scale: float, bias: Any = None,
) -> tuple:  # fmt: skip
    """The kernel's arguments, in the order and C types of ``QKV_SPARSE_PARAMS``.

    ``q (B, H, N, D)``, ``k (B, Hkv, M, D)``, ``v (B, Hkv, M, Dv)`` with a contiguous last axis,
    ``idx`` int64 ``(B, H, N, S)`` (a query stride of 0 shares a head's list), ``part_o`` and
    ``part_lse`` contiguous float32, optional contiguous float32 ``bias`` ``(B, H, S)``,
    ``(B, Hkv, S)`` or ``(B, H, N, S)`` (a null pointer without one).
    """
    B, H, N, D = q.shape
    Hkv, Dv, S = k.shape[1], v.shape[3], idx.shape[3]
    strides = (*(_launch.element_strides(x)[:3] for x in (q, k, v, idx)),)
    if bias is None:
        b_strides, bias_group = (0, 0, 0), 1
    else:
        sb = _launch.element_strides(bias)
        b_strides = (sb[0], sb[1], sb[2] if bias.ndim == 4 else 0)
        bias_group = H // bias.shape[1]  # H / Hkv for a bias per KV head, else 1
    return (
        q, k, v, idx, _launch.NULL if bias is None else bias, part_o, part_lse,
        *(np.int32(n) for n in (B, H, Hkv, N, S, D, Dv, chunk, n_splits)),
        *(np.int64(s) for triple in strides for s in triple),
        *(np.int64(s) for s in b_strides), np.int32(bias_group),
        np.float32(scale * _launch.LOG2E),
    )  # fmt: skip


def merge_splits(part_o: Any, part_lse: Any, xp: Any) -> tuple[Any, Any]:
    """Merge ``part_o (rows, P, Dv)`` and ``part_lse (rows, P)`` by their log-sum-exps (array
    module ``xp``): ``(O (rows, Dv), lse (rows,))``; a row empty in every split stays zero with
    ``lse = -inf``."""
    top = part_lse.max(axis=1, keepdims=True)  # (rows, 1)
    top = xp.where(xp.isinf(top), 0.0, top).astype(part_lse.dtype)
    w = xp.exp(part_lse - top)  # (rows, P); 0 for an empty split
    total = w.sum(axis=1)  # (rows,)
    out = (w[..., None] * part_o).sum(axis=1) / xp.where(total > 0, total, 1.0)[:, None]
    with np.errstate(divide="ignore"):
        lse = xp.log(total) + top[:, 0]  # (rows,)
    return out.astype(part_o.dtype), lse.astype(part_lse.dtype)


def sparse_forward(
    q: Any, k: Any, v: Any, indices: Any, *, scale: float | None, bias: Any = None
) -> tuple[Any, Any]:
    """Run the kernel on CuPy arrays; returns ``O (B, H, N, Dv)`` in the input dtype and
    ``lse (B, H, N)`` float32. ``bias`` (optional, ``(B, H, S)``, ``(B, Hkv, S)`` or
    ``(B, H, N, S)``) is read as float32.

    Raises ``Unsupported`` (before any work) for dtypes other than float16 and float32, head
    dims over 256 and sizes beyond the grid's limits.
    """
    import cupy

    name = kernel_name(_arrays.dtype_name(q))
    B, H, N, D = q.shape
    Dv, S = v.shape[3], indices.shape[-1]
    chunk, n_splits, grid = launch_plan(B * H * N, S, D, Dv)
    with q.device as device:
        q, k, v = (_launch._last_axis_contiguous(x) for x in (q, k, v))
        idx = cupy.ascontiguousarray(cupy.asarray(indices, dtype=cupy.int64))
        if idx.ndim == 3:
            idx = cupy.broadcast_to(idx[:, :, None], (B, H, N, S))  # (B, H, N, S), query stride 0
        part_o = cupy.empty((B * H * N, n_splits, Dv), dtype=cupy.float32)
        part_lse = cupy.empty((B * H * N, n_splits), dtype=cupy.float32)
        scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
        if bias is not None:
            bias = cupy.ascontiguousarray(cupy.asarray(bias, dtype=cupy.float32))
        args = sparse_arguments(
            q, k, v, idx, part_o, part_lse, chunk=chunk, n_splits=n_splits, scale=scale, bias=bias
        )
        kernel = _launch._kernel(device.id, "sparse_fwd.cu", (), name, 0)
        kernel(grid, (WARPS * 32, 1, 1), args)
        merged, lse = merge_splits(part_o, part_lse, cupy)
        out = _outputs.empty((B, H, N, Dv), like=q)
        out[...] = merged.reshape(B, H, N, Dv)  # (B, H, N, Dv), in q's dtype
    return out, lse.reshape(B, H, N)
