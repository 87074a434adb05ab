r"""TokenSelect: per-head soft voting over cached tokens, with a selection cache.

Paper: *TokenSelect: Efficient Long-Context Inference and Length Extrapolation for LLMs via
Dynamic Token-Level KV Cache Selection* (Wu et al., arXiv 2411.02886). Official code:
https://github.com/pzs19/TokenSelect (``patcher/token_retrieval.py``).

At each decode step the query of every head scores the candidate tokens (all but the first
$n_{init}$ and the last $n_{local}$ of the $L$ cached), each head normalises its scores with a
softmax so that no single head with large logits dominates, and the heads vote:

$$
v_j = \sum_{h=1}^{H} \frac{e^{q_h \cdot k_{g(h),j}}}{\sum_{j' \in \mathcal C}
e^{q_h \cdot k_{g(h),j'}}}, \qquad j \in \mathcal C = \{n_{init}, \dots, L - n_{local} - 1\},
$$

(no $1/\sqrt d$, as in the official kernel). Every head of the layer then reads

$$
\mathcal I = \{0, \dots, n_{init} - 1\} \;\cup\; \operatorname{TopK}_{j \in \mathcal C}(v_j)
\;\cup\; \{L - n_{local}, \dots, L - 1\}.
$$

When $n_{init} + k + n_{local} \ge L$ the whole cache is read (as the official code does).

**Selection cache** (the paper's section on consecutive queries): when the cosine similarity of
this step's query (all heads' rotated queries, flattened) with the previous step's is at least
``threshold``, the previous top-k is reused and only the sink and local windows are refreshed.
:attr:`TokenSelect.hit_rate` reports the fraction of reuses. The released ``patch()`` turns
the cache off; ``cache_selection=False`` gives that variant. The official code maps query head
$h$ to KV head $h \bmod H_{kv}$; here it is $\lfloor h / G \rfloor$, the grouping the lab
decoder was trained with. The optional max-pooling of the votes (off by default in the
official code) is not offered.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qkv.errors import ParameterError
from qkv.reference.kv.policy import CacheView, KVSelector, check_budget
from qkv.reference.ranking import top_k as top_k_indices
from qkv.reference.sparse.decode_scores import (
    all_slots,
    check_shared_tokens,
    check_top_k,
    head_scores,
    slots_of,
)

Array = np.ndarray


def soft_vote(scores: Array) -> Array:
    r"""Per-head softmax over the candidates, summed over heads: $v_j$ above.

    Args:
        scores: ``q . k`` per head ``(B, H, C)``, ``-inf`` on slots that are not candidates.

    Returns:
        Votes ``(B, C)``, zero on non-candidates.
    """
    top = np.max(scores, axis=-1, keepdims=True)  # (B, H, 1)
    top = np.where(np.isfinite(top), top, 0.0)
    e = np.exp(scores - top)  # (B, H, C), 0 on non-candidates
    total = e.sum(axis=-1, keepdims=True)  # (B, H, 1)
    return np.sum(e / np.where(total > 0, total, 1.0), axis=1)  # (B, C)


def tokenselect_slots(
    scores: Array, length: int, *, n_init: int, n_local: int, top_k: int
) -> Array:
    """The slots every head reads: sinks, the top-``top_k`` voted candidates, the local window.

    Args:
        scores: ``q . k`` per head ``(B, H, C)`` over a cache whose first ``length`` slots hold
            the tokens in order.
        length: occupied slots ``L``.
        n_init: sink tokens always read.
        n_local: latest tokens always read.
        top_k: candidates chosen by vote (at most the ``L - n_init - n_local`` candidates).

    Returns:
        Sorted slots ``(B, n_init + top_k + n_local)``.
    """
    C = scores.shape[-1]
    n_cand = length - n_init - n_local
    top_k = check_top_k(top_k, max(n_cand, 0))
    slot = np.arange(C)
    candidate = (slot >= n_init) & (slot < length - n_local)  # (C,)
    votes = soft_vote(np.where(candidate, scores, -np.inf))  # (B, C)
    votes = np.where(candidate, votes, -np.inf)
    chosen = top_k_indices(votes, top_k)  # (B, top_k) best first, ties to the earlier slot
    return _with_windows(chosen, C, length, n_init, n_local)


def _with_windows(chosen: Array, C: int, length: int, n_init: int, n_local: int) -> Array:
    """``chosen (B, k)`` slots plus the sink and local windows, as sorted slots ``(B, S)``."""
    slot = np.arange(C)
    mask = np.broadcast_to(
        (slot < n_init) | ((slot >= length - n_local) & (slot < length)), (len(chosen), C)
    ).copy()  # (B, C)
    np.put_along_axis(mask, chosen, True, axis=-1)
    return slots_of(mask)


def check_threshold(threshold: Any) -> float:
    """A cosine-similarity threshold in ``[-1, 1]``, or a clear error."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating)):
        raise ParameterError(f"threshold: expected a number in [-1, 1], got {threshold!r}")
    if not -1.0 <= float(threshold) <= 1.0:
        raise ParameterError(
            f"threshold: expected a cosine similarity in [-1, 1], got {threshold!r}"
        )
    return float(threshold)


@dataclass(frozen=True)
class TokenSelect(KVSelector):
    """TokenSelect as a decode-time selector (defaults: the official Llama configuration).

    Attributes:
        n_init: sink tokens always read.
        n_local: latest tokens always read.
        top_k: middle tokens chosen by the heads' soft vote.
        threshold: cosine similarity of consecutive queries above which the last top-k is reused.
        cache_selection: use the selection cache (the paper); ``False`` recomputes every step
            (the released code).
    """

    n_init: int = 128
    n_local: int = 512
    top_k: int = 2048
    threshold: float = 0.9
    cache_selection: bool = True
    _state: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_budget("n_init", self.n_init, minimum=0)
        check_budget("n_local", self.n_local, minimum=1)
        check_budget("top_k", self.top_k)
        check_threshold(self.threshold)
        if not isinstance(self.cache_selection, bool):
            raise ParameterError(f"cache_selection: expected a bool, got {self.cache_selection!r}")
        self.reset()

    def reset(self) -> None:
        """Forget cached selections and zero the hit counters."""
        self._state.clear()
        self._state.update(lookups=0, hits=0, layers={})

    @property
    def hit_rate(self) -> float:
        """Fraction of selections (rows x layers x steps) served by the selection cache."""
        return self._state["hits"] / max(self._state["lookups"], 1)

    def select(self, layer: int, cache: CacheView) -> Array:
        """Sorted slots ``(B, H, S)`` every head of this layer reads."""
        H = cache.queries.shape[1]
        length = check_shared_tokens(cache, who="TokenSelect")
        if self.n_init + self.top_k + self.n_local >= length:
            self._state["layers"].pop(layer, None)
            return all_slots(cache, H)
        q = cache.queries[:, :, -1].reshape(len(cache.queries), -1)  # (B, H * D)
        C = cache.keys.shape[2]
        fresh = tokenselect_slots(
            head_scores(cache), length, n_init=self.n_init, n_local=self.n_local, top_k=self.top_k
        )  # (B, S)
        top = _middle(fresh, self.n_init, length - self.n_local)  # (B, top_k)
        before = self._state["layers"].get(layer)
        if (
            self.cache_selection
            and before is not None
            and before["n"] == cache.n_tokens - 1
            and before["q"].shape == q.shape
        ):
            cos = np.sum(q * before["q"], axis=-1) / (
                np.linalg.norm(q, axis=-1) * np.linalg.norm(before["q"], axis=-1) + 1e-30
            )  # (B,)
            hit = cos >= self.threshold  # (B,)
            top = np.where(hit[:, None], before["top"], top)  # (B, top_k)
            self._state["lookups"] += len(hit)
            self._state["hits"] += int(hit.sum())
        self._state["layers"][layer] = {"q": q, "top": top, "n": cache.n_tokens}
        slots = _with_windows(top, C, length, self.n_init, self.n_local)  # (B, S)
        return np.repeat(slots[:, None], H, axis=1)  # (B, H, S)


def _middle(slots: Array, lo: int, hi: int) -> Array:
    """The entries of sorted ``slots (B, S)`` in ``[lo, hi)`` (the same count in every row)."""
    inside = (slots >= lo) & (slots < hi)  # (B, S)
    return slots[inside].reshape(len(slots), -1)


#: The catalog id.
tokenselect = TokenSelect
