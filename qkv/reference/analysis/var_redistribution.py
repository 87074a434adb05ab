r"""Visual attention redistribution (Kang et al., "See What You Are Told: Visual Attention Sink in
Large Multimodal Models", ICLR 2025, arXiv 2503.03321; official code: MICV-yonsei/VisAttnSink,
``src/logic/logic.py``).

A multimodal decoder reads an image as a segment of tokens in its prompt. Some of those tokens
draw a lot of attention while saying nothing about the text: like the first-token sink of a
language model, they carry a *massive activation* in a few fixed hidden dimensions
$\mathcal D_{\text{sink}}$. VAR finds them from the hidden state $h_j$ entering a layer,

$$
j \text{ is a sink} \iff \max_{d \in \mathcal D_{\text{sink}}}
\big|\operatorname{RMSNorm}(h_j)_d\big| > \tau, \qquad \tau = 20,
$$

keeps only the *image-centric* rows, those of a head and query $i$ that already look at the
image segment $\mathcal I$ without leaning on its sinks $\mathcal S$,

$$
\sum_{j \in \mathcal I} A_{ij} \ge 0.2, \qquad
\frac{\sum_{j \in \mathcal I \cap \mathcal S} A_{ij}}{\sum_{j \in \mathcal I} A_{ij}} \le \rho = 0.5,
$$

and in those rows moves a share $1 - p$ of all sink weight (text and image sinks) to the
image's other tokens, in proportion to their weights ($p = 0.6$):

$$
A'_{ij} = p\,A_{ij}\ (j \in \mathcal S), \qquad
A'_{ij} = A_{ij} + (1-p)\Big(\sum_{s \in \mathcal S} A_{is}\Big)
\frac{A_{ij}}{\sum_{j' \in \mathcal I \setminus \mathcal S} A_{ij'}}\
(j \in \mathcal I \setminus \mathcal S).
$$

Rows still sum to one. The official code skips the last layer; :func:`var_encoder_swaps`
follows it. There is no vision model here: the lab applies VAR to the MiniLM text encoder
with a designated segment of the sentence playing the image, and ``D_sink`` found on MiniLM's
own hidden states by :func:`massive_dims`. For LLaMA-2-7B the paper's dims are {2533, 1415}
with $\tau = 20$; since $|\operatorname{RMSNorm}(h)_d| \le \sqrt{d_{\text{model}}}$ (19.6 for
MiniLM's 384 against 64 for LLaMA's 4096), $\tau$ must be chosen per model.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

import qkv
from qkv.errors import ParameterError, ShapeError
from qkv.reference.analysis.sink_rate import check_fraction, check_threshold, check_weights

Array = np.ndarray


def rms_normalised(hidden: Array, eps: float = 1e-6) -> Array:
    r"""$h / \sqrt{\operatorname{mean}(h^2) + \epsilon}$ over the last axis (no gain)."""
    return hidden / np.sqrt(np.mean(hidden * hidden, axis=-1, keepdims=True) + eps)


def massive_dims(hidden: Array, *, top: int = 2) -> tuple[int, ...]:
    """The ``top`` hidden dimensions with the largest ``|RMSNorm(h)|`` anywhere: ``D_sink``.

    Args:
        hidden: hidden states ``(..., T, d)``.
        top: how many dimensions to return.

    Returns:
        Dimension indices, largest first.
    """
    peak = np.abs(rms_normalised(hidden)).reshape(-1, hidden.shape[-1]).max(axis=0)  # (d,)
    return tuple(int(d) for d in np.argsort(-peak, kind="stable")[:top])


def sink_tokens(hidden: Array, dims: Sequence[int], *, tau: float = 20.0) -> Array:
    r"""The hidden-state criterion: $\max_{d \in \text{dims}} |\operatorname{RMSNorm}(h)_d| > \tau$.

    Args:
        hidden: hidden states entering the layer ``(..., T, d)``.
        dims: the massive-activation dimensions ``D_sink``.
        tau: the threshold (positive).

    Returns:
        bool ``(..., T)``: True on sink tokens.

    Raises:
        ParameterError: an index of ``dims`` outside ``[0, d)``, no dims, or ``tau <= 0``.
    """
    hidden = np.asarray(hidden)
    d = hidden.shape[-1]
    dims = list(dims)
    if not dims or any(not 0 <= x < d for x in dims):
        raise ParameterError(f"dims: expected hidden dimensions in [0, {d}), got {dims}")
    if not tau > 0:
        raise ParameterError(f"tau: expected a positive threshold, got {tau!r}")
    return np.abs(rms_normalised(hidden)[..., dims]).max(axis=-1) > tau  # (..., T)


def _check_mask(name: str, x: Array, T: int) -> Array:
    x = np.asarray(x)
    if x.dtype != np.bool_ or x.shape[-1] != T:
        raise ShapeError(f"{name}: expected a bool mask (..., {T}), got {x.dtype} {x.shape}")
    return x


def segment_heads(
    attn: Array,
    segment: Array,
    sinks: Array,
    *,
    min_segment: float = 0.2,
    rho: float = 0.5,
) -> Array:
    r"""Which (head, query) rows are segment-centric (the paper's image-centric heads).

    Args:
        attn: row-stochastic weights ``(..., T, T)``.
        segment: bool ``(..., T)`` broadcastable over the rows: True on the segment's keys.
        sinks: bool ``(..., T)``: True on sink keys.
        min_segment: least total weight on the segment, in ``(0, 1)``; the paper's 0.2.
        rho: most share of the segment's weight on its sinks, in ``(0, 1)``; the paper's 0.5.

    Returns:
        bool ``(..., T)``: one entry per query row.
    """
    attn = check_weights(attn, causal=False)
    T = attn.shape[-1]
    segment = _check_mask("segment", segment, T)[..., None, :]  # (..., 1, T)
    sinks = _check_mask("sinks", sinks, T)[..., None, :]  # (..., 1, T)
    min_segment, rho = check_threshold("min_segment", min_segment), check_threshold("rho", rho)
    on_segment = np.where(segment, attn, 0).sum(axis=-1)  # (..., T)
    on_segment_sinks = np.where(segment & sinks, attn, 0).sum(axis=-1)  # (..., T)
    return (on_segment >= min_segment) & (on_segment_sinks <= rho * on_segment)


def var(
    attn: Array,
    segment: Array,
    sinks: Array,
    *,
    p: float = 0.6,
    min_segment: float = 0.2,
    rho: float = 0.5,
) -> Array:
    r"""Redistribute sink weight to the segment in segment-centric rows (module docstring).

    Args:
        attn: row-stochastic weights ``(..., T, T)`` (causal or not).
        segment: bool ``(..., T)``: True on the segment's keys (the "image").
        sinks: bool ``(..., T)``: True on sink keys (for example from :func:`sink_tokens`).
        p: the share of its weight a sink keeps, in ``[0, 1]``; the paper's 0.6.
        min_segment: see :func:`segment_heads`.
        rho: see :func:`segment_heads`.

    Returns:
        The redistributed weights, same shape and dtype; rows still sum to one, rows that are
        not segment-centric are unchanged.

    Raises:
        ShapeError: ``attn`` is not ``(..., T, T)`` or a mask does not have ``T`` entries.
        DTypeError: ``attn`` is not floating.
        ParameterError: a threshold outside ``(0, 1)``, ``p`` outside ``[0, 1]``, or weights
            that are negative or whose rows do not sum to one.
    """
    p = check_fraction("p", p)
    chosen = segment_heads(attn, segment, sinks, min_segment=min_segment, rho=rho)[..., None]
    attn = np.asarray(attn)
    seg = np.asarray(segment)[..., None, :]  # (..., 1, T)
    snk = np.asarray(sinks)[..., None, :]  # (..., 1, T)
    receivers = seg & ~snk  # (..., 1, T)
    freed = (1 - p) * np.where(snk, attn, 0).sum(axis=-1, keepdims=True)  # (..., T, 1)
    base = np.where(receivers, attn, 0).sum(axis=-1, keepdims=True)  # (..., T, 1), >= 0.1
    movable = chosen & (base > 0)
    gain = 1 + np.divide(freed, base, out=np.zeros_like(freed), where=movable)
    moved = np.where(snk, p * attn, np.where(receivers, gain * attn, attn))  # (..., T, T)
    return np.where(movable, moved, attn).astype(attn.dtype, copy=False)


def var_encoder_swaps(
    hidden: Sequence[Array],
    segment: Array,
    dims: Sequence[int],
    *,
    tau: float,
    p: float = 0.6,
    min_segment: float = 0.2,
    rho: float = 0.5,
) -> list:
    """``qkv.lab.encoder.Swap`` objects that apply :func:`var` in every layer but the last.

    Sinks of layer ``l`` are found on ``hidden[l]``, the hidden states entering it in the
    unmodified forward (the official code re-detects them on the modified stream; MiniLM's
    sinks are the same tokens either way in the tutorial's sentences).

    Args:
        hidden: ``qkv.lab.encoder.encode(...)`` output ``[h0, ..., hL]``, each ``(B, T, d)``.
        segment: bool ``(B, T)``: the designated segment of each sentence.
        dims: ``D_sink`` (:func:`massive_dims`).
        tau: sink threshold on ``|RMSNorm(h)_d|``.
        p: see :func:`var`.
        min_segment: see :func:`segment_heads`.
        rho: see :func:`segment_heads`.

    Returns:
        One swap per layer ``0 .. L-2``.
    """
    from qkv.lab.encoder import Swap

    segment = np.asarray(segment)

    def redistribute(sinks: Array):
        def attention(q: Array, k: Array, v: Array, *, mask: Array) -> Array:
            _, w = qkv.sdpa(q, k, v, mask=mask, return_weights=True)  # (B, h, T, T)
            seg, snk = segment[:, None] & mask[:, 0], sinks[:, None] & mask[:, 0]  # (B, 1, T)
            w = var(w, seg, snk, p=p, min_segment=min_segment, rho=rho)
            return w @ v  # (B, h, T, Dh)

        return attention

    n_layers = len(hidden) - 1
    return [
        Swap(i, redistribute(sink_tokens(hidden[i], dims, tau=tau))) for i in range(n_layers - 1)
    ]
