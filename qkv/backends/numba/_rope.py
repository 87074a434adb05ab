r"""Numba kernel for rotary position embeddings (RoFormer, arXiv 2104.09864).

Feature pair $(x_a, x_b)$ of the token at position $p$ is rotated by the angle $p\,\theta_i$,
$\theta_i = \text{base}^{-2i/D}$: $x'_a = x_a \cos p\theta_i - x_b \sin p\theta_i$,
$x'_b = x_a \sin p\theta_i + x_b \cos p\theta_i$. The angle and its sine and cosine are computed
in float64 once per ``(batch, token)`` and rounded to the dtype of ``x``, as the reference does.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from qkv import _outputs
from qkv.reference.core import rope_frequencies


@njit(parallel=True, cache=True)
def _rotate(x, positions, theta, half, out):
    """Rotate ``x (B, H, N, D)`` into ``out`` (same shape).

    ``positions (B, N)`` int64, ``theta (D/2,)`` float64; ``half`` pairs ``(i, i + D/2)``,
    otherwise ``(2i, 2i + 1)``.
    """
    B, H, N, D = x.shape
    P = D // 2
    for bn in prange(B * N):
        b, n = bn // N, bn % N
        cos = np.empty(P, x.dtype)
        sin = np.empty(P, x.dtype)
        for i in range(P):
            angle = positions[b, n] * theta[i]
            cos[i] = math.cos(angle)
            sin[i] = math.sin(angle)
        for h in range(H):
            for i in range(P):
                ia, ib = (i, i + P) if half else (2 * i, 2 * i + 1)
                xa, xb = x[b, h, n, ia], x[b, h, n, ib]
                out[b, h, n, ia] = xa * cos[i] - xb * sin[i]
                out[b, h, n, ib] = xa * sin[i] + xb * cos[i]


def rope(
    x: np.ndarray,
    *,
    positions: np.ndarray | None,
    offset: int,
    base: float,
    pairing: str,
) -> np.ndarray:
    """Rotary embedding of validated ``x (B, H, N, D)``, float32 or float64.

    ``positions`` are integers ``(N,)`` or ``(B, N)`` (default ``offset + arange(N)``).
    Returns ``(B, H, N, D)`` in the dtype of ``x``.
    """
    B, H, N, D = x.shape
    if positions is None:
        positions = offset + np.arange(N, dtype=np.int64)  # (N,)
    positions = np.broadcast_to(np.asarray(positions, np.int64), (B, N))  # (B, N)
    positions = np.require(positions, requirements=("C", "W"))
    out = _outputs.empty(x.shape, like=x)
    _rotate(
        np.require(x, requirements=("C", "W")),
        positions,
        rope_frequencies(D, base),
        pairing == "half",
        out,
    )
    return out
