r"""Numba kernel for multi-head Gaussian adaptive attention (GAAM, arXiv 2401.11143).

One fused pass per row of the normalisation axis: for each head slice the mean and the unbiased
variance (two passes over the slice, as the reference), the log mixture
$\log g_j$ of every entry (a log-sum-exp over the Gaussians for ``"sum"``; for ``"product"``
the sum over Gaussians of $(t_j - \delta_i)^2 / 2c_i^2$, with $t_j = x_j - \mu$, is the
quadratic $A t_j^2 - 2 B t_j + \text{const}$ with $A = \sum_i 1/2c_i^2$ and
$B = \sum_i \delta_i / 2c_i^2$, and the constant cancels in the softmax: one multiply-add per
entry instead of ``G``), the softmax over the slice with its maximum subtracted, and ``out = x * w``. Nothing
of size ``(..., L, G)`` is materialised, unlike the reference. Rows run in parallel. The per-row
arithmetic is float64 whatever the input (float32 or float64), rounded once on output: a float32
logit of -4e9 carries a rounding error of hundreds, which ``exp`` would turn into an overflow.
As in the reference, the statistics are those of ``x_j - x_1`` (the weights are shift
invariant), so a constant slice gets exactly uniform weights.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from qkv import _outputs


@njit(parallel=True, cache=True, fastmath={"nsz", "arcp", "contract", "afn", "reassoc"})
def _gaam(x, offsets, scales, log_pi, use_sum, eps, out, weights):
    """GAAM on the rows of ``x (R, L)`` into ``out`` and ``weights`` (both ``(R, L)``).

    ``offsets``, ``scales``, ``log_pi`` are ``(H, G)`` (``log_pi`` the log mixture weights,
    read only when ``use_sum``). Head ``h`` owns ``[h c, (h + 1) c)``, ``c = L // H``, and the
    last head also the remainder.
    """
    R, L = x.shape
    H, G = offsets.shape
    size = L // H
    quad = np.zeros(H)  # A_h = sum_i 1 / (2 c_i^2), for the product
    lin = np.zeros(H)  # B_h = sum_i delta_i / (2 c_i^2)
    for h in range(H):
        for i in range(G):
            a = 1.0 / (2.0 * scales[h, i] ** 2)
            quad[h] += a
            lin[h] += a * offsets[h, i]
    for r in prange(R):
        logit = np.empty(L, np.float64)  # per-row arithmetic in float64, rounded on output
        for h in range(H):
            start = h * size
            stop = L if h == H - 1 else start + size
            n = stop - start
            first = x[r, start]  # statistics of x_j - x_1, as the reference
            mean = 0.0
            for j in range(start, stop):
                mean += x[r, j] - first
            mean /= n
            var = 0.0
            for j in range(start, stop):
                var += (x[r, j] - first - mean) ** 2
            sigma = math.sqrt(var / max(n - 1, 1) + eps)
            if use_sum:
                for j in range(start, stop):
                    centred = x[r, j] - first - mean
                    inner_top = -np.inf
                    for i in range(G):
                        y = (centred - offsets[h, i]) / sigma
                        inner_top = max(inner_top, log_pi[h, i] - y * y / (2 * scales[h, i] ** 2))
                    acc = 0.0
                    for i in range(G):
                        y = (centred - offsets[h, i]) / sigma
                        acc += math.exp(log_pi[h, i] - y * y / (2 * scales[h, i] ** 2) - inner_top)
                    logit[j] = inner_top + math.log(acc)
            else:  # sum_i a_i (t - delta_i)^2 = A t^2 - 2 B t + const, the const cancels
                a, b = quad[h] / (sigma * sigma), 2 * lin[h] / (sigma * sigma)
                for j in range(start, stop):
                    t = x[r, j] - first - mean
                    logit[j] = (b - a * t) * t
            top = -np.inf
            for j in range(start, stop):
                top = max(top, logit[j])
            total = 0.0
            for j in range(start, stop):
                logit[j] = math.exp(logit[j] - top)
                total += logit[j]
            for j in range(start, stop):
                w = logit[j] / total
                weights[r, j] = w
                out[r, j] = x[r, j] * w


def gaussian(
    x: np.ndarray,
    offsets: np.ndarray,
    scales: np.ndarray,
    logits: np.ndarray | None,
    *,
    axis: int,
    mixture: str,
    eps: float,
    return_weights: bool,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """GAAM of validated float32/float64 ``x`` along ``axis``; ``offsets``, ``scales``,
    ``logits`` ``(H, G)``. Returns ``out`` (and ``weights``), shaped and typed as ``x``.
    """
    dtype = x.dtype
    xm = np.moveaxis(x, axis, -1)  # (..., L), a view
    rows = np.ascontiguousarray(xm).reshape(-1, xm.shape[-1])  # (R, L)
    H, G = offsets.shape
    log_pi = np.zeros((H, G), dtype)  # (H, G), unread by the product mixture
    if mixture == "sum":
        a = np.zeros((H, G), dtype) if logits is None else logits.astype(dtype)  # (H, G)
        a = a - a.max(axis=-1, keepdims=True)
        log_pi = a - np.log(np.exp(a).sum(axis=-1, keepdims=True))  # (H, G) log softmax
    out = _outputs.empty(rows.shape, like=rows)  # (R, L)
    weights = _outputs.empty(rows.shape, like=rows)  # (R, L)
    _gaam(
        rows,
        np.ascontiguousarray(offsets, dtype),
        np.ascontiguousarray(scales, dtype),
        np.ascontiguousarray(log_pi, dtype),
        mixture == "sum",
        dtype.type(eps),
        out,
        weights,
    )
    out = np.moveaxis(out.reshape(xm.shape), -1, axis)  # shape of x
    if not return_weights:
        return out
    return out, np.moveaxis(weights.reshape(xm.shape), -1, axis)  # shape of x
