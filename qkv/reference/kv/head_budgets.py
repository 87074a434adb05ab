r"""Per-head cache budgets: some KV heads keep everything, the others sinks and recent tokens.

DuoAttention and Task-KV both split a layer's KV heads in two: heads that keep the full cache
and heads that keep only the attention sinks (the first $s$ tokens) and the last $r$ tokens
(Task-KV adds a few chosen middle tokens). These helpers build that keep-set and pack it.
"""

from __future__ import annotations

import numpy as np

from qkv.errors import ParameterError, ShapeError
from qkv.reference.kv.policy import CacheView, KeptCache, gather

Array = np.ndarray


def sinks_and_recent(cache: CacheView, n_sink: int, recent: int) -> Array:
    r"""Slots holding a sink or a recent token ``(B, Hkv, C)`` bool.

    $$\text{keep}(j) = [\,t_j < s\,] \lor [\,t_j \ge n - r\,]$$ for the token index $t_j$ of slot
    $j$ and $n$ tokens seen; empty slots are never kept.
    """
    idx = cache.indices  # (B, Hkv, C)
    return cache.valid & ((idx < n_sink) | (idx >= cache.n_tokens - recent))


def keep_where(cache: CacheView, keep: Array) -> KeptCache:
    """Keep the slots where ``keep (B, Hkv, C)`` is true, in token order, positions unchanged."""
    C = cache.keys.shape[2]
    keep = keep & cache.valid  # (B, Hkv, C)
    width = max(int(keep.sum(axis=-1).max()), 1)
    slots = np.sort(np.where(keep, np.arange(C), C), axis=-1)[..., :width]  # (B, Hkv, K)
    return gather(cache, np.where(slots < C, slots, -1))


def check_head_mask(name: str, mask: Array, cache: CacheView, layer: int) -> Array:
    """Row ``layer`` of a per-(layer, KV head) bool table ``(L, Hkv)``, checked against the cache."""
    mask = np.asarray(mask, dtype=bool)
    Hkv = cache.keys.shape[1]
    if mask.ndim != 2 or mask.shape[1] != Hkv:
        raise ShapeError(
            f"{name}: expected one entry per (layer, KV head), shape (L, {Hkv}) for this cache, "
            f"got {mask.shape}"
        )
    if not 0 <= layer < mask.shape[0]:
        raise ParameterError(f"layer: expected an index in [0, {mask.shape[0]}), got {layer}")
    return mask[layer]
