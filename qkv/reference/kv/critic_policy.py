r"""CRITIC: keep the tokens the current context reads most, plus sinks and the recent window.

Paper: *Scaling Test-Time Inference with Policy-Optimized, Dynamic Retrieval-Augmented
Generation via KV Caching and Decoding* (arXiv 2504.01281), which proposes CRITIC "to
selectively compress key-value caches by token importance". No official code was found and
the paper's text available to us gives no scoring formula, so the form below is derived and
documented as a choice.

**Token importance.** The last $w$ prompt queries (the observation window, the context closest
to what is generated next) vote with their attention. For KV head $g$ with query heads
$\mathcal G(g)$ and causal attention weights $A_{h,i,j}$ over the cache,

$$
I_{g,j} = \frac{1}{w\,\lvert\mathcal G(g)\rvert}
\sum_{h \in \mathcal G(g)} \sum_{i \in \text{win}} A_{h,i,j},
$$

the mean attention token $j$ receives (``importance="attention"``, the default). Attention
alone ignores what the token contributes: with ``importance="output"`` the vote is weighted by
the size of the token's value, $I_{g,j}\,\lVert v_{g,j} \rVert_2$, the norm of its term in the
attention output $\sum_j A_{h,i,j} v_j$.

**Selection.** Each KV head keeps $B$ = ``budget`` tokens: the first ``n_sink`` tokens
(attention sinks), the ``window`` tokens of the observation window, and the
$B - s - w$ other tokens of largest importance (ties to the earlier token). A prompt of at
most $B$ tokens is kept whole. The policy compresses once, after the prefill.

Without pooling this ranks the tokens of a KV head as SnapKV with ``kernel=1`` and
``gqa="mean"`` does (a mean instead of a sum, the same order); CRITIC adds the sinks and the
value-norm variant. Why this form: it is the simplest reading of "compress by token importance" that uses what a
KV policy sees (queries, keys, values), with the two protections every attention-scored
eviction method needs (sinks, whose attention is structural, and the recent window, whose
scores are not yet informative).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from qkv.errors import ParameterError, ShapeError
from qkv.reference.kv.cache_checks import check_layout
from qkv.reference.kv.head_budgets import sinks_and_recent
from qkv.reference.kv.policy import CacheView, KeptCache, KVPolicy, check_budget, keep_top
from qkv.reference.kv.taskkv_policy import window_attention

Array = np.ndarray

IMPORTANCES = ("attention", "output")


def check_window(cache: CacheView, window: int, *, who: str) -> tuple[int, int, int, int]:
    """The cache's ``(B, Hkv, C, H)`` after checking it holds ``window`` recent queries."""
    B, Hkv, C, H = check_layout(cache, who=who)
    W = cache.queries.shape[2]
    if W < window:
        raise ShapeError(
            f"{who}: cache queries expected at least the last window={window} prompt queries, "
            f"got {W}"
        )
    return B, Hkv, C, H


def mean_window_attention(cache: CacheView, window: int) -> Array:
    r"""$\frac{1}{w |\mathcal G|}\sum_{h, i} A_{h,i,j}$ per KV head and slot ``(B, Hkv, C)``
    (0 on empty slots), from the last ``window`` queries of ``cache.queries``."""
    _, p = window_attention(cache, window)  # (B, H, w, C)
    B, Hkv, C = cache.indices.shape
    group = p.shape[1] // Hkv
    return p.reshape(B, Hkv, group * p.shape[2], C).mean(axis=2)  # (B, Hkv, C)


@dataclass(frozen=True)
class Critic(KVPolicy):
    """Sinks, the observation window and the most important other tokens, ``budget`` per head.

    Args:
        budget: tokens kept per KV head (sinks and window included).
        window: observation window: the last prompt queries that vote, their tokens kept.
        n_sink: first tokens always kept (attention sinks).
        importance: ``"attention"`` (mean window attention) or ``"output"`` (attention times
            the value's norm).
    """

    budget: int = 128
    window: int = 16
    n_sink: int = 4
    importance: Literal["attention", "output"] = "attention"

    def __post_init__(self) -> None:
        check_budget("window", self.window)
        check_budget("n_sink", self.n_sink, minimum=0)
        check_budget("budget", self.budget)
        if self.budget <= self.n_sink + self.window:
            raise ParameterError(
                f"budget: expected more than n_sink + window = {self.n_sink + self.window} "
                f"tokens (those are always kept, the rest is chosen), got {self.budget}"
            )
        if self.importance not in IMPORTANCES:
            raise ParameterError(
                f"importance: expected one of {IMPORTANCES}, got {self.importance!r}"
            )

    def importance_of(self, cache: CacheView) -> Array:
        """Importance $I$ of every cached token ``(B, Hkv, C)`` (``-inf`` on empty slots)."""
        check_window(cache, self.window, who="Critic")
        score = mean_window_attention(cache, self.window)  # (B, Hkv, C)
        if self.importance == "output":
            score = score * np.linalg.norm(cache.values, axis=-1)  # (B, Hkv, C)
        return np.where(cache.valid, score, -np.inf)

    def score(self, layer: int, cache: CacheView) -> Array:
        """Importance, ``+inf`` on sinks and the window, ``-inf`` on empty slots ``(B, Hkv, C)``."""
        importance = self.importance_of(cache)  # (B, Hkv, C), checks the cache first
        always = sinks_and_recent(cache, self.n_sink, self.window)  # (B, Hkv, C)
        return np.where(always, np.inf, importance)

    def compress(self, layer: int, cache: CacheView) -> KeptCache:
        """The ``budget`` best-scored tokens of each KV head, in token order."""
        return keep_top(cache, self.score(layer, cache), self.budget)


#: The catalog id.
critic = Critic
