r"""ActQKV: an activation-aware probe query retrieves KV blocks, an entropy cut-off sizes k.

Paper: *Activation-aware Probe-Query: Effective Key-Value Retrieval for Long-Context LLMs
Inference* (Xiao et al., arXiv 2502.13542). Official code: https://github.com/MrXiaoaa/ActQKV
(built on InfLLM; ``benchmark/actqkv/attention/context_manager_activate_3_dev.py``).

The cache is split into the first $n_{init}$ tokens, the last $n_{local}$ tokens and, between
them, blocks of ``block_size`` tokens. A window of $W$ queries (all heads concatenated,
$h_i \in \mathbb R^{F}$, $F = H D$) retrieves blocks with one **probe query**. Rather than
the plain mean of the window (InfLLM), ActQKV weights each token by its **activation bias**,
its deviation from the running statistics $\mu, \sigma^2 \in \mathbb R^F$ of the queries seen:

$$
\mathrm{dev}_i = \frac1F \sum_{f=1}^{F} \frac{(h_{i,f} - \mu_f)^2}
{\sigma_f^2 + \tfrac{1}{100}\,\overline{\sigma^2}}, \qquad
w_i = \frac{\mathrm{dev}_i}{\sum_{i'} \mathrm{dev}_{i'}}, \qquad
\hat q = \sum_{i=1}^{W} w_i\, h_i .
$$

Tokens that stand out (anchor tokens) dominate the probe. Each block $b$ is represented by
$r_b$, the mean of its ``repr_topk`` most important keys (all heads concatenated, as the
probe), and scored by cosine similarity $s_b = \cos(r_b, \hat q)$.

**Dynamic cut-off.** The softmax of the block scores, $p_b = \operatorname{softmax}(s /
\tau)_b$, has normalised entropy $\eta = -\sum_b p_b \log p_b / \log n_b \in [0, 1]$. A low
entropy means the relevant information is dense in a few blocks, a high one that it is spread
out, so the layer reads

$$
k = k_{\min} + \operatorname{round}\big(\eta\,(k_{\max} - k_{\min})\big)
$$

blocks, $k_{\min}$ = ``min_k`` and $k_{\max}$ = ``top_k`` (both clipped to $n_b$ as the official
code does). The paper states that entropy sets a per-layer budget between these bounds; the
official code feeds $\eta$ to a research-grade predictor that shares a global budget across
layers from running statistics of $\eta$. This linear map is the per-layer reading of the same
rule (documented choice); ``temperature`` $\tau$ (default 1, the official softmax of raw cosines)
sharpens the distribution when smaller. Every head reads the sinks, the chosen blocks and the
local window.

**The engine and the window.** The paper builds the probe from a chunk of the prompt at
prefill (chunked prefill); at decoding the window is the current token, whose weight is then 1.
The lab engine prefills with full attention and calls the selector at decode steps only, so the
selector keeps the last ``window`` decode queries of each layer as its window (``window=1``, the
default, is the official decoding behaviour) and pools the running $\mu, \sigma^2$ over every
query it has seen. The official code caps the running count at 1000 (an exponential-average
regime after that); here the statistics are the exact pooled ones. InfLLM scores a key's
importance by the attention it received inside its local window when it was processed; the
engine keeps no past queries, so here the importance is the attention the current window pays
it (summed over heads and window queries, softmax over the cache, $1/\sqrt D$ scaling). The
official code's question term (a second cosine with the question, weight 4, prefill only) is
not offered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qkv.errors import ParameterError
from qkv.reference.kv.policy import CacheView, KVSelector, check_budget
from qkv.reference.sparse.decode_scores import all_slots, check_shared_tokens, slots_of

Array = np.ndarray


def _finite(name: str, x: Array) -> Array:
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise ParameterError(f"{name}: expected a floating array, got dtype {x.dtype}")
    if not np.all(np.isfinite(x)):
        raise ParameterError(f"{name}: expected finite values, got NaN or inf")
    return x


@dataclass(frozen=True, eq=False)
class QueryStats:
    """Running per-feature mean and (population) variance of the queries seen so far.

    Attributes:
        count: queries pooled.
        mean: $\\mu$ ``(B, F)``.
        var: $\\sigma^2$ ``(B, F)``.
    """

    count: int
    mean: Array
    var: Array

    def update(self, h: Array) -> QueryStats:
        """Pool a window ``h (B, W, F)`` into the statistics (Chan's parallel update)."""
        n, m = self.count, h.shape[1]
        mu_w = h.mean(axis=1)  # (B, F)
        var_w = h.var(axis=1)  # (B, F)
        delta = mu_w - self.mean  # (B, F)
        total = n + m
        mean = self.mean + delta * (m / total)  # (B, F)
        var = (n * self.var + m * var_w + delta**2 * (n * m / total)) / total  # (B, F)
        return QueryStats(total, mean, var)


def query_stats(h: Array) -> QueryStats:
    """The statistics of a first window ``h (B, W, F)``."""
    h = _finite("queries", h)
    return QueryStats(h.shape[1], h.mean(axis=1), h.var(axis=1))


def activation_bias(h: Array, stats: QueryStats) -> Array:
    r"""$\mathrm{dev}_i$ of each window token against the running statistics.

    Args:
        h: window queries ``(B, W, F)`` (heads concatenated).
        stats: running mean and variance ``(B, F)`` each.

    Returns:
        ``dev (B, W)``; zero where every variance is zero (no feature has varied yet).
    """
    h = _finite("queries", h)
    denom = stats.var + stats.var.mean(axis=-1, keepdims=True) / 100  # (B, F)
    safe = np.where(denom > 0, denom, 1.0)  # (B, F)
    ratio = np.where(denom[:, None] > 0, (h - stats.mean[:, None]) ** 2 / safe[:, None], 0.0)
    return ratio.mean(axis=-1)  # (B, W)


def activation_weights(dev: Array) -> Array:
    """Token weights $w_i = \\mathrm{dev}_i / \\sum \\mathrm{dev}$ ``(B, W)``; uniform where
    every deviation is zero."""
    total = dev.sum(axis=-1, keepdims=True)  # (B, 1)
    uniform = np.full_like(dev, 1.0 / dev.shape[-1])
    return np.where(total > 0, dev / np.where(total > 0, total, 1.0), uniform)


def probe_query(h: Array, weights: Array) -> Array:
    """The probe $\\hat q = \\sum_i w_i h_i$ ``(B, F)`` of a window ``h (B, W, F)``."""
    return np.einsum("bw,bwf->bf", weights, h)


def block_representatives(
    keys: Array, importance: Array, *, block_size: int, repr_topk: int
) -> Array:
    """Each block's representative: the mean of its ``repr_topk`` most important keys.

    Args:
        keys: candidate keys in token order ``(B, T, F)``.
        importance: a score per key ``(B, T)`` (ties go to the earlier key).
        block_size: keys per block (the last block may be shorter).
        repr_topk: keys averaged per block.

    Returns:
        ``(B, ceil(T / block_size), F)``.
    """
    bs = check_budget("block_size", block_size)
    r = check_budget("repr_topk", repr_topk)
    B, T, F = keys.shape
    nb = -(-T // bs)
    pad = nb * bs - T
    imp = np.pad(importance, [(0, 0), (0, pad)], constant_values=-np.inf).reshape(B, nb, bs)
    order = np.argsort(-imp, axis=-1, kind="stable")[..., : min(r, bs)]  # (B, nb, r)
    real = np.take_along_axis(np.isfinite(imp), order, axis=-1)  # (B, nb, r) not padding
    token = np.minimum(np.arange(nb)[:, None] * bs + order, T - 1)  # (B, nb, r); padding: masked
    chosen = keys[np.arange(B)[:, None, None], token]  # (B, nb, r, F) gathered, keys not padded
    total = np.sum(chosen * real[..., None], axis=2)  # (B, nb, F)
    return total / real.sum(axis=-1, keepdims=True)


def block_scores(representatives: Array, probe: Array) -> Array:
    """Cosine similarity $s_b$ of each representative ``(B, nb, F)`` with the probe ``(B, F)``
    (zero for a zero vector), ``(B, nb)``."""
    dots = np.einsum("bnf,bf->bn", representatives, probe)  # (B, nb)
    norms = np.linalg.norm(representatives, axis=-1) * np.linalg.norm(probe, axis=-1)[:, None]
    return np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), 0.0)


def dynamic_k(
    scores: Array, *, min_k: int, top_k: int, temperature: float = 1.0
) -> tuple[Array, Array]:
    """The entropy-driven cut-off: blocks to read per row, and the normalised entropy.

    Args:
        scores: block scores ``(B, nb)``.
        min_k: blocks read when the score distribution is one-hot ($\\eta = 0$).
        top_k: blocks read when it is uniform ($\\eta = 1$); at most ``nb``.
        temperature: divides the scores before the softmax.

    Returns:
        ``k (B,)`` int64 in ``[min(min_k, nb), top_k]`` and ``eta (B,)`` in ``[0, 1]``
        (``eta = 0`` when there is a single block, as the official code).
    """
    scores = _finite("scores", scores)
    nb = scores.shape[-1]
    top_k = check_budget("top_k", top_k)
    if top_k > nb:
        raise ParameterError(f"top_k: expected at most the {nb} blocks in the cache, got {top_k}")
    lo = min(check_budget("min_k", min_k), top_k)
    t = check_temperature(temperature)
    z = scores / t  # (B, nb)
    z = z - z.max(axis=-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)  # (B, nb)
    entropy = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1)
    eta = np.clip(entropy / math.log(nb), 0.0, 1.0) if nb > 1 else np.zeros(len(scores))
    k = lo + np.round(eta * (top_k - lo)).astype(np.int64)  # (B,)
    return k, eta


def check_temperature(temperature: Any) -> float:
    """A finite temperature ``> 0``, or a clear error."""
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float, np.floating))
        or not math.isfinite(temperature)
        or temperature <= 0
    ):
        raise ParameterError(f"temperature: expected a finite number > 0, got {temperature!r}")
    return float(temperature)


def window_importance(h: Array, keys: Array, valid: Array) -> Array:
    """Attention the window pays each slot, summed over heads and queries ``(B, C)``.

    Args:
        h: window queries per head ``(B, H, W, D)``.
        keys: keys per query head ``(B, H, C, D)``.
        valid: occupied slots ``(B, C)``.
    """
    s = np.einsum("bhwd,bhcd->bhwc", h, keys) / math.sqrt(h.shape[-1])  # (B, H, W, C)
    s = np.where(valid[:, None, None], s, -np.inf)
    s = s - s.max(axis=-1, keepdims=True)
    p = np.exp(s)  # (B, H, W, C)
    return (p / p.sum(axis=-1, keepdims=True)).sum(axis=(1, 2))  # (B, C)


@dataclass(frozen=True)
class ActQKV(KVSelector):
    """ActQKV as a decode-time selector (defaults: the official Llama-3 configuration).

    Attributes:
        n_init: sink tokens always read.
        n_local: latest tokens always read.
        block_size: tokens per retrieved block.
        top_k: blocks read when the block scores are flat (the cut-off's maximum).
        min_k: blocks read when they are peaked (the cut-off's minimum; official ``min(32, n)``).
        repr_topk: keys averaged into a block's representative.
        window: decode queries per layer forming the probe window (1: the current query).
        temperature: softmax temperature of the block scores in the cut-off.
        dynamic: use the entropy cut-off; ``False`` always reads ``top_k`` blocks (InfLLM).
        activation: weight the window by activation bias; ``False`` uses the plain mean (InfLLM).
    """

    n_init: int = 64
    n_local: int = 512
    block_size: int = 32
    top_k: int = 46
    min_k: int = 32
    repr_topk: int = 4
    window: int = 1
    temperature: float = 1.0
    dynamic: bool = True
    activation: bool = True
    _state: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_budget("n_init", self.n_init, minimum=0)
        check_budget("n_local", self.n_local, minimum=1)
        check_budget("block_size", self.block_size)
        check_budget("top_k", self.top_k)
        check_budget("min_k", self.min_k)
        check_budget("repr_topk", self.repr_topk)
        check_budget("window", self.window)
        check_temperature(self.temperature)
        if self.min_k > self.top_k:
            raise ParameterError(f"min_k: expected at most top_k={self.top_k}, got {self.min_k}")
        for name in ("dynamic", "activation"):
            if not isinstance(getattr(self, name), bool):
                raise ParameterError(f"{name}: expected a bool, got {getattr(self, name)!r}")
        self.reset()

    def reset(self) -> None:
        """Forget the windows, statistics and the recorded cut-offs."""
        self._state.clear()
        self._state.update(layers={}, k=[], eta=[])

    @property
    def chosen_k(self) -> list[tuple[int, int, float]]:
        """``(layer, k, eta)`` of every row at every call: the cut-off's record."""
        return list(self._state["k"])

    def _window(self, layer: int, q: Array, n_tokens: int) -> tuple[Array, QueryStats]:
        """This layer's probe window ``(B, H, W, D)`` with the current query appended, and the
        running statistics updated with it."""
        before = self._state["layers"].get(layer)
        if before is None or before["n"] != n_tokens - 1 or before["h"].shape[:2] != q.shape[:2]:
            h, stats = q, query_stats(q.transpose(0, 2, 1, 3).reshape(len(q), 1, -1))
        else:
            h = np.concatenate([before["h"], q], axis=2)[:, :, -self.window :]  # (B, H, W, D)
            stats = before["stats"].update(
                _finite("queries", q).transpose(0, 2, 1, 3).reshape(len(q), 1, -1)
            )
        self._state["layers"][layer] = {"h": h, "stats": stats, "n": n_tokens}
        return h, stats

    def select(self, layer: int, cache: CacheView) -> Array:
        """Sorted slots ``(B, H, S)`` every head of this layer reads (``-1`` padded)."""
        B, H = cache.queries.shape[:2]
        length = check_shared_tokens(cache, who="ActQKV")
        q = cache.queries[:, :, -1:]  # (B, H, 1, D)
        h, stats = self._window(layer, q, cache.n_tokens)
        lo, hi = self.n_init, length - self.n_local
        n_blocks = -(-max(hi - lo, 0) // self.block_size)
        if n_blocks <= min(self.min_k, self.top_k) or (n_blocks <= self.top_k and not self.dynamic):
            return all_slots(cache, H)
        flat = h.transpose(0, 2, 1, 3).reshape(B, h.shape[2], -1)  # (B, W, H * D)
        if self.activation:
            w = activation_weights(activation_bias(flat, stats))  # (B, W)
        else:
            w = np.full(flat.shape[:2], 1.0 / flat.shape[1])  # (B, W)
        probe = probe_query(flat, w)  # (B, H * D)
        keys = np.repeat(cache.keys, H // cache.keys.shape[1], axis=1)  # (B, H, C, D)
        importance = window_importance(h, keys, cache.valid[:, 0])  # (B, C)
        middle = keys[:, :, lo:hi].transpose(0, 2, 1, 3).reshape(B, hi - lo, -1)  # (B, T, H*D)
        reps = block_representatives(
            middle, importance[:, lo:hi], block_size=self.block_size, repr_topk=self.repr_topk
        )  # (B, nb, H * D)
        scores = block_scores(reps, probe)  # (B, nb)
        top = min(self.top_k, n_blocks)
        if self.dynamic:
            k, eta = dynamic_k(scores, min_k=self.min_k, top_k=top, temperature=self.temperature)
        else:
            k, eta = np.full(B, top), np.full(B, np.nan)
        self._state["k"].extend((layer, int(kb), float(e)) for kb, e in zip(k, eta, strict=True))
        return np.repeat(
            _read_mask_slots(scores, k, cache.keys.shape[2], length, self)[:, None], H, axis=1
        )  # (B, H, S)


def _read_mask_slots(scores: Array, k: Array, C: int, length: int, sel: ActQKV) -> Array:
    """Slots ``(B, S)`` of the sinks, each row's ``k`` best blocks and the local window."""
    B, nb = scores.shape
    rank = np.argsort(np.argsort(-scores, axis=-1, kind="stable"), axis=-1)  # (B, nb) 0 = best
    block_on = rank < k[:, None]  # (B, nb)
    slot = np.arange(C)
    lo, hi = sel.n_init, length - sel.n_local
    inside = (slot >= lo) & (slot < hi)  # (C,)
    block_of = np.clip((slot - lo) // sel.block_size, 0, nb - 1)  # (C,)
    mask = (slot < lo) | ((slot >= hi) & (slot < length))  # (C,)
    mask = mask[None] | (inside[None] & block_on[:, block_of])  # (B, C)
    return slots_of(mask)


#: The catalog id.
actqkv = ActQKV
