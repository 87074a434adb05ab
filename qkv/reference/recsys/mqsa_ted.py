r"""MQSA-TED: multi-query self-attention with transition-aware embedding distillation (Zhu et
al., "Collaboration and Transition: Distilling Item Transitions into Multi-Query Self-Attention
for Sequential Recommendation", WSDM 2024; official code:
`zhuty16/MQSA-TED <https://github.com/zhuty16/MQSA-TED>`_, ``MQSA_TED.py``).

A SASRec-style recommender reads a user's item sequence $e_1, \dots, e_N$
($e_t = \sqrt D\, E_{i_t} + P_t$) with causal self-attention, and each position's query is one
item. MQSA adds an **L-query** stack whose query at $t$ is the masked mean of the last $L$
items, $\bar x_t = \frac{1}{|W_t|}\sum_{s \in W_t} x_s$ with $W_t$ the valid positions among
$t - L + 1, \dots, t$, and mixes the two stacks' predictions:

$$
\text{block:}\quad \hat x = \operatorname{LN}(\text{query input}), \quad
a = \operatorname{MHA}(\hat x W_Q,\; x W_K,\; x W_V), \quad
y = \operatorname{LN}(\hat x + a), \quad x' = (y + \operatorname{FFN}(y)) \odot m,
$$

$$
\text{score}(t, i) = \alpha\, \langle h^{\mathrm{short}}_t, E_i\rangle
+ (1 - \alpha)\, \langle h^{\mathrm{long}}_t, E_i\rangle ,
$$

with the query input $x$ (short) or $\bar x$ (long), causal and key-padding masks, the output
rows of padded positions zeroed ($m$), a final LN after each stack, and $\alpha = 0.5$, $L = 3$
by default. Keys and values are the block input $x$, unnormalised, as in the code. The
**transition-aware embedding distillation** (TED) turns the item-to-item transition counts
$c_{ij}$ of the training sequences into soft labels and distils them into the embeddings:

$$
\mathcal{L}_{\mathrm{TED}} = \frac{1}{|\mathcal{I}|}\sum_{i \in \mathcal{I}}
\mathrm{CE}\Big(\operatorname{softmax}\big(\tfrac{c_{i:}}{\max_j c_{ij}\, \tau}\big),\;
\operatorname{softmax}\big(\tfrac{E_i E^\top}{\tau}\big)\Big), \qquad \tau = 0.1,
$$

added to the next-item loss with weight $\lambda = 0.1$. With $L = 1$ the long query equals
the short one, so with shared weights (or $\alpha = 1$) MQSA is the short-query model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from qkv import _checks
from qkv.errors import ParameterError, ShapeError
from qkv.reference import core

Array = np.ndarray
DEFAULT_WINDOW = 3
DEFAULT_ALPHA = 0.5
DEFAULT_TEMPERATURE = 0.1
LN_EPS = 1e-8


@dataclass(frozen=True)
class MQSABlock:
    """One self-attention block (right-multiplied weights, LayerNorm gain/bias pairs).

    Attributes:
        w_q: ``(D, D)``.
        w_k: ``(D, D)``.
        w_v: ``(D, D)``.
        ln_q: gain and bias of the query LayerNorm, ``(2, D)``.
        ln_ffn: gain and bias of the LayerNorm before the FFN, ``(2, D)``.
        w1: first FFN layer ``(D, D)``.
        b1: ``(D,)``.
        w2: second FFN layer ``(D, D)``.
        b2: ``(D,)``.
    """

    w_q: Array
    w_k: Array
    w_v: Array
    ln_q: Array
    ln_ffn: Array
    w1: Array
    b1: Array
    w2: Array
    b2: Array


@dataclass(frozen=True)
class MQSAWeights:
    """The model: item table, positions, the two stacks and their final LayerNorms.

    Attributes:
        items: $E$ ``(V, D)``.
        positions: $P$ ``(N_max, D)``.
        short: the short-query blocks.
        long: the long-query blocks.
        ln_short: final LayerNorm of the short stack ``(2, D)``.
        ln_long: final LayerNorm of the long stack ``(2, D)``.
    """

    items: Array
    positions: Array
    short: tuple[MQSABlock, ...]
    long: tuple[MQSABlock, ...]
    ln_short: Array
    ln_long: Array


def layer_norm(x: Array, gain_bias: Array) -> Array:
    """LayerNorm over the last axis with ``gain_bias = (gain, bias)``, ``(2, D)``."""
    mean = x.mean(axis=-1, keepdims=True)
    var = x.var(axis=-1, keepdims=True)
    return gain_bias[0] * (x - mean) / np.sqrt(var + LN_EPS) + gain_bias[1]


def check_window(window: Any, n: int) -> int:
    """``window`` an int in ``[1, n]`` for sequences of length ``n``."""
    window = _checks.positive_int("window", window)
    if window > n:
        raise ParameterError(f"window: expected at most the sequence length N = {n}, got {window}")
    return window


def window_mean(x: Array, valid: Array, window: int) -> Array:
    r"""$\bar x_t$: the mean of the valid rows among $t - L + 1, \dots, t$ (0 if none).

    Args:
        x: ``(B, N, D)``.
        valid: bool ``(B, N)``.
        window: $L$, ``1 <= L <= N``.

    Returns:
        ``(B, N, D)``.
    """
    window = check_window(window, x.shape[1])
    w = valid.astype(x.dtype)[:, :, None]  # (B, N, 1)
    total = np.cumsum(x * w, axis=1)  # (B, N, D): prefix sums
    count = np.cumsum(w, axis=1)  # (B, N, 1)
    shifted = np.pad(total, ((0, 0), (window, 0), (0, 0)))[:, : x.shape[1]]  # (B, N, D)
    shifted_count = np.pad(count, ((0, 0), (window, 0), (0, 0)))[:, : x.shape[1]]  # (B, N, 1)
    n = count - shifted_count
    return np.where(n > 0, (total - shifted) / np.where(n > 0, n, 1.0), 0.0)


def block(x: Array, query_input: Array, valid: Array, b: MQSABlock, *, heads: int) -> Array:
    """One MQSA block: attention of ``LN(query_input)`` over ``x``, residual, LN, FFN.

    Args:
        x: block input (keys and values) ``(B, N, D)``.
        query_input: ``x`` (short) or its window mean (long), ``(B, N, D)``.
        valid: bool ``(B, N)``.
        b: the block's weights.
        heads: attention heads (dividing ``D``).

    Returns:
        ``(B, N, D)``.
    """
    B, N, D = x.shape
    dh = D // heads

    def split(y: Array) -> Array:
        return y.reshape(B, N, heads, dh).transpose(0, 2, 1, 3)  # (B, H, N, dh)

    q_in = layer_norm(query_input, b.ln_q)  # (B, N, D)
    mask = valid[:, None, None, :]  # (B, 1, 1, N): key padding; causal below
    a = core.sdpa(split(q_in @ b.w_q), split(x @ b.w_k), split(x @ b.w_v), mask=mask, causal=True)
    a = a.transpose(0, 2, 1, 3).reshape(B, N, D) * valid[:, :, None]  # (B, N, D), query mask
    y = layer_norm(q_in + a, b.ln_ffn)  # (B, N, D)
    ffn = np.maximum(y @ b.w1 + b.b1, 0.0) @ b.w2 + b.b2  # (B, N, D)
    return (y + ffn) * valid[:, :, None]


def _check(seq: Array, valid: Array | None, weights: MQSAWeights, heads: int, alpha: Any) -> None:
    seq = np.asarray(seq)
    if seq.ndim != 2 or seq.dtype.kind not in "iu":
        raise ShapeError(f"seq: expected integer item ids (B, N), got {seq.dtype} {seq.shape}")
    _checks.array("items", weights.items, rank=2, layout="(V, D)")
    _checks.array("positions", weights.positions, rank=2, layout="(N_max, D)")
    V, D = weights.items.shape
    if weights.positions.shape[1] != D or weights.positions.shape[0] < seq.shape[1]:
        raise ShapeError(
            f"positions: expected at least N = {seq.shape[1]} rows of D = {D}, "
            f"got {weights.positions.shape}"
        )
    if seq.min() < 0 or seq.max() >= V:
        raise ParameterError(f"seq: expected item ids in [0, {V})")
    if valid is not None and (np.asarray(valid).dtype != np.bool_ or np.shape(valid) != seq.shape):
        raise ShapeError(f"valid: expected bool {seq.shape}, got {np.shape(valid)}")
    heads = _checks.positive_int("heads", heads)
    if D % heads:
        raise ShapeError(f"heads: expected to divide D = {D}, got {heads}")
    if not (isinstance(alpha, (int, float, np.floating)) and 0.0 <= alpha <= 1.0):
        raise ParameterError(f"alpha: expected a number in [0, 1], got {alpha!r}")


def stack(
    e: Array, valid: Array, blocks: Sequence[MQSABlock], final_ln: Array, *, heads: int, window: int
) -> Array:
    """A stack of blocks; ``window = 1`` is the short-query stack, ``window > 1`` the L-query one.

    Args:
        e: embedded sequence ``(B, N, D)``.
        valid: bool ``(B, N)``.
        blocks: the blocks.
        final_ln: the final LayerNorm ``(2, D)``.
        heads: attention heads.
        window: $L$.

    Returns:
        ``(B, N, D)``.
    """
    x = e * valid[:, :, None]  # (B, N, D)
    for b in blocks:
        query_input = x if window == 1 else window_mean(x, valid, window)
        x = block(x, query_input, valid, b, heads=heads)
    return layer_norm(x, final_ln)


def mqsa(
    seq: Array,
    weights: MQSAWeights,
    *,
    valid: Array | None = None,
    heads: int = 1,
    window: int = DEFAULT_WINDOW,
    alpha: float = DEFAULT_ALPHA,
) -> Array:
    r"""MQSA next-item scores $\alpha\, h^{\mathrm{short}}_t E^\top + (1-\alpha)\,
    h^{\mathrm{long}}_t E^\top$ at every position.

    Args:
        seq: item ids ``(B, N)`` (SASRec pads on the left).
        weights: the model.
        valid: bool ``(B, N)``, False at padding (default: all valid).
        heads: attention heads of every block.
        window: $L$ of the long query, ``1 <= L <= N`` (default 3).
        alpha: weight of the short-query stack (default 0.5).

    Returns:
        scores ``(B, N, V)`` (float64 for float64 weights).
    """
    _check(seq, valid, weights, heads, alpha)
    seq = np.asarray(seq)
    B, N = seq.shape
    window = check_window(window, N)
    valid = np.ones((B, N), bool) if valid is None else np.asarray(valid)
    D = weights.items.shape[1]
    e = weights.items[seq] * math.sqrt(D) + weights.positions[:N]  # (B, N, D)
    h_short = stack(e, valid, weights.short, weights.ln_short, heads=heads, window=1)
    scores = alpha * (h_short @ weights.items.T)  # (B, N, V)
    if alpha < 1.0:
        h_long = stack(e, valid, weights.long, weights.ln_long, heads=heads, window=window)
        scores = scores + (1.0 - alpha) * (h_long @ weights.items.T)
    return scores


def transition_counts(sequences: Sequence[Sequence[int]], n_items: int) -> Array:
    """Item-to-item transition counts $c_{ij}$ (item ``i`` directly followed by ``j``), ``(V, V)``."""
    n_items = _checks.positive_int("n_items", n_items)
    counts = np.zeros((n_items, n_items))
    for s in sequences:
        s = np.asarray(s, dtype=np.int64)
        np.add.at(counts, (s[:-1], s[1:]), 1.0)
    return counts


def ted_loss(
    items: Array, heads: Array, counts: Array, *, temperature: float = DEFAULT_TEMPERATURE
) -> float:
    r"""$\mathcal{L}_{\mathrm{TED}}$: cross-entropy from the transition soft labels of the
    ``heads`` items to the softmax of their embedding similarities.

    Args:
        items: the item table $E$ ``(V, D)``.
        heads: the items $\mathcal I$ (ids ``(n,)``) whose transition rows are distilled; rows
            with no transition at all are skipped (their soft label is undefined).
        counts: $c$ ``(V, V)`` (:func:`transition_counts`).
        temperature: $\tau > 0$ (default 0.1).

    Returns:
        the mean cross-entropy (0 if no head item has a transition).
    """
    if not (isinstance(temperature, (int, float, np.floating)) and temperature > 0
            and math.isfinite(temperature)):  # fmt: skip
        raise ParameterError(f"temperature: expected a finite number > 0, got {temperature!r}")
    _checks.array("items", items, rank=2, layout="(V, D)")
    V = items.shape[0]
    counts = np.asarray(counts, dtype=np.float64)
    if counts.shape != (V, V):
        raise ShapeError(f"counts: expected (V, V) = {(V, V)}, got {counts.shape}")
    heads = np.asarray(heads)
    rows = counts[heads]  # (n, V)
    top = rows.max(axis=1)  # (n,)
    keep = top > 0
    if not keep.any():
        return 0.0
    target = _softmax(rows[keep] / (top[keep, None] * temperature))  # (n', V)
    logits = items[heads[keep]] @ items.T / temperature  # (n', V)
    log_p = logits - logits.max(axis=1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(axis=1, keepdims=True))  # (n', V)
    return float(-(target * log_p).sum(axis=1).mean())


def _softmax(x: Array) -> Array:
    z = np.exp(x - x.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)
