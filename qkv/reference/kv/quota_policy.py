r"""QuoTA: split the cache budget across segments by their relevance to the query.

Paper: *QuoTA: Query-oriented Token Assignment via CoT Query Decouple for Long Video
Comprehension* (Luo et al., arXiv 2503.08689). Official code:
https://github.com/MAC-AutoML/QuoTA.

QuoTA scores each video *frame* for its relevance to the question (with a small scoring model
and a chain-of-thought rewrite of the question), then gives each frame a share of a fixed
token budget in proportion to its score, before the language model sees any token. Here the
same assignment is applied to a KV cache: the *frames* are fixed-size segments of the prompt
(``segment`` tokens each), the *query* is the observation window (the last ``window`` prompt
queries), and the relevance comes from the model's own attention (no scoring model).

**Relevance.** With causal attention weights $A_{h,i,j}$ of the window queries, the vote of
token $j$ for KV head $g$ and the relevance of segment $s$ are

$$
t_{g,j} = \sum_{h \in \mathcal G(g)} \sum_{i \in \text{win}} A_{h,i,j},
\qquad
r_{g,s} = \sum_{j \in s} t_{g,j}.
$$

**Budget split** (our rule; the paper's frames all have the same size). The window is always
kept; the other $T = B - w$ tokens are split across the $S$ segments: every segment first gets
a floor $f' = \min(f, \lfloor T / S \rfloor)$ (``floor`` $f$, lowered when $T$ cannot cover it),
and the rest $R = T - S f'$ goes in proportion to relevance,

$$
x_s = R\,\frac{r_s}{\sum_{s'} r_{s'}},
$$

capped at the segment's size by water-filling (a full segment's excess is shared again among
the others in proportion to relevance; if every relevant segment is full, evenly among the
rest). Whole tokens: $\lfloor x_s \rfloor$, then the remaining tokens to the largest fractional
parts (Hamilton's rule; ties to the earlier segment). So the budgets sum to $T$, a segment of
zero relevance gets the floor, and equal relevances give an even split.

**Selection.** Segment $s$ keeps its $k_s$ tokens of largest $t_{g,j}$. A prompt of at most
$B$ tokens is kept whole; the policy compresses once, after the prefill.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qkv.reference.kv.critic_policy import check_window
from qkv.reference.kv.head_budgets import keep_where
from qkv.reference.kv.policy import (
    CacheView,
    KeptCache,
    KVPolicy,
    check_budget,
    check_window_budget,
    gather,
)
from qkv.reference.kv.taskkv_policy import window_attention

Array = np.ndarray


def water_fill(relevance: Array, room: Array, amount: float) -> Array:
    """Share ``amount`` in proportion to ``relevance (S,)``, each share capped at ``room (S,)``.

    A capped segment's excess is shared again among the others; once every segment of
    positive relevance is full, what is left is spread evenly over the segments with room.
    Returns real shares ``(S,)`` that sum to ``min(amount, room.sum())``.
    """
    share = np.zeros(len(room))
    active = room > 0
    left = float(min(amount, room.sum()))
    while left > 0 and active.any():
        weight = np.where(active, relevance, 0.0)  # (S,)
        if weight.sum() <= 0:
            weight = active.astype(np.float64)
        x = left * weight / weight.sum()  # (S,)
        over = active & (x >= room)
        if not over.any():
            return share + x
        left -= float((room - share)[over].sum())
        share[over] = room[over]
        active &= ~over
    return share


def split_budget(relevance: Array, sizes: Array, total: int, floor: int) -> Array:
    r"""Integer budgets ``(S,)`` of the segments: the floor, then shares by relevance.

    Args:
        relevance: non-negative relevance of each segment ``(S,)``.
        sizes: tokens each segment holds ``(S,)`` (no budget exceeds its size).
        total: tokens to assign (at most ``sizes.sum()`` are).
        floor: tokens every segment gets first, lowered to ``total // S`` when needed.

    Returns:
        ``k (S,)`` int64 with ``k.sum() == min(total, sizes.sum())`` and ``k <= sizes``.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    S = len(sizes)
    total = int(min(total, sizes.sum()))
    if S == 0 or total <= 0:
        return np.zeros(S, dtype=np.int64)
    base = np.minimum(min(floor, total // S), sizes)  # (S,)
    room = sizes - base  # (S,)
    left = total - int(base.sum())
    x = water_fill(np.asarray(relevance, dtype=np.float64), room.astype(np.float64), left)
    whole = np.minimum(np.floor(x).astype(np.int64), room)  # (S,)
    frac = np.where(whole < room, x - whole, -np.inf)  # (S,); full segments take no more
    extra = left - int(whole.sum())
    order = np.argsort(-frac, kind="stable")[:extra]  # largest remainders, earlier on ties
    whole[order] += 1
    return base + whole


@dataclass(frozen=True)
class QuoTA(KVPolicy):
    """The observation window plus, per segment, a relevance-proportional share of the budget.

    Args:
        budget: tokens kept per KV head (the window included).
        window: observation window: the last prompt queries (the *query*), always kept.
        segment: tokens per segment (the paper's frames) of the rest of the prompt.
        floor: tokens every segment is guaranteed (lowered when the budget cannot cover it).
    """

    budget: int = 128
    window: int = 16
    segment: int = 32
    floor: int = 1

    def __post_init__(self) -> None:
        check_window_budget(self.budget, self.window, rest="the rest is assigned to segments")
        check_budget("segment", self.segment)
        check_budget("floor", self.floor, minimum=0)

    def token_votes(self, cache: CacheView) -> Array:
        r"""$t_{g,j}$: window attention per KV head and slot ``(B, Hkv, C)`` (0 when empty)."""
        check_window(cache, self.window, who="QuoTA")
        _, p = window_attention(cache, self.window)  # (B, H, w, C)
        B, Hkv, C = cache.indices.shape
        return p.reshape(B, Hkv, -1, C).sum(axis=2)  # (B, Hkv, C)

    def segments(self, cache: CacheView) -> Array:
        """Segment of each prefix slot ``(B, Hkv, C)``; ``-1`` on the window and empty slots."""
        prefix = cache.valid & (cache.indices < cache.n_tokens - self.window)  # (B, Hkv, C)
        return np.where(prefix, cache.indices // self.segment, -1)

    def relevance(self, cache: CacheView) -> Array:
        r"""$r_{g,s}$ of every segment ``(B, Hkv, S)``."""
        votes, seg = self.token_votes(cache), self.segments(cache)  # (B, Hkv, C) each
        S = -(-max(cache.n_tokens - self.window, 0) // self.segment)
        onehot = seg[..., None] == np.arange(S)  # (B, Hkv, C, S)
        return np.einsum("bgc,bgcs->bgs", votes, onehot.astype(votes.dtype))

    def score(self, layer: int, cache: CacheView) -> Array:
        """Token votes, ``+inf`` on the window, ``-inf`` on empty slots ``(B, Hkv, C)``."""
        votes = self.token_votes(cache)
        window = cache.valid & (self.segments(cache) < 0)
        return np.where(window, np.inf, np.where(cache.valid, votes, -np.inf))

    def budgets(self, cache: CacheView) -> Array:
        """Tokens assigned to each segment ``(B, Hkv, S)`` int64 (they sum to budget - window,
        or to the prefix when it is shorter)."""
        rel = self.relevance(cache)  # (B, Hkv, S)
        seg = self.segments(cache)
        sizes = (seg[..., None] == np.arange(rel.shape[-1])).sum(axis=2)  # (B, Hkv, S)
        out = np.zeros(rel.shape, dtype=np.int64)
        for b, g in np.ndindex(*rel.shape[:2]):
            out[b, g] = split_budget(rel[b, g], sizes[b, g], self.budget - self.window, self.floor)
        return out

    def compress(self, layer: int, cache: CacheView) -> KeptCache:
        """The window plus each segment's top tokens within its budget; short caches whole."""
        check_window(cache, self.window, who="QuoTA")
        if int(cache.lengths.max()) <= self.budget:
            return gather(cache, np.where(cache.valid, np.arange(cache.keys.shape[2]), -1))
        votes, seg, k = self.token_votes(cache), self.segments(cache), self.budgets(cache)
        keep = cache.valid & (seg < 0)  # (B, Hkv, C): the window
        for b, g in np.ndindex(*k.shape[:2]):
            for s in np.flatnonzero(k[b, g]):
                slots = np.flatnonzero(seg[b, g] == s)
                best = slots[np.argsort(-votes[b, g, slots], kind="stable")[: k[b, g, s]]]
                keep[b, g, best] = True
        return keep_where(cache, keep)


#: The catalog id.
quota = QuoTA
