r"""ANNCUR: nearest neighbours under a cross-encoder, through a CUR approximation of its scores.

Paper: *Efficient Nearest Neighbor Search for Cross-Encoder Models using Matrix Factorization*
(Yadav, Monath, Angell, Zaheer, McCallum; EMNLP 2022; arXiv 2210.12579). Official code:
https://github.com/iesl/anncur.

A cross-encoder $\operatorname{CE}(q, i)$ reads the query and the item together, so it has no
item vectors to index: every score costs a forward pass. ANNCUR treats the score matrix of all
queries and items as approximately low rank and approximates it by CUR from a few rows and
columns. Offline, with $k_q$ **anchor queries** and $k_i$ **anchor items** $\mathcal I$,

$$
R = \operatorname{CE}(\text{anchor queries}, \text{all items}) \in \mathbb R^{k_q \times M},
\qquad U = \big(R_{:, \mathcal I}\big)^{+} \in \mathbb R^{k_i \times k_q},
$$

and at test time the query is scored exactly against the anchor items only,

$$
c = \operatorname{CE}(q, \mathcal I) \in \mathbb R^{k_i},\qquad \hat s = c\, U R \in \mathbb R^{M},
$$

the top $k_r$ items by $\hat s$ are re-scored with the exact cross-encoder, and the top $k$ of
those are returned: $k_i + k_r$ exact calls instead of $M$. If the full score matrix has rank
at most $\operatorname{rank}(R_{:,\mathcal I})$ (rank $\le$ the anchors, intersection of full
rank), then $\hat s$ is exact for every query (:func:`approximate_scores`).

Where qkv chooses: :class:`CURIndex` stores $UR$ (``(k_i, M)``) so that a query costs one
product; ``rank`` truncates the pseudo-inverse to the top singular values (the official code
uses the plain pseudo-inverse, ``rank=None`` here); singular values below ``rtol`` times the
largest are dropped, with ``rtol`` defaulting to $\max(k_q, k_i)\,\epsilon$ as
``torch.linalg.pinv``. By default (``reuse_anchors=True``) the anchor items, whose exact scores
the query has already paid for, join the re-ranked pool and are never scored twice;
``reuse_anchors=False`` re-ranks only the top $k_r$ by $\hat s$, as the paper describes it.
Calls are counted as distinct (query, item) exact scores.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from qkv.errors import ParameterError, ShapeError
from qkv.reference.retrieval import _score_checks as checks

Array = np.ndarray
#: Exact scores of one query against the given items: ``exact(items (n,)) -> (n,)``.
ExactScorer = Callable[[Array], Array]


@dataclass(frozen=True, eq=False)
class CURIndex:
    r"""The offline part of ANNCUR.

    Attributes:
        anchor_items: ``(k_i,)`` the anchor items $\mathcal I$ (columns of the score matrix).
        latent: ``(k_i, M)`` the product $U R$; a query's approximate scores are $c\,UR$.
        rank: the number of singular values kept in $U$.
    """

    anchor_items: Array
    latent: Array
    rank: int

    @property
    def n_items(self) -> int:
        """``M``, the number of indexed items."""
        return self.latent.shape[1]


class Retrieved(NamedTuple):
    """Items found for one query, best first, with their exact scores and the cost paid."""

    items: Array  # (k,) int64
    scores: Array  # (k,) exact scores
    calls: int  # distinct exact cross-encoder scores computed for this query


def cur_index(
    anchor_scores: Array,
    anchor_items: Any,
    *,
    rank: int | None = None,
    rtol: float | None = None,
) -> CURIndex:
    r"""Build the index $U R$ from the anchor queries' exact scores against every item.

    Args:
        anchor_scores: $R$, ``(k_q, M)`` exact scores of the anchor queries against all items.
        anchor_items: ``(k_i,)`` distinct item indices in ``[0, M)``, the anchor items.
        rank: singular values of $R_{:, \mathcal I}$ kept in the pseudo-inverse (``None``:
            all above ``rtol``); at most $\min(k_q, k_i)$.
        rtol: relative cutoff below which singular values are treated as 0 (default
            $\max(k_q, k_i)\,\epsilon$ of the dtype).

    Returns:
        The :class:`CURIndex`, in the dtype of ``anchor_scores``.
    """
    R = checks.matrix("anchor_scores", anchor_scores, "(k_q, M)", empty="an empty document list")
    k_q, M = R.shape
    items = checks.indices("anchor_items", anchor_items, M)
    k_i = items.size
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, int | np.integer) or rank < 1:
            raise ParameterError(f"rank: expected a positive integer or None, got {rank!r}")
        if rank > min(k_q, k_i):
            raise ParameterError(
                f"rank: expected at most min(k_q, k_i) = {min(k_q, k_i)} (the anchors: "
                f"{k_q} queries, {k_i} items), got {rank}; add anchors or lower the rank"
            )
    if rtol is None:
        rtol = max(k_q, k_i) * float(np.finfo(R.dtype).eps)
    elif not np.isfinite(rtol) or rtol < 0:
        raise ParameterError(f"rtol: expected a finite number >= 0, got {rtol!r}")
    W = R[:, items]  # (k_q, k_i), the intersection block
    left, sigma, right_t = np.linalg.svd(W, full_matrices=False)  # (k_q, r0), (r0,), (r0, k_i)
    keep = sigma > rtol * sigma[0] if sigma[0] > 0 else np.zeros_like(sigma, dtype=bool)
    if rank is not None:
        keep[rank:] = False
    r = int(keep.sum())
    U = (right_t[keep].T / sigma[keep]) @ left[:, keep].T  # (k_i, k_q), the pseudo-inverse
    return CURIndex(anchor_items=items, latent=U @ R, rank=r)  # latent (k_i, M)


def approximate_scores(anchor_item_scores: Array, index: CURIndex) -> Array:
    r"""$\hat s = c\, U R$ for a batch of queries.

    Args:
        anchor_item_scores: $c$, ``(Q, k_i)`` exact scores of each query against the anchor
            items (in the order of ``index.anchor_items``).
        index: the :class:`CURIndex`.

    Returns:
        ``(Q, M)`` approximate scores against every item.
    """
    c = checks.matrix("anchor_item_scores", anchor_item_scores, "(Q, k_i)")
    if c.shape[1] != index.anchor_items.size:
        raise ShapeError(
            f"anchor_item_scores: expected k_i={index.anchor_items.size} columns (one per "
            f"anchor item), got shape {c.shape}"
        )
    return c @ index.latent.astype(c.dtype)  # (Q, M)


def top_indices(scores: Array, k: int) -> Array:
    """Indices of the ``k`` largest of ``scores (n,)``, best first; ties go to the lower index."""
    return np.argsort(-scores, kind="stable")[:k]


def _exact(exact: ExactScorer, items: Array) -> Array:
    """``exact(items)`` checked to be a finite ``(len(items),)`` array."""
    out = np.asarray(exact(items))
    if out.shape != items.shape:
        raise ShapeError(f"exact: expected scores of shape {items.shape}, got {out.shape}")
    if not np.isfinite(out).all():
        raise ParameterError("exact: expected finite scores, got NaN or infinite values")
    return out


def rerank(
    candidates: Any,
    exact: ExactScorer,
    *,
    k: int,
    known: tuple[Array, Array] | None = None,
) -> Retrieved:
    """Score ``candidates`` exactly and return the top ``k`` (ties: lower item index first).

    Args:
        candidates: ``(n,)`` distinct item indices.
        exact: the exact scorer of this query.
        k: how many to return, at most the pool size.
        known: ``(items, scores)`` already scored exactly; they join the pool and are not
            scored again.

    Returns:
        :class:`Retrieved`, ``calls`` counting only the new exact scores.
    """
    candidates = np.asarray(candidates, dtype=np.int64)
    known_items = known[0] if known is not None else candidates[:0]
    new = np.setdiff1d(candidates, known_items)  # sorted: ties resolve to the lower index
    new_scores = _exact(exact, new)  # (n_new,)
    known_scores = known[1] if known is not None else new_scores[:0]
    pool = np.concatenate([known_items, new])  # (n_pool,)
    scores = np.concatenate([known_scores, new_scores])  # (n_pool,)
    k = checks.top_count("k", k, pool.size, "the re-ranked pool")
    order = np.lexsort((pool, -scores))[:k]  # by score descending, then item ascending
    return Retrieved(items=pool[order], scores=scores[order], calls=int(new.size))


def retrieve_then_rerank(
    first_stage: Array, exact: ExactScorer, *, k: int = 10, k_retrieve: int = 100
) -> Retrieved:
    """The usual two-stage search: top ``k_retrieve`` by a cheap score, exact re-ranking.

    Args:
        first_stage: ``(M,)`` cheap scores of every item (e.g. bi-encoder cosine).
        exact: the exact scorer of this query.
        k: items returned, ``k <= k_retrieve``.
        k_retrieve: items re-scored exactly, at most ``M``.

    Returns:
        :class:`Retrieved` with ``calls = k_retrieve``.
    """
    first_stage = np.asarray(first_stage)
    if first_stage.ndim != 1 or first_stage.size == 0:
        raise ShapeError(
            f"first_stage: expected (M,) scores of a non-empty item list, got {first_stage.shape}"
        )
    k_retrieve = checks.top_count("k_retrieve", k_retrieve, first_stage.size, "the items")
    checks.top_count("k", k, k_retrieve, "k_retrieve")
    return rerank(top_indices(first_stage, k_retrieve), exact, k=k)


def anncur(
    exact: ExactScorer,
    index: CURIndex,
    *,
    k: int = 10,
    k_retrieve: int = 100,
    reuse_anchors: bool = True,
) -> Retrieved:
    r"""Top-``k`` items of one query under the cross-encoder, by ANNCUR (module docstring).

    Args:
        exact: the exact cross-encoder of this query, ``exact(items (n,)) -> (n,)``.
        index: the :class:`CURIndex` built from the anchor queries.
        k: items returned, ``k <= k_retrieve``.
        k_retrieve: $k_r$, items re-scored exactly after the approximate search, at most ``M``.
        reuse_anchors: let the anchor items (already scored exactly) join the re-ranked pool.

    Returns:
        :class:`Retrieved`; ``calls`` $= k_i$ plus the re-scored items that are not anchors.
    """
    M = index.n_items
    k_retrieve = checks.top_count("k_retrieve", k_retrieve, M, "the indexed items")
    checks.top_count("k", k, k_retrieve, "k_retrieve")
    anchors = index.anchor_items
    c = _exact(exact, anchors)  # (k_i,)
    s_hat = approximate_scores(c[None, :], index)[0]  # (M,)
    candidates = top_indices(s_hat, k_retrieve)  # (k_r,)
    if reuse_anchors:
        found = rerank(candidates, exact, k=k, known=(anchors, c))
    else:
        in_pool = np.isin(anchors, candidates)
        found = rerank(candidates, exact, k=k, known=(anchors[in_pool], c[in_pool]))
    return found._replace(calls=found.calls + anchors.size)


def recall_at_k(found: Array, truth: Array) -> float:
    """``|found ∩ truth| / |truth|`` for two 1-D index arrays (``truth`` non-empty)."""
    truth = np.asarray(truth)
    if truth.size == 0:
        raise ShapeError("truth: expected a non-empty index array")
    return float(np.isin(truth, found).sum() / truth.size)


__all__ = [
    "CURIndex",
    "ExactScorer",
    "Retrieved",
    "anncur",
    "approximate_scores",
    "cur_index",
    "recall_at_k",
    "rerank",
    "retrieve_then_rerank",
    "top_indices",
]
