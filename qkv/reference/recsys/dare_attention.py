r"""DARE: decoupled attention and representation embeddings (Feng et al., "Long-Sequence
Recommendation Models Need Decoupled Embeddings", arXiv 2410.02604; official code:
`thuml/DARE <https://github.com/thuml/DARE>`_, ``model/attention_pytorch.py``).

A long-sequence recommender scores a target item $t$ against a user's history of $L$ behaviours
$b_1, \dots, b_L$ in two stages: a **search** keeps the $K$ behaviours most relevant to the
target, then **target attention** aggregates them. With a single embedding table the same
vectors must serve as attention keys and as aggregated values, and the paper shows the two
roles interfere. DARE keeps two tables, $E^{\mathrm{Att}}$ and $E^{\mathrm{Repr}}$:

$$
q = E^{\mathrm{Att}}_t, \quad k_j = E^{\mathrm{Att}}_{b_j}, \quad v_j = E^{\mathrm{Repr}}_{b_j},
\qquad s_j = \frac{\langle q, k_j\rangle}{\sqrt{d_{\mathrm{att}}}},
$$

$$
\mathcal{S} = \operatorname{top-}K_j\, s_j, \qquad
u = \sum_{j \in \mathcal{S}} \frac{e^{s_j}}{\sum_{l \in \mathcal{S}} e^{s_l}}\, v_j .
$$

Attention weights then depend on $E^{\mathrm{Att}}$ only and the aggregated vectors on
$E^{\mathrm{Repr}}$ only (the two independence properties the tests check). The official code
also feeds $E^{\mathrm{Repr}}_t \odot u$ to its MLP (:func:`target_interaction`), searches the
top 20 of 200 behaviours, and, in its ``concat`` time mode, adds a time-embedding score
$\langle q_t, k_{t,j}\rangle / \sqrt{d_t}$; time embeddings are left to the caller here (add
them to ``scores`` through ``bias``). Ties in the search go to the earlier behaviour.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qkv import _checks
from qkv.errors import ParameterError, ShapeError
from qkv.reference import core

Array = np.ndarray
#: The official script's search size (top 20 of a 200-behaviour sequence).
DEFAULT_TOP_K = 20


@dataclass(frozen=True)
class DareTables:
    """The two embedding tables of DARE.

    Attributes:
        attention: $E^{\\mathrm{Att}}$ ``(V, d_att)``: target query and behaviour keys.
        representation: $E^{\\mathrm{Repr}}$ ``(V, d_repr)``: behaviour values (and the target's
            representation for :func:`target_interaction`).
    """

    attention: Array
    representation: Array


def _check(target: Array, behaviours: Array, tables: DareTables, valid: Array | None) -> None:
    target, behaviours = np.asarray(target), np.asarray(behaviours)
    if target.ndim != 1 or target.dtype.kind not in "iu":
        raise ShapeError(
            f"target: expected integer item ids (B,), got {target.dtype} {target.shape}"
        )
    if behaviours.ndim != 2 or behaviours.dtype.kind not in "iu":
        raise ShapeError(
            f"behaviours: expected integer item ids (B, L), got {behaviours.dtype} {behaviours.shape}"
        )
    if behaviours.shape[0] != target.shape[0]:
        raise ShapeError(f"behaviours: expected B = {target.shape[0]} rows, got {behaviours.shape}")
    _checks.array("tables.attention", tables.attention, rank=2, layout="(V, d_att)")
    _checks.array("tables.representation", tables.representation, rank=2, layout="(V, d_repr)")
    V = tables.attention.shape[0]
    if tables.representation.shape[0] != V:
        raise ShapeError(
            f"tables.representation: expected V = {V} items as tables.attention, "
            f"got {tables.representation.shape[0]}"
        )
    _checks.same_dtype(attention=tables.attention, representation=tables.representation)
    for name, ids in (("target", target), ("behaviours", behaviours)):
        if ids.min() < 0 or ids.max() >= V:
            raise ParameterError(f"{name}: expected item ids in [0, {V}), got a {ids.max()}")
    if valid is not None:
        valid = np.asarray(valid)
        if valid.dtype != np.bool_ or valid.shape != behaviours.shape:
            raise ShapeError(
                f"valid: expected bool {behaviours.shape} (True = a real behaviour), "
                f"got {valid.dtype} {valid.shape}"
            )


def decoupled_embeddings(
    target: Array, behaviours: Array, tables: DareTables
) -> tuple[Array, Array, Array]:
    r"""Query, keys and values of DARE: $q = E^{\mathrm{Att}}_t$, $k_j = E^{\mathrm{Att}}_{b_j}$,
    $v_j = E^{\mathrm{Repr}}_{b_j}$.

    Args:
        target: target item ids ``(B,)``.
        behaviours: behaviour item ids ``(B, L)``.
        tables: the two embedding tables.

    Returns:
        ``q (B, d_att)``, ``k (B, L, d_att)``, ``v (B, L, d_repr)``.
    """
    _check(target, behaviours, tables, None)
    return (
        tables.attention[target],
        tables.attention[behaviours],
        tables.representation[behaviours],
    )


def search(scores: Array, top_k: int, valid: Array | None = None) -> Array:
    """The top-``top_k`` behaviours of each row of ``scores (B, L)`` as a bool mask ``(B, L)``.

    Only ``valid`` behaviours are eligible; when fewer than ``top_k`` are, all of them are kept.
    Ties go to the earlier behaviour (a stable sort on the negated score).
    """
    top_k = _checks.positive_int("top_k", top_k)
    eligible = np.ones(scores.shape, bool) if valid is None else np.asarray(valid)
    ranked = np.where(eligible, -scores, np.inf)  # (B, L): ineligible ones last
    order = np.argsort(ranked, axis=-1, kind="stable")[:, :top_k]  # (B, K)
    keep = np.zeros(scores.shape, bool)
    np.put_along_axis(keep, order, True, axis=-1)
    return keep & eligible


def dare(
    target: Array,
    behaviours: Array,
    tables: DareTables,
    *,
    top_k: int = DEFAULT_TOP_K,
    valid: Array | None = None,
    bias: Array | None = None,
    return_weights: bool = False,
) -> Array | tuple[Array, Array]:
    r"""DARE's user interest: top-$K$ search on attention embeddings, then target attention over
    representation embeddings, $u = \sum_{j \in \mathcal S} \operatorname{softmax}(s)_j\, v_j$.

    Args:
        target: target item ids ``(B,)``.
        behaviours: behaviour item ids ``(B, L)``.
        tables: the attention and representation tables.
        top_k: $K$, behaviours kept by the search (default 20, the official script's).
        valid: bool ``(B, L)``, False for padding; a row without a valid behaviour gets zeros.
        bias: ``(B, L)`` added to the scores before search and softmax (e.g. the official
            ``concat`` mode's time-embedding score).
        return_weights: also return the weights ``(B, L)`` (0 outside the search's selection).

    Returns:
        ``u (B, d_repr)`` in the tables' dtype, or ``(u, weights)``.
    """
    _check(target, behaviours, tables, valid)
    q, k, v = decoupled_embeddings(target, behaviours, tables)
    B, L, d_att = k.shape
    work = core._work_dtype(q.dtype)
    scores = (k.astype(work) @ q.astype(work)[:, :, None])[:, :, 0] / np.sqrt(d_att)  # (B, L)
    if bias is not None:
        _checks.array("bias", bias, rank=2, layout="(B, L)")
        if bias.shape != (B, L):
            raise ShapeError(f"bias: expected (B, L) = {(B, L)}, got {bias.shape}")
        scores = scores + bias.astype(work, copy=False)
    keep = search(scores, top_k, valid)  # (B, L)
    u, weights = core.sdpa(
        q[:, None, None, :],  # (B, 1, 1, d_att)
        k[:, None],  # (B, 1, L, d_att)
        v[:, None],  # (B, 1, L, d_repr)
        mask=np.where(keep, 0.0, -np.inf).astype(work)[:, None, None, :]
        + (0.0 if bias is None else bias.astype(work)[:, None, None, :]),  # (B, 1, 1, L)
        scale=1.0 / np.sqrt(d_att),
        return_weights=True,
    )
    u = u[:, 0, 0]  # (B, d_repr)
    if return_weights:
        return u, weights[:, 0, 0]  # (B, L)
    return u


def target_interaction(target: Array, interest: Array, tables: DareTables) -> Array:
    r"""The official code's extra feature $E^{\mathrm{Repr}}_t \odot u$, ``(B, d_repr)``.

    Args:
        target: target item ids ``(B,)``.
        interest: $u$ from :func:`dare`, ``(B, d_repr)``.
        tables: the embedding tables.
    """
    rep = tables.representation[np.asarray(target)]  # (B, d_repr)
    if np.shape(interest) != rep.shape:
        raise ShapeError(f"interest: expected (B, d_repr) = {rep.shape}, got {np.shape(interest)}")
    return rep * interest
