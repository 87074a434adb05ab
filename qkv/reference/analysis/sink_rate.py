r"""Attention sinks measured per head (Gu et al., "When Attention Sink Emerges in Language Models:
An Empirical View", arXiv 2410.10781; official code: sail-sg/Attention-Sink,
``eval_sink_open_source.py``).

A trained language model puts a large share of every query's attention on the first token,
whatever that token says: an *attention sink*. The paper measures it per layer $l$ and head
$h$ with the **importance** of key $k$, the mean attention it receives from the queries that
can see it. In a causal model of $T$ tokens (0-indexed), key $k$ is seen by queries
$i = k, \dots, T-1$, so

$$
\alpha_k^{l,h} = \frac{1}{T - k} \sum_{i=k}^{T-1} A^{l,h}_{ik}.
$$

In a bidirectional encoder every query sees every key and the mean runs over all $T$ rows.
A head has a sink on token $k$ when $\alpha_k^{l,h} > \epsilon$; the **sink rate** is the
share of (sample, layer, head) triples that do, with $\epsilon = 0.3$ and $k = 0$ in the
paper. It is reported there as a percentage; here it is a fraction in $[0, 1]$.

The paper's remedy is to drop the softmax's row normalisation: sigmoid attention
(:func:`qkv.sigmoid`) trained from scratch grows no sink. Its weights do not sum to one, so
:func:`sink_metric` accepts them with ``row_stochastic=False`` and the same $\epsilon$.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qkv.errors import DTypeError, ParameterError, ShapeError

Array = np.ndarray

#: Absolute tolerance on a row sum when rows are required to sum to one.
ROW_SUM_ATOL = 1e-4


def check_threshold(name: str, value: float) -> float:
    """``value`` as a float strictly inside ``(0, 1)``, else :class:`ParameterError`."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
        raise ParameterError(f"{name}: expected a number in (0, 1), got {value!r}")
    if not 0.0 < float(value) < 1.0:
        raise ParameterError(f"{name}: expected a number in (0, 1), got {value!r}")
    return float(value)


def check_fraction(name: str, value: float) -> float:
    """``value`` as a float in the closed interval ``[0, 1]``, else :class:`ParameterError`."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
        raise ParameterError(f"{name}: expected a number in [0, 1], got {value!r}")
    if not 0.0 <= float(value) <= 1.0:
        raise ParameterError(f"{name}: expected a number in [0, 1], got {value!r}")
    return float(value)


def check_weights(
    attn: Array, *, causal: bool, row_stochastic: bool = True, name: str = "attn"
) -> Array:
    """Check self-attention weights ``(..., T, T)`` and return them as an array.

    Args:
        attn: weights, query rows by key columns, float.
        causal: if True, the entries above the diagonal must be zero.
        row_stochastic: if True, every row must sum to one (within :data:`ROW_SUM_ATOL`).
        name: the argument name used in error messages.

    Returns:
        ``attn`` as a NumPy array (not copied).

    Raises:
        ShapeError: fewer than two axes, or the last two differ.
        DTypeError: not a floating dtype.
        ParameterError: a negative or non-finite entry, a causal leak, or a row that does not
            sum to one.
    """
    attn = np.asarray(attn)
    if attn.ndim < 2 or attn.shape[-1] != attn.shape[-2] or attn.shape[-1] == 0:
        raise ShapeError(f"{name}: expected self-attention weights (..., T, T), got {attn.shape}")
    if not np.issubdtype(attn.dtype, np.floating):
        raise DTypeError(f"{name}: expected a floating dtype, got {attn.dtype}")
    if not np.isfinite(attn).all() or (attn < 0).any():
        raise ParameterError(f"{name}: expected finite non-negative weights, got {attn.min()}")
    T = attn.shape[-1]
    if causal and np.triu(attn, k=1).any():
        raise ParameterError(
            f"{name}: expected causal weights (zero above the diagonal) since causal=True, "
            f"got a nonzero entry above it"
        )
    if row_stochastic:
        sums = attn.sum(axis=-1)  # (..., T)
        worst = float(np.abs(sums - 1.0).max())
        if worst > ROW_SUM_ATOL:
            raise ParameterError(
                f"{name}: expected row-stochastic weights (each of the {T} rows summing to 1), "
                f"got a row sum off by {worst:.3g}"
            )
    return attn


def key_importance(attn: Array, *, causal: bool = True) -> Array:
    r"""The importance $\alpha_k$ of every key: its mean weight over the queries that see it.

    Args:
        attn: weights ``(..., T, T)``, rows are queries (unchecked; see :func:`sink_metric`).
        causal: if True, key $k$ is seen by $T - k$ queries; otherwise by all $T$.

    Returns:
        ``(..., T)`` in the dtype of ``attn``.
    """
    T = attn.shape[-1]
    seen_by = np.arange(T, 0, -1) if causal else np.full(T, T)  # (T,)
    return attn.sum(axis=-2) / seen_by.astype(attn.dtype)  # (..., T)


@dataclass(frozen=True, eq=False)
class SinkMetric:
    """What :func:`sink_metric` measures.

    Attributes:
        importance: $\\alpha_k$ of every key, ``(..., T)``.
        is_sink: whether ``importance[..., token] > epsilon``, ``(...)`` (one per head).
        rate: the share of heads (all leading axes together) that have a sink on ``token``.
    """

    importance: Array
    is_sink: Array
    rate: float


def sink_metric(
    attn: Array,
    *,
    epsilon: float = 0.3,
    token: int = 0,
    causal: bool = True,
    row_stochastic: bool = True,
) -> SinkMetric:
    r"""Key importance and sink rate of attention weights (the paper's metric).

    $\alpha_k = \frac{1}{T-k}\sum_{i \ge k} A_{ik}$ (causal) or $\frac1T \sum_i A_{ik}$, and the
    sink rate $\frac{1}{|\mathcal H|}\sum_{h \in \mathcal H} [\alpha^{h}_{\text{token}} >
    \epsilon]$ over every head $h$ of every leading axis (samples, layers, heads).

    Args:
        attn: weights ``(..., T, T)``, for example ``(L, B, H, T, T)`` from
            ``qkv.lab.decoder.forward(..., return_attention=True)``.
        epsilon: the threshold, in ``(0, 1)``; the paper's 0.3.
        token: the key whose sink rate is counted; the paper's 0 (the first token).
        causal: whether the weights are causal (decoder) or bidirectional (encoder).
        row_stochastic: require rows that sum to one (softmax); False for sigmoid weights.

    Returns:
        A :class:`SinkMetric`.

    Raises:
        ShapeError: ``attn`` is not ``(..., T, T)``.
        DTypeError: ``attn`` is not floating.
        ParameterError: ``epsilon`` outside ``(0, 1)``, ``token`` outside ``[0, T)``, or
            weights that are negative, leak above the diagonal (causal) or, when required,
            rows that do not sum to one.
    """
    epsilon = check_threshold("epsilon", epsilon)
    attn = check_weights(attn, causal=causal, row_stochastic=row_stochastic)
    T = attn.shape[-1]
    if isinstance(token, bool) or not isinstance(token, (int, np.integer)) or not 0 <= token < T:
        raise ParameterError(f"token: expected an index in [0, {T}), got {token!r}")
    importance = key_importance(attn, causal=causal)  # (..., T)
    is_sink = importance[..., token] > epsilon  # (...)
    return SinkMetric(importance, is_sink, float(np.mean(is_sink)))
