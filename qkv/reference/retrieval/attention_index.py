r"""RetrievalAttention: an attention-aware graph index over the key cache, searched per query.

Paper: *RetrievalAttention: Accelerating Long-Context LLM Inference via Vector Retrieval*
(Liu et al., arXiv 2409.10516). Official code: https://github.com/microsoft/RetrievalAttention
(its public snapshot holds the follow-up RetroInfer; the index code of this paper is not in it,
so every detail below that the paper's text does not fix is our choice, and says so).

A decoding query $q$ puts almost all of its attention on a few keys, so exact attention over
its top-$k$ keys by $q \cdot k$ (a maximum-inner-product search) is nearly full attention. The
paper's observation is that queries and keys are *out of distribution* for each other: an index
built on keys alone (a key-key nearest-neighbour graph) leads a query's search through keys
that are near each other but not near the query, and must scan a large share of the keys. The
fix is to build the index from the prefill queries, whose attention is known:

1. **Bipartite links.** Every prefill query $q_i$ (all query heads that read this KV head) is
   linked to its exact top-``links`` keys, $T_i = \operatorname{TopK}_j(q_i \cdot k_j)$.
2. **Projection onto keys** (RoarGraph's projection, as the paper describes it). The key a
   query ranks first, its *pivot* $p_i = T_i[0]$, gathers the query's other linked keys
   $T_i \setminus \{p_i\}$ as candidate neighbours. Each key keeps at most ``max_degree`` of its
   candidates, taken nearest first (Euclidean) and skipping a candidate $c$ that is nearer to
   an already kept neighbour $s$ than to the key itself ($\lVert c - s\rVert <
   \lVert c - p\rVert$, the relative-neighbourhood rule that keeps edges pointing in different
   directions). Then every edge $p \to c$ gets its reverse $c \to p$ where $c$ has room.
3. **Connectivity** (our rule, both graphs). A key no query links has no projected edge. Keys
   not reachable from the entry are attached, in index order, each by an edge from its
   Euclidean-nearest reachable key and one back, so every key can be found; those edges may take
   a key past ``max_degree``. The entry is the key linked by the most queries.

A decoding query is answered by greedy best-first search (:func:`graph_search`): a candidate
queue and a result list of size ``ef``; pop the best candidate, stop once it scores below the
worst of a full result list, otherwise score its unvisited neighbours (one batched
$K_{\mathcal N} q$ product) and keep the best ``ef``. The number of keys scored is the cost the
paper reports ("keys scanned"). With ``ef`` at least the number of keys the search visits every
reachable key, so it returns the exact top-$k$.

Attention then splits the cache into the **static** tokens $\mathcal S$ (the first ``n_sink``
and everything from ``n_recent`` before the end of the indexed prefill onwards, which keeps the
tokens decoded since) and the **retrieved** keys $\mathcal R$ (the search's top-$k$ among the
indexed middle), two disjoint sets combined exactly by their log-sum-exps
(:func:`qkv.reference.sparse.merge_partials`):

$$
o = e^{\ell_{\mathcal S} - \ell}\, o_{\mathcal S} + e^{\ell_{\mathcal R} - \ell}\,
o_{\mathcal R}, \qquad \ell = \log\big(e^{\ell_{\mathcal S}} + e^{\ell_{\mathcal R}}\big),
$$

with $o_{\mathcal X}$, $\ell_{\mathcal X}$ the softmax attention over $\mathcal X$ and its
log-sum-exp (:func:`qkv.reference.sparse.sparse_attention`). The paper keeps the static part on
the GPU and searches on the CPU; here both are NumPy.

The baseline of the paper's comparison, a plain Euclidean key-key kNN graph searched the same way,
is :func:`build_knn_index`. The searches of a whole batch are the dispatched op
``qkv.graph_search_batch`` (:func:`graph_search_batch`), which the numba backend compiles.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any

import numpy as np

from qkv import _checks
from qkv.errors import ParameterError, ShapeError
from qkv.reference.sparse.selected_keys import merge_partials, sparse_attention

Array = np.ndarray


@dataclass(frozen=True, eq=False)
class AttentionIndex:
    """A search graph per (batch, KV head) over the keys ``[start, stop)`` of a cache.

    Attributes:
        neighbours: out-neighbours ``(B, Hkv, M_idx, R)`` as local ids in ``[0, M_idx)``
            (cache position minus ``start``), ``-1`` padded; ``M_idx = stop - start``.
        entry: the local id where every search starts, ``(B, Hkv)``.
        start: first indexed cache position (the sinks before it are static).
        stop: one past the last indexed position (the recent tokens from it on are static).
    """

    neighbours: Array
    entry: Array
    start: int
    stop: int

    @property
    def size(self) -> int:
        """Keys in each graph, ``M_idx = stop - start``."""
        return self.stop - self.start

    def degrees(self) -> Array:
        """Out-degree of every key, ``(B, Hkv, M_idx)``."""
        return (self.neighbours >= 0).sum(axis=-1)


# --------------------------------------------------------------------------- checks


def _finite(name: str, x: Array) -> None:
    if not np.isfinite(x).all():
        raise ParameterError(f"{name}: expected finite values, got NaN or inf")


def _indexed_range(M: int, n_sink: int, n_recent: int) -> tuple[int, int]:
    """``(start, stop)`` of the indexed keys; at least one key must be left to index."""
    for name, value in (("n_sink", n_sink), ("n_recent", n_recent)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ParameterError(f"{name}: expected an integer >= 0, got {value!r}")
    if n_sink + n_recent >= M:
        raise ParameterError(
            f"n_sink, n_recent: expected n_sink + n_recent < M={M} keys so that some are "
            f"indexed, got {n_sink} + {n_recent}"
        )
    return int(n_sink), int(M - n_recent)


def _count(name: str, value: Any, size: int, what: str) -> int:
    """An integer in ``[1, size]`` (``size`` counts ``what``)."""
    value = _checks.positive_int(name, value)
    if value > size:
        raise ParameterError(f"{name}: expected at most the {size} {what}, got {value}")
    return value


def _keys(name: str, keys: Any) -> None:
    _checks.array(name, keys, rank=4, layout="(B, Hkv, M, D)")
    _finite(name, keys)


# --------------------------------------------------------------------------- graphs


def _top(scores: Array, k: int) -> Array:
    """Column ids of the ``k`` largest entries of each row of ``scores (R, C)``, best first."""
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # (R, k)
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)  # (R, k)


def _sq_dist(keys: Array, rows: Array) -> Array:
    """Squared Euclidean distances ``(len(rows), M)`` from ``keys[rows]`` to all ``keys (M, D)``."""
    sq = np.einsum("md,md->m", keys, keys)  # (M,)
    return sq[rows, None] + sq[None, :] - 2.0 * keys[rows] @ keys.T  # (r, M)


def _prune(keys: Array, p: int, cand: Array, max_degree: int) -> list[int]:
    """At most ``max_degree`` of ``cand``, nearest to key ``p`` first, by the RNG rule."""
    dist = _sq_dist(keys, np.array([p]))[0, cand]  # (C,)
    kept: list[int] = []
    for j in np.argsort(dist, kind="stable"):
        c = int(cand[j])
        if kept and (np.square(keys[kept] - keys[c]).sum(axis=1) < dist[j]).any():
            continue  # a kept neighbour already leads towards c
        kept.append(c)
        if len(kept) == max_degree:
            break
    return kept


def _project(links: Array, keys: Array, max_degree: int) -> list[Array]:
    """Key-key out-neighbours from query-key links ``(Nq, links)`` (module docstring, step 2)."""
    M = keys.shape[0]
    candidates: list[set[int]] = [set() for _ in range(M)]
    for row in links:
        candidates[row[0]].update(row[1:].tolist())
    out = [
        _prune(keys, p, np.array(sorted(c), dtype=np.int64), max_degree) if c else []
        for p, c in enumerate(candidates)
    ]
    for p in range(M):
        for c in list(out[p]):
            if p not in out[c] and len(out[c]) < max_degree:
                out[c].append(p)
    return [np.asarray(o, dtype=np.int64) for o in out]


def _knn(keys: Array, max_degree: int, chunk: int = 1024) -> list[Array]:
    """Each key's ``max_degree`` Euclidean-nearest other keys (``keys (M, D)``), nearest first."""
    M = keys.shape[0]
    degree = min(max_degree, M - 1)
    out: list[Array] = []
    for lo in range(0, M, chunk):
        rows = np.arange(lo, min(lo + chunk, M))
        d = _sq_dist(keys, rows)  # (r, M)
        d[np.arange(len(rows)), rows] = np.inf  # not its own neighbour
        out.extend(_top(-d, degree) if degree else np.zeros((len(rows), 0), dtype=np.int64))
    return out


def _connect(adjacency: list[Array], keys: Array, entry: int) -> list[Array]:
    """Attach every key unreachable from ``entry`` (module docstring, step 3)."""
    M = keys.shape[0]
    edges = [list(map(int, a)) for a in adjacency]
    reached = np.zeros(M, dtype=bool)
    stack = [entry]
    reached[entry] = True
    while True:
        while stack:
            for u in edges[stack.pop()]:
                if not reached[u]:
                    reached[u] = True
                    stack.append(u)
        missing = np.flatnonzero(~reached)
        if not len(missing):
            return [np.asarray(e, dtype=np.int64) for e in edges]
        u = int(missing[0])
        near = np.flatnonzero(reached)  # (r,)
        r = int(near[np.argmin(_sq_dist(keys, np.array([u]))[0, near])])
        edges[r].append(u)
        if r not in edges[u]:
            edges[u].append(r)
        reached[u] = True
        stack.append(u)


def _pad(graphs: list[list[Array]]) -> Array:
    """Adjacency lists (``[B * Hkv][M_idx]``) as one ``-1`` padded array ``(B*Hkv, M_idx, R)``."""
    width = max(1, max(len(e) for g in graphs for e in g))
    out = np.full((len(graphs), len(graphs[0]), width), -1, dtype=np.int64)
    for g, graph in enumerate(graphs):
        for a, e in enumerate(graph):
            out[g, a, : len(e)] = e
    return out


def build_index(
    queries: Array,
    keys: Array,
    *,
    n_sink: int = 128,
    n_recent: int = 512,
    links: int = 100,
    max_degree: int = 32,
) -> AttentionIndex:
    """Build the attention-aware graph over the middle keys of a prefilled cache.

    Args:
        queries: prefill queries ``(B, H, N, D)`` (rotated, as the model's attention uses them);
            the ``H / Hkv`` query heads of a group all link into their KV head's graph.
        keys: the cache's keys ``(B, Hkv, M, D)``.
        n_sink: first keys kept static, not indexed (default 128: the paper's setup as we read
            it, 128 initial + 512 recent static tokens; no released code to confirm).
        n_recent: last keys kept static, not indexed (default 512, see ``n_sink``).
        links: top keys each prefill query is linked to (step 1; default 100, our choice).
        max_degree: cap on each key's projected out-degree (step 2; default 32, our choice).

    Returns:
        The :class:`AttentionIndex` over positions ``[n_sink, M - n_recent)``.
    """
    _checks.array("queries", queries, rank=4, layout="(B, H, N, D)")
    _keys("keys", keys)
    _checks.same_dtype(queries=queries, keys=keys)
    _finite("queries", queries)
    B, H, N, D = queries.shape
    Bk, Hkv, M, Dk = keys.shape
    if (Bk, Dk) != (B, D) or H % Hkv:
        raise ShapeError(
            f"queries, keys: expected (B, H, N, D) and (B, Hkv, M, D) with one B and D and "
            f"H % Hkv == 0, got {tuple(queries.shape)} and {tuple(keys.shape)}"
        )
    start, stop = _indexed_range(M, n_sink, n_recent)
    links = _count("links", links, stop - start, "indexed keys")
    max_degree = _checks.positive_int("max_degree", max_degree)
    work = np.float64 if keys.dtype == np.float64 else np.float32
    mid = keys[:, :, start:stop].astype(work)  # (B, Hkv, M_idx, D)
    grouped = queries.astype(work).reshape(B, Hkv, (H // Hkv) * N, D)  # (B, Hkv, G*N, D)
    graphs, entries = [], []
    for b in range(B):
        for h in range(Hkv):
            top = _top(grouped[b, h] @ mid[b, h].T, links)  # (G*N, links) bipartite links
            entry = int(np.argmax(np.bincount(top.ravel(), minlength=stop - start)))
            graphs.append(_connect(_project(top, mid[b, h], max_degree), mid[b, h], entry))
            entries.append(entry)
    return AttentionIndex(
        _pad(graphs).reshape(B, Hkv, stop - start, -1),  # (B, Hkv, M_idx, R)
        np.asarray(entries, dtype=np.int64).reshape(B, Hkv),
        start,
        stop,
    )


def build_knn_index(
    keys: Array, *, n_sink: int = 128, n_recent: int = 512, max_degree: int = 32
) -> AttentionIndex:
    """The baseline: each middle key linked to its ``max_degree`` Euclidean-nearest keys.

    What an off-the-shelf index over the keys alone builds; it never sees a query. The entry is
    the key nearest the mean key, and unreachable keys are attached as in :func:`build_index`.

    Args:
        keys: the cache's keys ``(B, Hkv, M, D)``.
        n_sink: first keys kept static, not indexed.
        n_recent: last keys kept static, not indexed.
        max_degree: out-degree of every key (fewer if there are fewer other keys).

    Returns:
        The :class:`AttentionIndex` over positions ``[n_sink, M - n_recent)``.
    """
    _keys("keys", keys)
    B, Hkv, M, _ = keys.shape
    start, stop = _indexed_range(M, n_sink, n_recent)
    max_degree = _checks.positive_int("max_degree", max_degree)
    work = np.float64 if keys.dtype == np.float64 else np.float32
    graphs, entries = [], []
    for b in range(B):
        for h in range(Hkv):
            mid = keys[b, h, start:stop].astype(work)  # (M_idx, D)
            entry = int(np.argmin(np.square(mid - mid.mean(axis=0)).sum(axis=1)))
            graphs.append(_connect(_knn(mid, max_degree), mid, entry))
            entries.append(entry)
    return AttentionIndex(
        _pad(graphs).reshape(B, Hkv, stop - start, -1),  # (B, Hkv, M_idx, R)
        np.asarray(entries, dtype=np.int64).reshape(B, Hkv),
        start,
        stop,
    )


# --------------------------------------------------------------------------- search


def graph_search(
    query: Array, keys: Array, neighbours: Array, entry: int, *, top_k: int, ef: int
) -> tuple[Array, int]:
    """Greedy best-first search of one graph for the keys of largest ``query . key``.

    Args:
        query: one query ``(D,)``.
        keys: the graph's keys ``(M_idx, D)``.
        neighbours: out-neighbours ``(M_idx, R)``, ``-1`` padded.
        entry: the key the search starts from.
        top_k: keys returned.
        ef: size of the result list (``>= top_k``); larger scans more and finds more.

    Returns:
        The ``top_k`` found key ids ``(top_k,)``, best first (fewer if the graph reaches fewer
        keys), and the number of keys scored.
    """
    visited = np.zeros(keys.shape[0], dtype=bool)
    visited[entry] = True
    first = float(keys[entry] @ query)
    candidates = [(-first, entry)]  # max-queue by score
    results = [(first, entry)]  # min-queue of the best ef
    scanned = 1
    while candidates:
        best, c = heapq.heappop(candidates)
        if len(results) >= ef and -best < results[0][0]:
            break
        fresh = np.unique(neighbours[c][neighbours[c] >= 0])
        fresh = fresh[~visited[fresh]]  # (F,) unscored neighbours
        visited[fresh] = True
        scanned += len(fresh)
        for score, u in zip((keys[fresh] @ query).tolist(), fresh.tolist(), strict=True):
            if len(results) < ef or score > results[0][0]:
                heapq.heappush(candidates, (-score, u))
                heapq.heappush(results, (score, u))
                if len(results) > ef:
                    heapq.heappop(results)
    found = sorted(results, key=lambda r: (-r[0], r[1]))[:top_k]
    return np.asarray([u for _, u in found], dtype=np.int64), scanned


def _integers(name: str, x: Any, shape: tuple[int, ...], low: int, high: int) -> None:
    """``x`` is an integer NumPy array whose shape starts with ``shape``, values in ``[low, high)``."""
    if not isinstance(x, np.ndarray) or not np.issubdtype(x.dtype, np.integer):
        got = getattr(x, "dtype", type(x).__name__)
        raise TypeError(f"{name}: expected an integer NumPy array, got {got}")
    if x.shape[: len(shape)] != shape:
        raise ShapeError(f"{name}: expected a shape starting with {shape}, got {x.shape}")
    if x.size and (x.min() < low or x.max() >= high):
        raise ParameterError(
            f"{name}: expected values in [{low}, {high}), got [{x.min()}, {x.max()}]"
        )


def check_graph_search(
    q: Any, k: Any, neighbours: Any, entry: Any, *, start: Any, top_k: Any, ef: Any = None
) -> tuple[int, int]:
    """Check the arguments of :func:`graph_search_batch`; returns ``(top_k, ef)``.

    ``q (B, H, N, D)`` and ``k (B, Hkv, M, D)`` must agree in batch and head dim with
    ``H % Hkv == 0`` (``ShapeError``) and be finite; ``neighbours (B, Hkv, M_idx, R)`` must
    hold ids in ``[-1, M_idx)`` and ``entry (B, Hkv)`` ids in ``[0, M_idx)``, with
    ``start + M_idx <= M``; ``top_k`` must lie in ``[1, M_idx]`` and ``ef`` (``None``:
    ``top_k``) be at least ``top_k`` (``ParameterError``).
    """
    _checks.array("q", q, rank=4, layout="(B, H, N, D)")
    _keys("k", k)
    _checks.same_dtype(q=q, k=k)
    _finite("q", q)
    B, H, _, D = q.shape
    Bk, Hkv, M, Dk = k.shape
    if Bk != B:
        raise ShapeError(f"k: expected batch B={B} as q, got {Bk}")
    if Dk != D:
        raise ShapeError(f"k: expected head dim D={D} as q, got {Dk} (k shape {tuple(k.shape)})")
    if H % Hkv:
        raise ShapeError(f"q, k: expected H % Hkv == 0, got H={H}, Hkv={Hkv}")
    if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or start < 0:
        raise ParameterError(f"start: expected an integer >= 0, got {start!r}")
    size = neighbours.shape[2] if getattr(neighbours, "ndim", 0) == 4 else 0
    if size < 1 or start + size > M:
        raise ShapeError(
            f"neighbours: expected graphs (B, Hkv, M_idx, R) over keys start={start} to "
            f"start + M_idx <= M={M}, got shape {getattr(neighbours, 'shape', None)}"
        )
    _integers("neighbours", neighbours, (B, Hkv, size), -1, size)
    _integers("entry", entry, (B, Hkv), 0, size)
    if entry.ndim != 2:
        raise ShapeError(f"entry: expected shape (B, Hkv)=({B}, {Hkv}), got {entry.shape}")
    top_k = _count("top_k", top_k, size, "indexed keys")
    ef = top_k if ef is None else _checks.positive_int("ef", ef)
    if ef < top_k:
        raise ParameterError(f"ef: expected ef >= top_k={top_k}, got {ef}")
    return top_k, ef


def graph_search_batch(
    q: Array,
    k: Array,
    neighbours: Array,
    entry: Array,
    *,
    start: int,
    top_k: int = 100,
    ef: int | None = None,
) -> tuple[Array, Array]:
    """:func:`graph_search` for every query of every head: the op the backends implement.

    Args:
        q: decoding queries ``(B, H, N, D)``; head ``h`` searches KV head ``h // (H / Hkv)``.
        k: the cache's keys ``(B, Hkv, M, D)``; the graphs cover ``k[:, :, start:start+M_idx]``.
        neighbours: out-neighbours ``(B, Hkv, M_idx, R)``, local ids, ``-1`` padded.
        entry: where each graph's search starts ``(B, Hkv)``.
        start: cache position of local id 0.
        top_k: keys retrieved per query (default 100, the paper's setup as we read it).
        ef: result-list size of the search (default ``top_k``).

    Returns:
        Cache positions of the retrieved keys ``(B, H, N, top_k)`` (best first, ``-1`` padded
        when a graph reaches fewer keys) and the keys scored per query ``(B, H, N)`` (int64).
    """
    top_k, ef = check_graph_search(q, k, neighbours, entry, start=start, top_k=top_k, ef=ef)
    B, H, N, _ = q.shape
    group = H // k.shape[1]
    stop = start + neighbours.shape[2]
    found = np.full((B, H, N, top_k), -1, dtype=np.int64)
    scanned = np.zeros((B, H, N), dtype=np.int64)
    for b in range(B):
        for h in range(H):
            g = h // group
            mid = k[b, g, start:stop]  # (M_idx, D)
            for n in range(N):
                ids, cost = graph_search(
                    q[b, h, n], mid, neighbours[b, g], int(entry[b, g]), top_k=top_k, ef=ef
                )
                found[b, h, n, : len(ids)] = ids + start
                scanned[b, h, n] = cost
    return found, scanned


def search(
    q: Array, k: Array, index: AttentionIndex, *, top_k: int = 100, ef: int | None = None
) -> tuple[Array, Array]:
    """Search ``index`` for every query of every head, on the selected backend.

    Args:
        q: decoding queries ``(B, H, N, D)``.
        k: the cache's keys ``(B, Hkv, M, D)``; the index covers ``k[:, :, start:stop]``.
        index: the graphs (:func:`build_index` or :func:`build_knn_index`).
        top_k: keys retrieved per query (default 100, the paper's setup as we read it).
        ef: result-list size of the search (default ``top_k``).

    Returns:
        As :func:`graph_search_batch`: positions ``(B, H, N, top_k)`` and keys scored ``(B, H, N)``.
    """
    if not isinstance(index, AttentionIndex):
        raise TypeError(f"index: expected an AttentionIndex, got {type(index).__name__}")
    import qkv  # the dispatched op: the current backend's kernel searches

    return qkv.graph_search_batch(
        q, k, index.neighbours, index.entry, start=index.start, top_k=top_k, ef=ef
    )


def static_positions(index: AttentionIndex, M: int) -> Array:
    """Cache positions attended exactly, outside the index: ``[0, start)`` and ``[stop, M)``."""
    return np.concatenate([np.arange(index.start), np.arange(index.stop, M)]).astype(np.int64)


def retrieval_attention(
    q: Array,
    k: Array,
    v: Array,
    index: AttentionIndex,
    *,
    top_k: int = 100,
    ef: int | None = None,
    scale: float | None = None,
    return_scanned: bool = False,
) -> Array | tuple[Array, Array]:
    """Attention over the static tokens and the keys the graph search retrieves, merged exactly.

    Args:
        q: decoding queries ``(B, H, N, D)``.
        k: keys ``(B, Hkv, M, D)``: the indexed prefill, then any tokens decoded since.
        v: values ``(B, Hkv, M, Dv)``.
        index: the graphs over ``k[:, :, start:stop]`` (:func:`build_index`).
        top_k: keys retrieved per query and head (default 100, the paper's setup as we read it).
        ef: result-list size of the search (default ``top_k``).
        scale: multiplies the scores; default ``1/sqrt(D)``.
        return_scanned: also return the keys scored by each search ``(B, H, N)``.

    Returns:
        ``O (B, H, N, Dv)`` in the dtype of ``q`` (and the scanned counts if asked).
    """
    _checks.attention(q, k, v, scale=scale)
    _finite("v", v)
    retrieved, scanned = search(q, k, index, top_k=top_k, ef=ef)  # (B, H, N, top_k)
    B, H = q.shape[:2]
    fixed = static_positions(index, k.shape[2])  # (S,)
    fixed = np.broadcast_to(fixed, (B, H, len(fixed)))  # (B, H, S)
    o_s, l_s = sparse_attention(q, k, v, fixed, scale=scale, return_lse=True)
    o_r, l_r = sparse_attention(q, k, v, retrieved, scale=scale, return_lse=True)
    out, _ = merge_partials([o_s, o_r], [l_s, l_r])  # (B, H, N, Dv)
    return (out, scanned) if return_scanned else out


def exact_top_k(q: Array, k: Array, index: AttentionIndex, top_k: int) -> Array:
    """The true top-``top_k`` indexed positions by ``q . k`` ``(B, H, N, top_k)``, best first."""
    check_graph_search(q, k, index.neighbours, index.entry, start=index.start, top_k=top_k, ef=None)
    B, H, N, D = q.shape
    Hkv = k.shape[1]
    kh = np.repeat(k[:, :, index.start : index.stop], H // Hkv, axis=1)  # (B, H, M_idx, D)
    s = np.einsum("bhnd,bhmd->bhnm", q, kh).reshape(B * H * N, -1)  # (B*H*N, M_idx)
    return _top(s, top_k).reshape(B, H, N, top_k) + index.start  # (B, H, N, top_k)


def recall(found: Array, exact: Array) -> float:
    """Mean ``|found ∩ exact| / |exact|`` over queries; both ``(..., k)`` position arrays."""
    hits = (found[..., :, None] == exact[..., None, :]).any(axis=-2).sum(axis=-1)  # (...)
    return float(np.mean(hits / exact.shape[-1]))
