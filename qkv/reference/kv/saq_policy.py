r"""SAQ: staircase adaptive quantisation of a multi-query-attention KV cache.

Paper: *The Nature of Mathematical Modeling and Probabilistic Optimization Engineering in
Generative AI* (Fulu Li, arXiv 2410.18441), the SAQ section. No official code was found.

SAQ extends a KIVI-style cache (a full-precision residual $X_r$ plus quantised groups; keys
grouped per channel, values per token) with a *staircase*: the older a token, the fewer bits.
With $S$ = ``segment`` tokens per segment and bit widths $B_1 > B_2 > \dots > B_{q}$
(``stairs``):

* the newest $r = n \bmod S$ tokens are the full-precision residual;
* when the residual reaches $S$ tokens it is quantised at $B_1$ and becomes the newest segment,
  and every older segment $i$ (1 = newest) is dequantised and re-quantised one stair lower,
  $B_i \to B_{i+1}$;
* after $q - 1$ stairs the tokens reach $B_q$ and stay there, merged into one old segment.

The paper gives the mechanism but no bit values; we take the stairs $(8, 4, 2)$ (the widths
:mod:`qkv.reference.kv.quantization` packs, KIVI's 2 bits at the bottom), so a token goes
full $\to$ 8 $\to$ 4 $\to$ 2 bits. Each segment keeps its own quantisation groups (keys per
channel over the segment's $S$ tokens, values per token): "merging" the old segments means
they share the lowest width, not one group, so a 2-bit token is never re-quantised again.

The cache state is the bit width of every slot (``extra["saq_bits"]``, 0 = full precision, a
small int8 array); :meth:`SAQ.compress` steps each slot down to the width its age gives,
through every intermediate stair, on the cache's current (dequantised) values. Compressing a
whole prompt therefore equals streaming it token by token. The engine holds floating caches:
the dequantised values are stored and the exact bits of the quantised form are in
``extra["quantized_bits"]`` (Python int). The paper targets MQA (one KV head);
``require_mqa=False`` applies the same staircase to each KV head of a grouped cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from qkv.errors import ParameterError, ShapeError
from qkv.reference.kv.policy import CacheView, KeptCache, KVPolicy, check_budget
from qkv.reference.kv.quantization import check_bits, fake_quantize

Array = np.ndarray

#: Bits of a full-precision element (the fp16 residual) and of a stored parameter.
FULL_BITS = 16


def target_bits(indices: Array, n_tokens: int, segment: int, stairs: tuple[int, ...]) -> Array:
    """The width each token should have now (``0`` = full precision), same shape as
    ``indices`` (empty slots, ``-1``, get 0)."""
    residual = n_tokens % segment
    age = (n_tokens - residual - 1 - indices) // segment  # 0 for the newest segment
    steps = np.asarray(stairs)[np.clip(age, 0, len(stairs) - 1)]
    return np.where((indices >= 0) & (indices < n_tokens - residual), steps, 0)


@dataclass(frozen=True)
class SAQ(KVPolicy):
    """Staircase quantisation: residual in full precision, older segments at fewer bits.

    Args:
        segment: tokens per segment (the residual is quantised when it reaches this).
        stairs: decreasing bit widths from the newest segment down (``(8, 4, 2)``, our choice).
        require_mqa: refuse a cache with more than one KV head (the paper's MQA layout).
    """

    segment: int = 32
    stairs: tuple[int, ...] = (8, 4, 2)
    require_mqa: bool = True

    every_step: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_budget("segment", self.segment)
        if not isinstance(self.stairs, tuple) or not self.stairs:
            raise ParameterError(f"stairs: expected a non-empty tuple of bits, got {self.stairs!r}")
        for s in self.stairs:
            check_bits(s, "stairs")
        if list(self.stairs) != sorted(set(self.stairs), reverse=True):
            raise ParameterError(f"stairs: expected strictly decreasing bits, got {self.stairs}")

    def score(self, layer: int, cache: CacheView) -> Array:
        """Recency (the token index): older tokens get fewer bits; ``-inf`` on empty slots."""
        return np.where(cache.valid, cache.indices.astype(np.float64), -np.inf)

    def compress(self, layer: int, cache: CacheView) -> KeptCache:
        """Step every segment down to the width its age gives; keep every token."""
        B, Hkv, C, D = cache.keys.shape
        if self.require_mqa and Hkv != 1:
            raise ShapeError(
                f"SAQ: expected a multi-query cache with one KV head, got {Hkv} KV heads "
                f"(pass require_mqa=False to quantise each KV head alike)"
            )
        current = cache.extra.get("saq_bits", np.zeros((B, Hkv, 0), dtype=np.int8))
        current = np.pad(current, [(0, 0), (0, 0), (0, C - current.shape[2])])  # (B, Hkv, C)
        target = target_bits(cache.indices, cache.n_tokens, self.segment, self.stairs)
        keys, values = cache.keys.copy(), cache.values.copy()
        order = (0, *self.stairs)  # full precision first
        for b in range(B):
            for h in range(Hkv):
                for seg in np.unique(cache.indices[b, h][target[b, h] > 0] // self.segment):
                    slots = np.flatnonzero(
                        (cache.indices[b, h] // self.segment == seg) & (target[b, h] > 0)
                    )
                    now, goal = (
                        order.index(current[b, h, slots[0]]),
                        order.index(target[b, h, slots[0]]),
                    )
                    for bits in order[now + 1 : goal + 1]:  # one stair at a time
                        k, v = keys[b, h, slots][None, None], values[b, h, slots][None, None]
                        keys[b, h, slots] = fake_quantize(k, bits=bits, axis="channel")[0][0, 0]
                        values[b, h, slots] = fake_quantize(v, bits=bits, axis="token")[0][0, 0]
        return KeptCache(
            indices=cache.indices.copy(),
            keys=keys,
            values=values,
            positions=cache.positions.copy(),
            next_position=cache.next_position.copy(),
            extra={
                **cache.extra,
                "saq_bits": target.astype(np.int8),
                "quantized_bits": self.storage(cache.indices, target, D, cache.values.shape[-1]),
            },
        )

    def storage(self, indices: Array, bits: Array, d_key: int, d_value: int) -> int:
        """Exact bits of the staircase cache: residual at 16 bits, each quantised segment's
        packed codes plus its fp16 scales and zero points (keys per channel, values per token)."""
        full = int(((indices >= 0) & (bits == 0)).sum()) * (d_key + d_value) * FULL_BITS
        total = full
        for b, h in np.ndindex(*indices.shape[:2]):
            quantised = (indices[b, h] >= 0) & (bits[b, h] > 0)
            for seg in np.unique(indices[b, h][quantised] // self.segment):
                sel = quantised & (indices[b, h] // self.segment == seg)
                w, T = int(bits[b, h][sel][0]), int(sel.sum())
                total += 8 * T * (-(-d_key * w // 8)) + 2 * FULL_BITS * d_key  # per channel
                total += 8 * T * (-(-d_value * w // 8)) + 2 * FULL_BITS * T  # per token
        return total


#: The catalog id.
saq = SAQ
