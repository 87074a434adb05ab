r"""Numba kernel for RetrievalAttention's graph search (arXiv 2409.10516).

Each (batch, head, query) runs the whole greedy best-first search of
:func:`qkv.reference.retrieval.attention_index.graph_search` in compiled code: a max-heap of
candidates, a min-heap of the best ``ef`` results, a visited mask, and one dot product per
newly reached key (accumulated in float64). Queries run in parallel. Heap entries compare by
(score, id), as the reference's ``heapq`` tuples do, so both return the same keys in the same
order; the count of keys scored is the same by construction.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from qkv import _outputs


@njit(cache=True, inline="always")
def _less(sa, ia, sb, ib):
    return sa < sb or (sa == sb and ia < ib)


@njit(cache=True)
def _push(scores, ids, n, s, i):
    """Insert ``(s, i)`` into the min-heap of ``n`` entries; returns the new size."""
    scores[n] = s
    ids[n] = i
    j = n
    while j > 0:
        p = (j - 1) // 2
        if not _less(scores[j], ids[j], scores[p], ids[p]):
            break
        scores[j], scores[p] = scores[p], scores[j]
        ids[j], ids[p] = ids[p], ids[j]
        j = p
    return n + 1


@njit(cache=True)
def _pop(scores, ids, n):
    """Drop the smallest entry of the min-heap of ``n`` entries; returns the new size."""
    n -= 1
    scores[0] = scores[n]
    ids[0] = ids[n]
    j = 0
    while True:
        low = j
        for c in (2 * j + 1, 2 * j + 2):
            if c < n and _less(scores[c], ids[c], scores[low], ids[low]):
                low = c
        if low == j:
            return n
        scores[j], scores[low] = scores[low], scores[j]
        ids[j], ids[low] = ids[low], ids[j]
        j = low


@njit(cache=True)
def _dot(q, keys, j):
    acc = 0.0
    for t in range(q.shape[0]):
        acc += np.float64(q[t]) * np.float64(keys[j, t])
    return acc


@njit(cache=True)
def _one(q, keys, nb, entry, top_k, ef, found):
    """One search; writes local ids (best first, ``-1`` padded) and returns the keys scored."""
    M = keys.shape[0]
    visited = np.zeros(M, np.bool_)
    cand_s = np.empty(M, np.float64)  # max-queue as a min-heap of negated scores
    cand_i = np.empty(M, np.int64)
    res_s = np.empty(ef + 1, np.float64)
    res_i = np.empty(ef + 1, np.int64)
    visited[entry] = True
    s0 = _dot(q, keys, entry)
    n_cand = _push(cand_s, cand_i, 0, -s0, entry)
    n_res = _push(res_s, res_i, 0, s0, entry)
    scanned = 1
    while n_cand > 0:
        best = -cand_s[0]
        c = cand_i[0]
        n_cand = _pop(cand_s, cand_i, n_cand)
        if n_res >= ef and best < res_s[0]:
            break
        for r in range(nb.shape[1]):
            u = nb[c, r]
            if u < 0 or visited[u]:
                continue
            visited[u] = True
            scanned += 1
            s = _dot(q, keys, u)
            if n_res < ef or s > res_s[0]:
                n_cand = _push(cand_s, cand_i, n_cand, -s, u)
                n_res = _push(res_s, res_i, n_res, s, u)
                if n_res > ef:
                    n_res = _pop(res_s, res_i, n_res)
    # best first, ties to the lower id (the reference's sort): insertion sort of <= ef entries
    for a in range(1, n_res):
        s, i = res_s[a], res_i[a]
        j = a - 1
        while j >= 0 and (res_s[j] < s or (res_s[j] == s and res_i[j] > i)):
            res_s[j + 1] = res_s[j]
            res_i[j + 1] = res_i[j]
            j -= 1
        res_s[j + 1] = s
        res_i[j + 1] = i
    for t in range(top_k):
        found[t] = res_i[t] if t < n_res else -1
    return scanned


@njit(parallel=True, cache=True)
def _search_all(q, k, nb, entry, start, top_k, ef, found, scanned):
    B, H, N, _ = q.shape
    group = H // k.shape[1]
    size = nb.shape[2]
    for t in prange(B * H * N):
        b = t // (H * N)
        h = (t // N) % H
        n = t % N
        g = h // group
        local = found[b, h, n]
        scanned[b, h, n] = _one(
            q[b, h, n], k[b, g, start : start + size], nb[b, g], entry[b, g], top_k, ef, local
        )
        for j in range(top_k):
            if local[j] >= 0:
                local[j] += start


def graph_search_batch(
    q: np.ndarray,
    k: np.ndarray,
    neighbours: np.ndarray,
    entry: np.ndarray,
    *,
    start: int,
    top_k: int,
    ef: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Checked arguments in; positions ``(B, H, N, top_k)`` and keys scored ``(B, H, N)`` out."""
    B, H, N, _ = q.shape
    found = _outputs.empty((B, H, N, top_k), like=q, dtype=np.int64)
    scanned = _outputs.empty((B, H, N), like=q, dtype=np.int64)
    _search_all(
        q,
        k,
        np.ascontiguousarray(neighbours, dtype=np.int64),
        np.ascontiguousarray(entry, dtype=np.int64),
        int(start),
        int(top_k),
        int(ef),
        found,
        scanned,
    )
    return found, scanned
