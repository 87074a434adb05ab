r"""The attention calibration technique (Yu et al., "Unveiling and Harnessing Hidden Attention
Sinks: Enhancing Large Language Models without Training through Attention Calibration",
ICML 2024, arXiv 2406.15765; official code: GATECH-EIC/ACT, ``models/llama_modelling_aug.py``).

Sinks are not only at the first token: later tokens (often punctuation) also collect a large
mean attention, and the paper finds that damping those *hidden* sinks in chosen heads, after
the softmax and without any training, can raise accuracy. For one head with causal weights
$A \in \mathbb R^{T \times T}$, the sink set is every key whose importance (its mean weight
over the queries that see it, as in :mod:`qkv.reference.analysis.sink_rate`) exceeds a
threshold, minus the first such key (usually the first token, which is left alone):

$$
S = \Big\{ j : \tfrac{1}{T - j}\textstyle\sum_{i \ge j} A_{ij} > \tau \Big\} \setminus
\{\min\,\cdot\}, \qquad \tau = 0.1 .
$$

Each row gives up a share $1 - \beta$ of its sink weight, and the freed mass goes to the row's
other entries in proportion to their weights ($\beta = 0.4$):

$$
\mathrm{avail}_i = (1-\beta)\sum_{j \in S} A_{ij}, \qquad
A'_{ij} = \beta A_{ij}\ (j \in S), \qquad
A'_{ij} = A_{ij} + \mathrm{avail}_i \frac{A_{ij}}{\sum_{j' \notin S} A_{ij'}}\ (j \notin S),
$$

so every row still sums to one. The official code then sets $A'_{00} = 1$; here that rule is
general: a row with no weight outside $S$ has nowhere to move its mass and is left unchanged
(in a causal head row 0 is always such a row or untouched, so the two agree). The heads to
calibrate are searched on a development set in the paper (layers 2 to 30 of the Llama models);
here the caller names them. :func:`act_decoder_attention` and :func:`act_encoder_attention`
apply the calibration inside ``qkv.lab.decoder.forward`` and the MiniLM ``Swap``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

import qkv
from qkv.errors import ParameterError
from qkv.reference.analysis.sink_rate import (
    check_fraction,
    check_threshold,
    check_weights,
    key_importance,
)

Array = np.ndarray


def hidden_sinks(attn: Array, *, threshold: float = 0.1, causal: bool = True) -> Array:
    r"""The sink set $S$ of every head as a mask: importance above ``threshold``, first one off.

    Args:
        attn: weights ``(..., T, T)`` (unchecked; see :func:`act`).
        threshold: $\tau$ on the key importance.
        causal: whether a key is seen by $T - j$ queries (True) or by all $T$.

    Returns:
        bool ``(..., T)``: True on the keys of $S$.
    """
    above = key_importance(attn, causal=causal) > threshold  # (..., T)
    first = np.argmax(above, axis=-1)  # (...): lowest index above the threshold
    rest = above.copy()
    np.put_along_axis(rest, first[..., None], False, axis=-1)  # the first sink is kept as is
    return rest


def act(
    attn: Array,
    *,
    beta: float = 0.4,
    threshold: float = 0.1,
    causal: bool = True,
) -> Array:
    r"""Calibrate attention weights: damp the hidden sinks by ``beta``, give the rest to the row.

    Args:
        attn: row-stochastic weights ``(..., T, T)`` of the heads to calibrate.
        beta: the share of its weight a hidden sink keeps, in ``[0, 1]``; the paper's 0.4.
        threshold: $\tau$ on the key importance, in ``(0, 1)``; the paper's 0.1.
        causal: whether the weights are causal (decoder) or bidirectional (encoder).

    Returns:
        The calibrated weights, same shape and dtype; each row still sums to one.

    Raises:
        ShapeError: ``attn`` is not ``(..., T, T)``.
        DTypeError: ``attn`` is not floating.
        ParameterError: ``beta`` outside ``[0, 1]``, ``threshold`` outside ``(0, 1)``, or weights
            that are negative, leak above the diagonal (causal) or whose rows do not sum to one.
    """
    beta = check_fraction("beta", beta)
    threshold = check_threshold("threshold", threshold)
    attn = check_weights(attn, causal=causal)
    sink = hidden_sinks(attn, threshold=threshold, causal=causal)[..., None, :]  # (..., 1, T)
    on_sinks = np.where(sink, attn, 0).sum(axis=-1, keepdims=True)  # (..., T, 1)
    elsewhere = np.where(sink, 0, attn).sum(axis=-1, keepdims=True)  # (..., T, 1)
    movable = elsewhere > 0  # rows with somewhere to put the freed mass
    avail = (1 - beta) * on_sinks  # (..., T, 1)
    gain = 1 + np.divide(avail, elsewhere, out=np.zeros_like(avail), where=movable)
    calibrated = np.where(sink, beta * attn, gain * attn)  # (..., T, T)
    return np.where(movable, calibrated, attn).astype(attn.dtype, copy=False)


def _check_heads(heads: Mapping[int, tuple[int, ...]], n_layers: int, n_heads: int) -> None:
    for layer, chosen in heads.items():
        if not 0 <= layer < n_layers:
            raise ParameterError(f"heads: expected layers in [0, {n_layers}), got layer {layer}")
        bad = [h for h in chosen if not 0 <= h < n_heads]
        if bad:
            raise ParameterError(
                f"heads: layer {layer}: expected head indices in [0, {n_heads}), got {bad}"
            )


def _attend(weights: Array, v: Array) -> Array:
    """``weights (B, H, N, M) @ v (B, Hkv, M, Dv)`` with grouped heads: ``(B, H, N, Dv)``."""
    group = weights.shape[1] // v.shape[1]
    return weights @ np.repeat(v, group, axis=1)  # (B, H, N, Dv)


def act_decoder_attention(
    heads: Mapping[int, tuple[int, ...]],
    *,
    n_layers: int,
    n_heads: int,
    beta: float = 0.4,
    threshold: float = 0.1,
) -> Callable[[int, Array, Array, Array], Array]:
    """An ``attention(layer, q, k, v)`` for ``qkv.lab.decoder.forward`` that calibrates ``heads``.

    The weights come from causal :func:`qkv.sdpa`; the listed query heads of each layer are
    calibrated by :func:`act` and every head's output is ``weights @ v``.

    Args:
        heads: ``{layer: query heads}`` to calibrate.
        n_layers: layers of the model (to check ``heads``).
        n_heads: query heads per layer (to check ``heads``).
        beta: see :func:`act`.
        threshold: see :func:`act`.

    Returns:
        The attention callable.

    Raises:
        ParameterError: a layer or head index out of range, or a bad ``beta``/``threshold``.
    """
    _check_heads(heads, n_layers, n_heads)
    beta, threshold = check_fraction("beta", beta), check_threshold("threshold", threshold)

    def attention(layer: int, q: Array, k: Array, v: Array) -> Array:
        _, p = qkv.sdpa(q, k, v, causal=True, return_weights=True)  # (B, H, N, N)
        chosen = sorted(heads.get(layer, ()))
        if chosen:
            p = p.copy()
            p[:, chosen] = act(p[:, chosen], beta=beta, threshold=threshold, causal=True)
        return _attend(p, v)

    return attention


def act_encoder_attention(*, beta: float = 0.4, threshold: float = 0.1) -> Callable[..., Array]:
    """An attention with the ``qkv.lab.encoder.Swap`` contract that calibrates every head it gets.

    Each sentence is calibrated on its real tokens only (the padding comes last, as the
    tokenizer pads on the right), bidirectionally.

    Args:
        beta: see :func:`act`.
        threshold: see :func:`act`.

    Returns:
        ``attention(q, k, v, *, mask)`` returning ``(B, h, N, Dh)``.
    """
    beta, threshold = check_fraction("beta", beta), check_threshold("threshold", threshold)

    def attention(q: Array, k: Array, v: Array, *, mask: Array) -> Array:
        _, p = qkv.sdpa(q, k, v, mask=mask, return_weights=True)  # (B, h, N, N)
        p = p.copy()
        real = np.broadcast_to(mask, (q.shape[0], 1, 1, k.shape[2]))[:, 0, 0].sum(-1)  # (B,)
        for b, n in enumerate(real):
            p[b, :, :n, :n] = act(p[b, :, :n, :n], beta=beta, threshold=threshold, causal=False)
        return _attend(p, v)

    return attention
