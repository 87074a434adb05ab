r"""Numba kernel for LeanVec's first stage: float queries against 8-bit vectors (arXiv 2312.16335).

Each score is $s_{ij} = \ell_j \sum_t \tilde q_{it} + \Delta_j \sum_t \tilde q_{it} c_{jt}$
(see :func:`qkv.reference.retrieval.leanvec_projection.lvq_dot`). The reference turns the codes
into a float matrix of the queries' dtype and multiplies; here the codes stay uint8 (a quarter
of float32's bytes) and each data row is widened once, in cache, for every query. Data rows run
in parallel. Products are in the queries' dtype, sums in float64, and each score is rounded
once to the queries' dtype.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from qkv import _outputs


@njit(parallel=True, fastmath={"reassoc", "contract", "nsz"}, cache=True)
def _scores(queries, codes, scales, offsets, out):
    """``out (Nq, N)`` = the scores of ``queries (Nq, d)`` against ``codes (N, d)``.

    Each data row's codes are widened once into a small buffer of the queries' dtype, then every
    query meets it in a contiguous dot product (reassociated so that it vectorises; the sum is
    float64).
    """
    Nq, d = queries.shape
    N = codes.shape[0]
    sums = np.zeros(Nq, np.float64)
    for i in range(Nq):
        for t in range(d):
            sums[i] += queries[i, t]
    for j in prange(N):
        row = np.empty(d, queries.dtype)  # (d,) the widened codes of data row j
        for t in range(d):
            row[t] = codes[j, t]
        low = np.float64(offsets[j])
        step = np.float64(scales[j])
        for i in range(Nq):
            acc = 0.0
            for t in range(d):
                acc += queries[i, t] * row[t]
            out[i, j] = low * sums[i] + step * acc


def lvq_dot(
    queries: np.ndarray, codes: np.ndarray, scales: np.ndarray, offsets: np.ndarray
) -> np.ndarray:
    """Scores ``(Nq, N)`` in the queries' dtype (arguments as the reference's)."""
    out = _outputs.empty((queries.shape[0], codes.shape[0]), like=queries)  # (Nq, N)
    _scores(
        np.ascontiguousarray(queries),
        np.ascontiguousarray(codes),
        np.ascontiguousarray(scales),
        np.ascontiguousarray(offsets),
        out,
    )
    return out
