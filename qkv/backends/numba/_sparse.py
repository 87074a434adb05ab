r"""Numba ``sparse_attention``: one fused gather-and-attend pass per query row.

For row $(b, h, i)$ with slots $t = 0 \dots S-1$ holding key indices $j_t$ ($-1$ = empty), the
kernel reads only the selected rows of the KV head $g(h) = h // (H / H_{kv})$:

$$
s_t = \text{scale}\cdot q_{h,i}\cdot k_{g(h),j_t},\quad m = \max_t s_t,\quad
\ell = \sum_t e^{s_t - m},\quad o = \frac{1}{\ell}\sum_t e^{s_t - m}\, v_{g(h),j_t},\quad
\mathrm{lse} = m + \log \ell .
$$

The scores of a row are kept in an ``S``-long scratch (two passes: scores and maximum, then
weights and the weighted sum), so no ``K`` or ``V`` copy is gathered and nothing of size ``M``
is touched. Rows are spread over threads (``prange`` over ``B * H * N``). A row whose slots are
all empty gives zeros and ``lse = -inf``; an index present twice is counted twice, as in the
reference. Computes in the input dtype (float32 or float64).
"""

from __future__ import annotations

import math

import numpy as np

_KERNEL = None


def _compile():
    """The ``@njit(parallel=True)`` row kernel (numba imported on first use)."""
    import numba

    @numba.njit(parallel=True, cache=True)
    def kernel(q, k, v, idx, scale, out, lse):
        B, H, N, D = q.shape
        Hkv, Dv = k.shape[1], v.shape[3]
        S = idx.shape[3]
        group = H // Hkv
        for row in numba.prange(B * H * N):
            b = row // (H * N)
            h = row // N % H
            i = row % N
            g = h // group
            s = np.empty(S, dtype=q.dtype)  # the row's scores
            m = -np.inf
            for t in range(S):
                j = idx[b, h, i, t]
                if j < 0:
                    continue
                dot = q.dtype.type(0.0)
                for d in range(D):
                    dot += q[b, h, i, d] * k[b, g, j, d]
                s[t] = dot * scale
                if s[t] > m:
                    m = s[t]
            for e in range(Dv):
                out[b, h, i, e] = 0.0
            if m == -np.inf:  # no selected key
                lse[b, h, i] = -np.inf
                continue
            total = q.dtype.type(0.0)
            for t in range(S):
                j = idx[b, h, i, t]
                if j < 0:
                    continue
                w = np.exp(s[t] - m)
                total += w
                for e in range(Dv):
                    out[b, h, i, e] += w * v[b, g, j, e]
            for e in range(Dv):
                out[b, h, i, e] /= total
            lse[b, h, i] = m + np.log(total)

    return kernel


def sparse_attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    indices: np.ndarray,
    *,
    scale: float | None,
    return_lse: bool,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """``sparse_attention`` on validated NumPy inputs of one dtype (float32 or float64).

    ``q (B, H, N, D)``, ``k (B, Hkv, M, D)``, ``v (B, Hkv, M, Dv)``, integer ``indices``
    ``(B, H, S)`` or ``(B, H, N, S)``. Returns ``O (B, H, N, Dv)`` in the input dtype and, with
    ``return_lse``, ``lse (B, H, N)`` in the same dtype.
    """
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = _compile()
    B, H, N, D = q.shape
    dtype = q.dtype
    idx = np.asarray(indices, dtype=np.int64)
    if idx.ndim == 3:
        idx = np.broadcast_to(idx[:, :, None], (B, H, N, idx.shape[-1]))  # (B, H, N, S)
    out = np.empty((B, H, N, v.shape[3]), dtype=dtype)  # (B, H, N, Dv)
    lse = np.empty((B, H, N), dtype=dtype)  # (B, H, N)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    _KERNEL(
        np.ascontiguousarray(q),
        np.ascontiguousarray(k, dtype=dtype),
        np.ascontiguousarray(v, dtype=dtype),
        idx,
        dtype.type(scale),
        out,
        lse,
    )
    return (out, lse) if return_lse else out
