r"""Numba kernels for SDIM (arXiv 2205.10249): SimHash codes and bucket aggregation.

The reference compares every candidate's code with every behaviour's, $O(C L m)$ comparisons
and an $O(C L m d)$ sum. Here, as in the paper's behaviour-sequence encoding, the behaviours
are hashed and **grouped by bucket once** per (user, hash): their codes are sorted and each run
of equal codes summed into one bucket vector. A candidate then costs its own hashing,
$O(m\,\tau\,d)$, a binary search among at most $L$ bucket codes and one $d$-vector add per
hash, so the cost per candidate does not grow with $L$ beyond the $\log L$ search.

Hashing takes $x^\top R$ in float64 (as the reference, so codes agree with it); the bucket sums
and the normalisation are float64 too, and the result is rounded once to the input dtype.
(User, hash) pairs run in parallel.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from qkv import _outputs


@njit(parallel=True, cache=True)
def _codes(x, planes, out):
    """SimHash codes of the rows of ``x (R, d)`` with ``planes (d, m, tau)`` into ``out (R, m)``."""
    R, d = x.shape
    m, tau = planes.shape[1], planes.shape[2]
    for r in prange(R):
        for i in range(m):
            code = np.uint64(0)
            for bit in range(tau):
                s = 0.0
                for j in range(d):
                    s += np.float64(x[r, j]) * planes[j, i, bit]
                if s > 0.0:
                    code |= np.uint64(1) << np.uint64(bit)
            out[r, i] = code


@njit(parallel=True, cache=True)
def _aggregate(behaviours, b_codes, valid, t_codes, normalize, parts):
    """Per (user b, hash i): sort the valid behaviours' codes, sum each bucket, look every
    candidate's code up; ``parts (B, m, C, d)`` gets the (normalised) bucket sum or zeros."""
    B, L, d = behaviours.shape
    C, m = t_codes.shape[1], t_codes.shape[2]
    for task in prange(B * m):
        b = task // m
        i = task % m
        n = 0
        rows = np.empty(L, np.int64)
        for j in range(L):
            if valid[b, j]:
                rows[n] = j
                n += 1
        keys = np.empty(n, np.uint64)
        for t in range(n):
            keys[t] = b_codes[b, rows[t], i]
        order = np.argsort(keys)
        bucket_codes = np.empty(n, np.uint64)
        sums = np.zeros((max(n, 1), d), np.float64)
        n_buckets = 0
        for t in range(n):  # runs of equal codes, in sorted order
            j = rows[order[t]]
            if n_buckets == 0 or keys[order[t]] != bucket_codes[n_buckets - 1]:
                bucket_codes[n_buckets] = keys[order[t]]
                n_buckets += 1
            for c in range(d):
                sums[n_buckets - 1, c] += np.float64(behaviours[b, j, c])
        if normalize:
            for s in range(n_buckets):
                norm = 0.0
                for c in range(d):
                    norm += sums[s, c] * sums[s, c]
                norm = np.sqrt(norm)
                if norm > 0.0:
                    for c in range(d):
                        sums[s, c] /= norm
        codes = bucket_codes[:n_buckets]
        for cand in range(C):
            code = t_codes[b, cand, i]
            pos = np.searchsorted(codes, code)
            if pos < n_buckets and codes[pos] == code:
                for c in range(d):
                    parts[b, i, cand, c] = sums[pos, c]
            else:
                for c in range(d):
                    parts[b, i, cand, c] = 0.0


def simhash(x: np.ndarray, planes: np.ndarray) -> np.ndarray:
    """Codes ``(..., m)`` uint64 of ``x (..., d)``; as :func:`qkv.reference.recsys.sdim_hashing.simhash`."""
    d = x.shape[-1]
    flat = np.ascontiguousarray(x.reshape(-1, d))  # (R, d)
    out = np.empty((flat.shape[0], planes.shape[1]), np.uint64)  # (R, m)
    _codes(flat, np.ascontiguousarray(planes, dtype=np.float64), out)
    return out.reshape(*x.shape[:-1], planes.shape[1])  # (..., m)


def sdim(
    targets: np.ndarray,
    behaviours: np.ndarray,
    planes: np.ndarray,
    *,
    valid: np.ndarray | None = None,
    normalize: bool = True,
) -> np.ndarray:
    """SDIM interest ``(B, C, d)``; same arguments and result as the reference."""
    B, C, d = targets.shape
    L = behaviours.shape[1]
    m = planes.shape[1]
    t_codes = simhash(targets, planes)  # (B, C, m)
    b_codes = simhash(behaviours, planes)  # (B, L, m)
    mask = np.ones((B, L), np.bool_) if valid is None else np.ascontiguousarray(valid)
    parts = _outputs.empty((B, m, C, d), like=targets, dtype=np.float64)  # (B, m, C, d)
    _aggregate(np.ascontiguousarray(behaviours), b_codes, mask, t_codes, bool(normalize), parts)
    out = _outputs.empty((B, C, d), like=targets)
    out[...] = parts.mean(axis=1)  # (B, C, d)
    return out
