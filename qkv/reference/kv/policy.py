r"""The protocol every KV-cache method follows: score the cached tokens, keep some of them.

A cache, per layer, holds for each KV head up to $C$ slots: rotated keys, values, the index of
the token each slot came from (``-1`` for an empty slot) and the RoPE position the key is
rotated at. Heads may keep different numbers of tokens; kept slots come first, in token order.

A :class:`KVPolicy` is a frozen dataclass whose constructor validates its hyperparameters. It
answers two questions:

* :meth:`KVPolicy.score`: how important is each cached token, per KV head
  (``(B, Hkv, C)``; ``-inf`` on empty slots);
* :meth:`KVPolicy.compress`: which tokens stay, returned as a :class:`KeptCache` (indices,
  keys, values, positions, the next token's position, and any extra state such as a
  compensation token or quantisation parameters).

The default :meth:`KVPolicy.compress` keeps the ``budget`` best-scored tokens of each head
(:func:`keep_top`). A :class:`KVSelector` instead chooses, at each decode step, which cached
keys the query reads; its indices feed :func:`qkv.sparse_attention`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from qkv.errors import ParameterError, ShapeError
from qkv.reference.ranking import top_k

Array = np.ndarray


@dataclass(frozen=True, eq=False)
class CacheView:
    """One layer's cache as a policy sees it (dense, padded).

    Attributes:
        keys: rotated keys ``(B, Hkv, C, D)``.
        values: values ``(B, Hkv, C, Dv)``.
        indices: token index of each slot ``(B, Hkv, C)`` int64, ``-1`` where empty.
        positions: RoPE position each key is rotated at ``(B, Hkv, C)`` int64.
        next_position: position the next token will take, per KV head ``(B, Hkv)`` int64.
        n_tokens: tokens seen so far (prompt and decoded).
        queries: the most recent rotated queries ``(B, H, W, D)`` (the prompt's at prefill,
            the last token's at a decode step), for attention-based scores.
        extra: state a policy left in the cache (for example a compensation token).
        rope_base: the model's RoPE base (for policies that re-rotate keys).
    """

    keys: Array
    values: Array
    indices: Array
    positions: Array
    next_position: Array
    n_tokens: int
    queries: Array
    extra: dict[str, Any] = field(default_factory=dict)
    rope_base: float = 10000.0

    @property
    def valid(self) -> Array:
        """Occupied slots ``(B, Hkv, C)`` bool."""
        return self.indices >= 0

    @property
    def lengths(self) -> Array:
        """Occupied slots per KV head ``(B, Hkv)``."""
        return self.valid.sum(axis=-1)


@dataclass(frozen=True, eq=False)
class KeptCache:
    """What a policy keeps: the same fields as :class:`CacheView`, for the kept slots.

    Attributes:
        indices: kept token indices ``(B, Hkv, K)``, ``-1`` padding at the end of each row.
        keys: their keys ``(B, Hkv, K, D)`` (rotated at ``positions``).
        values: their values ``(B, Hkv, K, Dv)``.
        positions: RoPE positions of the kept keys ``(B, Hkv, K)``.
        next_position: the next token's position per KV head ``(B, Hkv)``.
        extra: state to keep (compensation tokens, quantisation scales, ...).
    """

    indices: Array
    keys: Array
    values: Array
    positions: Array
    next_position: Array
    extra: dict[str, Any] = field(default_factory=dict)


def gather(cache: CacheView, slots: Array) -> KeptCache:
    """Keep the given cache slots ``(B, Hkv, K)`` (``-1`` = none), in the order given."""
    valid = slots >= 0  # (B, Hkv, K)
    safe = np.where(valid, slots, 0)  # (B, Hkv, K)
    keys = np.take_along_axis(cache.keys, safe[..., None], axis=2)  # (B, Hkv, K, D)
    values = np.take_along_axis(cache.values, safe[..., None], axis=2)  # (B, Hkv, K, Dv)
    return KeptCache(
        indices=np.where(valid, np.take_along_axis(cache.indices, safe, axis=2), -1),
        keys=np.where(valid[..., None], keys, 0),
        values=np.where(valid[..., None], values, 0),
        positions=np.where(valid, np.take_along_axis(cache.positions, safe, axis=2), 0),
        next_position=cache.next_position.copy(),
        extra=dict(cache.extra),
    )


def keep_top(cache: CacheView, scores: Array, budget: int) -> KeptCache:
    """Keep the ``budget`` highest-scored occupied slots of each KV head, in token order.

    Ties go to the earlier slot. With ``budget`` at least a head's occupancy nothing is
    dropped there.
    """
    C = scores.shape[-1]
    k = min(budget, C)
    scores = np.where(cache.valid, scores, -np.inf)  # (B, Hkv, C)
    order = top_k(scores, k)  # (B, Hkv, k) best first
    chosen = np.take_along_axis(cache.valid, order, axis=-1)  # empty slots never count
    slots = np.sort(np.where(chosen, order, C), axis=-1)  # token order, empties last
    return gather(cache, np.where(slots < C, slots, -1))


@dataclass(frozen=True)
class KVPolicy:
    """Base of KV-cache compression policies (subclass it as a frozen dataclass).

    ``every_step`` says whether the engine compresses after each decoded token too (as
    StreamingLLM does) or after the prefill only (as SnapKV does).
    """

    every_step: ClassVar[bool] = False

    def score(self, layer: int, cache: CacheView) -> Array:
        """Importance of each cached token ``(B, Hkv, C)``; ``-inf`` on empty slots."""
        raise NotImplementedError

    def budget_for(self, layer: int, cache: CacheView) -> int:
        """Tokens :meth:`compress` keeps per head (default: no compression)."""
        return cache.keys.shape[2]

    def compress(self, layer: int, cache: CacheView) -> KeptCache:
        """The kept cache: by default the :meth:`budget_for` best-scored tokens per head."""
        return keep_top(cache, self.score(layer, cache), self.budget_for(layer, cache))


@dataclass(frozen=True)
class KVSelector:
    """Base of decode-time selection methods: which cached keys each query head reads."""

    def select(self, layer: int, cache: CacheView) -> Array:
        """Cache slots each query head reads ``(B, H, S)`` (``-1`` = none)."""
        raise NotImplementedError


def check_budget(name: str, value: Any, *, minimum: int = 1) -> int:
    """A token count ``>= minimum`` (a policy hyperparameter), or a clear error."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ParameterError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def check_window_budget(budget: Any, window: Any, *, rest: str) -> tuple[int, int]:
    """``(budget, window)`` of a policy that always keeps its observation window: both counts
    ``>= 1`` and the budget above the window (``rest`` says what the other tokens are for)."""
    window = check_budget("window", window)
    budget = check_budget("budget", budget)
    if budget <= window:
        raise ParameterError(
            f"budget: expected more than window={window} tokens (the window is always kept, "
            f"{rest}), got {budget}"
        )
    return budget, window


def check_kept(kept: KeptCache, cache: CacheView, *, who: str) -> KeptCache:
    """Validate a policy's result against the cache it compressed (used by the engine)."""
    B, Hkv, _, D = cache.keys.shape
    K = kept.indices.shape[-1] if kept.indices.ndim == 3 else -1
    expected = {
        "indices": (B, Hkv, K),
        "keys": (B, Hkv, K, D),
        "values": (B, Hkv, K, cache.values.shape[-1]),
        "positions": (B, Hkv, K),
        "next_position": (B, Hkv),
    }
    for name, shape in expected.items():
        got = tuple(np.shape(getattr(kept, name)))
        if got != shape:
            raise ShapeError(f"{who}: kept {name} expected shape {shape}, got {got}")
    idx = kept.indices
    if idx.size and (idx.min() < -1 or idx.max() >= cache.n_tokens):
        raise ParameterError(
            f"{who}: returned token indices in [{idx.min()}, {idx.max()}], expected indices "
            f"in [0, {cache.n_tokens}) of tokens seen so far, or -1 for an empty slot"
        )
    kept_tokens = idx[idx >= 0]
    known = np.isin(kept_tokens, cache.indices[cache.indices >= 0])
    if not known.all():
        raise ParameterError(
            f"{who}: returned token indices {kept_tokens[~known][:5].tolist()} that are not in "
            f"the cache (already evicted)"
        )
    return kept
