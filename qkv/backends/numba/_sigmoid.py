r"""Numba sigmoid attention: the tiled kernels of :mod:`qkv.backends.numba._attention` with
the softmax step replaced by the logistic function.

For a row tile and key tile with scores $S_j = \text{scale}\cdot Q K_j^\top + A_j$ (mask,
ALiBi, $-\infty$ where hidden), the kernel forms $P_j = \sigma(S_j + b)$ in place (vectorised,
$z = e^{-|x|}$, $\sigma = z/(1+z)$ or $1/(1+z)$) and adds $P_j V_j$ (a BLAS tile product) to the
row tile's accumulator: $O = \sum_j \sigma(S_j + b) V_j$. There is no running maximum, no
rescaling and no final division, so the same tile loop, work split, key-split decoding (the
parts are summed) and causal tile skipping serve both forms. No ``N x M`` array is made unless
the weights are asked for.
"""

from __future__ import annotations

import numpy as np

from qkv.backends.numba import _attention
from qkv.reference.core import alibi_slopes
from qkv.reference.forms.sigmoid_attention import default_bias


def sigmoid(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    *,
    mask: np.ndarray | None,
    causal: bool,
    scale: float | None,
    bias: float | None,
    alibi: bool,
    return_weights: bool,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Sigmoid attention on validated NumPy inputs, with the results of ``qkv.sigmoid``.

    ``q (B, H, N, D)``, ``k (B, Hkv, M, D)``, ``v (B, Hkv, M, Dv)`` of one dtype, float32 or
    float64 (computed in that dtype). Returns ``O (B, H, N, Dv)``, or ``(O, P)`` with the
    weights ``P (B, H, N, M)``.
    """
    M = k.shape[2]
    form = _attention.Form(
        sigmoid=True,
        bias=default_bias(M) if bias is None else float(bias),
        slopes=alibi_slopes(q.shape[1]) if alibi else None,
    )
    out, w, _, _ = _attention.run(
        q, k, v, mask=mask, causal=causal, scale=scale, return_weights=return_weights, form=form
    )
    return out if w is None else (out, w)
