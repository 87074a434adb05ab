r"""ZipCache: mixed-precision KV quantisation by normalised attention saliency.

Paper: *ZipCache: Accurate and Efficient KV Cache Quantization with Salient Token
Identification* (He et al., arXiv 2405.14256). Official code:
https://github.com/ThisisBillhe/ZipCache.

**Saliency.** Under a causal mask key $i$ of $L$ is seen by $L - i$ queries only, so the
column sum of the attention matrix favours early tokens. ZipCache divides by that count:

$$
\tilde p_i = \frac{\sum_{k} A_{k i}}{\operatorname{nnz}(A_{:, i})},
$$

the mean attention key $i$ receives from the queries that can see it. To avoid the full
$L \times L$ matrix the scores come from **probe queries**: the last ``probe_fraction`` of the
prompt plus as many random earlier queries (drawn with ``seed``), attending causally; sums run
over the probes and the query heads of each KV head. ``denominator="probes"`` (the default, the
paper's definition applied to the probes) divides by the number of probes that see the key;
``denominator="causal"`` divides by $L - i$ as the official code does although only the probes
were summed.

**Quantisation.** The ``1 - unimportant_ratio`` most salient tokens of each KV head are kept
at ``high_bits`` (4 in the paper), the rest at ``low_bits`` (2). Keys are quantised
**channel-wise** (per channel over the tokens of the set), values **channel-separable
token-wise**: with $c_j = \sqrt{\max_t |V_{tj}|}$ the values $V / c$ are quantised per token
and multiplied back by $c$ afterwards, so outlier channels do not dominate a token's range
while only $D$ extra parameters are stored. Important and unimportant sets are quantised
separately. Per KV head here; the official code flattens heads into channels (keys) and
groups value rows across heads, a difference in grouping only.

The engine holds floating caches, so :meth:`ZipCache.compress` stores the dequantised keys and
values (nothing is evicted) and records the exact bits of the quantised form (packed codes,
fp16 scales, zero points and channel factors) in ``extra["quantized_bits"]`` (a Python int).
Tokens decoded after the prefill stay in full precision (the paper re-compresses them every
100 steps; our answers are shorter).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qkv.errors import ParameterError
from qkv.reference.core import sdpa
from qkv.reference.kv.policy import CacheView, KeptCache, KVPolicy
from qkv.reference.kv.quantization import check_bits, fake_quantize

Array = np.ndarray

#: Bits of one stored floating parameter (scale, zero point, channel factor): fp16.
PARAM_BITS = 16


def probe_queries(n_queries: int, probe_fraction: float, rng: np.random.Generator) -> Array:
    """Probe rows of ``n_queries`` prompt queries: the last ``ceil(f n)`` and as many random
    earlier ones (fewer when there are not enough), sorted, int64."""
    m = int(np.ceil(probe_fraction * n_queries))
    recent = np.arange(n_queries - m, n_queries)
    earlier = rng.permutation(n_queries - m)[:m]
    return np.sort(np.concatenate([earlier, recent])).astype(np.int64)


def normalized_scores(cache: CacheView, probes: Array, *, denominator: str = "probes") -> Array:
    r"""Normalised attention score of every cached key ``(B, Hkv, C)`` (``-inf`` when empty).

    ``probes`` index the rows of ``cache.queries (B, H, W, D)``; query row ``w`` is token
    ``n_tokens - W + w`` and sees the keys of tokens up to itself.
    """
    B, H, W, D = cache.queries.shape
    Hkv = cache.keys.shape[1]
    group = H // Hkv
    q = cache.queries[:, :, probes]  # (B, H, P, D)
    k = np.repeat(cache.keys, group, axis=1)  # (B, H, C, D)
    v = np.zeros((*k.shape[:3], 1), dtype=k.dtype)  # (B, H, C, 1), only the weights are used
    token = cache.n_tokens - W + probes  # (P,)
    idx = np.repeat(cache.indices, group, axis=1)  # (B, H, C)
    sees = (idx[:, :, None, :] >= 0) & (idx[:, :, None, :] <= token[None, None, :, None])
    _, a = sdpa(q, k, v, mask=sees, return_weights=True)  # (B, H, P, C)
    total = a.reshape(B, Hkv, group, len(probes), -1).sum(axis=(2, 3))  # (B, Hkv, C)
    if denominator == "probes":
        count = sees.reshape(B, Hkv, group, len(probes), -1).sum(axis=(2, 3))  # (B, Hkv, C)
    else:
        count = group * (cache.n_tokens - cache.indices)  # (B, Hkv, C)
    score = total / np.maximum(count, 1)
    return np.where(cache.valid, score, -np.inf)


def channel_separable_quantize(v: Array, bits: int) -> tuple[Array, int]:
    r"""Channel-separable token-wise quantisation of ``v (B, H, T, D)``: divide each channel
    by $c_j = \sqrt{\max_t |v_{tj}|}$, quantise per token, multiply back. Returns the
    dequantised values and the exact bits (codes, per-token scale and zero, $D$ factors)."""
    c = np.sqrt(np.abs(v).max(axis=2, keepdims=True))  # (B, H, 1, D)
    c = np.where(c > 0, c, v.dtype.type(1))
    out, bits_used = fake_quantize(v / c, bits=bits, axis="token")
    return out * c, bits_used + PARAM_BITS * c.size


def mixed_precision(cache: CacheView, important: Array, high_bits: int, low_bits: int) -> KeptCache:
    """Every occupied slot quantised and dequantised: ``important (B, Hkv, C)`` slots at
    ``high_bits``, the others at ``low_bits`` (keys channel-wise, values channel-separable
    token-wise, each set on its own). Returns the whole cache with the dequantised keys and
    values and the exact size of the codes and scales in ``extra["quantized_bits"]``."""
    keys, values = cache.keys.copy(), cache.values.copy()
    total_bits = 0
    B, Hkv = cache.indices.shape[:2]
    for b in range(B):
        for h in range(Hkv):
            occupied = cache.valid[b, h]  # (C,)
            for chosen, bits in ((important[b, h], high_bits), (~important[b, h], low_bits)):
                slots = np.flatnonzero(occupied & chosen)
                if len(slots) == 0:
                    continue
                k = cache.keys[b, h, slots][None, None]  # (1, 1, T, D)
                v = cache.values[b, h, slots][None, None]  # (1, 1, T, Dv)
                k_hat, k_bits = fake_quantize(k, bits=bits, axis="channel")
                v_hat, v_bits = channel_separable_quantize(v, bits)
                keys[b, h, slots], values[b, h, slots] = k_hat[0, 0], v_hat[0, 0]
                total_bits += k_bits + v_bits
    return KeptCache(
        indices=cache.indices.copy(),
        keys=keys,
        values=values,
        positions=cache.positions.copy(),
        next_position=cache.next_position.copy(),
        extra={**cache.extra, "quantized_bits": total_bits},
    )


@dataclass(frozen=True)
class ZipCache(KVPolicy):
    """Salient tokens at ``high_bits``, the rest at ``low_bits`` (no eviction).

    Args:
        high_bits: bits of the salient tokens (4 in the paper).
        low_bits: bits of the others (2 in the paper).
        unimportant_ratio: fraction of each head's tokens quantised at ``low_bits`` (0.4 in
            the official code).
        probe_fraction: fraction of the prompt's queries used as recent probes, with as many
            random earlier ones (0.05 each in the paper), in ``(0, 1]``.
        denominator: ``"probes"`` (the paper) or ``"causal"`` (the official code, ``L - i``).
        seed: seed of the random probes.
    """

    high_bits: int = 4
    low_bits: int = 2
    unimportant_ratio: float = 0.4
    probe_fraction: float = 0.05
    denominator: str = "probes"
    seed: int = 0

    def __post_init__(self) -> None:
        check_bits(self.high_bits, "high_bits")
        check_bits(self.low_bits, "low_bits")
        if self.low_bits > self.high_bits:
            raise ParameterError(
                f"low_bits: expected at most high_bits={self.high_bits}, got {self.low_bits}"
            )
        if not 0 <= self.unimportant_ratio <= 1:
            raise ParameterError(
                f"unimportant_ratio: expected a fraction in [0, 1], got {self.unimportant_ratio!r}"
            )
        if not 0 < self.probe_fraction <= 1:
            raise ParameterError(
                f"probe_fraction: expected a fraction in (0, 1], got {self.probe_fraction!r}"
            )
        if self.denominator not in ("probes", "causal"):
            raise ParameterError(
                f"denominator: expected 'probes' or 'causal', got {self.denominator!r}"
            )

    def score(self, layer: int, cache: CacheView) -> Array:
        """Normalised attention scores from the probe queries ``(B, Hkv, C)``."""
        rng = np.random.default_rng((self.seed, layer))
        probes = probe_queries(cache.queries.shape[2], self.probe_fraction, rng)
        return normalized_scores(cache, probes, denominator=self.denominator)

    def compress(self, layer: int, cache: CacheView) -> KeptCache:
        """Every occupied slot, its keys and values quantised (and dequantised) by saliency."""
        score = self.score(layer, cache)
        important = np.zeros(cache.valid.shape, dtype=bool)  # (B, Hkv, C)
        B, Hkv = cache.indices.shape[:2]
        for b in range(B):
            for h in range(Hkv):
                n = int(cache.lengths[b, h])
                order = np.argsort(-score[b, h, :n], kind="stable")  # best first
                important[b, h, order[: n - round(self.unimportant_ratio * n)]] = True
        return mixed_precision(cache, important, self.high_bits, self.low_bits)


#: The catalog id.
zipcache = ZipCache
