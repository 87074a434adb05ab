r"""Sigmoid attention (Ramapuram et al., "Theory, Analysis, and Best Practices for Sigmoid
Self-Attention", arXiv 2409.04431; official code: apple/ml-sigmoid-attention, FlashSigmoid).

Softmax attention turns each row of scores into a probability distribution. Sigmoid attention
squashes every score on its own and does not normalise the row:

$$
S = \text{scale}\cdot Q K^\top + A + b, \qquad P = \sigma(S) = \frac{1}{1 + e^{-S}}, \qquad
O = P V,
$$

with an optional additive mask or ALiBi bias $A$ and a scalar bias $b$. The paper's analysis
(its section 3) shows that without $b$ the output norm grows like the number of keys $n$ at
initialisation, since every weight starts near $\sigma(0) = 1/2$; the bias $b = -\log n$ makes
each weight about $1/n$, so a row of weights sums to about one as with softmax, and training is
stable. FlashSigmoid takes $b$ as a number (the RealNews configuration uses
$-7.62 = -\ln 2048$, the training length).

Because no normaliser couples the entries of a row, the output is a plain sum over key tiles,
$O = \sum_t \sigma(S_t) V_t$: the tiled, memory-efficient form needs no running maximum and no
rescaling (what makes FlashAttention's online softmax subtle is absent here), so this module
has only the materialising form; the backends tile it.
"""

from __future__ import annotations

import math

import numpy as np

from qkv import _checks
from qkv.reference import core

Array = np.ndarray


def default_bias(n_keys: int) -> float:
    r"""The paper's bias $b = -\log n$ for $n$ = ``n_keys``: each weight starts near $1/n$."""
    return -math.log(n_keys)


def logistic(x: Array) -> Array:
    r"""$\sigma(x) = 1 / (1 + e^{-x})$ without overflow: $z = e^{-|x|} \in [0, 1]$, then
    $\sigma(x) = 1/(1+z)$ for $x \ge 0$ and $z/(1+z)$ otherwise. $\sigma(-\infty) = 0$ exactly;
    NaN stays NaN. Same shape and dtype as ``x``."""
    z = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0, z) / (1.0 + z)


def sigmoid(
    q: Array,
    k: Array,
    v: Array,
    *,
    mask: Array | None = None,
    causal: bool = False,
    scale: float | None = None,
    bias: float | None = None,
    alibi: bool = False,
    return_weights: bool = False,
) -> Array | tuple[Array, Array]:
    r"""Sigmoid attention: $O = \sigma(\text{scale}\cdot QK^\top + A + b)\,V$, no row normalisation.

    $$
    O_i = \sum_{j \in \mathcal{V}(i)} \sigma\big(\text{scale}\,\langle q_i, k_j\rangle + A_{ij} + b\big)\, v_j
    $$

    where $\mathcal{V}(i)$ is the set of keys query $i$ may see (the mask, ``causal``); a key
    outside it contributes exactly nothing (its score is $-\infty$ and $\sigma(-\infty) = 0$),
    and a query that sees no key gets a zero output.

    Args:
        q: queries ``(B, H, N, D)``.
        k: keys ``(B, Hkv, M, D)``; ``H`` a multiple of ``Hkv`` (query head ``h`` reads KV head
            ``h // (H // Hkv)``).
        v: values ``(B, Hkv, M, Dv)``.
        mask: broadcastable to ``(B, H, N, M)``; bool (True = attend) or float (added to the
            scores; ``-inf`` masks), as in :func:`qkv.reference.core.sdpa`.
        causal: query ``i`` sees key ``j`` only if ``j <= i + (M - N)`` (bottom-right alignment).
        scale: multiplies $QK^\top$; default $1/\sqrt{D}$.
        bias: the scalar $b$; default $-\log M$ (the paper's $b = -\log n$ with $n$ the sequence
            length; for $M$ keys, $n = M$). Must be finite.
        alibi: add ALiBi biases $A_{hij} = -m_h\,|i + (M - N) - j|$ with the standard slopes
            $m_h$ of :func:`qkv.reference.core.alibi_slopes` (FlashSigmoid's ALiBi option; the
            distance is symmetric, so under ``causal`` it is the paper's one-sided ALiBi).
        return_weights: also return $P$ ``(B, H, N, M)`` (0 where masked).

    Returns:
        ``O (B, H, N, Dv)`` in the dtype of ``q``, or ``(O, P)`` with ``return_weights``.
        Arithmetic is float64 for float64 inputs and float32 otherwise. A NaN score gives a
        NaN weight; a NaN value reaches every row through $PV$ (``0 * NaN`` is NaN), as in
        :func:`qkv.reference.core.sdpa`.
    """
    dims = _checks.sigmoid_call(
        q, k, v, mask=mask, causal=causal, scale=scale, bias=bias, alibi=alibi
    )
    B, H, Hkv, N, M, D, Dv = dims
    G = dims.group
    work = core._work_dtype(q.dtype)
    b = default_bias(M) if bias is None else float(bias)
    scale = float(1.0 / np.sqrt(D) if scale is None else scale)
    qg = q.astype(work, copy=False).reshape(B, Hkv, G, N, D)  # (B, Hkv, G, N, D)
    kw = k.astype(work, copy=False)  # (B, Hkv, M, D)
    vw = v.astype(work, copy=False)[:, :, None]  # (B, Hkv, 1, M, Dv)
    s = scale * (qg @ kw[:, :, None].swapaxes(-1, -2))  # (B, Hkv, G, N, M)
    s = s.reshape(B, H, N, M)  # (B, H, N, M)
    if mask is not None:
        mask = np.asarray(mask)
        if mask.dtype == np.bool_:
            s = np.where(mask, s, -np.inf)
        else:  # an additive -inf masks the entry outright (so a NaN score stays shielded)
            s = np.where(np.isneginf(mask), -np.inf, s + mask.astype(work, copy=False))
    if causal:
        s = np.where(core.causal_allowed(N, M), s, -np.inf)
    if alibi:
        s = s + core.alibi(H, N, M, symmetric=True, dtype=work)  # (H, N, M) broadcast
    p = logistic(s + b)  # (B, H, N, M); exactly 0 where s = -inf
    out = p.reshape(B, Hkv, G, N, M) @ vw  # (B, Hkv, G, N, Dv)
    out = out.reshape(B, H, N, Dv).astype(q.dtype, copy=False)  # (B, H, N, Dv)
    if return_weights:
        return out, p.astype(q.dtype, copy=False)
    return out
