r"""Numba kernels for softmax attention: a parallel, tiled online softmax.

The queries of one KV head are stacked into a matrix of ``R = G * N`` rows (the ``G = H / Hkv``
query heads that read it, each with ``N`` rows; ``q`` laid out ``(B, H, N, D)`` makes that block
contiguous). The kernel cuts it into tiles of ``bq`` rows and each tile walks the keys in tiles
of ``bk``. One work item is one ``(batch, KV head, row tile, key split)``; ``prange`` spreads the
items over the threads.

For one row tile, with scores $S_j = \text{scale}\cdot Q K_j^\top + B_j$ of key tile $j$
(``bq x bk``, $-\infty$ where masked), the online softmax keeps a running maximum $m$, a running
normaliser $\ell$ and an unnormalised output $\tilde O$ (``bq x Dv``):

$$
m' = \max\big(m, \operatorname{rowmax} S_j\big),\quad \alpha = e^{m - m'},\quad
P_j = e^{S_j - m'},\quad \ell' = \alpha\,\ell + \operatorname{rowsum} P_j,\quad
\tilde O' = \alpha\,\tilde O + P_j V_j ,
$$

and at the end $O = \tilde O / \ell$, $\mathrm{lse} = m + \log \ell$. A row that has seen only
masked keys has $m = -\infty$; it is shifted by 0 instead, so that $e^{-\infty} = 0$ and the row
ends with $\ell = 0$, output 0 and $\mathrm{lse} = -\infty$.

The two tile products $(\text{scale}\cdot Q) K_j^\top$ and $P_j V_j$ go to BLAS (``np.dot``
inside the compiled code, one BLAS thread per Numba thread); the softmax step between them is a
compiled loop that LLVM vectorises (the row maximum through integer comparisons, the exponential
as a polynomial in float32). Peak extra memory is one ``bq x bk`` score tile and a few
``bq x D`` buffers per thread: no ``N x M`` array exists unless the caller asks for the weights.
Each thread is one worker with its own buffers; work items are dealt round-robin to the workers,
the costliest first (under ``causal`` the last row tiles see the most keys).

When there are fewer work items than threads (decoding: ``N = 1``), the keys are split as well
and the partial results of the splits $s$ are merged by their log-sum-exp:
$m = \max_s m_s$, $\ell = \sum_s e^{m_s - m}\ell_s$, $\tilde O = \sum_s e^{m_s - m}\tilde O_s$.

The same kernels compute sigmoid attention (:class:`Form` with ``sigmoid=True``, see
:mod:`qkv.backends.numba._sigmoid`): the softmax step becomes $P_j = \sigma(S_j + b)$ and the
tiles' $P_j V_j$ are simply summed ($m = 0$ and $\ell = 1$ throughout; split parts are added).
The scores may also carry ALiBi biases $-m_h |i + M - N - j|$, computed in the tile.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from qkv import _outputs

#: LLVM fast-math flags that keep IEEE infinities and NaN: reassociation (vectorised sums),
#: fused multiply-add, reciprocal and sign-of-zero freedom. ``nnan``/``ninf`` are left out on
#: purpose: masked scores are ``-inf`` and NaN must propagate as the reference documents.
FASTMATH = {"nsz", "contract", "reassoc", "arcp"}

#: Taylor coefficients $1/k!$ of $e^f$, enough for float32 on $|f| \le \ln 2 / 2$.
_EXP_COEF = tuple(1.0 / math.factorial(k) for k in range(8))
#: $\ln 2$ split into a head with 16 significant bits (so that $n \ln 2_{hi}$ is exact in float32
#: for $|n| \le 256$) and the rest (Cody and Waite's range reduction).
_LN2_HI = round(math.log(2.0) * 2**16) / 2**16
_LN2_LO = math.log(2.0) - _LN2_HI


def fast_exp(y: float) -> float:
    """$e^y$; compiled code picks a vectorisable float32 form or ``math.exp`` (see overload)."""
    return math.exp(y)


@njit(fastmath={"contract", "nsz"}, cache=True)  # no reassociation: it would undo the split
def _exp_f32(y: np.float32) -> np.float32:
    r"""$e^y$ in float32 for $y \le 0$ (and NaN), written so that LLVM can vectorise it.

    $e^y = 2^n e^f$ with $n$ the integer nearest to $y / \ln 2$ and $f = y - n \ln 2$
    ($|f| \lesssim \ln 2 / 2$, computed in two steps to stay exact); $e^f$ by its Taylor
    polynomial of degree 7 and $2^n$ by writing the exponent bits: within one float32 ulp of
    $e^y$ (measured on $[-80, 0]$). Results below $2^{-126}$ flush to 0, so $e^{-\infty} = 0$; a NaN stays NaN.
    """
    t = y * np.float32(1.4426950408889634)
    normal = t >= np.float32(-126.0)
    n = np.floor(t + np.float32(0.5)) if normal else np.float32(0.0)
    f = (y - n * np.float32(_LN2_HI)) - n * np.float32(_LN2_LO)
    c = _EXP_COEF
    p = np.float32(c[7])
    p = p * f + np.float32(c[6])
    p = p * f + np.float32(c[5])
    p = p * f + np.float32(c[4])
    p = p * f + np.float32(c[3])
    p = p * f + np.float32(c[2])
    p = p * f + np.float32(c[1])
    p = p * f + np.float32(c[0])
    two_n = np.int32((np.int32(n) + np.int32(127)) << np.int32(23)).view(np.float32)
    return np.float32(0.0) if t < np.float32(-126.0) else p * two_n


@overload(fast_exp, jit_options={"fastmath": FASTMATH})
def _fast_exp_overload(y):
    if isinstance(y, types.Float) and y.bitwidth == 32:
        return lambda y: _exp_f32(y)
    return lambda y: math.exp(y)


def row_max(row: np.ndarray, start: float) -> float:
    """``max(start, max(row))``; compiled code uses the vectorisable forms below (see overload)."""
    return max(start, float(np.max(row)))


def _ordered_max(bits_dtype: type, sign_shift: int) -> Any:
    """A compiled ``row_max`` that compares floats through their bits as integers.

    Flipping the magnitude bits of negative floats, ``b ^ ((b >> sign_shift) & ~sign_bit)``,
    gives integers ordered as the floats are (``-inf < ... < -0 < 0 < ... < inf``), and an
    integer maximum vectorises where a float maximum with IEEE semantics does not. A positive
    NaN orders above ``inf`` and a negative one below ``-inf``; either way the row's softmax
    turns NaN, since every score, NaN included, goes through ``exp(s - max)``.
    """
    int_t = bits_dtype
    float_t = np.float32 if bits_dtype is np.int32 else np.float64
    lowest = np.iinfo(bits_dtype).min
    magnitude = np.iinfo(bits_dtype).max

    @njit(fastmath=FASTMATH, cache=True)
    def ordered_max(row, start):
        bits = row.view(int_t)
        top = int_t(lowest)
        for c in range(bits.shape[0]):
            b = bits[c]
            key = b ^ ((b >> sign_shift) & magnitude)
            top = key if key > top else top
        found = int_t(top ^ ((top >> sign_shift) & magnitude)).view(float_t)
        return found if found > start else start

    return ordered_max


_row_max_f32 = _ordered_max(np.int32, 31)
_row_max_f64 = _ordered_max(np.int64, 63)


@overload(row_max, jit_options={"fastmath": FASTMATH})
def _row_max_overload(row, start):
    if row.dtype == types.float32:
        return lambda row, start: _row_max_f32(row, start)
    return lambda row, start: _row_max_f64(row, start)


@njit(fastmath=FASTMATH, cache=True)
def _score_tile(s, mask, has_mask, slopes, has_alibi, causal, g, Hkv, G, N, M, r0, j0):
    """Add the mask, ALiBi and the causal pattern to the scaled products ``s`` of one tile,
    in place.

    ``s (n, m)`` holds ``(scale * Q) K^T``. Row ``r`` of the tile is stacked row ``r0 + r`` of
    KV head ``g`` (batch ``g // Hkv``): query head ``(g % Hkv) * G + (r0 + r) // N``, query
    ``i = (r0 + r) % N``. Column ``c`` is key ``j0 + c``. A ``-inf`` mask entry gives ``-inf``
    outright (a NaN product stays shielded), and so does a key above the causal diagonal,
    ``j > i + M - N``. ``mask`` is 4-D with each axis of size 1 (broadcast) or full. With
    ``has_alibi``, ``-slopes[h] * |i + M - N - j|`` is added (``slopes (H,)``).
    """
    n, m = s.shape
    b = g // Hkv
    h0 = (g % Hkv) * G
    sb, sh, sn, sm = mask.shape
    for r in range(n):
        row = r0 + r
        srow = s[r]
        if has_alibi:
            slope = slopes[h0 + row // N]
            here = row % N + M - N - j0  # query position minus the tile's first key
            for c in range(m):
                srow[c] -= slope * abs(here - c)
        if has_mask:
            add = mask[b if sb > 1 else 0, h0 + row // N if sh > 1 else 0, row % N if sn > 1 else 0]
            for c in range(m):
                a = add[j0 + c if sm > 1 else 0]
                x = srow[c] + a
                srow[c] = -np.inf if a == -np.inf else x
        if causal:
            for c in range(max(row % N + M - N - j0 + 1, 0), m):
                srow[c] = -np.inf


@njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def _logistic_row(row, bias):
    r"""``row[c] = sigmoid(row[c] + bias)`` in place, as $z/(1+z)$ or $1/(1+z)$ with
    $z = e^{-|x|} \le 1$: no overflow, $\sigma(-\infty) = 0$ exactly, NaN stays NaN.

    ``error_model="numpy"`` drops Python's zero-division check (the denominator is at least 1
    anyway), without which the division keeps LLVM from vectorising the loop (10x slower).
    """
    one = row.dtype.type(1.0)
    for c in range(row.shape[0]):
        x = row[c] + bias
        z = fast_exp(-abs(x))
        row[c] = (one if x >= 0 else z) / (one + z)


@njit(fastmath=FASTMATH, cache=True)
def _scaled_rows(q, start, stop, scale, buf):
    """``scale * q[start:stop]`` written into ``buf``; returns that ``(stop - start, D)`` view."""
    n = stop - start
    for r in range(n):
        for d in range(q.shape[1]):
            buf[r, d] = q[start + r, d] * scale
    return buf[:n]


@njit(fastmath=FASTMATH, cache=True)
def _work_item(item, BHkv, ntile, nsplit):
    """``(KV head g, row tile, key split)`` of the ``item``-th work item.

    The last row tiles, the costliest under ``causal``, come first, so that handing items out
    round-robin (worker ``w`` takes items ``w, w + W, ...``) gives every worker an equal share.
    """
    split = item % nsplit
    g = item // nsplit % BHkv
    tile = ntile - 1 - item // nsplit // BHkv
    return g, tile, split


@njit(fastmath=FASTMATH, cache=True)
def _visible_keys(causal, r0, r1, N, M):
    """Keys ``[0, limit)`` that some row of the stacked rows ``[r0, r1)`` may attend."""
    if not causal:
        return M
    last_i = N - 1 if r0 // N != (r1 - 1) // N else (r1 - 1) % N
    return max(min(M, last_i + 1 + M - N), 0)


@njit(fastmath=FASTMATH, cache=True)
def _finish_row(acc_row, l, causal, i, N, M, bad_v, out_row):
    """``out_row = acc_row / l`` (``l = 0``: a fully masked row, left at 0 by dividing by 1).

    With ``causal``, a row's weight on keys ``j > i + M - N`` is 0 and ``0 * v_j`` is NaN where
    ``v_j`` is not finite: ``bad_v[d]`` (the last key with a non-finite ``v[:, d]``) says where
    such a NaN, which the skipped key tiles did not compute, reaches the output.
    """
    one = acc_row.dtype.type(1.0)
    inv = one / l if l > 0 else one
    limit = i + M - N
    for d in range(out_row.shape[0]):
        o = acc_row[d] * inv
        out_row[d] = np.nan if causal and bad_v[d] >= 0 and bad_v[d] > limit else o


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def forward(
    q,
    k,
    v,
    mask,
    has_mask,
    slopes,
    has_alibi,
    causal,
    scale,
    sigmoid,
    bias,
    Hkv,
    N,
    M,
    bq,
    bk,
    bad_v,
    workers,
    out,
    m_out,
    l_out,
):
    r"""Attention forward over all ``(batch, KV head, row tile, key split)``: the online
    softmax, or with ``sigmoid`` the unnormalised $\sum_j \sigma(s_{ij} + b) v_j$.

    Args:
        q: queries ``(B*H*N, D)``, C-contiguous (rows of ``(B, H, N, D)``).
        k: keys ``(B*Hkv*M, D)``; v: values ``(B*Hkv*M, Dv)``.
        mask: additive mask ``(b, h, n, m)``, each size 1 or full (broadcast against
            ``(B, H, N, M)``), read only when ``has_mask``; ``-inf`` masks.
        slopes, has_alibi: ALiBi slopes ``(H,)``, added only when ``has_alibi``.
        causal: bottom-right causal alignment, key ``j`` visible to query ``i`` iff
            ``j <= i + M - N``; key tiles wholly above the diagonal are skipped.
        scale: multiplies ``Q`` (so that ``Q K^T`` comes out scaled).
        sigmoid, bias: sigmoid attention with the scalar bias ``bias`` instead of the softmax;
            each tile's weights are then simply summed ($m = 0$, $\ell = 1$ throughout).
        Hkv, N, M: KV heads, queries and keys per head; ``G = H / Hkv`` is read from the shapes.
        bq, bk: row and key tile sizes.
        bad_v: ``(B*Hkv, Dv)`` last key with a non-finite value per column, -1 if none
            (used with ``causal`` only, see ``_finish_row``).
        workers: parallel workers (one per thread), each with its own tile buffers.
        out: ``(S, B*H*N, Dv)``. With one split (``S = 1``) the normalised output; with several,
            each split's unnormalised $\tilde O$ for :func:`combine` (:func:`sum_parts` for
            ``sigmoid``).
        m_out, l_out: ``(S, B*H*N)`` running max and normaliser of each split.
    """
    nsplit = out.shape[0]
    D, Dv = q.shape[1], v.shape[1]
    BHkv = k.shape[0] // M
    R = q.shape[0] // BHkv  # stacked rows per KV head: G * N
    G = R // N
    ntile = (R + bq - 1) // bq
    items = BHkv * ntile * nsplit
    split_keys = (((M + bk - 1) // bk + nsplit - 1) // nsplit) * bk
    zero, one = q.dtype.type(0.0), q.dtype.type(1.0)
    for w in prange(workers):
        q_buf = np.empty((bq, D), q.dtype)
        s_buf = np.empty(bq * bk, q.dtype)
        pv_buf = np.empty((bq, Dv), q.dtype)
        acc = np.empty((bq, Dv), q.dtype)
        m_run = np.empty(bq, q.dtype)
        l_run = np.empty(bq, q.dtype)
        alpha = np.empty(bq, q.dtype)
        for item in range(w, items, workers):
            g, tile, split = _work_item(item, BHkv, ntile, nsplit)
            r0 = tile * bq
            r1 = min(r0 + bq, R)
            n = r1 - r0
            q_tile = _scaled_rows(q, g * R + r0, g * R + r1, scale, q_buf)  # (n, D)
            pv = pv_buf[:n]  # (n, Dv)
            acc[:n] = zero
            m_run[:n] = zero if sigmoid else -np.inf
            l_run[:n] = one if sigmoid else zero
            key_end = min(_visible_keys(causal, r0, r1, N, M), (split + 1) * split_keys)
            for j0 in range(split * split_keys, key_end, bk):
                j1 = min(j0 + bk, M)
                s = s_buf[: n * (j1 - j0)].reshape(n, j1 - j0)  # (n, m) scores
                np.dot(q_tile, k[g * M + j0 : g * M + j1].T, s)
                if has_mask or has_alibi or causal:
                    _score_tile(
                        s, mask, has_mask, slopes, has_alibi, causal, g, Hkv, G, N, M, r0, j0
                    )
                if sigmoid:
                    for r in range(n):
                        _logistic_row(s[r], bias)
                    np.dot(s, v[g * M + j0 : g * M + j1], pv)
                    for r in range(n):
                        for d in range(Dv):
                            acc[r, d] += pv[r, d]
                    continue
                for r in range(n):
                    srow = s[r]
                    m_new = row_max(srow, m_run[r])
                    shift = m_new if m_new != -np.inf else zero
                    total = zero
                    for c in range(srow.shape[0]):
                        p = fast_exp(srow[c] - shift)
                        srow[c] = p
                        total += p
                    alpha[r] = fast_exp(m_run[r] - shift)
                    l_run[r] = alpha[r] * l_run[r] + total
                    m_run[r] = m_new
                np.dot(s, v[g * M + j0 : g * M + j1], pv)
                for r in range(n):
                    for d in range(Dv):
                        acc[r, d] = alpha[r] * acc[r, d] + pv[r, d]
            for r in range(n):
                row = g * R + r0 + r
                m_out[split, row] = m_run[r]
                l_out[split, row] = l_run[r]
                if nsplit == 1:
                    i = (r0 + r) % N
                    _finish_row(acc[r], l_run[r], causal, i, N, M, bad_v[g], out[0, row])
                else:
                    out[split, row] = acc[r]


@njit(fastmath=FASTMATH, cache=True)
def combine(parts, m_parts, l_parts, causal, N, M, bad_v, out, m_out, l_out):
    r"""Merge key splits: $m = \max_s m_s$, $w_s = e^{m_s - m}$, $\ell = \sum_s w_s \ell_s$,
    $O = \sum_s w_s \tilde O_s / \ell$.

    ``parts (S, rows, Dv)``, ``m_parts``/``l_parts (S, rows)``; writes ``out (rows, Dv)`` and
    the merged ``m_out``/``l_out (rows,)``.
    """
    nsplit, rows, Dv = parts.shape
    R = rows // bad_v.shape[0]
    zero = parts.dtype.type(0.0)
    for row in range(rows):
        m = m_parts[0, row]
        for s in range(1, nsplit):
            if m_parts[s, row] > m:
                m = m_parts[s, row]
        shift = m if m != -np.inf else zero
        acc = np.zeros(Dv, parts.dtype)
        l = zero
        for s in range(nsplit):
            w = fast_exp(m_parts[s, row] - shift)
            l += w * l_parts[s, row]
            for d in range(Dv):
                acc[d] += w * parts[s, row, d]
        m_out[row] = m
        l_out[row] = l
        _finish_row(acc, l, causal, row % R % N, N, M, bad_v[row // R], out[row])


@njit(fastmath=FASTMATH, cache=True)
def sum_parts(parts, causal, N, M, bad_v, out):
    r"""Merge the key splits of sigmoid attention: $O = \sum_s \tilde O_s$ (no normaliser).

    ``parts (S, rows, Dv)``; writes ``out (rows, Dv)``.
    """
    nsplit, rows, Dv = parts.shape
    R = rows // bad_v.shape[0]
    one = parts.dtype.type(1.0)
    for row in range(rows):
        acc = np.zeros(Dv, parts.dtype)
        for s in range(nsplit):
            for d in range(Dv):
                acc[d] += parts[s, row, d]
        _finish_row(acc, one, causal, row % R % N, N, M, bad_v[row // R], out[row])


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def weights(
    q,
    k,
    mask,
    has_mask,
    slopes,
    has_alibi,
    causal,
    scale,
    sigmoid,
    bias,
    Hkv,
    N,
    M,
    bq,
    bk,
    m_rows,
    l_rows,
    workers,
    out,
):
    r"""The attention weights $P = e^{S - m} / \ell$, tile by tile, from the forward's $m, \ell$
    (with ``sigmoid``: $P = \sigma(S + b)$, where $m, \ell$ play no part).

    ``q (B*H*N, D)``, ``k (B*Hkv*M, D)``, ``m_rows``/``l_rows (B*H*N,)``; writes
    ``out (B*H*N, M)``. A fully masked row ($\ell = 0$) gets zeros; a row whose normaliser is
    NaN (a NaN score) gets NaN throughout, as the reference's division does.
    """
    BHkv = k.shape[0] // M
    R = q.shape[0] // BHkv
    G = R // N
    ntile = (R + bq - 1) // bq
    zero, one, nan = q.dtype.type(0.0), q.dtype.type(1.0), q.dtype.type(np.nan)
    for w in prange(workers):
        q_buf = np.empty((bq, q.shape[1]), q.dtype)
        s_buf = np.empty(bq * bk, q.dtype)
        for item in range(w, BHkv * ntile, workers):
            g, tile, _ = _work_item(item, BHkv, ntile, 1)
            r0 = tile * bq
            r1 = min(r0 + bq, R)
            n = r1 - r0
            q_tile = _scaled_rows(q, g * R + r0, g * R + r1, scale, q_buf)  # (n, D)
            key_end = _visible_keys(causal, r0, r1, N, M)
            for j0 in range(0, M, bk):
                j1 = min(j0 + bk, M)
                s = s_buf[: n * (j1 - j0)].reshape(n, j1 - j0)
                if j0 < key_end:
                    np.dot(q_tile, k[g * M + j0 : g * M + j1].T, s)
                    _score_tile(
                        s, mask, has_mask, slopes, has_alibi, causal, g, Hkv, G, N, M, r0, j0
                    )
                for r in range(n):
                    row = g * R + r0 + r
                    m = m_rows[row]
                    l = l_rows[row]
                    shift = m if m != -np.inf else zero
                    inv = one / l if l > 0 else (one if l == 0 else nan)
                    dest = out[row, j0:j1]
                    if sigmoid:
                        if j0 < key_end:
                            dest[:] = s[r]
                            _logistic_row(dest, bias)
                        else:
                            dest[:] = zero
                    elif j0 < key_end:
                        for c in range(j1 - j0):
                            dest[c] = fast_exp(s[r, c] - shift) * inv
                    else:
                        for c in range(j1 - j0):
                            dest[c] = zero * inv


@njit(cache=True)
def last_nonfinite(v, M, first):
    """``(B*Hkv, Dv)`` index of the last key ``j >= first`` whose value is not finite, per
    column (-1: none). ``v (B*Hkv*M, Dv)``.
    """
    BHkv = v.shape[0] // M
    Dv = v.shape[1]
    found = np.full((BHkv, Dv), -1, np.int64)
    for g in range(BHkv):
        for j in range(first, M):
            for d in range(Dv):
                if not np.isfinite(v[g * M + j, d]):
                    found[g, d] = j
    return found


def num_threads() -> int:
    """Threads Numba's ``prange`` runs on."""
    return numba.get_num_threads()


# --------------------------------------------------------------------------- driver

#: Tile sizes, chosen by measurement (B=1, H=8, D=64, N=M=2048, fp32 on 2 cores): the tile
#: products are then large enough for BLAS to run near its peak, and one thread's tiles
#: (``BQ x BK`` scores, ``BQ x Dv`` accumulators) stay in its L2 cache.
BQ, BK = 256, 256


@functools.cache
def _blas_libraries() -> tuple[Any, ...]:
    """threadpoolctl's controllers of the BLAS that Numba's ``np.dot`` calls (empty without
    threadpoolctl).

    Numba's ``np.dot`` calls SciPy's BLAS; each of our threads must run it single-threaded, or
    BLAS would start its own threads on the cores ``prange`` already uses. SciPy's own library
    is picked when it can be told apart (NumPy ships a second OpenBLAS, which the kernels never
    call); otherwise every BLAS loaded.
    """
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return ()
    import scipy.linalg.cython_blas  # noqa: F401  (loads the BLAS that np.dot uses)

    libs = ThreadpoolController().select(user_api="blas").lib_controllers
    scipy_libs = tuple(lib for lib in libs if "scipy.libs" in lib.filepath.replace("\\", "/"))
    return scipy_libs or tuple(libs)


@contextlib.contextmanager
def _one_blas_thread() -> Iterator[None]:
    """Hold BLAS to one thread inside the block, then give it back its own count.

    Each BLAS library's thread count is read and set directly through threadpoolctl's
    per-library controllers (about 1 us; its ``limit()`` context re-inspects the
    process and costs about 11 us, which a decode step's small kernels would notice). A no-op
    without threadpoolctl, where the kernels still run, about three times slower on 2 cores as
    the threads oversubscribe.
    """
    libs = _blas_libraries()
    before = [lib.get_num_threads() for lib in libs]
    for lib, n in zip(libs, before, strict=True):
        if n != 1:
            lib.set_num_threads(1)
    try:
        yield
    finally:
        for lib, n in zip(libs, before, strict=True):
            if n != 1:
                lib.set_num_threads(n)


def _rows(x: np.ndarray) -> np.ndarray:
    """``x (B, H, L, D)`` as a C-contiguous, writeable ``(B*H*L, D)`` matrix (copied if needed).

    Writeable only so that every call compiles to the same specialisation; nothing writes it.
    """
    return np.require(x, requirements=("C", "W")).reshape(-1, x.shape[-1])


def _additive_mask(mask: np.ndarray | None, dtype: np.dtype) -> tuple[np.ndarray, bool]:
    """The mask as additive scores of ``dtype`` in its own 4-D shape, and whether there is one.

    A mask broadcastable to ``(B, H, N, M)`` keeps its own sizes (each 1 or full; the kernel
    indexes a size-1 axis at 0), so no ``(B, H, N, M)`` array is made. A bool mask becomes
    0 / ``-inf``; a float mask is cast to ``dtype``, as the reference adds it.
    """
    if mask is None:
        return np.zeros((1, 1, 1, 1), dtype), False
    mask = np.asarray(mask)
    if mask.dtype == np.bool_:
        add = np.where(mask, dtype.type(0.0), dtype.type(-np.inf))
    else:
        add = mask.astype(dtype, copy=False)
    add = add.reshape((1,) * (4 - add.ndim) + add.shape)  # (b, h, n, m), each 1 or full
    return np.require(add, requirements=("C", "W")), True


@dataclass(frozen=True)
class Form:
    """What the kernels compute from the scores: the softmax (default) or sigmoid attention.

    Attributes:
        sigmoid: ``P = sigmoid(S + bias)`` with no normalisation, instead of the softmax.
        bias: the scalar ``b`` of sigmoid attention.
        slopes: ALiBi slopes ``(H,)`` float64 (``-slopes[h] * |i + M - N - j|`` is added to
            the scores), or ``None``.
    """

    sigmoid: bool = False
    bias: float = 0.0
    slopes: np.ndarray | None = None

    def arguments(self, dtype: np.dtype) -> tuple[np.ndarray, bool, bool, np.floating]:
        """``(slopes, has_alibi, sigmoid, bias)`` as the kernels take them, in ``dtype``."""
        slopes = np.zeros(1, dtype) if self.slopes is None else self.slopes.astype(dtype)
        return slopes, self.slopes is not None, self.sigmoid, dtype.type(self.bias)


def _forward_rows(
    q2: np.ndarray,
    k2: np.ndarray,
    v2: np.ndarray,
    add: np.ndarray,
    has_mask: bool,
    causal: bool,
    scale: np.floating,
    Hkv: int,
    N: int,
    M: int,
    out: np.ndarray,
    form: Form,
) -> tuple[np.ndarray, np.ndarray]:
    """Run :func:`forward` (and :func:`combine` or :func:`sum_parts` if the keys are split)
    into ``out (rows, Dv)``.

    The keys are split only when there are fewer ``(batch, KV head, row tile)`` items than
    threads, into as many parts as it takes to give every thread one (decoding, ``N = 1``).
    Returns the rows' final maximum and normaliser, ``m, l (rows,)`` (0 and 1 for sigmoid).
    """
    rows, Dv = out.shape
    BHkv = k2.shape[0] // M
    bq = min(BQ, rows // BHkv)
    items = BHkv * -(-(rows // BHkv) // bq)
    threads = num_threads()
    nsplit = min(-(-M // BK), -(-threads // items)) if items < threads else 1
    # Causal rows never see keys j > i + M - N; only the last N - 1 keys can be hidden so.
    hidden_from = max(M - N + 1, 0) if causal else M
    bad_v = last_nonfinite(v2, M, hidden_from)
    dtype = out.dtype
    parts = out.reshape(1, rows, Dv) if nsplit == 1 else np.empty((nsplit, rows, Dv), dtype)
    m_parts, l_parts = np.empty((nsplit, rows), dtype), np.empty((nsplit, rows), dtype)
    slopes, has_alibi, sigmoid, bias = form.arguments(dtype)
    forward(
        q2, k2, v2, add, has_mask, slopes, has_alibi, causal, scale, sigmoid, bias,
        Hkv, N, M, bq, BK, bad_v, min(threads, items * nsplit), parts, m_parts, l_parts,
    )  # fmt: skip
    if nsplit == 1:
        return m_parts[0], l_parts[0]
    if sigmoid:
        sum_parts(parts, causal, N, M, bad_v, out)
        return m_parts[0], l_parts[0]
    m, l = np.empty(rows, dtype), np.empty(rows, dtype)
    combine(parts, m_parts, l_parts, causal, N, M, bad_v, out, m, l)
    return m, l


def run(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    *,
    mask: np.ndarray | None,
    causal: bool,
    scale: float | None,
    return_weights: bool,
    form: Form,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray]:
    """The tiled kernels on validated NumPy inputs: ``(O, P or None, m, l)``.

    ``q (B, H, N, D)``, ``k (B, Hkv, M, D)``, ``v (B, Hkv, M, Dv)`` of one dtype, float32 or
    float64 (computed in that dtype); ``mask`` broadcastable to ``(B, H, N, M)``. ``O`` is
    ``(B, H, N, Dv)``, ``P`` the weights ``(B, H, N, M)`` when asked, ``m, l (B*H*N,)`` the
    rows' maximum and normaliser (softmax only).
    """
    dtype = q.dtype
    B, H, N, D = q.shape
    Hkv, M, Dv = k.shape[1], k.shape[2], v.shape[3]
    rows = B * H * N
    q2, k2, v2 = _rows(q), _rows(k), _rows(v)  # (B*H*N, D), (B*Hkv*M, D), (B*Hkv*M, Dv)
    add, has_mask = _additive_mask(mask, dtype)
    scale = dtype.type(1.0 / math.sqrt(D) if scale is None else scale)
    causal = bool(causal)
    out = _outputs.empty((B, H, N, Dv), like=q)
    w = None
    with _one_blas_thread():
        m, l = _forward_rows(
            q2, k2, v2, add, has_mask, causal, scale, Hkv, N, M, out.reshape(rows, Dv), form
        )
        if return_weights:
            w = _outputs.empty((B, H, N, M), like=q)
            bq = min(BQ, rows // (B * Hkv))
            workers = min(num_threads(), B * Hkv * -(-(rows // (B * Hkv)) // bq))
            slopes, has_alibi, sigmoid, bias = form.arguments(dtype)
            weights(
                q2, k2, add, has_mask, slopes, has_alibi, causal, scale, sigmoid, bias,
                Hkv, N, M, bq, BK, m, l, workers, w.reshape(rows, M),
            )  # fmt: skip
    return out, w, m, l


def attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    *,
    mask: np.ndarray | None,
    causal: bool,
    scale: float | None,
    return_weights: bool,
    return_lse: bool,
) -> np.ndarray | tuple[np.ndarray, ...]:
    """Softmax attention on validated NumPy inputs, with the results of ``qkv.sdpa``.

    ``q (B, H, N, D)``, ``k (B, Hkv, M, D)``, ``v (B, Hkv, M, Dv)`` of one dtype, float32 or
    float64 (computed in that dtype); ``mask`` broadcastable to ``(B, H, N, M)``. Returns
    ``O (B, H, N, Dv)``, then the weights ``(B, H, N, M)`` and ``lse (B, H, N)`` if asked.
    """
    out, w, m, l = run(
        q, k, v, mask=mask, causal=causal, scale=scale, return_weights=return_weights, form=Form()
    )
    results = [out] if w is None else [out, w]
    if return_lse:
        lse = _outputs.empty(q.shape[:3], like=q)
        with np.errstate(divide="ignore", invalid="ignore"):
            np.add(m, np.log(l), out=lse.reshape(-1))  # m + log(l); -inf where l = 0
        results.append(lse)
    return results[0] if len(results) == 1 else tuple(results)
