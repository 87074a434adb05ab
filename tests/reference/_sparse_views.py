"""Synthetic one-layer caches for the decode-time selector tests (TokenSelect, TidalDecode, HiP)."""

from __future__ import annotations

import numpy as np

from qkv.lab import decoder as dec
from qkv.reference.kv.policy import CacheView

#: A small decoder for engine runs: 3 layers, 4 query heads over 2 KV heads.
SMALL = dec.DecoderConfig(n_layers=3, d_model=32, n_heads=4, n_kv_heads=2, d_ff=48, max_len=96)


def view(q, keys, length=None, n_tokens=None):
    """A cache of ``keys (B, Hkv, C, D)`` whose first ``length`` slots hold tokens 0.., queried
    by ``q (B, H, 1, D)``."""
    B, Hkv, C, D = keys.shape
    length = C if length is None else length
    idx = np.where(np.arange(C) < length, np.arange(C), -1)
    idx = np.broadcast_to(idx, (B, Hkv, C)).copy()
    return CacheView(
        keys=keys,
        values=keys.copy(),
        indices=idx,
        positions=np.maximum(idx, 0),
        next_position=np.full((B, Hkv), length),
        n_tokens=length if n_tokens is None else n_tokens,
        queries=q,
    )


def random_view(rng, B=2, H=4, Hkv=2, C=40, D=8, length=None):
    """A random cache and query."""
    q = rng.standard_normal((B, H, 1, D))
    keys = rng.standard_normal((B, Hkv, C, D))
    return view(q, keys, length)


def sets(slots):
    """Rows of padded slots ``(..., S)`` as Python sets (``-1`` dropped)."""
    flat = slots.reshape(-1, slots.shape[-1])
    return [set(int(s) for s in row if s >= 0) for row in flat]
