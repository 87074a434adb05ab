r"""Numba neighborhood attention: one fused pass per query, neighbours found by arithmetic.

Every spatial grid is handled as a 3-D one (missing leading axes have length 1, kernel 1). For
query $i$ the kernel computes, per axis, the first key and the number of keys of its window
with the rule of :func:`qkv.reference.local.neighborhood_attention.axis_window` (dilation group, stride
leader, window shifted inward at the borders, causal end), then walks the product of the three
windows: scores $s_t = \text{scale}\,\langle q_i, k_{n(i,t)}\rangle$ into a scratch row of
$K = \prod k$ entries, their maximum $m$, and

$$
O_i = \frac{\sum_t e^{s_t - m} v_{n(i,t)}}{\sum_t e^{s_t - m}}, \qquad
\mathrm{lse}_i = m + \log \sum_t e^{s_t - m}.
$$

Work is split with ``prange`` over ``(b, h, chunk of queries)``; each worker allocates its
scratch once. Nothing of size ``N x N`` (or ``N x K``, unless the weights are asked for)
exists: time and memory are $O(N K D)$ and $O(K)$ per worker. Arithmetic is in the input
dtype, float32 or float64.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

#: Queries per unit of parallel work.
CHUNK = 64


@njit(cache=True, inline="always")
def _window(i, length, k, d, s, causal):
    """First key and key count of position ``i`` along one axis (see the module docstring)."""
    g = i % d
    place = i // d
    group_length = length // d + (1 if g < length % d else 0)
    if causal:
        leader = min(place // s * s + s - 1, group_length - 1)
        lo = max(leader - k + 1, 0)
        count = place - lo + 1
    else:
        leader = min(place // s * s + s // 2, group_length - 1)
        left = k // 2
        right = k // 2 + k % 2 - 1
        lo = min(max(leader, left), group_length - 1 - right) - left
        count = k
    return lo * d + g, count


@njit(parallel=True, cache=True)
def _forward(q, k, v, grid, kernel, dilation, stride, causal, scale, zero, out, lse, weights):
    """``q (B, H, N, D)``, ``k (B, Hkv, N, D)``, ``v (B, Hkv, N, Dv)``; ``grid``, ``kernel``,
    ``dilation``, ``stride``, ``causal`` int64 ``(3,)``; ``scale`` and ``zero`` scalars of the
    input dtype (so the arithmetic stays in it); writes ``out (B, H, N, Dv)``,
    ``lse (B, H, N)`` and, when its last axis is ``K`` long, ``weights (B, H, N, K)``."""
    B, H, N, D = q.shape
    G = H // k.shape[1]
    Dv = v.shape[3]
    L0, L1, L2 = grid[0], grid[1], grid[2]
    k0, k1, k2 = kernel[0], kernel[1], kernel[2]
    K = k0 * k1 * k2
    want_weights = weights.shape[3] == K
    n_chunks = (N + CHUNK - 1) // CHUNK
    for work in prange(B * H * n_chunks):
        bh = work // n_chunks
        b = bh // H
        h = bh % H
        hk = h // G
        scores = np.empty(K, dtype=q.dtype)
        keys = np.empty(K, dtype=np.int64)
        slots = np.empty(K, dtype=np.int64)
        acc = np.empty(Dv, dtype=q.dtype)
        start = (work % n_chunks) * CHUNK
        for n in range(start, min(N, start + CHUNK)):
            f0, c0 = _window(n // (L1 * L2), L0, k0, dilation[0], stride[0], causal[0])
            f1, c1 = _window(n // L2 % L1, L1, k1, dilation[1], stride[1], causal[1])
            f2, c2 = _window(n % L2, L2, k2, dilation[2], stride[2], causal[2])
            count = 0
            top = zero
            for t0 in range(c0):
                for t1 in range(c1):
                    row = ((f0 + t0 * dilation[0]) * L1 + f1 + t1 * dilation[1]) * L2 + f2
                    for t2 in range(c2):
                        j = row + t2 * dilation[2]
                        dot = zero
                        for e in range(D):
                            dot += q[b, h, n, e] * k[b, hk, j, e]
                        score = dot * scale
                        scores[count] = score
                        keys[count] = j
                        slots[count] = (t0 * k1 + t1) * k2 + t2
                        count += 1
                        if count == 1 or score > top:
                            top = score
            acc[:] = 0.0
            total = zero
            for t in range(count):
                p = math.exp(scores[t] - top)
                scores[t] = p
                total += p
                j = keys[t]
                for e in range(Dv):
                    acc[e] += p * v[b, hk, j, e]
            for e in range(Dv):
                out[b, h, n, e] = acc[e] / total
            lse[b, h, n] = top + math.log(total)
            if want_weights:
                weights[b, h, n, :] = 0.0
                for t in range(count):
                    weights[b, h, n, slots[t]] = scores[t] / total


def _three(values: tuple, fill: int, rank: int) -> np.ndarray:
    """Per-axis values padded in front to three axes, as int64."""
    return np.array((fill,) * (3 - rank) + tuple(int(x) for x in values), dtype=np.int64)


def neighborhood(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    *,
    kernel_size: tuple[int, ...],
    dilation: tuple[int, ...],
    stride: tuple[int, ...],
    causal: tuple[bool, ...],
    scale: float | None,
    return_weights: bool,
    return_lse: bool,
) -> np.ndarray | tuple[np.ndarray, ...]:
    """Neighborhood attention on validated NumPy inputs, with the results of
    ``qkv.neighborhood``.

    ``q (B, H, *spatial, D)``, ``k (B, Hkv, *spatial, D)``, ``v (B, Hkv, *spatial, Dv)`` of one
    dtype, float32 or float64; the per-axis tuples have one entry per spatial axis. Returns
    ``O (B, H, *spatial, Dv)`` and, as asked, ``P (B, H, *spatial, K)`` and ``lse``.
    """
    B, H, *spatial, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    rank = len(spatial)
    N, K = math.prod(spatial), math.prod(kernel_size)
    dtype = q.dtype
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    q3 = np.ascontiguousarray(q).reshape(B, H, N, D)  # (B, H, N, D)
    k3 = np.ascontiguousarray(k).reshape(B, Hkv, N, D)  # (B, Hkv, N, D)
    v3 = np.ascontiguousarray(v).reshape(B, Hkv, N, Dv)  # (B, Hkv, N, Dv)
    out = np.empty((B, H, N, Dv), dtype=dtype)
    lse = np.empty((B, H, N), dtype=dtype)
    weights = np.empty((B, H, N, K) if return_weights else (1, 1, 1, 0), dtype=dtype)
    _forward(
        q3, k3, v3,
        _three(spatial, 1, rank), _three(kernel_size, 1, rank), _three(dilation, 1, rank),
        _three(stride, 1, rank), _three(causal, 0, rank),
        dtype.type(scale), dtype.type(0.0), out, lse, weights,
    )  # fmt: skip
    results = [out.reshape(B, H, *spatial, Dv)]  # (B, H, *spatial, Dv)
    if return_weights:
        results.append(weights.reshape(B, H, *spatial, K))  # (B, H, *spatial, K)
    if return_lse:
        results.append(lse.reshape(B, H, *spatial))  # (B, H, *spatial)
    return results[0] if len(results) == 1 else tuple(results)
