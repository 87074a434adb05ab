r"""Numba kernel of RCMHA's relative-score attention with the depth-wise causal convolutions
fused in (the ``relative_attention`` op; see :mod:`qkv.reference.heads.relative_conv`).

One work item is one ``(batch, query head, tile of BQ query rows)``; ``prange`` spreads the
items over the threads. An item

1. convolves its query rows from the raw queries (the ``K - 1`` rows before the tile are read
   again, never stored), and forms $\text{scale}(\tilde q + u)$ and $\text{scale}\,\tilde q$;
2. walks the visible keys in tiles of ``BK``. For a key tile it convolves the raw keys and
   values of the tile (and the ``K - 1`` rows before it), then forms the content scores with
   one BLAS product, ``BQ x BK``, and the position scores on the fly: the distances of the
   tile's ``(i, j)`` pairs form a band $\delta \in [\delta_{lo}, \delta_{hi}]$ of at most
   ``BQ + BK - 1`` rows of $R$, so one BLAS product $\tilde Q R_{band}^\top$ gives every
   $\tilde q_i \cdot R_\delta$ the tile needs and entry $(i, j)$ reads column
   $\delta_{ij} - \delta_{lo}$ (the relative shift, done by indexing);
3. folds the tile into an online softmax (running maximum, normaliser and unnormalised output,
   as :func:`qkv.reference.core.flash` describes).

Peak extra memory per thread: a ``BQ x BK`` score tile, a ``BQ x (BQ + BK)`` band, the
convolved ``BK`` key and value rows and the ``BQ`` query rows. No ``N x M`` (let alone
``N x M x D``) array exists. Arithmetic is in the input dtype (float32 or float64). A missing
kernel is the 1-tap identity (multiplying by 1 is exact).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from qkv import _outputs
from qkv.backends.numba._attention import FASTMATH, _one_blas_thread, fast_exp

#: Query rows and keys per tile.
BQ, BK = 64, 128


@njit(fastmath=FASTMATH, cache=True)
def _conv_rows(x, base, start, stop, weight, out):
    """``out[t - start] = sum_s weight[:, s] * x[base + t - (K-1) + s]`` for ``t`` in
    ``[start, stop)``, rows before the sequence's first (``base``) counting as 0.

    ``x (rows, C)``, ``weight (C, K)``, ``out (stop - start, C)``.
    """
    C, K = weight.shape
    for t in range(start, stop):
        row = out[t - start]
        row[:] = 0.0
        for s in range(K):
            src = t - (K - 1) + s
            if src >= 0:
                src_row = x[base + src]
                for c in range(C):
                    row[c] += weight[c, s] * src_row[c]


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def forward(q, k, v, r, u, b, wq, wk, wv, scale, B, H, Hkv, N, M, L, bq, bk, out):
    """Fill ``out (B*H*N, Dv)`` with the relative-score attention of the flattened inputs.

    ``q (B*H*N, D)``, ``k (B*Hkv*M, D)``, ``v (B*Hkv*M, Dv)``, ``r (H*L, D)``, ``u (H, D)``,
    ``b (H, Lb)``, kernels ``wq``, ``wk (D, K)``, ``wv (Dv, K)``; all C-contiguous, one dtype.
    """
    D = q.shape[1]
    Dv = v.shape[1]
    G = H // Hkv
    shift = M - N  # query i sits at key position i + shift
    n_tiles = (N + bq - 1) // bq
    dtype = q.dtype.type
    for item in prange(B * H * n_tiles):
        bh = item // n_tiles
        i0 = (item % n_tiles) * bq
        i1 = min(N, i0 + bq)
        n = i1 - i0
        bb = bh // H
        h = bh % H
        k_base = (bb * Hkv + h // G) * M
        qc = np.empty((n, D), dtype=q.dtype)
        _conv_rows(q, bh * N, i0, i1, wq, qc)
        qc *= scale
        qu = qc + scale * u[h]  # (n, D): scale * (q~ + u)
        acc = np.zeros((n, Dv), dtype=q.dtype)
        m_run = np.full(n, -np.inf, dtype=q.dtype)
        l_run = np.zeros(n, dtype=q.dtype)
        stop = i1 - 1 + shift + 1  # keys the tile's last row may see
        for j0 in range(0, stop, bk):
            j1 = min(stop, j0 + bk)
            w = j1 - j0
            kc = np.empty((w, D), dtype=q.dtype)
            vc = np.empty((w, Dv), dtype=q.dtype)
            _conv_rows(k, k_base, j0, j1, wk, kc)
            _conv_rows(v, k_base, j0, j1, wv, vc)
            s = np.empty((n, w), dtype=q.dtype)
            np.dot(qu, kc.T, s)  # content scores
            d_lo = max(i0 + shift - (j1 - 1), 0)
            d_hi = i1 - 1 + shift - j0
            band = np.empty((n, d_hi - d_lo + 1), dtype=q.dtype)
            np.dot(qc, r[h * L + d_lo : h * L + d_hi + 1].T, band)  # scale * q~ . R_delta
            for a in range(n):
                pos = i0 + a + shift
                row = s[a]
                top = m_run[a]
                for c in range(w):
                    d = pos - (j0 + c)
                    if d < 0:
                        row[c] = -np.inf
                    else:
                        row[c] += band[a, d - d_lo] + scale * b[h, d]
                        top = max(top, row[c])
                alpha = fast_exp(m_run[a] - top) if m_run[a] > -np.inf else dtype(0.0)
                total = dtype(0.0)
                for c in range(w):
                    p = fast_exp(row[c] - top)
                    row[c] = p
                    total += p
                l_run[a] = alpha * l_run[a] + total
                m_run[a] = top
                acc[a] *= alpha
            pv = np.empty((n, Dv), dtype=q.dtype)
            np.dot(s, vc, pv)
            acc += pv
        for a in range(n):
            out[bh * N + i0 + a] = acc[a] / l_run[a]


def _rows(x: np.ndarray) -> np.ndarray:
    """``x`` as a C-contiguous matrix of its last axis (copied only if needed)."""
    return np.require(x, requirements=("C", "W")).reshape(-1, x.shape[-1])


def _kernel(weight: np.ndarray | None, channels: int, dtype: np.dtype) -> np.ndarray:
    """The given kernel, C-contiguous, or the 1-tap identity ``(channels, 1)``."""
    if weight is None:
        return np.ones((channels, 1), dtype=dtype)
    return np.require(weight, requirements=("C", "W"))


def relative_attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    r: np.ndarray,
    u: np.ndarray,
    b: np.ndarray,
    *,
    conv_q: np.ndarray | None,
    conv_k: np.ndarray | None,
    conv_v: np.ndarray | None,
    scale: float | None,
) -> np.ndarray:
    """The fused kernel on validated NumPy inputs of one dtype, float32 or float64.

    ``q (B, H, N, D)``, ``k (B, Hkv, M, D)``, ``v (B, Hkv, M, Dv)``, ``r (H, L, D)``,
    ``u (H, D)``, ``b (H, Lb)``; returns ``O (B, H, N, Dv)`` in the input dtype.
    """
    B, H, N, D = q.shape
    Hkv, M, Dv = k.shape[1], k.shape[2], v.shape[3]
    L = r.shape[1]
    dtype = q.dtype
    scale = dtype.type(1.0 / math.sqrt(D) if scale is None else scale)
    out = _outputs.empty((B, H, N, Dv), like=q)
    with _one_blas_thread():
        forward(
            _rows(q), _rows(k), _rows(v), _rows(r), _rows(u), _rows(b),
            _kernel(conv_q, D, dtype), _kernel(conv_k, D, dtype), _kernel(conv_v, Dv, dtype),
            scale, B, H, Hkv, N, M, L, min(BQ, N), BK, out.reshape(B * H * N, Dv),
        )  # fmt: skip
    return out
