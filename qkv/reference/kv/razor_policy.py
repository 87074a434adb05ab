r"""RazorAttention: full cache for retrieval heads, sinks + recent + one compensation token else.

Paper: *RazorAttention: Efficient KV Cache Compression Through Retrieval Heads* (Tang et al.,
arXiv 2407.15891). No official repository was found; the closest code is Huawei's MindSpore
golden-stick ``razor_attention`` and msModelSlim's ``RARopeCompressConfig``.

**Finding the retrieval heads.** Feed BOS and a block of $T$ random tokens repeated a few times
(:func:`repeated_tokens`). At position $i$ of a repeat, the same token occurred at every
$j < i$ with $j \equiv i \pmod T$. An *echo* head attends to those earlier copies, an
*induction* head to the token that followed them:

$$
\mathrm{echo}_h = \frac{1}{|\mathcal P|}\sum_{(i,j)\in\mathcal P} A_{h,i,j}, \qquad
\mathrm{ind}_h = \frac{1}{|\mathcal P|}\sum_{(i,j)\in\mathcal P} A_{h,i,j+1}, \qquad
\mathcal P = \{(i, j) : j < i,\ j \equiv i \ (\mathrm{mod}\ T)\}
$$

over token positions (BOS excluded). The MindSpore code divides by $S^2$ instead of
$|\mathcal P|$: a constant factor, so the ranking is the same. A KV head takes the max over
its query heads; heads are ranked over all layers at once and the top ``echo_ratio`` (1%) by
echo together with the top ``induction_ratio`` (14%) by induction are the retrieval heads
(:func:`retrieval_heads`; at least one of each when a ratio is positive).

**The cache.** Retrieval heads keep everything. Every other head keeps the first $s$ sinks,
the recent tokens, and one *compensation token* for the dropped set $\mathcal D$, in
``local_capacity`` slots in all:

$$
\hat k = \frac{1}{|\mathcal D|}\sum_{j \in \mathcal D} k_j, \qquad
\hat v = \frac{1}{|\mathcal D|}\sum_{j \in \mathcal D} v_j .
$$

The paper weights the compensation token by $|\mathcal D|$ in the softmax (its term is
$|\mathcal D|\,e^{q\cdot\hat k}$ in numerator and denominator), so if every dropped key is the
same the output equals full attention exactly; that is ``weighting="count"`` (the default),
computed by :func:`compensated_attention` from the ``log_weight`` the policy stores (a slot's
logit bias, $\log|\mathcal D|$ on the compensation slot, 0 elsewhere); the lab engine passes
it as the ``bias`` of :func:`qkv.sparse_attention` at every decode step. ``weighting="mean"``
stores zero biases: the plain mean token that the MindSpore deploy code inserts. The
compensation token takes the slot (and token index) of the first dropped token, between the
sinks and the recent tokens; its key is the mean of the rotated keys and keeps that token's
position. The policy compresses once, after the prefill.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np

import qkv
from qkv.errors import ParameterError, ShapeError
from qkv.reference.kv.cache_checks import check_layout
from qkv.reference.kv.policy import CacheView, KeptCache, KVPolicy, check_budget, gather

Array = np.ndarray

WEIGHTINGS = ("count", "mean")


def repeated_tokens(
    rng: np.random.Generator, *, period: int, repeats: int, low: int, high: int, bos: int
) -> Array:
    """BOS followed by ``period`` random ids in ``[low, high)`` repeated ``repeats`` times.

    Returns:
        Token ids ``(1 + period * repeats,)`` int64.
    """
    block = rng.integers(low, high, size=period)  # (T,)
    return np.concatenate([[bos], np.tile(block, repeats)]).astype(np.int64)


def head_scores(attention: Array, period: int) -> tuple[Array, Array]:
    """Echo and induction scores of every head from its attention on :func:`repeated_tokens`.

    Args:
        attention: causal attention weights ``(..., S, S)`` (e.g. ``(L, H, S, S)``); position
            0 is BOS, the repeats follow.
        period: the repeated block's length ``T``.

    Returns:
        ``echo`` and ``induction``, each of shape ``attention.shape[:-2]``.
    """
    S = attention.shape[-1]
    if attention.shape[-2] != S or not 1 <= period < S - 1:
        raise ShapeError(
            f"attention: expected square maps (..., S, S) longer than period + 1={period + 1}, "
            f"got {attention.shape}"
        )
    pos = np.arange(1, S)  # token positions (BOS excluded)
    i, j = np.meshgrid(pos, pos, indexing="ij")  # (S-1, S-1) each
    pairs = (j < i) & ((i - j) % period == 0)
    ii, jj = i[pairs], j[pairs]  # (P,) each
    echo = attention[..., ii, jj].mean(-1)
    induction = attention[..., ii, jj + 1].mean(-1)
    return echo, induction


def retrieval_heads(
    echo: Array, induction: Array, *, echo_ratio: float = 0.01, induction_ratio: float = 0.14
) -> tuple[tuple[int, int], ...]:
    """Top ``echo_ratio`` heads by echo score united with the top ``induction_ratio`` by induction.

    Args:
        echo: scores per KV head ``(L, Hkv)`` (the max over each KV head's query heads).
        induction: scores per KV head ``(L, Hkv)``.
        echo_ratio: share of all heads taken by echo score (1% in the paper).
        induction_ratio: share taken by induction score (14% in the paper).

    Returns:
        Sorted ``(layer, kv_head)`` pairs.
    """
    if echo.ndim != 2 or echo.shape != induction.shape:
        raise ShapeError(
            f"echo, induction: expected two (L, Hkv) arrays, got {echo.shape}, {induction.shape}"
        )
    chosen: set[tuple[int, int]] = set()
    for name, ratio, s in (
        ("echo_ratio", echo_ratio, echo),
        ("induction_ratio", induction_ratio, induction),
    ):
        if not 0 <= ratio <= 1:
            raise ParameterError(f"{name}: expected a fraction in [0, 1], got {ratio!r}")
        n = math.ceil(ratio * s.size)
        best = np.argsort(-s.ravel(), kind="stable")[:n]
        chosen |= {tuple(int(a) for a in np.unravel_index(f, s.shape)) for f in best}
    return tuple(sorted(chosen))


def per_kv_head(scores: Array, n_kv_heads: int) -> Array:
    """Max over each KV group of query-head scores ``(..., H) -> (..., Hkv)``."""
    H = scores.shape[-1]
    return scores.reshape(*scores.shape[:-1], n_kv_heads, H // n_kv_heads).max(-1)


@dataclass(frozen=True)
class Razor(KVPolicy):
    """Full cache on the retrieval heads; sinks, a compensation token and recent tokens else.

    Args:
        retrieval: ``(layer, kv_head)`` pairs that keep the whole cache (from
            :func:`retrieval_heads`).
        local_capacity: slots of every other head: sinks + compensation token + recent
            (256 in the MindSpore code).
        n_sink: initial tokens kept (4).
        weighting: ``"count"`` (the paper: the compensation token counts ``|D|`` times) or
            ``"mean"`` (a plain mean token, the MindSpore deploy code).
    """

    retrieval: tuple[tuple[int, int], ...] = ()
    local_capacity: int = 256
    n_sink: int = 4
    weighting: Literal["count", "mean"] = "count"

    def __post_init__(self) -> None:
        check_budget("n_sink", self.n_sink, minimum=0)
        check_budget("local_capacity", self.local_capacity)
        if self.local_capacity < self.n_sink + 2:
            raise ParameterError(
                f"local_capacity: expected at least n_sink + 2 = {self.n_sink + 2} slots (sinks, "
                f"the compensation token and a recent token), got {self.local_capacity}"
            )
        if self.weighting not in WEIGHTINGS:
            raise ParameterError(f"weighting: expected one of {WEIGHTINGS}, got {self.weighting!r}")
        pairs = _pairs(self.retrieval)
        object.__setattr__(self, "retrieval", pairs)

    @property
    def recent(self) -> int:
        """Recent tokens kept by a non-retrieval head."""
        return self.local_capacity - self.n_sink - 1

    def score(self, layer: int, cache: CacheView) -> Array:
        """``+inf`` on tokens a head keeps as they are (all of a retrieval head's or of a head
        within ``local_capacity``; sinks and recent tokens of the others), the token index
        elsewhere, ``-inf`` on empty slots."""
        B, Hkv, C, _ = check_layout(cache, who="Razor")
        start = cache.n_tokens - self.recent
        keep = (cache.indices < self.n_sink) | (cache.indices >= start)  # (B, Hkv, C)
        keep = keep | self._retrieval_mask(layer, Hkv)[None, :, None]
        keep = keep | (cache.lengths <= self.local_capacity)[..., None]  # short heads: all
        score = np.where(keep, np.inf, cache.indices.astype(np.float64))
        return np.where(cache.valid, score, -np.inf)

    def _retrieval_mask(self, layer: int, Hkv: int) -> Array:
        bad = [h for l_, h in self.retrieval if l_ == layer and not 0 <= h < Hkv]
        if bad:
            raise ParameterError(f"retrieval: expected KV heads in [0, {Hkv}), got {bad}")
        return np.isin(np.arange(Hkv), [h for l_, h in self.retrieval if l_ == layer])

    def compress(self, layer: int, cache: CacheView) -> KeptCache:
        """Drop the middle of every non-retrieval head longer than ``local_capacity`` into one
        compensation token; ``extra`` gets ``log_weight (B, Hkv, K)`` and ``dropped (B, Hkv)``."""
        B, Hkv, C, _ = check_layout(cache, who="Razor")
        full = self.score(layer, cache) == np.inf  # (B, Hkv, C) kept as they are
        dropped = cache.valid & ~full  # (B, Hkv, C)
        n_drop = dropped.sum(-1)  # (B, Hkv)
        if not n_drop.any():
            kept = gather(cache, np.where(cache.valid, np.arange(C), -1))
            log_weight = np.zeros(kept.indices.shape)
            return _with_extra(kept, log_weight, n_drop)
        first = np.argmax(dropped, axis=-1)  # (B, Hkv) slot of the first dropped token
        comp = (n_drop > 0)[..., None] & (np.arange(C) == first[..., None])  # (B, Hkv, C)
        keep = full | comp
        K = int(keep.sum(-1).max())
        slots = np.sort(np.where(keep, np.arange(C), C), axis=-1)[..., :K]  # (B, Hkv, K)
        kept = gather(cache, np.where(slots < C, slots, -1))
        denom = np.maximum(n_drop, 1)[..., None]  # (B, Hkv, 1)
        k_hat = (dropped[..., None] * cache.keys).sum(2) / denom  # (B, Hkv, D)
        v_hat = (dropped[..., None] * cache.values).sum(2) / denom  # (B, Hkv, Dv)
        at = (slots == first[..., None]) & (n_drop > 0)[..., None]  # (B, Hkv, K)
        keys = np.where(at[..., None], k_hat[:, :, None].astype(cache.keys.dtype), kept.keys)
        values = np.where(at[..., None], v_hat[:, :, None].astype(cache.values.dtype), kept.values)
        count = np.log(np.maximum(n_drop, 1)).astype(np.float64)[..., None]  # (B, Hkv, 1)
        log_weight = np.where(at, count, 0.0) if self.weighting == "count" else np.zeros(at.shape)
        kept = KeptCache(kept.indices, keys, values, kept.positions, kept.next_position, kept.extra)
        return _with_extra(kept, log_weight, n_drop)


def _pairs(retrieval: Iterable) -> tuple[tuple[int, int], ...]:
    try:
        pairs = tuple(sorted({(int(a), int(b)) for a, b in retrieval}))
    except (TypeError, ValueError):
        raise ParameterError(
            f"retrieval: expected (layer, kv_head) integer pairs, got {retrieval!r}"
        ) from None
    if any(a < 0 or b < 0 for a, b in pairs):
        raise ParameterError(f"retrieval: expected non-negative (layer, kv_head), got {pairs}")
    return pairs


def _with_extra(kept: KeptCache, log_weight: Array, dropped: Array) -> KeptCache:
    extra = {**kept.extra, "log_weight": log_weight, "dropped": dropped.astype(np.int64)}
    return KeptCache(
        kept.indices, kept.keys, kept.values, kept.positions, kept.next_position, extra
    )


def compensated_attention(q: Array, kept: KeptCache, *, scale: float | None = None) -> Array:
    r"""Attention of queries over a kept cache with the per-slot logit bias ``log_weight``.

    $o = \sum_j e^{s_j + b_j} v_j / \sum_j e^{s_j + b_j}$ with $s_j = \text{scale}\, q \cdot k_j$
    and $b$ = ``kept.extra["log_weight"]`` (0 where absent), the paper's |D|-weighted softmax.

    Args:
        q: queries ``(B, H, N, D)`` (``H`` a multiple of the cache's ``Hkv``).
        kept: a :class:`Razor` result.
        scale: logit scale (default ``1 / sqrt(D)``).

    Returns:
        ``(B, H, N, Dv)``.
    """
    B, Hkv, K, D = kept.keys.shape
    group = q.shape[1] // Hkv
    bias = kept.extra.get("log_weight", np.zeros((B, Hkv, K)))  # (B, Hkv, K)
    bias = np.where(kept.indices >= 0, bias, -np.inf).astype(q.dtype)  # (B, Hkv, K)
    bias = np.repeat(bias, group, axis=1)[:, :, None, :]  # (B, H, 1, K)
    k = np.repeat(kept.keys, group, axis=1)  # (B, H, K, D)
    v = np.repeat(kept.values, group, axis=1)  # (B, H, K, Dv)
    return qkv.sdpa(q, k, v, mask=bias, scale=scale)


#: The catalog id.
razor = Razor
