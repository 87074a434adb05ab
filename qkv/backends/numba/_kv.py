r"""Numba KV-cache kernels: packed quantisation, window scoring, mixed-precision attention.

* ``quantize``: one pass per group for its minimum, maximum, scale $s = (\max - \min)/(2^b-1)$
  and zero point, then one pass per token row that rounds each element
  ($\lfloor (x - z)/s + \tfrac12 \rfloor$, clipped) and ORs $8/b$ codes into each byte. The
  arithmetic is the reference's, step for step and in the input dtype, so the codes are equal.
* ``dequantize``: one pass per token row, $\hat x = q\,s + z$ with $q$ shifted out of its byte
  (each channel's byte, shift and group computed once per call).
* ``window_scores``: per query head, the causal softmax of each window query over the cached
  slots (max-subtracted), summed over the window into the slot votes, then the 1-D pool; no
  ``W x C`` array is kept.
* ``mixed_attention``: one task per KV head, two passes over its slots (scores of every query
  row of the group and their maxima, then weights and the weighted sums); each quantised key or
  value row is dequantised once into a row buffer as it is read and used by all the group's
  query rows: no floating copy of the quantised slots is made.

Rows are spread over threads with ``prange``. All kernels compute in the input dtype (float32 or
float64); constants are passed in that dtype so float32 arithmetic is never widened.
"""

from __future__ import annotations

import math

import numpy as np

_KERNELS: dict[str, object] = {}


def _compile() -> dict[str, object]:
    """The ``@njit(parallel=True)`` kernels (numba imported on first use)."""
    import numba

    @numba.njit(parallel=True, cache=True)
    def quantize_kernel(x, gn, gd, bits, levels, half, packed, scale, zero):
        B, H, N, D = x.shape
        Gn, Gd = scale.shape[2], scale.shape[3]
        for g in numba.prange(B * H * Gn * Gd):
            b = g // (H * Gn * Gd)
            h = g // (Gn * Gd) % H
            i = g // Gd % Gn
            j = g % Gd
            lo = x[b, h, i * gn, j * gd]
            hi = lo
            for n in range(i * gn, (i + 1) * gn):
                for d in range(j * gd, (j + 1) * gd):
                    lo = min(lo, x[b, h, n, d])
                    hi = max(hi, x[b, h, n, d])
            scale[b, h, i, j] = (hi - lo) / levels
            zero[b, h, i, j] = lo
        per = 8 // bits
        nbytes = packed.shape[3]
        for row in numba.prange(B * H * N):
            b = row // (H * N)
            h = row // N % H
            n = row % N
            for byte in range(nbytes):
                acc = 0
                for lane in range(per):
                    d = byte * per + lane
                    if d >= D:
                        break
                    s = scale[b, h, n // gn, d // gd]
                    code = 0
                    if s > 0:
                        t = np.floor((x[b, h, n, d] - zero[b, h, n // gn, d // gd]) / s + half)
                        code = int(min(max(t, 0), levels))
                    acc |= code << (lane * bits)
                packed[b, h, n, byte] = acc

    @numba.njit(inline="always")
    def lanes(dim, bits, group_d):
        """Byte, shift and channel group of each of ``dim`` channels (integer divisions once)."""
        per = 8 // bits
        byte = np.empty(dim, dtype=np.int64)
        shift = np.empty(dim, dtype=np.int64)
        group = np.empty(dim, dtype=np.int64)
        for d in range(dim):
            byte[d], shift[d], group[d] = d // per, (d % per) * bits, d // group_d
        return byte, shift, group

    @numba.njit(inline="always")
    def row_into(buf, codes, scale, zero, b, h, n, group_n, byte, shift, group, mask):
        """Row ``n`` of a quantised tensor, dequantised into ``buf``."""
        i = n // group_n
        for d in range(buf.shape[0]):
            c = buf.dtype.type((codes[b, h, n, byte[d]] >> shift[d]) & mask)
            buf[d] = c * scale[b, h, i, group[d]] + zero[b, h, i, group[d]]

    @numba.njit(parallel=True, cache=True)
    def dequantize_kernel(packed, scale, zero, bits, out):
        B, H, N, D = out.shape
        byte, shift, group = lanes(D, bits, D // scale.shape[3])
        gn = N // scale.shape[2]
        for row in numba.prange(B * H * N):
            b = row // (H * N)
            h = row // N % H
            n = row % N
            row_into(out[b, h, n], packed, scale, zero, b, h, n, gn, byte, shift, group,
                     (1 << bits) - 1)  # fmt: skip

    @numba.njit(parallel=True, cache=True)
    def window_kernel(q, k, idx, n_tokens, kernel, use_max, scale, out):
        B, H, W, D = q.shape
        Hkv, C = k.shape[1], k.shape[2]
        group = H // Hkv
        start = n_tokens - W  # the first window token
        pad = kernel // 2
        for bh in numba.prange(B * H):
            b = bh // H
            h = bh % H
            g = h // group
            votes = np.zeros(C, dtype=q.dtype)
            s = np.empty(C, dtype=q.dtype)
            for i in range(W):
                at = start + i
                m = -np.inf
                for j in range(C):
                    t = idx[b, g, j]
                    if t < 0 or t > at:
                        continue
                    dot = q.dtype.type(0.0)
                    for d in range(D):
                        dot += q[b, h, i, d] * k[b, g, j, d]
                    s[j] = dot * scale
                    m = max(m, s[j])
                if m == -np.inf:
                    continue
                total = q.dtype.type(0.0)
                for j in range(C):
                    t = idx[b, g, j]
                    if 0 <= t <= at:
                        s[j] = np.exp(s[j] - m)
                        total += s[j]
                for j in range(C):
                    t = idx[b, g, j]
                    if 0 <= t <= at:
                        votes[j] += s[j] / total
            for j in range(C):
                t = idx[b, g, j]
                if t < 0 or t >= start:
                    out[b, h, j] = -np.inf
                    continue
                acc = q.dtype.type(0.0) if not use_max else q.dtype.type(-np.inf)
                for u in range(max(j - pad, 0), min(j + pad + 1, C)):
                    tu = idx[b, g, u]
                    if tu < 0 or tu >= start:
                        continue
                    acc = max(acc, votes[u]) if use_max else acc + votes[u]
                out[b, h, j] = acc if use_max else acc / kernel

    @numba.njit(parallel=True, cache=True)
    def mixed_kernel(q, k, v, kc, ks, kz, vc, vs, vz, bits, scale, out, lse):
        B, H, N, D = q.shape
        Hkv, Mf, Dv = k.shape[1], k.shape[2], v.shape[3]
        Mq = kc.shape[2]
        group = H // Hkv
        R = group * N  # query rows reading one KV head
        mask = (1 << bits) - 1
        kbyte, kshift, kgroup = lanes(D, bits, D // ks.shape[3])
        vbyte, vshift, vgroup = lanes(Dv, bits, Dv // vs.shape[3])
        kgn, vgn = Mq // ks.shape[2], Mq // vs.shape[2]
        for bg in numba.prange(B * Hkv):  # each quantised row is dequantised once per KV head
            b = bg // Hkv
            g = bg % Hkv
            s = np.empty((R, Mq + Mf), dtype=q.dtype)
            row = np.empty(max(D, Dv), dtype=q.dtype)
            for j in range(Mq + Mf):
                if j < Mq:
                    row_into(row[:D], kc, ks, kz, b, g, j, kgn, kbyte, kshift, kgroup, mask)
                else:
                    row[:D] = k[b, g, j - Mq]
                for r in range(R):
                    dot = q.dtype.type(0.0)
                    for d in range(D):
                        dot += q[b, g * group + r // N, r % N, d] * row[d]
                    s[r, j] = dot * scale
            m = np.empty(R, dtype=q.dtype)
            total = np.zeros(R, dtype=q.dtype)
            for r in range(R):
                m[r] = s[r].max()
                out[b, g * group + r // N, r % N, :] = 0.0
            for j in range(Mq + Mf):
                if j < Mq:
                    row_into(row[:Dv], vc, vs, vz, b, g, j, vgn, vbyte, vshift, vgroup, mask)
                else:
                    row[:Dv] = v[b, g, j - Mq]
                for r in range(R):
                    w = np.exp(s[r, j] - m[r])
                    total[r] += w
                    o = out[b, g * group + r // N, r % N]
                    for e in range(Dv):
                        o[e] += w * row[e]
            for r in range(R):
                out[b, g * group + r // N, r % N, :] /= total[r]
                lse[b, g * group + r // N, r % N] = m[r] + np.log(total[r])

    return {
        "quantize": quantize_kernel,
        "dequantize": dequantize_kernel,
        "window": window_kernel,
        "mixed": mixed_kernel,
    }


def _kernel(name: str):
    if not _KERNELS:
        _KERNELS.update(_compile())
    return _KERNELS[name]


def quantize(
    x: np.ndarray, *, bits: int, group_n: int, group_d: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``quantize`` on a validated float32/float64 ``x (B, H, N, D)`` with groups of
    ``group_n`` tokens by ``group_d`` channels: ``(packed, scale, zero)`` as the reference."""
    B, H, N, D = x.shape
    t = x.dtype.type
    packed = np.empty((B, H, N, math.ceil(D * bits / 8)), dtype=np.uint8)  # (B, H, N, bytes)
    scale = np.empty((B, H, N // group_n, D // group_d), dtype=x.dtype)  # (B, H, Gn, Gd)
    zero = np.empty_like(scale)
    _kernel("quantize")(
        np.ascontiguousarray(x), group_n, group_d, bits, t((1 << bits) - 1), t(0.5),
        packed, scale, zero,
    )  # fmt: skip
    return packed, scale, zero


def dequantize(
    packed: np.ndarray, scale: np.ndarray, zero: np.ndarray, *, bits: int, dim: int
) -> np.ndarray:
    """``dequantize`` on validated arrays: ``x_hat (B, H, N, dim)`` in ``scale``'s dtype."""
    B, H, N, _ = packed.shape
    out = np.empty((B, H, N, dim), dtype=scale.dtype)  # (B, H, N, D)
    _kernel("dequantize")(
        np.ascontiguousarray(packed), np.ascontiguousarray(scale),
        np.ascontiguousarray(zero, dtype=scale.dtype), bits, out,
    )  # fmt: skip
    return out


def window_scores(
    q: np.ndarray,
    k: np.ndarray,
    indices: np.ndarray,
    *,
    n_tokens: int,
    kernel: int,
    pooling: str,
    scale: float | None,
) -> np.ndarray:
    """``window_scores`` on validated arrays of one dtype: ``(B, H, C)`` in ``q``'s dtype."""
    B, H, W, D = q.shape
    out = np.empty((B, H, k.shape[2]), dtype=q.dtype)  # (B, H, C)
    s = q.dtype.type(D**-0.5 if scale is None else scale)
    _kernel("window")(
        np.ascontiguousarray(q), np.ascontiguousarray(k), np.asarray(indices, dtype=np.int64),
        n_tokens, kernel, pooling == "maxpool", s, out,
    )  # fmt: skip
    return out


def mixed_attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    quantized: tuple[np.ndarray, ...],
    *,
    bits: int,
    scale: float | None,
    return_lse: bool,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """``mixed_attention`` on validated arrays; ``quantized`` holds
    ``(k_codes, k_scale, k_zero, v_codes, v_scale, v_zero)``."""
    B, H, N, D = q.shape
    out = np.empty((B, H, N, v.shape[3]), dtype=q.dtype)  # (B, H, N, Dv)
    lse = np.empty((B, H, N), dtype=q.dtype)  # (B, H, N)
    s = q.dtype.type(D**-0.5 if scale is None else scale)
    arrays = [np.ascontiguousarray(a) for a in (q, k, v, *quantized)]
    _kernel("mixed")(*arrays, bits, s, out, lse)
    return (out, lse) if return_lse else out
