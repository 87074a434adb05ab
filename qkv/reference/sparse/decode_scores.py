r"""Pieces shared by the decode-time key selectors (TokenSelect, TidalDecode, HiP).

A selector sees one layer's cache (:class:`~qkv.reference.kv.policy.CacheView`) and the rotated
query of the token being decoded, and returns the cache slots each query head reads. Query head
$h$ reads KV head $g(h) = \lfloor h / G \rfloor$ with $G = H / H_{kv}$ (the grouping of
:func:`qkv.sparse_attention`). The raw scores are the unscaled dot products

$$
s_{h,j} = q_h \cdot k_{g(h),j},
$$

$-\infty$ on empty slots (a positive scale does not change any ranking).
:class:`CountReads` measures the fraction of the cache a selector reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qkv.errors import ParameterError
from qkv.reference.kv.policy import CacheView, KVSelector

Array = np.ndarray


def head_scores(cache: CacheView) -> Array:
    """Unscaled ``q . k`` of the latest query against every slot ``(B, H, C)``, ``-inf`` if empty."""
    q = cache.queries[:, :, -1]  # (B, H, D)
    B, H, D = q.shape
    Hkv, C = cache.keys.shape[1:3]
    grouped = q.reshape(B, Hkv, H // Hkv, D)  # (B, Hkv, G, D): a KV head's query heads
    scores = np.einsum("bkgd,bkcd->bkgc", grouped, cache.keys)  # (B, Hkv, G, C)
    scores = np.where(cache.valid[:, :, None], scores, -np.inf)  # (B, Hkv, G, C)
    return scores.reshape(B, H, C)


def slots_of(mask: Array) -> Array:
    """The ``True`` positions of ``mask (..., C)`` as sorted slots ``(..., S)``, ``-1`` padded."""
    C = mask.shape[-1]
    S = max(int(mask.sum(axis=-1).max(initial=0)), 1)
    ranked = np.sort(np.where(mask, np.arange(C), C), axis=-1)[..., :S]  # (..., S)
    return np.where(ranked < C, ranked, -1)


def all_slots(cache: CacheView, n_heads: int) -> Array:
    """Every occupied slot, per query head ``(B, H, S)`` (dense attention)."""
    valid = np.repeat(cache.valid, n_heads // cache.keys.shape[1], axis=1)  # (B, H, C)
    return slots_of(valid)


def check_shared_tokens(cache: CacheView, *, who: str) -> int:
    """The common occupancy of every KV head; an error if heads or rows hold different tokens.

    Selections shared across heads (or reused across layers and steps) name slots, so every
    head must hold the same tokens in the same slots, as an uncompressed cache does.
    """
    first = cache.indices[:1, :1]  # (1, 1, C)
    if not np.array_equal(np.broadcast_to(first, cache.indices.shape), cache.indices):
        raise ParameterError(
            f"{who}: expected every KV head and row to hold the same tokens (an uncompressed "
            f"cache); got caches of lengths {sorted(set(cache.lengths.ravel().tolist()))}"
        )
    return int(cache.lengths.flat[0])


def check_top_k(top_k: Any, n_keys: int, *, name: str = "top_k") -> int:
    """A count of keys in ``[1, n_keys]`` (the keys available), or a clear error."""
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise ParameterError(f"{name}: expected an integer >= 1, got {top_k!r}")
    if top_k > n_keys:
        raise ParameterError(
            f"{name}: expected at most the {n_keys} keys in the cache, got {int(top_k)}"
        )
    return int(top_k)


@dataclass(frozen=True)
class CountReads(KVSelector):
    """Wraps a selector and records the fraction of cached keys its query heads read.

    Attributes:
        inner: the selector measured.
    """

    inner: KVSelector
    _reads: list = field(default_factory=list, init=False, repr=False, compare=False)

    def select(self, layer: int, cache: CacheView) -> Array:
        """The inner selection, recording ``keys read / keys cached`` over all heads."""
        slots = self.inner.select(layer, cache)  # (B, H, S)
        H = slots.shape[1]
        cached = int(np.repeat(cache.lengths, H // cache.keys.shape[1], axis=1).sum())
        self._reads.append(int((slots >= 0).sum()) / cached)
        return slots

    @property
    def fraction_read(self) -> float:
        """Mean fraction of the cache read per (layer, step) call so far."""
        return float(np.mean(self._reads)) if self._reads else float("nan")
