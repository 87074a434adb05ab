r"""Numba kernel for exact tensor (Kronecker) attention: a streaming online softmax.

Tensor attention (Alman and Song, arXiv 2310.04064) scores query $a$ against every pair
$(i, j)$ of a first and a second key, $S_{a,ij} = \text{scale}\sum_l Q_{al} K_{1,il} K_{2,jl}$,
and returns $o_a = \sum_{ij} \operatorname{softmax}_{ij}(S_a)\, V_1[i] \circ V_2[j]$ (see
:mod:`qkv.reference.forms.tensor_attention`). No $N \times M^2$ array is made.

As for softmax attention (:mod:`qkv.backends.numba._attention`), the queries of one KV head are
stacked into ``R = G * N`` rows and cut into tiles of ``bq`` rows; one work item is one
``(batch, KV head, row tile)`` and ``prange`` deals the items to one worker per thread. A tile
walks the first keys $i$ in blocks of ``bi``. For a block it builds the ``bq * bi`` rows
$Q_a \circ K_1[i]$ (row ``r * bi + ii`` for query ``r`` and first key ``i0 + ii``), so that all
their scores against the second keys are one BLAS product
$S = (Q \circ K_1)\, K_2^\top$ of shape ``(bq * bi, M)``. Row ``r``'s ``bi * M`` scores are then
contiguous and go through the online softmax (running max $m$, normaliser $\ell$, unnormalised
output $\tilde O$):

$$
m' = \max(m, \max S_r),\quad \alpha = e^{m - m'},\quad P_r = e^{S_r - m'},\quad
\ell' = \alpha\ell + \textstyle\sum P_r,\quad
\tilde O'_r = \alpha \tilde O_r + \sum_{ii} V_1[i_0 + ii] \circ (P V_2)_{r \cdot bi + ii},
$$

with $P V_2$ a second BLAS product ``(bq * bi, M) @ (M, Dv)``. At the end $O = \tilde O / \ell$.
Time $O(N M^2 (D + D_v))$; extra memory per thread one ``(bq * bi) x M`` score tile and
``O(bq * bi * (D + Dv))`` buffers, that is $O(M + D)$ for fixed tiles: $O(n d)$ in all.
The $N M^2$ exponentials cost as much as the two products, so they are computed in a form LLVM
vectorises, in float32 (:func:`qkv.backends.numba._attention.fast_exp`) and in float64
(:func:`_exp_f64`; ``math.exp`` took half the float64 time).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from qkv import _outputs
from qkv.backends.numba._attention import (
    FASTMATH,
    _one_blas_thread,
    _rows,
    fast_exp,
    num_threads,
    row_max,
)

#: Row tile (queries) and first-key block: ``BQ * BI`` rows make each BLAS product large
#: enough to run near its peak at ``D = 32`` (measured on 2 cores, ``N = M = 256``).
BQ, BI = 32, 8


#: Taylor coefficients $1/k!$ of $e^f$ to degree 13: float64 accuracy on $|f| \le \ln 2 / 2$.
_EXP_COEF_F64 = tuple(1.0 / math.factorial(k) for k in range(14))
#: $\ln 2$ split for Cody and Waite's range reduction in float64 (fdlibm's constants: the head
#: has trailing zero bits, so $n \ln 2_{hi}$ is exact for $|n| \le 2048$).
_LN2_HI_F64 = 6.93147180369123816490e-01
_LN2_LO_F64 = 1.90821492927058770002e-10


@njit(fastmath={"contract", "nsz"}, cache=True)  # no reassociation: it would undo the split
def _exp_f64(y: float) -> float:
    r"""$e^y$ in float64 for $y \le 0$ (and NaN), written so that LLVM can vectorise it.

    $e^y = 2^n e^f$ with $n$ the integer nearest to $y / \ln 2$ and $f = y - n \ln 2$ (in two
    steps, exact); $e^f$ by its Taylor polynomial of degree 13 (truncation below $10^{-17}$
    relative), $2^n$ by writing the exponent bits. Results below $2^{-1022}$ flush to 0 (so
    $e^{-\infty} = 0$; every use adds them to a sum holding a 1); a NaN stays NaN.
    """
    t = y * 1.4426950408889634
    normal = t >= -1022.0
    n = np.floor(t + 0.5) if normal else 0.0
    f = (y - n * _LN2_HI_F64) - n * _LN2_LO_F64
    c = _EXP_COEF_F64
    p = c[13]
    p = p * f + c[12]
    p = p * f + c[11]
    p = p * f + c[10]
    p = p * f + c[9]
    p = p * f + c[8]
    p = p * f + c[7]
    p = p * f + c[6]
    p = p * f + c[5]
    p = p * f + c[4]
    p = p * f + c[3]
    p = p * f + c[2]
    p = p * f + c[1]
    p = p * f + c[0]
    two_n = np.int64((np.int64(n) + np.int64(1023)) << np.int64(52)).view(np.float64)
    return 0.0 if t < -1022.0 else p * two_n


def exp_nonpositive(y: float) -> float:
    r"""$e^y$ for $y \le 0$; compiled code picks a vectorisable form per dtype (see overload)."""
    return math.exp(y)


@overload(exp_nonpositive, jit_options={"fastmath": FASTMATH})
def _exp_nonpositive_overload(y):
    if isinstance(y, types.Float) and y.bitwidth == 32:
        return lambda y: fast_exp(y)
    return lambda y: _exp_f64(y)


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def forward(q, k1, k2, v1, v2, scale, M, bq, bi, workers, out):
    """Online-softmax tensor attention over all ``(batch, KV head, row tile)`` items.

    Args:
        q: queries ``(B*H*N, D)``, C-contiguous rows of ``(B, H, N, D)``.
        k1, k2: keys ``(B*Hkv*M, D)``; v1, v2: values ``(B*Hkv*M, Dv)``.
        scale: multiplies the scores (applied to the queries).
        M: keys per head in each set.
        bq, bi: row tile and first-key block sizes.
        workers: parallel workers (one per thread), each with its own buffers.
        out: ``(B*H*N, Dv)``, every row written.
    """
    D, Dv = q.shape[1], v1.shape[1]
    BHkv = k1.shape[0] // M
    R = q.shape[0] // BHkv  # stacked rows per KV head: G * N
    ntile = (R + bq - 1) // bq
    items = BHkv * ntile
    zero = q.dtype.type(0.0)
    for w in prange(workers):
        q_buf = np.empty((bq, D), q.dtype)
        qk_buf = np.empty((bq * bi, D), q.dtype)
        s_buf = np.empty(bq * bi * M, q.dtype)
        pv_buf = np.empty((bq * bi, Dv), q.dtype)
        acc = np.empty((bq, Dv), q.dtype)
        m_run = np.empty(bq, q.dtype)
        l_run = np.empty(bq, q.dtype)
        alpha = np.empty(bq, q.dtype)
        for item in range(w, items, workers):
            g = item // ntile
            r0 = (item % ntile) * bq
            n = min(r0 + bq, R) - r0
            for r in range(n):
                for d in range(D):
                    q_buf[r, d] = q[g * R + r0 + r, d] * scale
            acc[:n] = zero
            m_run[:n] = -np.inf
            l_run[:n] = zero
            k2g = k2[g * M : (g + 1) * M]  # (M, D)
            v2g = v2[g * M : (g + 1) * M]  # (M, Dv)
            for i0 in range(0, M, bi):
                b = min(bi, M - i0)
                for r in range(n):  # rows Q[r] ∘ K1[i0 + ii], row r * b + ii
                    for ii in range(b):
                        key = k1[g * M + i0 + ii]
                        for d in range(D):
                            qk_buf[r * b + ii, d] = q_buf[r, d] * key[d]
                s = s_buf[: n * b * M].reshape(n * b, M)
                np.dot(qk_buf[: n * b], k2g.T, s)  # (n * b, M) scores
                for r in range(n):
                    srow = s_buf[r * b * M : (r + 1) * b * M]  # the b * M scores of query r
                    m_new = row_max(srow, m_run[r])
                    total = zero
                    for c in range(srow.shape[0]):
                        p = exp_nonpositive(srow[c] - m_new)
                        srow[c] = p
                        total += p
                    alpha[r] = exp_nonpositive(m_run[r] - m_new)
                    l_run[r] = alpha[r] * l_run[r] + total
                    m_run[r] = m_new
                pv = pv_buf[: n * b]
                np.dot(s, v2g, pv)  # (n * b, Dv): P V2 for each (query, first key)
                for r in range(n):
                    for d in range(Dv):
                        acc[r, d] *= alpha[r]
                    for ii in range(b):
                        value = v1[g * M + i0 + ii]
                        for d in range(Dv):
                            acc[r, d] += value[d] * pv[r * b + ii, d]  # V1[i] ∘ (P V2)
            for r in range(n):
                inv = q.dtype.type(1.0) / l_run[r]
                for d in range(Dv):
                    out[g * R + r0 + r, d] = acc[r, d] * inv


def tensor(
    q: np.ndarray,
    k1: np.ndarray,
    k2: np.ndarray,
    v1: np.ndarray,
    v2: np.ndarray,
    *,
    scale: float = 1.0,
) -> np.ndarray:
    """Exact tensor attention on validated NumPy inputs, with the result of ``qkv.tensor``.

    ``q (B, H, N, D)``; ``k1``, ``k2 (B, Hkv, M, D)``; ``v1``, ``v2 (B, Hkv, M, Dv)``; one
    dtype, float32 or float64 (computed in that dtype). Returns ``O (B, H, N, Dv)``.
    """
    dtype = q.dtype
    B, H, N, _ = q.shape
    Hkv, M, Dv = k1.shape[1], k1.shape[2], v1.shape[3]
    rows = B * H * N
    q2 = _rows(q)  # (B*H*N, D)
    k1r, k2r = _rows(k1), _rows(k2)  # (B*Hkv*M, D)
    v1r, v2r = _rows(v1), _rows(v2)  # (B*Hkv*M, Dv)
    out = _outputs.empty((B, H, N, Dv), like=q)
    R = rows // (B * Hkv)  # stacked query rows per KV head
    bq, bi = min(BQ, R), min(BI, M)
    items = B * Hkv * -(-R // bq)  # (batch, KV head, row tile) work items
    with _one_blas_thread():
        forward(
            q2,
            k1r,
            k2r,
            v1r,
            v2r,
            dtype.type(scale),
            M,
            bq,
            bi,
            min(num_threads(), items),
            out.reshape(rows, Dv),
        )
    return out
