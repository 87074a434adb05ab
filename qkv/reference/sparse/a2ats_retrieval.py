r"""A²ATS: windowed RoPE + query-aware vector quantisation of keys, top-k retrieval at decode.

Paper: *A^2ATS: Retrieval-Based KV Cache Reduction via Windowed Rotary Position Embedding and
Query-Aware Vector Quantization* (He et al., arXiv 2502.12665). Official code:
https://github.com/junhuihe-hjh/A2ATS (``vqkey/models/llama_masked.py``,
``vqkey/notebooks/construct_codebooks.py``).

A decoding query should read only the keys with the largest attention scores; A²ATS finds them
from a small codebook instead of every key.

**Windowed RoPE.** With RoPE, $\langle R_i q, R_j k\rangle = \langle R_{i-j} q, k\rangle$ depends
on the distance, so one codebook cannot serve all positions. WRoPE keeps the true distance inside
the local window $w$ and a fixed relative position $\delta$ outside it:

$$
\tilde s_{j} = \big\langle R_{r(i-j)}\, q,\; k_j \big\rangle, \qquad
r(t) = \begin{cases} t & t < w \\ \delta & t \ge w \end{cases}
$$

with $q$, $k_j$ before RoPE (:func:`wrope_logits`). Outside the window every key meets the same
rotated query $R_\delta q$, so the keys can be quantised once, without positions.

**Query-aware VQ.** The score error of replacing $k$ by a centroid $c$ is
$\mathbb E_q[(q\cdot(k - c))^2] = (k - c)^\top H (k - c)$ with $H = \mathbb E[q q^\top]$. From
calibration queries rotated at $\delta$ (all query heads of a KV group):
$H = Q^\top Q$, $H \leftarrow H / \operatorname{rms}(H)$, $L = \operatorname{chol}(H + 10^{-6} I)$
($H = L L^\top$), so $\|(k - c) L\|^2$ is that error, and k-means(++) on the rows $k L$ gives
centroids $\hat c$; a key's code is $\arg\min_m \|k L - \hat c_m\|$ and its approximate logit is
$R_\delta q \cdot (\hat c_{\text{code}} L^{-1})$ (:class:`QueryAwareCodebook`,
:func:`kmeans`).

**Decode** (:class:`A2ATS`): approximate logits of every key except the ``n_sink`` first and
the ``window`` latest tokens; each query head keeps its top $\lfloor \text{topk} \cdot L\rfloor$;
the heads of a GQA group take the union; every head of the group then attends exactly to
sinks ∪ window ∪ union (the engine's :func:`qkv.sparse_attention`). Defaults are the official
ones: ``n_sink=8``, ``window=64``, ``relative_position=2048``, ``topk=0.03``, 4096 centroids.

The lab engine (:mod:`qkv.lab.engine`) caches keys **after** RoPE, each at its position; the
selector un-rotates them ($R_{-j} R_j k = k$) before coding them, and rotates the cached
query (at position $i$) by $\delta - i$ to get $R_\delta q$. The official code codes each key
once, when it enters the cache; the selector does the same across decode steps: it keeps each
layer's codes with the keys and positions they came from and codes only the slots that changed
since its last call (the step's new token), which gives the codes of coding every key afresh.
Calibration for the lab decoder: :func:`lab_codebooks`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import qkv
from qkv.errors import ParameterError, ShapeError
from qkv.reference.kv.policy import CacheView, KVSelector, check_budget
from qkv.reference.ranking import top_k
from qkv.reference.sparse.decode_scores import all_slots, check_shared_tokens, slots_of

Array = np.ndarray


def rotate(x: Array, positions: Array, *, base: float = 10000.0) -> Array:
    """RoPE of ``x (B, G, C, D)`` with one position per vector ``positions (B, G, C)`` (any sign)."""
    B, G, C, D = x.shape
    flat = x.reshape(B * G, 1, C, D)  # (B G, 1, C, D)
    where = np.asarray(positions, dtype=np.int64).reshape(B * G, C)  # (B G, C)
    return qkv.rope(flat, positions=where, base=base).reshape(B, G, C, D)


def wrope_logits(
    q: Array,
    k: Array,
    distance: Array,
    *,
    window: int = 64,
    relative_position: int = 2048,
    base: float = 10000.0,
) -> Array:
    r"""Windowed-RoPE logits $\tilde s_j = \langle R_{r(i-j)} q, k_j\rangle$ (no scale).

    Args:
        q: pre-RoPE queries ``(B, H, D)``.
        k: pre-RoPE keys ``(B, Hkv, C, D)``, ``H % Hkv == 0``.
        distance: query position minus key position ``(B, Hkv, C)``.
        window: distances below it keep their true rotation.
        relative_position: the rotation $\delta$ used for every distance ``>= window``.
        base: RoPE base.

    Returns:
        Logits ``(B, H, C)``.
    """
    r = np.where(distance < window, distance, relative_position)  # (B, Hkv, C)
    k_turned = rotate(k, -r, base=base)  # (B, Hkv, C, D): <R_r q, k> = <q, R_{-r} k>
    H, Hkv = q.shape[1], k.shape[1]
    q_grouped = q.reshape(q.shape[0], Hkv, H // Hkv, q.shape[-1])  # (B, Hkv, G, D)
    logits = np.einsum("bkgd,bkcd->bkgc", q_grouped, k_turned)  # (B, Hkv, G, C)
    return logits.reshape(q.shape[0], H, k.shape[2])


# --------------------------------------------------------------------------- query-aware VQ


def query_metric(queries: Array, *, eps: float = 1e-6) -> tuple[Array, Array]:
    r"""$H = Q^\top Q / \operatorname{rms}(Q^\top Q)$ and $L = \operatorname{chol}(H + \epsilon I)$.

    Args:
        queries: calibration queries of one KV group, rotated at $\delta$ ``(n, D)``.
        eps: the ridge added before the Cholesky factorisation.

    Returns:
        ``H (D, D)`` and the lower-triangular ``L (D, D)`` with ``H + eps I = L L^T``.
    """
    Hm = queries.T @ queries  # (D, D)
    Hm = Hm / np.sqrt(np.mean(Hm**2))
    return Hm, np.linalg.cholesky(Hm + eps * np.eye(len(Hm), dtype=Hm.dtype))


@dataclass(frozen=True, eq=False)
class KMeans:
    """The result of :func:`kmeans`.

    Attributes:
        centroids: ``(K, D)``.
        assignment: the centroid of each point ``(n,)``.
        objective: mean squared distance to the assigned centroid, after the seeding and after
            each Lloyd iteration ``(iters + 1,)``.
    """

    centroids: Array
    assignment: Array
    objective: Array


def nearest(points: Array, centroids: Array) -> tuple[Array, Array]:
    """Index of the nearest centroid ``(n,)`` and the squared distance to it ``(n,)``."""
    d2 = (
        np.sum(points**2, axis=1)[:, None]
        - 2.0 * points @ centroids.T
        + np.sum(centroids**2, axis=1)[None, :]
    )  # (n, K)
    best = np.argmin(d2, axis=1)  # (n,)
    return best, np.maximum(d2[np.arange(len(points)), best], 0.0)


def check_codebook_size(n_centroids: Any, n_keys: int) -> int:
    """A codebook size in ``[1, n_keys]``, or a clear error."""
    if isinstance(n_centroids, bool) or not isinstance(n_centroids, (int, np.integer)):
        raise ParameterError(f"n_centroids: expected an integer >= 1, got {n_centroids!r}")
    if not 1 <= n_centroids <= n_keys:
        raise ParameterError(
            f"n_centroids: expected a codebook size in [1, {n_keys}] (at most the number of "
            f"keys), got {int(n_centroids)}"
        )
    return int(n_centroids)


def kmeans(
    points: Array, n_centroids: int, *, iters: int = 20, rng: int | np.random.Generator = 0
) -> KMeans:
    """k-means++ seeding then ``iters`` Lloyd iterations (an empty cluster keeps its centroid).

    Args:
        points: ``(n, D)``.
        n_centroids: ``K``, at most ``n``.
        iters: Lloyd iterations.
        rng: seed or generator of the seeding.

    Returns:
        The :class:`KMeans` (its objective never increases).
    """
    K = check_codebook_size(n_centroids, len(points))
    gen = np.random.default_rng(rng)
    centroids = np.empty((K, points.shape[1]), dtype=points.dtype)  # (K, D)
    centroids[0] = points[gen.integers(len(points))]
    d2 = np.sum((points - centroids[0]) ** 2, axis=1)  # (n,)
    for m in range(1, K):  # k-means++: sample proportionally to the squared distance
        total = d2.sum()
        pick = gen.choice(len(points), p=d2 / total) if total > 0 else gen.integers(len(points))
        centroids[m] = points[pick]
        d2 = np.minimum(d2, np.sum((points - centroids[m]) ** 2, axis=1))
    assignment, d2 = nearest(points, centroids)
    objective = [float(d2.mean())]
    for _ in range(iters):
        sums = np.zeros_like(centroids)  # (K, D)
        np.add.at(sums, assignment, points)
        counts = np.bincount(assignment, minlength=K)  # (K,)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
        assignment, d2 = nearest(points, centroids)
        objective.append(float(d2.mean()))
    return KMeans(centroids, assignment, np.asarray(objective))


@dataclass(frozen=True, eq=False)
class QueryAwareCodebook:
    r"""One layer's codebooks, one per KV head.

    Attributes:
        centroids: codewords in key space $\hat c L^{-1}$ ``(Hkv, K, D)``.
        cholesky: the factors $L$ ``(Hkv, D, D)`` of the query metric.
    """

    centroids: Array
    cholesky: Array

    @classmethod
    def fit(
        cls,
        queries: Array,
        keys: Array,
        n_centroids: int,
        *,
        iters: int = 20,
        rng: int = 0,
    ) -> QueryAwareCodebook:
        r"""Learn the codebooks from calibration data.

        Args:
            queries: pre-RoPE queries of each KV group rotated at $\delta$ ``(Hkv, n, D)``.
            keys: pre-RoPE calibration keys ``(Hkv, m, D)``.
            n_centroids: codewords per KV head (at most ``m``).
            iters: Lloyd iterations.
            rng: seed.

        Returns:
            The codebook.
        """
        if queries.ndim != 3 or keys.ndim != 3 or queries.shape[::2] != keys.shape[::2]:
            raise ShapeError(
                f"queries, keys: expected (Hkv, n, D) and (Hkv, m, D), got {queries.shape} "
                f"and {keys.shape}"
            )
        check_codebook_size(n_centroids, keys.shape[1])
        centroids, factors = [], []
        for g in range(keys.shape[0]):
            _, L = query_metric(queries[g])
            fit = kmeans(keys[g] @ L, n_centroids, iters=iters, rng=rng + g)
            centroids.append(np.linalg.solve(L.T, fit.centroids.T).T)  # (K, D) = c_hat L^-1
            factors.append(L)
        return cls(np.stack(centroids), np.stack(factors))

    def assign(self, keys: Array) -> Array:
        """Codes ``(B, Hkv, C)`` of pre-RoPE keys ``(B, Hkv, C, D)``: nearest in the metric."""
        B, Hkv, C, D = keys.shape
        heads = np.broadcast_to(np.arange(Hkv)[:, None], (B, Hkv, C))  # (B, Hkv, C)
        return self.assign_rows(keys.reshape(-1, D), heads.reshape(-1)).reshape(B, Hkv, C)

    def assign_rows(self, keys: Array, heads: Array) -> Array:
        """Codes ``(n,)`` of pre-RoPE keys ``(n, D)``, key ``r`` coded with KV head ``heads[r]``'s
        codebook: the nearest codeword in that head's metric."""
        codes = np.empty(len(keys), dtype=np.int64)
        for g in np.unique(heads):
            rows = heads == g  # (n,)
            L = self.cholesky[g]
            codes[rows] = nearest(keys[rows] @ L, self.centroids[g] @ L)[0]
        return codes


def approximate_logits(q_delta: Array, codes: Array, centroids: Array) -> Array:
    r"""$R_\delta q_h \cdot \hat c_{\text{code}(j)}$ for every head and key ``(B, H, C)``.

    Args:
        q_delta: queries rotated at $\delta$ ``(B, H, D)``.
        codes: the code of each key ``(B, Hkv, C)``.
        centroids: codewords in key space ``(Hkv, K, D)``.

    Returns:
        Logits ``(B, H, C)``: each head meets the ``K`` codewords once, then a lookup.
    """
    B, H, _ = q_delta.shape
    Hkv = centroids.shape[0]
    q_grouped = q_delta.reshape(B, Hkv, H // Hkv, -1)  # (B, Hkv, G, D)
    per_word = np.einsum("bkgd,kmd->bkgm", q_grouped, centroids)  # (B, Hkv, G, K)
    lookup = np.broadcast_to(codes[:, :, None], (B, Hkv, H // Hkv, codes.shape[-1]))
    return np.take_along_axis(per_word, lookup, axis=-1).reshape(B, H, -1)  # (B, H, C)


def check_topk(topk: Any) -> float:
    """A fraction of the sequence in ``(0, 1]``, or a clear error."""
    if isinstance(topk, bool) or not isinstance(topk, (int, float, np.floating)):
        raise ParameterError(f"topk: expected a fraction in (0, 1], got {topk!r}")
    if not 0.0 < float(topk) <= 1.0:
        raise ParameterError(f"topk: expected a fraction of the sequence in (0, 1], got {topk!r}")
    return float(topk)


def a2ats_slots(logits: Array, candidate: Array, keep: Array, count: int) -> Array:
    """Per head top-``count`` candidates, unioned over each GQA group, plus the ``keep`` slots.

    Args:
        logits: approximate logits ``(B, H, C)``.
        candidate: slots open to retrieval ``(B, Hkv, C)`` bool.
        keep: slots always read (sinks and window) ``(B, Hkv, C)`` bool.
        count: keys each query head retrieves (clipped to the candidates).

    Returns:
        Sorted slots ``(B, H, S)``, the same for every head of a group, ``-1`` padded.
    """
    B, H, C = logits.shape
    Hkv = candidate.shape[1]
    G = H // Hkv
    cand = np.repeat(candidate, G, axis=1)  # (B, H, C)
    count = min(count, int(candidate.sum(axis=-1).min()))
    best = top_k(np.where(cand, logits, -np.inf), count)  # (B, H, count)
    chosen = np.zeros((B, H, C), dtype=bool)
    np.put_along_axis(chosen, best, True, axis=-1)
    union = chosen.reshape(B, Hkv, G, C).any(axis=2) | keep  # (B, Hkv, C)
    return np.repeat(slots_of(union), G, axis=1)  # (B, H, S)


@dataclass(frozen=True, eq=False)
class CodedKeys:
    """One layer's key codes with what they were computed from.

    Attributes:
        keys: the cached (rotated) keys ``(B, Hkv, C, D)``.
        positions: their positions ``(B, Hkv, C)``.
        codes: their codes ``(B, Hkv, C)``.
    """

    keys: Array
    positions: Array
    codes: Array

    def carried(self, cache: CacheView) -> tuple[Array, Array]:
        """``(codes, kept)``, both ``(B, Hkv, C)`` for ``cache``: ``kept`` marks the slots that
        still hold the key and position coded here (none past this record's slots, none for a
        cache of another layout), ``codes`` their codes (0 elsewhere)."""
        B, Hkv, C, D = cache.keys.shape
        codes = np.zeros((B, Hkv, C), dtype=np.int64)
        kept = np.zeros((B, Hkv, C), dtype=bool)
        if self.keys.shape[:2] != (B, Hkv) or self.keys.shape[3] != D:
            return codes, kept
        n = min(self.keys.shape[2], C)  # the slots both hold
        kept[..., :n] = np.all(self.keys[:, :, :n] == cache.keys[:, :, :n], axis=-1) & (
            self.positions[:, :, :n] == cache.positions[:, :, :n]
        )
        codes[..., :n] = np.where(kept[..., :n], self.codes[..., :n], 0)
        return codes, kept


@dataclass(frozen=True)
class A2ATS(KVSelector):
    """A²ATS as a decode-time selector for the lab engine.

    Attributes:
        codebooks: one :class:`QueryAwareCodebook` per layer.
        topk: keys each query head retrieves, as a fraction of the cached tokens.
        n_sink: first tokens always read.
        window: latest tokens always read (and the WRoPE window).
        relative_position: WRoPE's $\\delta$.
        top_k: a fixed count of retrieved keys per head instead of ``topk`` (``None``: the
            fraction; used where a budget is given in keys, as in ``qkv lab kv-eval``).
    """

    codebooks: tuple[QueryAwareCodebook, ...] = field(repr=False)
    topk: float = 0.03
    n_sink: int = 8
    window: int = 64
    relative_position: int = 2048
    top_k: int | None = None
    coded: dict[int, CodedKeys] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_topk(self.topk)
        check_budget("n_sink", self.n_sink, minimum=0)
        check_budget("window", self.window)
        check_budget("relative_position", self.relative_position, minimum=0)
        if self.top_k is not None:
            check_budget("top_k", self.top_k, minimum=0)
        if not all(isinstance(c, QueryAwareCodebook) for c in self.codebooks):
            raise ParameterError("codebooks: expected one QueryAwareCodebook per layer")

    def count(self, length: int) -> int:
        """Keys each query head retrieves from ``length`` cached tokens."""
        return self.top_k if self.top_k is not None else int(self.topk * length)

    def codebook(self, layer: int) -> QueryAwareCodebook:
        """The codebook calibrated for ``layer`` (a clear error for another layer)."""
        if not 0 <= layer < len(self.codebooks):
            raise ParameterError(
                f"layer: expected one of the {len(self.codebooks)} calibrated layers, got {layer}"
            )
        return self.codebooks[layer]

    def codes(self, layer: int, cache: CacheView) -> Array:
        """Codes ``(B, Hkv, C)`` of the cached keys: un-rotated from their cached positions,
        then coded with the layer's codebook.

        The paper codes each key once, when it enters the cache. The selector keeps the
        layer's codes of its last call (:attr:`coded`) and codes only the slots whose key or
        position has changed since: at a decode step, the new token's slot; for another cache,
        every slot. The codes are those of coding every key afresh.
        """
        book = self.codebook(layer)
        last = self.coded.get(layer)
        if last is None:
            codes = np.zeros(cache.keys.shape[:3], dtype=np.int64)  # (B, Hkv, C)
            kept = np.zeros(codes.shape, dtype=bool)  # (B, Hkv, C)
        else:
            codes, kept = last.carried(cache)
        b, g, c = np.nonzero(~kept)  # (n,) each: the slots to code
        if len(b):
            pre = rotate(
                cache.keys[b, g, c][None, None],
                -cache.positions[b, g, c][None, None],
                base=cache.rope_base,
            )  # (1, 1, n, D) the pre-RoPE keys
            codes[b, g, c] = book.assign_rows(pre[0, 0], g)
        self.coded[layer] = CodedKeys(cache.keys.copy(), cache.positions.copy(), codes)
        return codes

    def logits(self, layer: int, cache: CacheView, codes: Array | None = None) -> Array:
        r"""Approximate logits $R_\delta q_h \cdot \hat c_{\text{code}(j)}$ of every slot ``(B, H, C)``.

        The latest query, cached at its position $i$, is turned by $\delta - i$ and meets each
        codeword once; every key then looks its code's logit up. ``codes`` (from
        :meth:`codes`) are computed here when not given.
        """
        book = self.codebook(layer)
        codes = self.codes(layer, cache) if codes is None else codes  # (B, Hkv, C)
        if codes.shape != cache.keys.shape[:3]:
            raise ShapeError(
                f"codes: expected one code per cache slot {cache.keys.shape[:3]}, got {codes.shape}"
            )
        G = cache.queries.shape[1] // cache.keys.shape[1]
        here = np.repeat(cache.next_position - 1, G, axis=1)  # (B, H) the query's position
        q = cache.queries[:, :, -1:]  # (B, H, 1, D) rotated at its position
        q_delta = rotate(q, (self.relative_position - here)[..., None], base=cache.rope_base)
        return approximate_logits(q_delta[:, :, 0], codes, book.centroids)  # (B, H, C)

    def select(self, layer: int, cache: CacheView, codes: Array | None = None) -> Array:
        """Sorted slots ``(B, H, S)``: sinks, window and the retrieved keys of each group
        (``codes`` as in :meth:`logits`)."""
        length = check_shared_tokens(cache, who="A2ATS")
        if self.n_sink + self.window >= length:
            return all_slots(cache, cache.queries.shape[1])
        token = cache.indices  # (B, Hkv, C)
        keep = cache.valid & ((token < self.n_sink) | (token >= cache.n_tokens - self.window))
        candidate = cache.valid & ~keep
        logits = self.logits(layer, cache, codes)
        return a2ats_slots(logits, candidate, keep, self.count(length))


# --------------------------------------------------------------------------- the lab decoder


def calibration_qk(weights: Any, prompts: Array, *, relative_position: int = 2048) -> list:
    """Per layer, pre-RoPE queries rotated at $\\delta$ and pre-RoPE keys of the lab decoder.

    Args:
        weights: :class:`qkv.lab.decoder.DecoderWeights`.
        prompts: calibration token ids ``(B, N)``.
        relative_position: $\\delta$.

    Returns:
        One ``(queries (Hkv, B G N, D), keys (Hkv, B N, D))`` pair per layer.
    """
    from qkv.lab import decoder as dec

    config = weights.config
    Hkv, D = config.n_kv_heads, config.head_dim
    x = weights.embed[prompts]  # (B, N, d)
    N = x.shape[1]
    out = []
    for lw in weights.layers:
        q, k, v = dec.project_qkv(config, lw, x, None)  # pre-RoPE (B, H, N, D), (B, Hkv, N, D)
        at_delta = qkv.rope(q, positions=np.full(N, relative_position), base=config.rope_base)
        groups = at_delta.reshape(len(x), Hkv, -1, D).transpose(1, 0, 2, 3)  # (Hkv, B, G N, D)
        out.append((groups.reshape(Hkv, -1, D), k.transpose(1, 0, 2, 3).reshape(Hkv, -1, D)))
        q_rot = qkv.rope(q, base=config.rope_base)  # (B, H, N, D)
        k_rot = qkv.rope(k, base=config.rope_base)  # (B, Hkv, N, D)
        x = dec.finish_block(config, lw, x, qkv.sdpa(q_rot, k_rot, v, causal=True))
    return out


@functools.lru_cache(maxsize=4)
def lab_codebooks(
    n_centroids: int = 128, *, relative_position: int = 2048, prompts: int = 4, length: int = 256
) -> tuple[QueryAwareCodebook, ...]:
    """Codebooks of the shipped lab decoder, calibrated on held-out passkey prompts (cached).

    Args:
        n_centroids: codewords per KV head and layer.
        relative_position: WRoPE's $\\delta$ the calibration queries are rotated at.
        prompts: calibration prompts (seeded; a seed neither training nor ``kv-eval`` uses).
        length: their length in tokens.

    Returns:
        One :class:`QueryAwareCodebook` per layer.
    """
    from qkv.lab import decoder as dec
    from qkv.lab import tasks

    weights = dec.load()
    rng = np.random.default_rng(31337)
    batch = np.stack([tasks.passkey(length, rng.random(), rng).prompt for _ in range(prompts)])
    pairs = calibration_qk(weights, batch, relative_position=relative_position)
    return tuple(QueryAwareCodebook.fit(q, k, n_centroids, rng=i) for i, (q, k) in enumerate(pairs))


#: The catalog id.
a2ats = A2ATS
