r"""Grouped-query attention and its key-driven variants (Khan et al., "Beyond Uniform Query
Distribution: Key-Driven Grouped Query Attention", arXiv 2408.08454; code of the paper's variants
as found in the fork https://github.com/yjzhang0505/key-driven-gqa, ``modules/attention``).

Multi-head attention (MHA) gives each of the $H$ query heads its own key and value head.
Grouped-query attention (GQA) splits the query heads into $G$ contiguous groups of $r = H / G$
heads that share one key/value head; $G = H$ is MHA and $G = 1$ is multi-query attention (MQA).
The KV cache shrinks by $H / G$. A trained MHA checkpoint becomes a GQA one by **mean-pooling**
the key and value projections of each group of heads (and their biases):

$$
W^K_g = \frac1r \sum_{h \in \mathcal{G}_g} W^K_h, \qquad
W^V_g = \frac1r \sum_{h \in \mathcal{G}_g} W^V_h, \qquad
\mathcal{G}_g = \{gr, \dots, gr + r - 1\},
$$

then training a little more ("uptraining"). Since projection is linear, pooling the weights is
the same as pooling the projected heads, $X W^K_g + b^K_g = \frac1r\sum_h (X W^K_h + b^K_h)$.

The paper makes the allocation of query heads to KV heads depend on the keys:

* **KDGQA** (:func:`kdgqa`): on every forward pass, group $g$ receives a number of query heads
  proportional to the norm $\lVert K_g \rVert_F$ of its key head,
  $a_g = \operatorname{round}(H\, n_g / \sum_{g'} n_{g'})$, repaired so that $\sum_g a_g = H$;
  a group may receive no query head. The query heads are still taken in order: the first $a_0$
  read KV head 0, the next $a_1$ read KV head 1, and so on.
* **DGQA** (:func:`dgqa`): the same allocation, from key norms tracked over training (an
  exponential moving average, or the change of the norms over a window of steps), kept in an
  explicit :class:`DGQAState`.
* **PGQA** (:func:`pgqa`): uniform GQA whose head outputs get noise subtracted, group by group.

Every forward here runs its softmax attention through the dispatched :func:`qkv.sdpa`, so the
backend chosen by ``QKV_BACKEND``, :func:`qkv.use_backend` or ``backend=`` computes it; the
allocation, pooling and noise are NumPy. Arrays of any supported kind are accepted and the
result has the type of ``q`` (torch tensors are detached: no gradient flows through these forms).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np

from qkv import _arrays, _checks
from qkv.errors import ParameterError, ShapeError
from qkv.reference import core

Array = np.ndarray
Normalisation = Literal["ratio", "minmax"]

#: Under ``minmax`` normalisation, scores whose spread is at most this fraction of their maximum
#: count as equal (uniform GQA): rounding noise in equal norms must not decide the allocation.
EQUAL_SCORES = 1e-12


# --------------------------------------------------------------------------- shared helpers


def _host(x: Any) -> Any:
    return None if x is None else _arrays.to_numpy(x)


def _attend(q: Array, k: Array, v: Array, backend: Any, **kwargs: Any) -> Array:
    """Softmax attention through the dispatched ``qkv.sdpa`` (NumPy in, NumPy out)."""
    import qkv  # here, not at the top: qkv's __init__ imports this module

    return qkv.sdpa(q, k, v, backend=backend, **kwargs)


def _divisor(name: str, value: Any, total: int, what: str) -> int:
    """``value`` is a positive int that divides ``total`` (``what`` names the total)."""
    value = _checks.positive_int(name, value)
    if total % value:
        raise ShapeError(f"{name}: expected a divisor of {what}={total}, got {value}")
    return value


def pool_heads(x: Array, groups: int, *, axis: int = 1) -> Array:
    r"""Mean of contiguous blocks of heads: $\bar x_g = \frac1r \sum_{h=gr}^{gr+r-1} x_h$.

    The GQA conversion of an MHA checkpoint. It applies to projected heads (``(B, H, M, D)``,
    ``axis=1``), to per-head projection weights (``(H, C, D)``, ``axis=0``) and to biases
    (``(H, D)``, ``axis=0``) alike.

    Args:
        x: an array with ``H`` heads along ``axis``.
        groups: $G$, the number of groups; must divide ``H``.
        axis: the head axis.

    Returns:
        ``x`` with ``G`` heads along ``axis``, in the arithmetic dtype (float64 stays float64).
    """
    axis = axis % x.ndim
    H = x.shape[axis]
    G = _divisor("groups", groups, H, "H")
    work = core._work_dtype(x.dtype)
    blocks = x.astype(work, copy=False).reshape(
        *x.shape[:axis], G, H // G, *x.shape[axis + 1 :]
    )  # (..., G, r, ...)
    return blocks.mean(axis=axis + 1)  # (..., G, ...)


def repeat_heads(x: Array, heads: int) -> Array:
    """``(B, Hkv, M, D)`` -> ``(B, heads, M, D)``: query head ``h`` gets KV head ``h // r``."""
    return np.repeat(x, heads // x.shape[1], axis=1)  # (B, heads, M, D)


# --------------------------------------------------------------------------- projections


@dataclass(frozen=True, eq=False)
class AttentionWeights:
    r"""Per-head projections of an attention layer: $Q_h = X W^Q_h + b^Q_h$, and so on.

    ``w_q (H, C, D)``, ``w_k (Hkv, C, D)``, ``w_v (Hkv, C, Dv)`` and optional biases
    ``b_q (H, D)``, ``b_k (Hkv, D)``, ``b_v (Hkv, Dv)``. A ``torch.nn.Linear(C, H * D)`` weight
    ``W`` (shape ``(H * D, C)``) is ``W.reshape(H, D, C).transpose(0, 2, 1)`` here.
    """

    w_q: Array
    w_k: Array
    w_v: Array
    b_q: Array | None = None
    b_k: Array | None = None
    b_v: Array | None = None

    def __post_init__(self) -> None:
        _checks.array("w_q", self.w_q, rank=3, layout="(H, C, D)")
        _checks.array("w_k", self.w_k, rank=3, layout="(Hkv, C, D)")
        _checks.array("w_v", self.w_v, rank=3, layout="(Hkv, C, Dv)")
        H, C, D = self.w_q.shape
        Hkv, Dv = self.w_k.shape[0], self.w_v.shape[2]
        if self.w_k.shape[1:] != (C, D):
            raise ShapeError(f"w_k: expected (Hkv, C, D) with C={C}, D={D}, got {self.w_k.shape}")
        if self.w_v.shape[:2] != (Hkv, C):
            raise ShapeError(
                f"w_v: expected (Hkv, C, Dv) with Hkv={Hkv}, C={C}, got {self.w_v.shape}"
            )
        _divisor("w_k", Hkv, H, "H (query heads of w_q); KV heads")
        for name, bias, shape in (
            ("b_q", self.b_q, (H, D)),
            ("b_k", self.b_k, (Hkv, D)),
            ("b_v", self.b_v, (Hkv, Dv)),
        ):
            if bias is not None and tuple(np.shape(bias)) != shape:
                raise ShapeError(f"{name}: expected shape {shape}, got {tuple(np.shape(bias))}")


def project(x: Array, weights: AttentionWeights) -> tuple[Array, Array, Array]:
    """Queries, keys and values of tokens ``x (B, N, C)``.

    Returns:
        ``q (B, H, N, D)``, ``k (B, Hkv, N, D)``, ``v (B, Hkv, N, Dv)``.
    """
    _checks.array("x", x, rank=3, layout="(B, N, C)")
    if x.shape[2] != weights.w_q.shape[1]:
        raise ShapeError(f"x: expected C={weights.w_q.shape[1]} features, got {x.shape[2]}")

    def heads(w: Array, b: Array | None) -> Array:
        y = np.einsum("bnc,hcd->bhnd", x, w)  # (B, heads, N, D)
        return y if b is None else y + b[None, :, None, :]  # bias (1, heads, 1, D)

    return (
        heads(weights.w_q, weights.b_q),
        heads(weights.w_k, weights.b_k),
        heads(weights.w_v, weights.b_v),
    )


def uptrain(weights: AttentionWeights, groups: int) -> AttentionWeights:
    r"""Convert MHA (or GQA) weights to GQA with ``groups`` KV heads by mean pooling.

    $W^K_g$, $W^V_g$ (and $b^K_g$, $b^V_g$) are the means over contiguous groups of
    $r = H_{kv} / G$ heads (:func:`pool_heads`); the query projection is kept. The result is the
    starting point of the paper's uptraining (the training itself is out of scope here).

    Args:
        weights: the source projections, ``Hkv`` KV heads (``Hkv = H`` for an MHA checkpoint).
        groups: $G$; must divide ``Hkv``.

    Returns:
        :class:`AttentionWeights` with ``groups`` KV heads.
    """
    _divisor("groups", groups, weights.w_k.shape[0], "Hkv")

    def pooled(x: Array | None) -> Array | None:
        return None if x is None else pool_heads(x, groups, axis=0)

    return replace(
        weights,
        w_k=pooled(weights.w_k),
        w_v=pooled(weights.w_v),
        b_k=pooled(weights.b_k),
        b_v=pooled(weights.b_v),
    )


# --------------------------------------------------------------------------- GQA


def _attention_inputs(q: Any, k: Any, v: Any, mask: Any, causal: bool, scale: Any) -> tuple:
    """Host copies of the inputs, checked as an ``sdpa`` call (heads may be any divisor)."""
    qn, kn, vn, mn = _host(q), _host(k), _host(v), _host(mask)
    dims = _checks.attention(qn, kn, vn, mask=mn, causal=causal, scale=scale)
    return dims, qn, kn, vn, mn


def gqa(
    q: Any,
    k: Any,
    v: Any,
    *,
    groups: int | None = None,
    mask: Any = None,
    causal: bool = False,
    scale: float | None = None,
    backend: Any = None,
) -> Any:
    r"""Grouped-query attention; MHA for $G = H$, MQA for $G = 1$.

    $$
    O_h = \operatorname{softmax}\!\big(s\, Q_h K_{g(h)}^\top + B\big)\, V_{g(h)}, \qquad
    g(h) = \lfloor h / r \rfloor,\ r = H / G .
    $$

    Args:
        q: queries ``(B, H, N, D)``.
        k: keys ``(B, Hkv, M, D)``: the $G$ KV heads themselves, or (with ``groups``) the
            ``Hkv`` heads of a model to pool.
        v: values ``(B, Hkv, M, Dv)``.
        groups: ``None`` uses ``k``/``v`` as the $G = H_{kv}$ KV heads. An int $G$ first
            mean-pools contiguous groups of $H_{kv}/G$ KV heads (:func:`pool_heads`, the GQA
            conversion of a checkpoint applied to its projected heads, equal to pooling the
            projection weights); it must divide both ``Hkv`` and ``H``.
        mask: bool (True = attend) or additive, broadcastable to ``(B, H, N, M)``.
        causal: bottom-right causal mask, as :func:`qkv.sdpa`.
        scale: $s$; default $1/\sqrt D$.
        backend: the backend of the ``sdpa`` call (default: the current one).

    Returns:
        ``O (B, H, N, Dv)`` with the array type and dtype of ``q``.
    """
    dims, qn, kn, vn, mn = _attention_inputs(q, k, v, mask, causal, scale)
    if groups is not None:
        _divisor("groups", groups, dims.H, "H")
        _divisor("groups", groups, dims.Hkv, "Hkv (KV heads given)")
        kn = pool_heads(kn, groups).astype(kn.dtype, copy=False)  # (B, G, M, D)
        vn = pool_heads(vn, groups).astype(vn.dtype, copy=False)  # (B, G, M, Dv)
    out = _attend(qn, kn, vn, backend, mask=mn, causal=causal, scale=scale)
    return _arrays.from_numpy(out, q)


# --------------------------------------------------------------------------- allocation


def _check_scores(scores: Array) -> None:
    if scores.ndim < 1 or scores.shape[-1] < 1:
        raise ShapeError(f"scores: expected shape (..., G) with G >= 1, got {scores.shape}")
    if not np.isfinite(scores).all() or (scores < 0).any():
        raise ParameterError("scores: expected finite, non-negative key-head scores")


def _check_normalisation(normalisation: Any) -> None:
    if normalisation not in ("ratio", "minmax"):
        raise ParameterError(f"normalisation: expected 'ratio' or 'minmax', got {normalisation!r}")


def _repair(counts: Array, n_heads: int, rng: np.random.Generator | None) -> Array:
    """Move single heads until ``counts (G,)`` sums to ``n_heads``.

    Without ``rng`` (deterministic, the default): take from the largest count and give to the
    smallest, ties to the lowest group index (the official KDGQA loop, with NumPy's
    first-index ``argmax``/``argmin``). With ``rng`` (the official DGQA loop): take from a
    uniformly drawn group that still has a head, give to a uniformly drawn group.
    """
    counts = counts.copy()
    G = counts.shape[0]
    while counts.sum() > n_heads:
        if rng is None:
            counts[np.argmax(counts)] -= 1
        else:
            counts[rng.choice(np.flatnonzero(counts > 0))] -= 1
    while counts.sum() < n_heads:
        counts[np.argmin(counts) if rng is None else rng.integers(G)] += 1
    return counts


def allocate_queries(
    scores: Array,
    n_heads: int,
    *,
    normalisation: Normalisation = "ratio",
    rng: np.random.Generator | None = None,
) -> Array:
    r"""Query heads per KV group in proportion to non-negative group scores (key norms).

    $$
    \hat n = \begin{cases} n & \text{ratio (the paper: ratios of the norms)} \\
    \dfrac{n - \min n}{\max n - \min n} & \text{minmax (the official code)} \end{cases},
    \qquad a_g = \operatorname{round}\Big(H\,\frac{\hat n_g}{\sum_{g'} \hat n_{g'}}\Big),
    $$

    rounded half to even (as ``torch.round``), then repaired one head at a time until
    $\sum_g a_g = H$ (:func:`_repair`). A group may get zero heads. When the normalised scores
    sum to zero (all scores zero, or all equal under ``minmax``, where the official code divides
    0 by 0 and allocates NaN; "equal" there means a spread of at most :data:`EQUAL_SCORES`
    times the largest score) the allocation falls back to uniform GQA, $a_g = H / G$.

    Args:
        scores: ``(..., G)`` finite, non-negative; one allocation per leading index.
        n_heads: $H$, a multiple of $G$.
        normalisation: ``"ratio"`` (default, the paper) or ``"minmax"`` (the official code).
        rng: ``None`` for the deterministic repair (ties to the lowest index), or a NumPy
            ``Generator`` for the official DGQA code's random repair.

    Returns:
        ``(..., G)`` int64 counts, each row non-negative and summing to ``n_heads``.
    """
    scores = np.asarray(scores, dtype=np.float64)
    _check_scores(scores)
    G = scores.shape[-1]
    H = _checks.positive_int("n_heads", n_heads)
    if H % G:
        raise ShapeError(f"n_heads: expected a multiple of the G={G} groups, got H={H}")
    _check_normalisation(normalisation)
    rows = scores.reshape(-1, G)  # (R, G)
    if normalisation == "minmax":
        low, high = rows.min(axis=1, keepdims=True), rows.max(axis=1, keepdims=True)
        spread = np.where(high - low > EQUAL_SCORES * high, high - low, np.inf)  # (R, 1)
        rows = (rows - low) / spread  # rows of equal scores become zeros: uniform GQA
    total = rows.sum(axis=1, keepdims=True)  # (R, 1)
    uniform = np.full(G, H // G, dtype=np.int64)
    counts = np.where(
        total > 0, np.round(H * rows / np.where(total > 0, total, 1.0)), uniform
    ).astype(np.int64)  # (R, G)
    out = np.stack([_repair(row, H, rng) for row in counts])  # (R, G)
    return out.reshape(scores.shape)  # (..., G)


def _check_allocation(allocation: Any, B: int, G: int, H: int) -> Array:
    """An explicit allocation ``(G,)`` or ``(B, G)`` of non-negative ints summing to ``H``."""
    a = np.asarray(allocation)
    if a.shape not in ((G,), (B, G)):
        raise ShapeError(f"allocation: expected shape ({G},) or ({B}, {G}), got {a.shape}")
    if not np.issubdtype(a.dtype, np.integer):
        raise ParameterError(f"allocation: expected integer counts, got dtype {a.dtype}")
    if (a < 0).any():
        raise ParameterError(f"allocation: expected non-negative counts, got {a.tolist()}")
    sums = a.reshape(-1, G).sum(axis=1)
    if (sums != H).any():
        raise ParameterError(
            f"allocation: expected counts summing to H={H} query heads, got sums {sums.tolist()}"
        )
    return np.broadcast_to(a.astype(np.int64), (B, G))  # (B, G)


def group_of_heads(allocation: Array) -> Array:
    """KV head of each query head: query heads are dealt out in order, ``a_0`` to group 0, ...

    ``allocation (..., G)`` -> ``(..., H)`` int64 group indices (non-decreasing along the last
    axis).
    """
    allocation = np.asarray(allocation)
    G = allocation.shape[-1]
    rows = allocation.reshape(-1, G)  # (R, G)
    groups = np.stack([np.repeat(np.arange(G), row) for row in rows])  # (R, H)
    return groups.reshape(*allocation.shape[:-1], -1)  # (..., H)


def allocated_attention(
    q: Array,
    k: Array,
    v: Array,
    allocation: Array,
    *,
    backend: Any = None,
    **kwargs: Any,
) -> Array:
    r"""$O_h = \operatorname{softmax}(s\,Q_h K_{g(h)}^\top + B)\,V_{g(h)}$ for a given allocation.

    Args:
        q: ``(B, H, N, D)`` NumPy queries (checked).
        k: ``(B, G, M, D)`` NumPy keys.
        v: ``(B, G, M, Dv)`` NumPy values.
        allocation: ``(B, G)`` counts summing to ``H`` per sample.
        backend: the backend of the ``sdpa`` call.
        **kwargs: ``mask``, ``causal``, ``scale`` for ``sdpa``.

    Returns:
        ``(B, H, N, Dv)``; each query head reads the KV head its sample's allocation gives it
        (the KV heads are gathered to ``H`` heads, then one MHA-shaped ``sdpa`` call runs).
    """
    heads = group_of_heads(allocation)[:, :, None, None]  # (B, H, 1, 1)
    k_h = np.take_along_axis(k, heads, axis=1)  # (B, H, M, D)
    v_h = np.take_along_axis(v, heads, axis=1)  # (B, H, M, Dv)
    return _attend(q, k_h, v_h, backend, **kwargs)


def key_norms(k: Array, *, batch_coupled: bool = False) -> Array:
    r"""$n_{b,g} = \lVert K_{b,g} \rVert_F$ per sample, or (``batch_coupled``, the official code)
    $n_g = \sum_b \lVert K_{b,g} \rVert_F$ shared by the whole batch.

    ``k (B, G, M, D)`` -> float64 ``(B, G)`` (``batch_coupled``: every row the same sum).
    """
    norms = np.sqrt((np.asarray(k, dtype=np.float64) ** 2).sum(axis=(2, 3)))  # (B, G)
    if batch_coupled:
        norms = np.broadcast_to(norms.sum(axis=0), norms.shape)  # (B, G)
    return norms


def kdgqa(
    q: Any,
    k: Any,
    v: Any,
    *,
    allocation: Any = None,
    normalisation: Normalisation = "ratio",
    batch_coupled: bool = False,
    mask: Any = None,
    causal: bool = False,
    scale: float | None = None,
    return_allocation: bool = False,
    backend: Any = None,
) -> Any:
    r"""Key-distributed GQA: query heads allocated to KV heads by the key-head norms.

    $$
    n_{b,g} = \lVert K_{b,g} \rVert_F, \qquad
    a_b = \operatorname{alloc}(n_{b,\cdot}) \ (\text{:func:`allocate_queries`}), \qquad
    O_{b,h} = \operatorname{softmax}\!\big(s\,Q_{b,h} K_{b,g_b(h)}^\top + B\big)\, V_{b,g_b(h)}
    $$

    with query heads dealt out in order (:func:`group_of_heads`), recomputed on every call.

    Paper versus official code: the paper allocates by the *ratios* of the norms, which we read
    per sample (one sample's output never depends on another's); the code sums the norms over
    the batch and min-max normalises them, giving NaN counts when every norm is equal. Defaults
    follow the paper; ``batch_coupled=True, normalisation="minmax"`` reproduces the code, with
    the equal-norm case falling back to uniform GQA instead of NaN.

    Args:
        q: queries ``(B, H, N, D)``.
        k: keys ``(B, G, M, D)``, ``H`` a multiple of ``G``.
        v: values ``(B, G, M, Dv)``.
        allocation: fixed counts ``(G,)`` or ``(B, G)``, non-negative ints summing to ``H``,
            instead of the key-driven ones (``[H/G] * G`` is GQA).
        normalisation: ``"ratio"`` (the paper) or ``"minmax"`` (the official code).
        batch_coupled: sum the norms over the batch (the official code) instead of per sample.
        mask: bool (True = attend) or additive, broadcastable to ``(B, H, N, M)``.
        causal: bottom-right causal mask.
        scale: $s$; default $1/\sqrt D$.
        return_allocation: also return the counts ``(B, G)``.
        backend: the backend of the ``sdpa`` call.

    Returns:
        ``O (B, H, N, Dv)`` with the array type and dtype of ``q``; with ``return_allocation``
        the pair ``(O, allocation)``, the allocation an int64 NumPy array ``(B, G)``.
    """
    dims, qn, kn, vn, mn = _attention_inputs(q, k, v, mask, causal, scale)
    _check_normalisation(normalisation)
    if not isinstance(batch_coupled, (bool, np.bool_)):
        raise ParameterError(f"batch_coupled: expected a bool, got {batch_coupled!r}")
    if allocation is None:
        norms = key_norms(kn, batch_coupled=batch_coupled)  # (B, G)
        counts = allocate_queries(norms, dims.H, normalisation=normalisation)  # (B, G)
    else:
        counts = _check_allocation(_host(allocation), dims.B, dims.Hkv, dims.H)  # (B, G)
    out = allocated_attention(
        qn, kn, vn, counts, backend=backend, mask=mn, causal=causal, scale=scale
    )
    out = _arrays.from_numpy(out, q)
    return (out, np.array(counts)) if return_allocation else out


# --------------------------------------------------------------------------- DGQA


@dataclass(frozen=True, eq=False)
class DGQAState:
    """What DGQA carries from one training step to the next.

    Attributes:
        cache: float64 ``(G,)``, the tracked key-head norms (zeros at the start, as in the
            official code).
        allocation: int64 ``(G,)``, the query heads per KV head in use (uniform at the start).
        step: training steps seen so far.
    """

    cache: Array
    allocation: Array
    step: int = 0

    @classmethod
    def initial(cls, n_heads: int, n_groups: int) -> DGQAState:
        """Zero cache and uniform allocation ``[H/G] * G``; ``n_groups`` must divide ``n_heads``."""
        H = _checks.positive_int("n_heads", n_heads)
        G = _divisor("n_groups", n_groups, H, "n_heads")
        return cls(np.zeros(G), np.full(G, H // G, dtype=np.int64), 0)


def dgqa_update(
    state: DGQAState,
    k: Any,
    *,
    kind: Literal["ema", "diff"] = "ema",
    window: int = 1,
    beta: float = 0.9,
    training: bool = True,
    cache_update: Literal["paper", "code"] = "paper",
    rng: np.random.Generator | None = None,
) -> DGQAState:
    r"""One DGQA step of the tracked key norms and the allocation they give.

    With $n_g$ this batch's key-head norms (the batch mean of $\lVert K_{b,g}\rVert_F$; the
    code's batch sum differs by the constant factor $B$, which changes no allocation for a fixed
    batch size) and $c$ the cache:

    $$
    \text{ema:}\ \ r = \beta\, n + (1 - \beta)\, c, \qquad
    \text{diff:}\ \ r = \lvert c - n \rvert, \qquad a = \operatorname{alloc}(r).
    $$

    In training the allocation is recomputed only on steps that are multiples of ``window``
    (steps counted from 0); at inference on every call. The cache then becomes:

    * ``cache_update="paper"`` (default, our reading of "norms as they evolve through
      training"): ema keeps the moving average, $c \leftarrow r$; diff keeps the norms of the
      last update, $c \leftarrow n$, so $r$ is their change over the window;
    * ``cache_update="code"`` (the official code): $c \leftarrow (c + n) / \text{window}$ in
      training and $c \leftarrow n$ at inference.

    Args:
        state: the state before this step (:meth:`DGQAState.initial` to start).
        k: keys ``(B, G, M, D)`` of this step.
        kind: ``"ema"`` or ``"diff"``.
        window: update period in training steps (the code's ``window_size``, default 1).
        beta: the weight $\beta$ of the new norms in ema (0.9 in the code).
        training: training (windowed, step counted) or inference (every call).
        cache_update: ``"paper"`` or ``"code"``, see above.
        rng: ``None`` for the deterministic repair of the rounded counts, a NumPy ``Generator``
            for the code's random repair (:func:`allocate_queries`).

    Returns:
        The new :class:`DGQAState` (the input is not changed).
    """
    kn = _host(k)
    _checks.array("k", kn, rank=4, layout="(B, G, M, D)")
    G = state.cache.shape[0]
    if kn.shape[1] != G:
        raise ShapeError(f"k: expected G={G} KV heads as the state, got {kn.shape[1]}")
    if kind not in ("ema", "diff"):
        raise ParameterError(f"kind: expected 'ema' or 'diff', got {kind!r}")
    if cache_update not in ("paper", "code"):
        raise ParameterError(f"cache_update: expected 'paper' or 'code', got {cache_update!r}")
    window = _checks.positive_int("window", window)
    if not (isinstance(beta, (int, float, np.floating)) and 0.0 <= beta <= 1.0):
        raise ParameterError(f"beta: expected a number in [0, 1], got {beta!r}")
    step = state.step + 1 if training else state.step
    if training and state.step % window:
        return replace(state, step=step)
    H = int(state.allocation.sum())
    n = key_norms(kn).mean(axis=0)  # (G,)
    c = state.cache
    ratios = beta * n + (1.0 - beta) * c if kind == "ema" else np.abs(c - n)  # (G,)
    allocation = allocate_queries(ratios, H, rng=rng)  # (G,)
    if cache_update == "code":
        cache = (c + n) / window if training else n
    else:
        cache = ratios if kind == "ema" else n
    return DGQAState(cache=cache, allocation=allocation, step=step)


def dgqa(
    q: Any,
    k: Any,
    v: Any,
    state: DGQAState,
    *,
    kind: Literal["ema", "diff"] = "ema",
    window: int = 1,
    beta: float = 0.9,
    training: bool = True,
    cache_update: Literal["paper", "code"] = "paper",
    rng: np.random.Generator | None = None,
    mask: Any = None,
    causal: bool = False,
    scale: float | None = None,
    backend: Any = None,
) -> tuple[Any, DGQAState]:
    r"""Dynamic key-distributed GQA: one forward pass and the updated state.

    As in the official code, the state is first updated from this step's keys
    (:func:`dgqa_update`), then the query heads attend with the new allocation, shared by the
    whole batch (:func:`allocated_attention`).

    Args:
        q: queries ``(B, H, N, D)``; ``H`` must equal the state's total allocation.
        k: keys ``(B, G, M, D)``.
        v: values ``(B, G, M, Dv)``.
        state: the :class:`DGQAState` before this step.
        kind: ``"ema"`` or ``"diff"`` (:func:`dgqa_update`).
        window: update period in training steps.
        beta: ema weight of the new norms.
        training: training or inference behaviour of the update.
        cache_update: ``"paper"`` or ``"code"`` cache rule.
        rng: ``None`` (deterministic) or a ``Generator`` (the code's random repair).
        mask: bool (True = attend) or additive, broadcastable to ``(B, H, N, M)``.
        causal: bottom-right causal mask.
        scale: $s$; default $1/\sqrt D$.
        backend: the backend of the ``sdpa`` call.

    Returns:
        ``(O, new_state)``, ``O (B, H, N, Dv)`` with the array type and dtype of ``q``.
    """
    dims, qn, kn, vn, mn = _attention_inputs(q, k, v, mask, causal, scale)
    if int(state.allocation.sum()) != dims.H:
        raise ShapeError(
            f"q: expected H={int(state.allocation.sum())} query heads as the state, got {dims.H}"
        )
    new = dgqa_update(
        state,
        kn,
        kind=kind,
        window=window,
        beta=beta,
        training=training,
        cache_update=cache_update,
        rng=rng,
    )
    counts = np.broadcast_to(new.allocation, (dims.B, dims.Hkv))  # (B, G)
    out = allocated_attention(
        qn, kn, vn, counts, backend=backend, mask=mn, causal=causal, scale=scale
    )
    return _arrays.from_numpy(out, q), new


# --------------------------------------------------------------------------- PGQA


def _row_std(x: Array) -> Array:
    """Sample standard deviation (``ddof=1``, as ``torch.std``) of the last axis, keepdims;
    zero for rows of one element."""
    if x.shape[-1] < 2:
        return np.zeros((*x.shape[:-1], 1), dtype=x.dtype)
    return x.std(axis=-1, ddof=1, keepdims=True)


def group_noise(
    out: Array, groups: int, rng: np.random.Generator, *, noise: str = "uniform"
) -> Array:
    r"""The noise PGQA subtracts from the head outputs ``out (B, H, N, Dv)``.

    For each group $g$ of $r = H/G$ heads, one matrix $U \in \mathbb{R}^{r \times N D_v}$ is
    drawn (uniform on $[0, 1)$ as the code's ``torch.rand``, or standard normal), its
    "diagonal" $U_{ii}$, $i < \min(r, N D_v)$, is set to zero, each row is standardised to mean
    0 and standard deviation 1, then rescaled per sample and head to the mean $\mu_{b,h}$ and
    standard deviation $\sigma_{b,h}$ of that head's flattened output:
    $E_{b,h} = \mu_{b,h} + \sigma_{b,h}\,(U_h - \bar U_h)/s_{U_h}$ (sample standard deviations;
    a row of $U$ with zero spread is divided by 1). The same $U$ serves every sample.

    Args:
        out: head outputs ``(B, H, N, Dv)``.
        groups: $G$, the KV heads; divides ``H``.
        rng: the NumPy ``Generator`` the noise is drawn from (one matrix per group, in order).
        noise: ``"uniform"`` (what the official code draws) or ``"gaussian"``.

    Returns:
        ``(B, H, N, Dv)`` noise in the dtype of ``out``.
    """
    B, H, N, Dv = out.shape
    r = H // groups
    flat = out.reshape(B, groups, r, N * Dv)  # (B, G, r, N*Dv)
    draw = rng.random if noise == "uniform" else rng.standard_normal
    u = np.stack([draw((r, N * Dv)) for _ in range(groups)])  # (G, r, N*Dv)
    diagonal = np.arange(min(r, N * Dv))
    u[:, diagonal, diagonal] = 0.0
    spread = _row_std(u)
    u = (u - u.mean(axis=-1, keepdims=True)) / np.where(spread > 0, spread, 1.0)  # (G, r, N*Dv)
    e = u[None] * _row_std(flat) + flat.mean(axis=-1, keepdims=True)  # (B, G, r, N*Dv)
    return e.reshape(B, H, N, Dv).astype(out.dtype, copy=False)  # (B, H, N, Dv)


def pgqa(
    q: Any,
    k: Any,
    v: Any,
    *,
    rng: np.random.Generator | int,
    noise: Literal["uniform", "gaussian"] = "uniform",
    mask: Any = None,
    causal: bool = False,
    scale: float | None = None,
    backend: Any = None,
) -> Any:
    r"""Perturbed GQA: uniform GQA, then noise subtracted from each group's head outputs.

    $$
    O = \operatorname{GQA}(Q, K, V) - E, \qquad E = \text{:func:`group_noise`}(O).
    $$

    The paper describes subtracting noise "from the attention maps" to vary the static groups;
    this follows the official code, which subtracts it from the attention *outputs* of each
    group, rescaled to their row statistics, **in training and at inference alike** (it is not
    switched off in eval mode). A consequence: each perturbed head row has mean zero. The code's
    helper is named and commented as Gaussian but draws uniform noise; ``noise="uniform"``
    (default) is what the code runs, ``"gaussian"`` what its comments say.

    Args:
        q: queries ``(B, H, N, D)``.
        k: keys ``(B, G, M, D)``, ``H`` a multiple of ``G``.
        v: values ``(B, G, M, Dv)``.
        rng: a NumPy ``Generator`` or an int seed (required: no hidden randomness).
        noise: ``"uniform"`` or ``"gaussian"``.
        mask: bool (True = attend) or additive, broadcastable to ``(B, H, N, M)``.
        causal: bottom-right causal mask.
        scale: $s$; default $1/\sqrt D$.
        backend: the backend of the ``sdpa`` call.

    Returns:
        ``(B, H, N, Dv)`` with the array type and dtype of ``q``.
    """
    dims, qn, kn, vn, mn = _attention_inputs(q, k, v, mask, causal, scale)
    if noise not in ("uniform", "gaussian"):
        raise ParameterError(f"noise: expected 'uniform' or 'gaussian', got {noise!r}")
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        rng = np.random.default_rng(int(rng))
    if not isinstance(rng, np.random.Generator):
        raise ParameterError(f"rng: expected a numpy Generator or an int seed, got {rng!r}")
    out = _attend(qn, kn, vn, backend, mask=mn, causal=causal, scale=scale)  # (B, H, N, Dv)
    out = out - group_noise(out, dims.Hkv, rng, noise=noise)
    return _arrays.from_numpy(out, q)
