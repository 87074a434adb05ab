r"""StreamingLLM: attention sinks plus a recent window, with positions re-assigned in the cache.

Paper: *Efficient Streaming Language Models with Attention Sinks* (Xiao et al., arXiv
2309.17453). Official code: https://github.com/mit-han-lab/streaming-llm.

Trained models pour much of their attention onto the first few tokens whatever they contain
(the *attention sinks*); evicting them breaks the model, while keeping them plus a window of
recent tokens lets it run on an unbounded stream. The cache keeps

$$
\mathcal K = \{0, \dots, s - 1\} \;\cup\; \{n - r, \dots, n - 1\},
$$

$s$ = ``n_sink`` sinks and $r$ = ``recent`` tokens of the $n$ seen, evicting the middle once
$n > s + r$. **Position shift** (the paper's section 3.2, ``pos_shift`` in the official code):
positions are assigned *within the cache*, so the kept keys sit at $0, \dots, |\mathcal K| - 1$
and the next token at $|\mathcal K|$, and no distance exceeds what the model was trained on.
The official code caches keys before RoPE and rotates them at each step; here keys are cached
rotated and a kept key moves from position $p$ to $p'$ by one more rotation by $p' - p$
(rotations compose: $R_{p'-p} R_p = R_{p'}$), which gives the same scores up to rounding.

``rerotate=False`` keeps each key's original position instead, as kvpress'
``StreamingLLMPress`` and KVCache-Factory do (no re-rotation); the query then sits at its true
position. The importance :meth:`StreamingLLM.score` returns is recency (the token index), with
the sinks scored $+\infty$.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

import qkv
from qkv.reference.kv.policy import CacheView, KeptCache, KVPolicy, check_budget, gather

Array = np.ndarray


@dataclass(frozen=True)
class StreamingLLM(KVPolicy):
    """Keep ``n_sink`` attention sinks and the ``recent`` latest tokens of every head.

    Args:
        n_sink: initial tokens always kept (4 in the paper and the official code).
        recent: latest tokens kept (the official class default is 512).
        rerotate: re-assign positions within the cache (the paper); ``False`` keeps original
            positions (kvpress / KVCache-Factory).
    """

    n_sink: int = 4
    recent: int = 512
    rerotate: bool = True

    every_step: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_budget("n_sink", self.n_sink, minimum=0)
        check_budget("recent", self.recent)
        if not isinstance(self.rerotate, bool):
            raise TypeError(f"rerotate: expected a bool, got {self.rerotate!r}")

    @property
    def budget(self) -> int:
        """Tokens kept per head once the stream is longer than it."""
        return self.n_sink + self.recent

    def score(self, layer: int, cache: CacheView) -> Array:
        """Recency (the token index), ``+inf`` for the sinks, ``-inf`` on empty slots."""
        idx = cache.indices.astype(np.float64)  # (B, Hkv, C)
        score = np.where(cache.indices < self.n_sink, np.inf, idx)
        return np.where(cache.valid, score, -np.inf)

    def compress(self, layer: int, cache: CacheView) -> KeptCache:
        """Keep the sinks and the recent window; shift positions into the cache if asked."""
        if int(cache.lengths.max()) <= self.budget:
            return gather(cache, np.where(cache.valid, np.arange(cache.keys.shape[2]), -1))
        score = self.score(layer, cache)
        order = np.argsort(-score, axis=-1, kind="stable")[..., : self.budget]  # (B, Hkv, K)
        chosen = np.take_along_axis(cache.valid, order, axis=-1)
        slots = np.sort(np.where(chosen, order, cache.keys.shape[2]), axis=-1)
        kept = gather(cache, np.where(slots < cache.keys.shape[2], slots, -1))
        return shift_positions(kept, base=cache.rope_base) if self.rerotate else kept


def shift_positions(kept: KeptCache, *, base: float = 10000.0) -> KeptCache:
    """Move the kept keys to positions ``0..K-1`` of their head and the next token to ``K``.

    Each key is rotated once more, by ``new - old`` (a negative angle), with :func:`qkv.rope`
    at the model's RoPE ``base``.
    """
    valid = kept.indices >= 0  # (B, Hkv, K)
    new = np.where(valid, np.cumsum(valid, axis=-1) - 1, 0)  # (B, Hkv, K)
    keys = kept.keys.copy()
    B, Hkv, K, D = keys.shape
    for b in range(B):
        for h in range(Hkv):
            delta = (new[b, h] - kept.positions[b, h]).astype(np.int64)  # (K,)
            keys[b, h] = qkv.rope(keys[b : b + 1, h : h + 1], positions=delta, base=base)[
                0, 0
            ]  # (K, D)
    keys = np.where(valid[..., None], keys, 0)
    return KeptCache(
        indices=kept.indices,
        keys=keys,
        values=kept.values,
        positions=new,
        next_position=valid.sum(axis=-1).astype(np.int64),
        extra=kept.extra,
    )


#: The catalog id.
streaming = StreamingLLM
