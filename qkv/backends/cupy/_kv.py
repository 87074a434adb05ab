"""Host side of ``kv.cu``: argument packing, launch geometry, launches, and the window pooling.

Everything here but the ``*_forward`` functions is plain Python and NumPy (:func:`pool_votes`
takes either array module), so the packing is tested against the kernels' PTX signatures and
the pooling against the reference on machines without a GPU.

Status: the kernels compile (nvcc -arch=sm_90) but have not yet run on a GPU.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from qkv import _arrays, _outputs
from qkv.backends.cupy import _launch
from qkv.errors import Unsupported

#: Threads per block of every kernel in ``kv.cu`` (``kThreads``); warps = query rows per block.
THREADS = 128
WARPS = THREADS // 32
#: Input dtypes the kernels take, with their entry-point suffix (``quantize``: float32 only).
ELEMENTS = {"float16": "f16", "float32": "f32"}
MAX_HEAD_DIM = 256
SOURCE = "kv.cu"


def kernel_name(kind: str, dtype: str) -> str:
    """The entry point ``qkv_kv_<kind>_<suffix>``; ``Unsupported`` for other dtypes."""
    allowed = ("float32",) if kind in ("minmax", "pack") else tuple(ELEMENTS)
    if dtype not in allowed:
        raise Unsupported(f"dtype {dtype}: the CuPy kv {kind} kernel takes {' and '.join(allowed)}")
    return f"qkv_kv_{kind}_{ELEMENTS[dtype]}"


def blocks(items: int, per_block: int = THREADS) -> tuple[int, int, int]:
    """A 1-d grid covering ``items`` work items, ``per_block`` per block."""
    if items >= 2**31 * per_block:
        raise Unsupported(f"{items} work items exceed the kernels' grid")
    return (max(1, -(-items // per_block)), 1, 1)


def minmax_arguments(x: Any, scale: Any, zero: Any, *, group_n: int, group_d: int, bits: int):
    """Arguments of ``qkv_kv_minmax_f32`` (contiguous ``x (B, H, N, D)`` float32)."""
    B, H, N, D = x.shape
    ints = (np.int32(n) for n in (B, H, N, D, group_n, group_d))
    return (x, scale, zero, *ints, np.float32((1 << bits) - 1))


def pack_arguments(x: Any, scale: Any, zero: Any, packed: Any, *, group_n: int, group_d: int,
                   bits: int):  # fmt: skip
    """Arguments of ``qkv_kv_pack_f32``."""
    B, H, N, D = x.shape
    ints = (B, H, N, D, packed.shape[3], group_n, group_d, bits)
    return (x, scale, zero, packed, *(np.int32(n) for n in ints))


def unpack_arguments(packed: Any, scale: Any, zero: Any, out: Any, *, bits: int):
    """Arguments of ``qkv_kv_unpack_*`` (groups read off the parameters' shape)."""
    B, H, N, D = out.shape
    ints = (B, H, N, D, packed.shape[3], N // scale.shape[2], D // scale.shape[3], bits)
    return (packed, scale, zero, out, *(np.int32(n) for n in ints))


def window_arguments(q: Any, k: Any, idx: Any, votes: Any, *, n_tokens: int, scale: float):
    """Arguments of ``qkv_kv_window_*``: ``idx`` int64 ``(B, H, C)`` per query head."""
    _, H, W, D = q.shape
    Hkv, C = k.shape[1], k.shape[2]
    ints = (np.int32(n) for n in (H, Hkv, W, C, D))
    return (q, k, idx, votes, *ints, np.int64(n_tokens - W), np.float32(scale * _launch.LOG2E))


def mixed_arguments(q, k, v, kc, ks, kz, vc, vs, vz, out, lse, *, bits: int, scale: float):
    """Arguments of ``qkv_kv_mixed_*`` (the order of ``mixed_attention``, then outputs)."""
    B, H, N, D = q.shape
    Hkv, Mf, Dv = k.shape[1], k.shape[2], v.shape[3]
    Mq = kc.shape[2]
    ints = (B, H, Hkv, N, Mq, Mf, D, Dv, kc.shape[3], vc.shape[3], bits)
    groups = (Mq // ks.shape[2], D // ks.shape[3], Mq // vs.shape[2], Dv // vs.shape[3])
    return (
        q, k, v, kc, ks, kz, vc, vs, vz, out, lse,
        *(np.int32(n) for n in (*ints, *groups)), np.float32(scale * _launch.LOG2E),
    )  # fmt: skip


def pool_votes(votes: Any, prefix: Any, kernel: int, pooling: str, xp: Any) -> Any:
    """SnapKV's stride-1 pool over the slot axis of ``votes (B, H, C)`` (array module ``xp``):
    slots off ``prefix`` count as 0 in an average and not at all in a max; ``-inf`` there."""
    pad = kernel // 2
    fill = 0.0 if pooling == "avgpool" else -np.inf
    base = xp.where(prefix, votes, fill)
    padded = xp.pad(base, ((0, 0), (0, 0), (pad, pad)), constant_values=fill)  # (B, H, C + 2p)
    C = votes.shape[-1]
    acc = padded[..., :C]
    for t in range(1, kernel):
        acc = (
            acc + padded[..., t : t + C]
            if pooling == "avgpool"
            else xp.maximum(acc, padded[..., t : t + C])
        )
    if pooling == "avgpool":
        acc = acc / kernel
    return xp.where(prefix, acc, -np.inf).astype(votes.dtype)


def _run(name: str, grid: tuple[int, int, int], args: tuple, device: Any) -> None:
    kernel = _launch._kernel(device.id, SOURCE, (), name, 0)
    kernel(grid, (THREADS, 1, 1), args)


def quantize_forward(x: Any, *, bits: int, group_n: int, group_d: int) -> tuple[Any, Any, Any]:
    """``(packed, scale, zero)`` of a CuPy float32 ``x (B, H, N, D)``."""
    import cupy

    kernel_name("pack", _arrays.dtype_name(x))
    B, H, N, D = x.shape
    with x.device as device:
        x = cupy.ascontiguousarray(x)
        shape = (B, H, N // group_n, D // group_d)
        scale, zero = _outputs.empty(shape, like=x), _outputs.empty(shape, like=x)
        packed = _outputs.empty((B, H, N, math.ceil(D * bits / 8)), like=x, dtype=cupy.uint8)
        groups = {"group_n": group_n, "group_d": group_d, "bits": bits}
        _run("qkv_kv_minmax_f32", blocks(scale.size),
             minmax_arguments(x, scale, zero, **groups), device)  # fmt: skip
        _run("qkv_kv_pack_f32", blocks(packed.size),
             pack_arguments(x, scale, zero, packed, **groups), device)  # fmt: skip
    return packed, scale, zero


def dequantize_forward(packed: Any, scale: Any, zero: Any, *, bits: int, dim: int) -> Any:
    """``x_hat (B, H, N, dim)`` in ``scale``'s dtype from CuPy arrays."""
    import cupy

    name = kernel_name("unpack", _arrays.dtype_name(scale))
    B, H, N, _ = packed.shape
    with scale.device as device:
        packed, scale, zero = (cupy.ascontiguousarray(a) for a in (packed, scale, zero))
        out = _outputs.empty((B, H, N, dim), like=scale)
        _run(name, blocks(out.size), unpack_arguments(packed, scale, zero, out, bits=bits), device)
    return out


def window_forward(q: Any, k: Any, idx: Any, *, n_tokens: int, scale: float) -> Any:
    """Unpooled window votes ``(B, H, C)`` float32; ``idx`` the slots' tokens per query head."""
    import cupy

    name = kernel_name("window", _arrays.dtype_name(q))
    B, H = q.shape[:2]
    with q.device as device:
        q, k = cupy.ascontiguousarray(q), cupy.ascontiguousarray(k)
        idx = cupy.ascontiguousarray(idx, dtype=cupy.int64)
        votes = cupy.zeros((B, H, k.shape[2]), dtype=cupy.float32)
        args = window_arguments(q, k, idx, votes, n_tokens=n_tokens, scale=scale)
        _run(name, (B * H, 1, 1), args, device)
    return votes


def mixed_forward(q, k, v, kc, ks, kz, vc, vs, vz, *, bits: int, scale: float | None):
    """``(O (B, H, N, Dv) in q's dtype, lse (B, H, N) float32)`` from CuPy arrays."""
    import cupy

    name = kernel_name("mixed", _arrays.dtype_name(q))
    B, H, N, D = q.shape
    Dv = v.shape[3]
    if max(D, Dv) > MAX_HEAD_DIM:
        raise Unsupported(f"D={D}, Dv={Dv}: the kernel takes head dims up to {MAX_HEAD_DIM}")
    with q.device as device:
        arrays = [cupy.ascontiguousarray(a) for a in (q, k, v, kc, ks, kz, vc, vs, vz)]
        out = _outputs.empty((B, H, N, Dv), like=arrays[0])
        lse = _outputs.empty((B, H, N), like=arrays[0], dtype=cupy.float32)
        scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
        args = mixed_arguments(*arrays, out, lse, bits=bits, scale=scale)
        _run(name, blocks(B * H * N, WARPS), args, device)
    return out, lse
