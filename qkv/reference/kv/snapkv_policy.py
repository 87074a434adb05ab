r"""SnapKV: the last queries of the prompt vote for the keys worth keeping.

Paper: *SnapKV: LLM Knows What You are Looking for Before Generation* (Li et al., arXiv
2404.14469). Official code: https://github.com/FasterDecoding/SnapKV.

After the prefill, the last $w$ prompt queries (the *observation window*) already attend to
what generation will need. With $A_{h} = \operatorname{softmax}(Q_{h,\text{win}} K_h^\top /
\sqrt d)$ over the whole (causal) row, each prefix key $j$ gets the vote

$$
C_{h,j} = \sum_{i \in \text{win}} A_{h,i,j}, \qquad
\tilde C_{h} = \operatorname{pool}_k(C_h),
$$

smoothed by a 1-D pool (``"avgpool"`` or ``"maxpool"``, odd kernel $k$, stride 1, padding
$\lfloor k/2 \rfloor$; zeros pad the average, $-\infty$ the max), and each head keeps

$$
\mathcal K_h = \operatorname{top}_{B - w}(\tilde C_h) \;\cup\; \text{win},
$$

$B$ = ``budget`` tokens in all. A prompt of at most ``budget`` tokens is left as it is. The
policy compresses once, after the prefill (``every_step`` is off).

Grouped-query attention (``gqa``): the official code repeats the KV heads to the query heads
before selecting, so every *query* head picks its own top-$(B - w)$. The cache here is stored
per KV head, so ``gqa="query"`` keeps, per KV head, the *union* of its query heads' picks (at
most ``group * (B - w) + w`` tokens, the official code's memory; each query head then reads the
whole union, a superset of its own pick). ``gqa="mean"`` averages the pooled votes over the
group and keeps exactly $B$ tokens per KV head, as kvpress' ``SnapKVPress`` does (kvpress also
averages rather than sums over the window, which ranks the same).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from qkv.errors import ParameterError, ShapeError
from qkv.reference.kv.cache_checks import check_layout
from qkv.reference.kv.policy import (
    CacheView,
    KeptCache,
    KVPolicy,
    check_budget,
    check_window_budget,
    gather,
    keep_top,
)
from qkv.reference.kv.window_scoring import POOLINGS, pool1d  # noqa: F401 (pool1d re-exported)
from qkv.reference.ranking import top_k

Array = np.ndarray

GQA_MODES = ("query", "mean")


@dataclass(frozen=True)
class SnapKV(KVPolicy):
    """Keep the observation window and each head's top prefix tokens by pooled window votes.

    Args:
        budget: tokens kept per head (``max_capacity_prompt``; 2048 in ``init_snapkv``).
        window: observation window ``w``, always kept (32 in ``init_snapkv``).
        kernel: pooling kernel, odd (5 in ``init_snapkv``).
        pooling: ``"avgpool"`` (``init_snapkv``) or ``"maxpool"`` (the LongBench configs).
        gqa: ``"query"`` (each query head votes alone, the official code) or ``"mean"``
            (votes averaged over the KV group, kvpress).
    """

    budget: int = 2048
    window: int = 32
    kernel: int = 5
    pooling: Literal["avgpool", "maxpool"] = "avgpool"
    gqa: Literal["query", "mean"] = "query"

    def __post_init__(self) -> None:
        check_window_budget(self.budget, self.window, rest="the rest is chosen")
        check_budget("kernel", self.kernel)
        if self.kernel % 2 == 0:
            raise ParameterError(
                f"kernel: expected an odd pooling kernel (stride 1, padding kernel // 2), got "
                f"{self.kernel}"
            )
        if self.pooling not in POOLINGS:
            raise ParameterError(f"pooling: expected one of {POOLINGS}, got {self.pooling!r}")
        if self.gqa not in GQA_MODES:
            raise ParameterError(f"gqa: expected one of {GQA_MODES}, got {self.gqa!r}")

    def _split(self, cache: CacheView) -> tuple[Array, Array]:
        """Window slots and prefix slots, ``(B, Hkv, C)`` bool each."""
        start = cache.n_tokens - self.window
        return cache.valid & (cache.indices >= start), cache.valid & (cache.indices < start)

    def votes(self, layer: int, cache: CacheView) -> Array:
        r"""Pooled votes $\tilde C$ of every query head ``(B, H, C)``; ``-inf`` off the prefix."""
        B, Hkv, C, H = check_layout(cache, who="SnapKV")
        W = cache.queries.shape[2]
        if W < self.window:
            raise ShapeError(
                f"SnapKV: cache queries expected the last window={self.window} prompt queries, "
                f"got {W}"
            )
        import qkv  # the dispatched op: the current backend's kernel scores

        q = cache.queries[:, :, -self.window :]  # (B, H, w, D)
        return qkv.window_scores(
            q,
            cache.keys,
            np.where(cache.valid, cache.indices, -1),
            n_tokens=cache.n_tokens,
            kernel=self.kernel,
            pooling=self.pooling,
        )

    def score(self, layer: int, cache: CacheView) -> Array:
        """Per KV head: the group's mean (``gqa="mean"``) or max (``"query"``) pooled vote;
        ``+inf`` on the window, ``-inf`` on empty slots ``(B, Hkv, C)``."""
        B, Hkv, C, H = check_layout(cache, who="SnapKV")
        v = self.votes(layer, cache).reshape(B, Hkv, H // Hkv, C)  # (B, Hkv, group, C)
        agg = v.mean(axis=2) if self.gqa == "mean" else v.max(axis=2)  # (B, Hkv, C)
        window, _ = self._split(cache)
        return np.where(window, np.inf, np.where(cache.valid, agg, -np.inf))

    def compress(self, layer: int, cache: CacheView) -> KeptCache:
        """The window plus the top ``budget - window`` prefix tokens per head (or per query
        head, unioned over the group, with ``gqa="query"``); short caches are kept whole."""
        B, Hkv, C, H = check_layout(cache, who="SnapKV")
        if int(cache.lengths.max()) <= self.budget:
            return gather(cache, np.where(cache.valid, np.arange(C), -1))
        if self.gqa == "mean":
            return keep_top(cache, self.score(layer, cache), self.budget)
        votes = self.votes(layer, cache)  # (B, H, C)
        k = min(self.budget - self.window, C)
        top = top_k(votes, k)  # (B, H, k)
        picked = np.zeros(votes.shape, dtype=bool)  # (B, H, C)
        np.put_along_axis(picked, top, True, axis=-1)
        picked &= np.isfinite(votes)
        window, _ = self._split(cache)
        keep = picked.reshape(B, Hkv, H // Hkv, C).any(axis=2) | window  # (B, Hkv, C)
        K = int(keep.sum(-1).max())
        slots = np.sort(np.where(keep, np.arange(C), C), axis=-1)[..., :K]  # (B, Hkv, K)
        return gather(cache, np.where(slots < C, slots, -1))


#: The catalog id.
snapkv = SnapKV
