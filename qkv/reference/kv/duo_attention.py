r"""DuoAttention: retrieval heads keep the full KV cache, streaming heads sinks and recent tokens.

Paper: *DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming Heads*
(Xiao et al., arXiv 2410.10819). Official code: https://github.com/mit-han-lab/duo-attention.

Each (layer, KV head) gets a gate $\alpha \in [0, 1]$ that mixes full causal attention with
*streaming* attention, whose mask $\Lambda$ lets query $i$ see key $j \le i$ only if $j$ is one of
the first $s$ tokens (the sinks) or one of the last $r$ before it:

$$
\operatorname{attn}_h = \alpha_h \operatorname{full}_h + (1 - \alpha_h) \operatorname{streaming}_h,
\qquad \Lambda_{ij} = [\,j \le i\,] \land \big([\,j < s\,] \lor [\,i - j < r\,]\big).
$$

The gates are optimised on synthetic passkey data (:mod:`qkv.reference.kv.duo_training`) so that
the gated model's final hidden states match the full model's on the answer tokens, with an L1
push towards zero; then heads with $\alpha \ge \tau$ are *retrieval heads* (full cache) and the
others *streaming heads* (sinks + recent only). $\tau$ is a threshold (0.5 by default in the
official code) or the ``sparsity``-quantile of the gates (a target fraction of streaming heads),
after adding uniform noise in $[0, 10^{-6})$ to break ties, as the official code does.

:class:`DuoAttention` is the deployed policy. As in the official code, positions are not
re-assigned (each key keeps its position), and streaming heads are restricted after the prefill
and after every decoded token; unlike kvpress, which restricts them at decode time only. Here
the prefill runs full attention for every head and the cache is cut right after it, as the lab
engine does for every policy; the official code also restricts streaming heads *during* the
prefill (its mixed attention with $\alpha \in \{0, 1\}$ is :func:`duo_attention`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

import qkv
from qkv.errors import ParameterError, ShapeError
from qkv.reference.kv.head_budgets import check_head_mask, keep_where, sinks_and_recent
from qkv.reference.kv.policy import CacheView, KeptCache, KVPolicy, check_budget

Array = np.ndarray


def check_gates(gates: Array, *, name: str = "gates") -> Array:
    """Gates as a float array with every entry in ``[0, 1]``, or a clear error."""
    arr = np.asarray(gates)
    if arr.size == 0 or not np.issubdtype(arr.dtype, np.number) or arr.dtype.kind == "c":
        raise ParameterError(f"{name}: expected real gates in [0, 1], got {arr.dtype} {arr.shape}")
    arr = arr.astype(np.float64) if arr.dtype.kind in "iub" else arr
    if not np.all((arr >= 0) & (arr <= 1)):
        bad = arr[~((arr >= 0) & (arr <= 1))]
        raise ParameterError(
            f"{name}: expected every gate in [0, 1], got {bad.size} outside (e.g. {bad.flat[0]!r})"
        )
    return arr


def check_fraction(name: str, value: float) -> float:
    """A number in ``[0, 1]``, or a clear error."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ParameterError(f"{name}: expected a number in [0, 1], got {value!r}")
    if not 0.0 <= float(value) <= 1.0:
        raise ParameterError(f"{name}: expected a number in [0, 1], got {value!r}")
    return float(value)


def streaming_mask(n_queries: int, n_keys: int, *, n_sink: int, recent: int) -> Array:
    r"""The $\Lambda$ mask ``(N, M)`` bool: causal, sinks and the last ``recent`` keys.

    Queries are aligned to the end of the keys (query ``i`` is token ``M - N + i``).
    """
    i = np.arange(n_queries)[:, None] + (n_keys - n_queries)  # (N, 1) token of each query
    j = np.arange(n_keys)[None, :]  # (1, M)
    return (j <= i) & ((j < n_sink) | (i - j < recent))


def duo_attention(
    q: Array,
    k: Array,
    v: Array,
    gates: Array,
    *,
    n_sink: int = 4,
    recent: int = 28,
    scale: float | None = None,
) -> Array:
    r"""Gated mix of full causal and streaming attention, one gate per KV head.

    $$O_h = \alpha_{g(h)}\,\operatorname{softmax}(S_h + M_{\text{causal}}) V
          + (1 - \alpha_{g(h)})\,\operatorname{softmax}(S_h + M_\Lambda) V$$

    with $g(h)$ the KV head that query head $h$ reads.

    Args:
        q: queries ``(B, H, N, D)``.
        k: keys ``(B, Hkv, M, D)`` (``M >= N``; queries are the last ``N`` tokens).
        v: values ``(B, Hkv, M, Dv)``.
        gates: ``(Hkv,)`` in ``[0, 1]``; 1 is a retrieval head, 0 a streaming head.
        n_sink: sink tokens every streaming query sees.
        recent: tokens of the local window, the query's own included.
        scale: score scale, default ``1/sqrt(D)``.

    Returns:
        ``(B, H, N, Dv)`` in the dtype of ``q``.
    """
    gates = check_gates(gates)
    check_budget("n_sink", n_sink, minimum=0)
    check_budget("recent", recent)
    if q.ndim != 4 or k.ndim != 4:
        raise ShapeError(
            f"q, k: expected (B, H, N, D) and (B, Hkv, M, D), got {q.shape}, {k.shape}"
        )
    Hkv = k.shape[1]
    if gates.shape != (Hkv,):
        raise ShapeError(f"gates: expected one gate per KV head, shape ({Hkv},), got {gates.shape}")
    N, M = q.shape[2], k.shape[2]
    full = qkv.sdpa(q, k, v, causal=True, scale=scale)  # (B, H, N, Dv)
    lam = streaming_mask(N, M, n_sink=n_sink, recent=recent)  # (N, M)
    stream = qkv.sdpa(q, k, v, mask=lam, scale=scale)  # (B, H, N, Dv)
    alpha = np.repeat(gates, q.shape[1] // Hkv).astype(q.dtype)[:, None, None]  # (H, 1, 1)
    return alpha * full + (1 - alpha) * stream


def retrieval_heads(
    gates: Array, *, threshold: float = 0.5, sparsity: float | None = None, seed: int = 0
) -> Array:
    r"""Which (layer, KV head) keep the full cache: ``gates >= tau``, bool, same shape.

    Args:
        gates: gates ``(L, Hkv)`` in ``[0, 1]``.
        threshold: $\tau$ when ``sparsity`` is None (the official default 0.5).
        sparsity: target fraction of streaming heads; $\tau$ is then the ``sparsity``-quantile
            of the gates after tie-breaking noise $U(0, 10^{-6})$.
        seed: seed of that noise.
    """
    gates = check_gates(gates)
    threshold = check_fraction("threshold", threshold)
    if sparsity is None:
        return gates >= threshold
    sparsity = check_fraction("sparsity", sparsity)
    noisy = gates + np.random.default_rng(seed).uniform(0, 1e-6, size=gates.shape)
    if sparsity == 1.0:
        return np.zeros(gates.shape, dtype=bool)
    return noisy >= np.quantile(noisy, sparsity)


@dataclass(frozen=True)
class DuoAttention(KVPolicy):
    """Full cache for retrieval heads, sinks + recent window for streaming heads.

    Args:
        gates: optimised gates, one row per layer, one entry per KV head, each in ``[0, 1]``
            (see :func:`qkv.reference.kv.duo_training.train_gates`).
        threshold: gates at or above it are retrieval heads (official default 0.5).
        sparsity: if given, the fraction of heads made streaming instead of ``threshold``.
        n_sink: sink tokens streaming heads keep.
        recent: recent tokens streaming heads keep.
        seed: seed of the tie-breaking noise used with ``sparsity``.
    """

    gates: tuple[tuple[float, ...], ...]
    threshold: float = 0.5
    sparsity: float | None = None
    n_sink: int = 4
    recent: int = 28
    seed: int = 0

    every_step: ClassVar[bool] = True

    def __post_init__(self) -> None:
        gates = check_gates(self.gates)
        if gates.ndim != 2:
            raise ShapeError(f"gates: expected (layers, KV heads), got shape {gates.shape}")
        object.__setattr__(self, "gates", tuple(tuple(float(g) for g in row) for row in gates))
        check_fraction("threshold", self.threshold)
        if self.sparsity is not None:
            check_fraction("sparsity", self.sparsity)
        check_budget("n_sink", self.n_sink, minimum=0)
        check_budget("recent", self.recent)

    @classmethod
    def for_budget(cls, gates: Array, budget: int, *, n_sink: int = 4, **kw) -> DuoAttention:
        """Streaming heads keep ``budget`` tokens: ``n_sink`` sinks and ``budget - n_sink`` recent."""
        check_budget("n_sink", n_sink, minimum=0)
        check_budget("budget", budget, minimum=n_sink + 1)
        return cls(gates=gates, n_sink=n_sink, recent=budget - n_sink, **kw)

    @property
    def retrieval(self) -> Array:
        """Retrieval heads ``(L, Hkv)`` bool."""
        return retrieval_heads(
            np.array(self.gates), threshold=self.threshold, sparsity=self.sparsity, seed=self.seed
        )

    def score(self, layer: int, cache: CacheView) -> Array:
        """``+inf`` on every slot of a retrieval head and on sinks; recency elsewhere."""
        full = check_head_mask("gates", self.retrieval, cache, layer)  # (Hkv,)
        idx = cache.indices.astype(np.float64)  # (B, Hkv, C)
        score = np.where(full[None, :, None] | (cache.indices < self.n_sink), np.inf, idx)
        return np.where(cache.valid, score, -np.inf)

    def compress(self, layer: int, cache: CacheView) -> KeptCache:
        """Keep every token of retrieval heads and sinks + recent of streaming heads."""
        full = check_head_mask("gates", self.retrieval, cache, layer)  # (Hkv,)
        keep = full[None, :, None] | sinks_and_recent(cache, self.n_sink, self.recent)
        return keep_where(cache, keep)


#: The catalog id.
duo = DuoAttention
