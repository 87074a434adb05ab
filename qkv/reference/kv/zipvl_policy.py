r"""ZipVL: each layer keeps as many tokens as its attention distribution needs.

Paper: *ZipVL: Efficient Large Vision-Language Models with Dynamic Token Sparsification and KV
Cache Compression* (He et al., arXiv 2410.08584). No official code was found; the method below
follows the paper's description, with the choices it leaves open documented.

**Dynamic ratio.** Instead of a fixed budget, a layer keeps the smallest number of tokens that
holds a fraction $\tau$ of its attention. Probe queries (as in ZipCache: the last
``probe_fraction`` of the prompt and as many random earlier ones) attend causally to the cache;
per KV head $g$ the accumulated attention of token $j$ is

$$
a_{g,j} = \sum_{h \in \mathcal G(g)} \sum_{i \in \text{probes}} A_{h,i,j},
\qquad
p_g = \min\Big\{p : \sum_{r \le p} a_{g,(r)} \ge \tau \sum_j a_{g,j}\Big\},
$$

with $a_{g,(r)}$ sorted in descending order (the total $\sum_j a_{g,j}$ is the number of
probe rows of the group, each row summing to 1). The layer keeps $p = \max_g p_g$ tokens per
KV head (*choice*: one count per layer, as the paper's "layer-wise ratio", the largest any of
its heads needs so that every head reaches $\tau$). A flat attention distribution needs many
tokens, a peaked one few, so the ratio $p / L$ differs by layer.

**Which tokens.** The paper selects the $p$ important tokens by their *normalised* attention
score (ZipCache's: $a_{g,j}$ divided by the number of probe rows that see token $j$, which
removes the causal bias towards early tokens), ``select="normalized"`` (default). With
``select="accumulated"`` the $p$ tokens of largest $a_{g,j}$ are kept, which guarantees that the
kept set holds at least $\tau$ of every head's attention.

**The rest.** The paper's versions differ: the first (v1, project page) keeps every token and
quantises the unimportant ones at low bits, ``rest="quantize"``: important tokens at
``high_bits``, the others at ``low_bits``, keys channel-wise and values channel-separable
token-wise (ZipCache's quantisers); the later arXiv version discards them, ``rest="drop"``
(default). With ``"quantize"`` the engine stores the dequantised floats and the exact bits of
the quantised form go to ``extra["quantized_bits"]``. The prefill acceleration (attention over
the important tokens only) is not part of a cache policy and is not reproduced here.

$\tau = 0.97$ and 5% probes are our defaults (the paper's values were not verified).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from qkv.errors import ParameterError
from qkv.reference.core import sdpa
from qkv.reference.kv.cache_checks import check_layout
from qkv.reference.kv.head_budgets import keep_where
from qkv.reference.kv.policy import CacheView, KeptCache, KVPolicy
from qkv.reference.kv.quantization import check_bits
from qkv.reference.kv.zipcache_policy import mixed_precision, probe_queries

Array = np.ndarray

SELECTS = ("normalized", "accumulated")
RESTS = ("drop", "quantize")


def check_fraction(name: str, value: object) -> float:
    """A fraction in ``(0, 1]``, or a clear error."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
        raise ParameterError(f"{name}: expected a fraction in (0, 1], got {value!r}")
    if not 0.0 < value <= 1.0:
        raise ParameterError(f"{name}: expected a fraction in (0, 1], got {value!r}")
    return float(value)


def probe_mass(cache: CacheView, probes: Array) -> tuple[Array, Array]:
    r"""Accumulated attention $a_{g,j}$ and the number of probe rows that see each slot.

    Args:
        cache: the layer's cache; query row ``w`` of ``cache.queries (B, H, W, D)`` is token
            ``n_tokens - W + w`` and sees the tokens up to itself.
        probes: query rows used as probes ``(P,)``.

    Returns:
        ``(a, seen)``, each ``(B, Hkv, C)``: attention summed over the probes and the group's
        query heads (0 on empty slots), and the count of (probe, query head) rows seeing the
        slot.
    """
    B, H, W, _ = cache.queries.shape
    Hkv = cache.keys.shape[1]
    group = H // Hkv
    q = cache.queries[:, :, probes]  # (B, H, P, D)
    k = np.repeat(cache.keys, group, axis=1)  # (B, H, C, D)
    v = np.zeros((*k.shape[:3], 1), dtype=k.dtype)  # (B, H, C, 1): only the weights are used
    token = cache.n_tokens - W + probes  # (P,) token index of each probe
    idx = np.repeat(cache.indices, group, axis=1)  # (B, H, C)
    sees = (idx[:, :, None, :] >= 0) & (idx[:, :, None, :] <= token[None, None, :, None])
    _, a = sdpa(q, k, v, mask=sees, return_weights=True)  # (B, H, P, C)
    shape = (B, Hkv, group * len(probes), -1)
    return a.reshape(shape).sum(axis=2), sees.reshape(shape).sum(axis=2)  # (B, Hkv, C) each


def tokens_for_mass(mass: Array, tau: float) -> Array:
    r"""$p = \min\{p : \sum_{r \le p} a_{(r)} \ge \tau \sum_j a_j\}$ per row of ``mass (..., C)``
    (non-negative; 0 for an all-zero row)."""
    ordered = -np.sort(-mass, axis=-1)  # (..., C) descending
    cum = np.cumsum(ordered, axis=-1)  # (..., C); the last entry is the total
    reached = cum >= tau * cum[..., -1:]  # (..., C), true at the last entry at least
    return np.where(cum[..., -1] > 0, reached.argmax(axis=-1) + 1, 0)


@dataclass(frozen=True)
class ZipVL(KVPolicy):
    """Per layer, the fewest tokens holding a fraction ``tau`` of the attention; the rest
    dropped or stored at low bits.

    Args:
        tau: attention mass to keep, in ``(0, 1]`` (1 keeps every token).
        probe_fraction: fraction of the prompt's queries used as recent probes, with as many
            random earlier ones, in ``(0, 1]``.
        select: ``"normalized"`` (the paper) or ``"accumulated"`` (largest raw mass).
        rest: ``"drop"`` (arXiv v2) or ``"quantize"`` (v1, mixed precision).
        high_bits: bits of the important tokens with ``rest="quantize"``.
        low_bits: bits of the others with ``rest="quantize"``.
        seed: seed of the random probes.
    """

    tau: float = 0.97
    probe_fraction: float = 0.05
    select: Literal["normalized", "accumulated"] = "normalized"
    rest: Literal["drop", "quantize"] = "drop"
    high_bits: int = 4
    low_bits: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        check_fraction("tau", self.tau)
        check_fraction("probe_fraction", self.probe_fraction)
        if self.select not in SELECTS:
            raise ParameterError(f"select: expected one of {SELECTS}, got {self.select!r}")
        if self.rest not in RESTS:
            raise ParameterError(f"rest: expected one of {RESTS}, got {self.rest!r}")
        check_bits(self.high_bits, "high_bits")
        check_bits(self.low_bits, "low_bits")
        if self.low_bits > self.high_bits:
            raise ParameterError(
                f"low_bits: expected at most high_bits={self.high_bits}, got {self.low_bits}"
            )

    def mass(self, layer: int, cache: CacheView) -> tuple[Array, Array]:
        """Accumulated and normalised attention of every slot ``(B, Hkv, C)`` each."""
        check_layout(cache, who="ZipVL")
        rng = np.random.default_rng((self.seed, layer))
        probes = probe_queries(cache.queries.shape[2], self.probe_fraction, rng)
        a, seen = probe_mass(cache, probes)
        return a, a / np.maximum(seen, 1)

    def n_important(self, layer: int, cache: CacheView) -> int:
        r"""$p$: tokens this layer keeps per KV head (the largest $p_g$ of its heads; every
        occupied slot when ``tau == 1``, whatever the rounding of the sums)."""
        if self.tau == 1.0:
            return int(cache.lengths.max())
        a, _ = self.mass(layer, cache)
        return max(int(tokens_for_mass(a, self.tau).max()), 1)

    def score(self, layer: int, cache: CacheView) -> Array:
        """The selection score (normalised or accumulated mass), ``-inf`` on empty slots."""
        a, normalized = self.mass(layer, cache)
        chosen = normalized if self.select == "normalized" else a
        return np.where(cache.valid, chosen, -np.inf)

    def important(self, layer: int, cache: CacheView) -> Array:
        """The ``p`` best-scored occupied slots of each KV head ``(B, Hkv, C)`` bool."""
        score = self.score(layer, cache)  # (B, Hkv, C)
        p = self.n_important(layer, cache)
        top = np.argsort(-score, axis=-1, kind="stable")[..., :p]  # (B, Hkv, p)
        keep = np.zeros(score.shape, dtype=bool)
        np.put_along_axis(keep, top, True, axis=-1)
        return keep & cache.valid

    def compress(self, layer: int, cache: CacheView) -> KeptCache:
        """Drop the unimportant tokens, or keep all with mixed precision."""
        important = self.important(layer, cache)
        if self.rest == "drop":
            return keep_where(cache, important)
        return mixed_precision(cache, important, self.high_bits, self.low_bits)


#: The catalog id.
zipvl = ZipVL
