r"""Task-KV: heads far from the layer's semantic centre keep the full cache, the rest a little.

Paper: *Task-KV: Task-aware KV Cache Optimization via Semantic Differentiation of Attention
Heads* (arXiv 2501.15113). No official code was found; the details below are derived from the
paper's description and documented as choices.

A *semantic separator* places every head of a layer in a common space by what it produced for
the current input and measures its distance to the layer's *semantic centre*, the mean of those
vectors. Heads far from the centre (*heterogeneous* heads) carry task-specific meaning and keep
their full KV cache; the others mainly aggregate and keep the attention sinks, the recent tokens
and a few *middle activations*, the middle tokens they gather the most attention on.

Choices made here (the paper gives no formula we could rely on):

* **Semantic vector** of query head $h$: its attention output over the observation window
  (the last $w$ prompt queries), averaged over the window and normalised to unit length,
  $u_h = \bar o_h / \lVert \bar o_h \rVert$ with $\bar o_h = \frac1w \sum_{t} o_{h,t}$.
  Unit length makes the distance measure direction (what the head says), not the size of its
  values.
* **Semantic centre** $c = \frac1H \sum_h u_h$; distance $\delta_h = \lVert u_h - c \rVert_2$.
  A KV head's distance is the largest of its query heads' (its cache is shared by the group, so
  it stays whole if any head reading it is heterogeneous).
* **Heterogeneous heads**: the ``ceil(ratio * Hkv)`` KV heads of each layer farthest from the
  centre (``ratio = 0.25`` by default), at least one.
* **Middle activations**: for the other heads, besides ``n_sink`` sinks and ``recent`` recent
  tokens, the ``budget - n_sink - recent`` middle tokens with the largest attention mass from
  the observation window, summed over the window and over the group's query heads.

The policy compresses once, after the prefill (as SnapKV); positions are not re-assigned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

import qkv
from qkv.errors import ParameterError
from qkv.reference.kv.head_budgets import keep_where, sinks_and_recent
from qkv.reference.kv.policy import CacheView, KeptCache, KVPolicy, check_budget

Array = np.ndarray


def window_attention(cache: CacheView, window: int) -> tuple[Array, Array]:
    """Outputs and weights of the last ``window`` cached queries over the cache.

    Returns:
        ``o (B, H, w, Dv)`` and ``P (B, H, w, C)`` (causal by token index; empty slots masked).
    """
    q = cache.queries[:, :, -window:]  # (B, H, w, D)
    w = q.shape[2]
    q_token = cache.n_tokens - w + np.arange(w)  # (w,) token index of each query
    mask = cache.valid[:, :, None, :] & (
        cache.indices[:, :, None, :] <= q_token[None, None, :, None]
    )  # (B, Hkv, w, C)
    group = q.shape[1] // cache.keys.shape[1]
    mask = np.repeat(mask, group, axis=1)  # (B, H, w, C)
    return qkv.sdpa(q, cache.keys, cache.values, mask=mask, return_weights=True)


def semantic_distance(outputs: Array) -> Array:
    r"""Each head's distance from the layer's semantic centre ``(B, H)``.

    $u_h = \bar o_h / \lVert \bar o_h \rVert$, $c = \operatorname{mean}_h u_h$,
    $\delta_h = \lVert u_h - c \rVert_2$, for head outputs ``outputs (B, H, w, Dv)``.
    """
    mean = outputs.mean(axis=2)  # (B, H, Dv)
    norm = np.linalg.norm(mean, axis=-1, keepdims=True)  # (B, H, 1)
    u = mean / np.maximum(norm, np.finfo(mean.dtype).tiny)  # (B, H, Dv)
    centre = u.mean(axis=1, keepdims=True)  # (B, 1, Dv)
    return np.linalg.norm(u - centre, axis=-1)  # (B, H)


def heterogeneous_heads(distance: Array, n_kv_heads: int, ratio: float) -> Array:
    """The ``ceil(ratio * Hkv)`` (at least 1) farthest KV heads ``(B, Hkv)`` bool.

    ``distance (B, H)`` per query head; a KV head takes its group's largest distance. Ties go
    to the lower head index.
    """
    B, H = distance.shape
    per_kv = distance.reshape(B, n_kv_heads, H // n_kv_heads).max(axis=-1)  # (B, Hkv)
    n_far = max(1, math.ceil(ratio * n_kv_heads))
    order = np.argsort(-per_kv, axis=-1, kind="stable")[:, :n_far]  # (B, n_far)
    far = np.zeros((B, n_kv_heads), dtype=bool)
    np.put_along_axis(far, order, True, axis=-1)
    return far


@dataclass(frozen=True)
class TaskKV(KVPolicy):
    """Full cache for heterogeneous heads; sinks, recent tokens and middle activations else.

    Args:
        budget: tokens each non-heterogeneous KV head keeps (sinks + recent + middle).
        n_sink: attention sinks kept.
        recent: recent tokens kept.
        ratio: fraction of each layer's KV heads treated as heterogeneous, in ``(0, 1]``.
        window: observation window (last prompt queries) for distances and middle scores.
    """

    budget: int = 64
    n_sink: int = 4
    recent: int = 28
    ratio: float = 0.25
    window: int = 8

    def __post_init__(self) -> None:
        check_budget("n_sink", self.n_sink, minimum=0)
        check_budget("recent", self.recent)
        check_budget("window", self.window)
        check_budget("budget", self.budget, minimum=1)
        if self.budget < self.n_sink + self.recent:
            raise ParameterError(
                f"budget: expected at least n_sink + recent = {self.n_sink + self.recent} "
                f"tokens, got {self.budget}"
            )
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)):
            raise ParameterError(f"ratio: expected a fraction in (0, 1], got {self.ratio!r}")
        if not 0.0 < self.ratio <= 1.0:
            raise ParameterError(f"ratio: expected a fraction in (0, 1], got {self.ratio!r}")

    def heterogeneous(self, cache: CacheView) -> Array:
        """Heterogeneous KV heads of this layer ``(B, Hkv)`` bool."""
        o, _ = window_attention(cache, self.window)  # (B, H, w, Dv)
        return heterogeneous_heads(semantic_distance(o), cache.keys.shape[1], self.ratio)

    def score(self, layer: int, cache: CacheView) -> Array:
        """Window attention mass per slot ``(B, Hkv, C)``, ``+inf`` where always kept."""
        _, p = window_attention(cache, self.window)  # (B, H, w, C)
        B, Hkv, C = cache.indices.shape
        mass = p.reshape(B, Hkv, -1, C).sum(axis=2).astype(np.float64)  # (B, Hkv, C)
        always = sinks_and_recent(cache, self.n_sink, self.recent)
        always |= self.heterogeneous(cache)[:, :, None]
        return np.where(cache.valid, np.where(always, np.inf, mass), -np.inf)

    def compress(self, layer: int, cache: CacheView) -> KeptCache:
        """Keep whole heterogeneous heads; sinks, recent and the top middle tokens elsewhere."""
        score = self.score(layer, cache)  # (B, Hkv, C)
        far = self.heterogeneous(cache)  # (B, Hkv)
        always = np.isposinf(score)  # (B, Hkv, C)
        n_middle = self.budget - self.n_sink - self.recent
        middle = np.where(always, -np.inf, score)  # (B, Hkv, C)
        order = np.argsort(-middle, axis=-1, kind="stable")[..., :n_middle]  # (B, Hkv, m)
        top = np.zeros_like(always)
        np.put_along_axis(top, order, np.isfinite(np.take_along_axis(middle, order, -1)), -1)
        return keep_where(cache, always | top | far[:, :, None])


#: The catalog id.
taskkv = TaskKV
