r"""LeanVec: linear dimensionality reduction + 8-bit vectors for fast inner-product search.

Paper: *LeanVec: Search your vectors faster by making them fit* (Tepper, Bhati, Aguerrebere,
Hildebrand, Willke; arXiv 2312.16335). Official code: https://github.com/intel/ScalableVectorSearch
(``bindings/python/src/svs/leanvec.py`` for LeanVec-OOD).

Search asks for the $k$ data vectors $x_j \in \mathbb R^D$ with the largest inner products
$q \cdot x_j$. LeanVec projects queries with a $D \times d$ matrix $A$ and data with a
$D \times d$ matrix $B$ ($d < D$), so that $q \cdot x \approx (A^\top q) \cdot (B^\top x)$,
stores the reduced data vectors in 8 bits, searches the reduced space for $k'$ candidates and
re-ranks those with the full vectors.

* **LeanVec-ID** (queries distributed like the data): $A = B = P$, the top $d$ principal
  directions of the data centred by its mean $\mu$ (:func:`leanvec_id`). Centring changes each
  score of one query by the same $q \cdot \mu$, so no ranking.
* **LeanVec-OOD** (queries from another distribution, e.g. text queries against documents):
  $A$ and $B$ minimise the error of all query-data inner products,

$$
\min_{A, B \in \mathbb R^{D \times d}} \big\| Q A B^\top X^\top - Q X^\top \big\|_F^2
= \operatorname{tr}(B A^\top K_Q A B^\top K_X) - 2 \operatorname{tr}(K_Q A B^\top K_X)
  + \operatorname{tr}(K_Q K_X),
$$

with $K_Q = Q^\top Q$, $K_X = X^\top X$, over the spectral-norm balls $\|A\|_2, \|B\|_2 \le 1$,
by alternating Frank-Wolfe steps (:func:`leanvec_ood`): from $A = B = 0$, at step $t$ with
$\gamma_t = 1/(t+1)^{0.999}$,

$$
A \leftarrow (1 - \gamma_t) A + \gamma_t\, U V^\top, \quad U \Sigma V^\top = -\nabla_A,
\qquad \nabla_A = 2 K_Q A B^\top K_X B - 2 K_Q K_X B,
$$

then the same for $B$ with $\nabla_B = 2 K_X B A^\top K_Q A - 2 K_X K_Q A$ (using the new $A$),
stopping when the loss changes by less than ``rel_tol`` of its previous value or after
``max_steps`` steps. $U V^\top$ is the linear minimisation oracle of the spectral-norm ball.
The first $A$-step sees $B = 0$, a zero gradient, whose oracle is any feasible point; we take
the first $d$ coordinate axes (what the official code's SVD of a zero matrix returns), so with
$\gamma_0 = 1$ both matrices have orthonormal columns after the first step. LeanVec-OOD does
not centre (as in the official code).

**Quantisation** (:func:`lvq_encode`, LVQ-like as in the paper): each reduced data vector
$y = B^\top (x - \mu)$ is stored as 8-bit codes with its own offset and step,

$$
\ell = \min_t y_t, \quad \Delta = \frac{\max_t y_t - \ell}{2^8 - 1}, \quad
c_t = \operatorname{round}\Big(\frac{y_t - \ell}{\Delta}\Big) \in \{0, \dots, 255\},
\quad \hat y = \ell + \Delta c,
$$

so the first-stage score of a reduced query $\tilde q = A^\top q$ is
$\tilde q \cdot \hat y = \ell \sum_t \tilde q_t + \Delta\, (\tilde q \cdot c)$
(:func:`lvq_dot`, the dispatched hot loop). The paper's LVQ also keeps a second-level residual
code (LVQ-4x8 etc.); one 8-bit level is kept here.

Ranking ties go to the lower data index everywhere (first stage, re-ranking, exact search).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from qkv import _arrays, _checks
from qkv.errors import DTypeError, ParameterError, ShapeError

Array = np.ndarray

#: Levels of the 8-bit codes.
LEVELS = 255


# --------------------------------------------------------------------------- checks


def check_vectors(name: str, x: Any, *, dim: int | None = None, layout: str = "(N, D)") -> Array:
    """A finite 2-D floating NumPy array ``x`` (``dim`` columns if given), or a clear error."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name}: expected a NumPy array {layout}, got {type(x).__name__}")
    _checks.array(name, x, rank=2, layout=layout)
    if dim is not None and x.shape[1] != dim:
        raise ShapeError(
            f"{name}: expected {dim} columns (the dimension of the data), got shape {x.shape}"
        )
    if not np.all(np.isfinite(x)):
        bad = int((~np.isfinite(x)).sum())
        raise ParameterError(f"{name}: expected finite values, got {bad} NaN or infinite entries")
    return x


def check_count(name: str, value: Any, upper: int, what: str) -> int:
    """An integer in ``[1, upper]`` (``what`` names the upper bound), or a clear error."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ParameterError(f"{name}: expected an integer >= 1, got {value!r}")
    if value > upper:
        raise ParameterError(f"{name}: expected at most {upper} ({what}), got {int(value)}")
    return int(value)


# --------------------------------------------------------------------------- projections


def leanvec_id(data: Array, d: int) -> tuple[Array, Array]:
    r"""LeanVec-ID: the top-``d`` principal directions $P$ of the data, used for both sides.

    Args:
        data: data vectors ``(N, D)``.
        d: reduced dimension (``1 <= d <= D``).

    Returns:
        ``P (D, d)`` with orthonormal columns (largest variance first) and the data mean
        ``mu (D,)``.
    """
    check_vectors("data", data)
    d = check_count("d", d, data.shape[1], "the full dimension D")
    mu = data.mean(axis=0)  # (D,)
    centred = data - mu  # (N, D)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)  # vt (min(N, D), D)
    P = vt[:d].T  # (D, d)
    if P.shape[1] < d:  # fewer data vectors than d: complete the basis
        q, _ = np.linalg.qr(np.concatenate([P, np.eye(data.shape[1], dtype=data.dtype)], axis=1))
        P = np.concatenate([P, q[:, P.shape[1] : d]], axis=1)  # (D, d)
    return P, mu


def ood_loss(KQ: Array, KX: Array, A: Array, B: Array) -> float:
    r"""$\|Q A B^\top X^\top - Q X^\top\|_F^2$ from the second moments $K_Q$, $K_X$ ``(D, D)``.

    Evaluated with ``d``-sized products: $\operatorname{tr}\big((A^\top K_Q A)(B^\top K_X B)\big)
    - 2 \langle K_X B, K_Q A\rangle + \langle K_Q, K_X\rangle$.
    """
    QA, XB = KQ @ A, KX @ B  # (D, d) each
    return float(np.sum((A.T @ QA) * (B.T @ XB)) - 2.0 * np.sum(XB * QA) + np.sum(KQ * KX))


def _oracle(gradient: Array) -> Array:
    r"""$U V^\top$ of the SVD of $-\nabla$ (the first coordinate axes for a zero gradient)."""
    D, d = gradient.shape
    if not np.any(gradient):
        return np.eye(D, d, dtype=gradient.dtype)
    u, _, vt = np.linalg.svd(-gradient, full_matrices=False)  # u (D, d), vt (d, d)
    return u @ vt


@dataclass(frozen=True, eq=False)
class OODFit:
    """The result of :func:`leanvec_ood`.

    Attributes:
        query_matrix: ``A (D, d)``.
        data_matrix: ``B (D, d)``.
        losses: the loss after each step ``(steps,)``.
    """

    query_matrix: Array
    data_matrix: Array
    losses: Array


def leanvec_ood(
    queries: Array, data: Array, d: int, *, max_steps: int = 500, rel_tol: float = 1e-3
) -> OODFit:
    """LeanVec-OOD: query and data projections learned by alternating Frank-Wolfe steps.

    Args:
        queries: training queries ``Q (Nq, D)`` (use other queries to evaluate).
        data: data vectors ``X (N, D)``.
        d: reduced dimension (``1 <= d <= D``).
        max_steps: most steps.
        rel_tol: stop when the loss changes by less than this fraction of its last value.

    Returns:
        The :class:`OODFit` (``A``, ``B`` and the loss per step).
    """
    check_vectors("data", data)
    check_vectors("queries", queries, dim=data.shape[1], layout="(Nq, D)")
    _checks.same_dtype(queries=queries, data=data)
    d = check_count("d", d, data.shape[1], "the full dimension D")
    max_steps = check_count("max_steps", max_steps, 10**6, "a sanity bound")
    if not isinstance(rel_tol, (int, float)) or not 0 <= rel_tol < 1:
        raise ParameterError(f"rel_tol: expected a number in [0, 1), got {rel_tol!r}")
    KQ = queries.T @ queries  # (D, D)
    KX = data.T @ data  # (D, D)
    KQX = KQ @ KX  # (D, D), once; K_X K_Q is its transpose
    A = np.zeros((data.shape[1], d), dtype=data.dtype)  # (D, d)
    B = np.zeros_like(A)  # (D, d)
    losses: list[float] = []
    for t in range(max_steps):
        gamma = 1.0 / (t + 1) ** 0.999
        grad_a = 2.0 * (KQ @ A) @ (B.T @ KX @ B) - 2.0 * KQX @ B  # (D, d)
        A = (1.0 - gamma) * A + gamma * _oracle(grad_a)
        grad_b = 2.0 * (KX @ B) @ (A.T @ KQ @ A) - 2.0 * KQX.T @ A  # (D, d)
        B = (1.0 - gamma) * B + gamma * _oracle(grad_b)
        losses.append(ood_loss(KQ, KX, A, B))
        if t > 1 and abs(losses[-1] - losses[-2]) < rel_tol * losses[-2]:
            break
    return OODFit(A, B, np.asarray(losses))


# --------------------------------------------------------------------------- 8-bit vectors


def lvq_encode(y: Array) -> tuple[Array, Array, Array]:
    r"""8-bit codes of each row with its own offset $\ell$ and step $\Delta$ (see the module).

    Args:
        y: reduced vectors ``(N, d)``.

    Returns:
        ``codes (N, d)`` uint8, ``scales (N,)`` ($\Delta$, 0 for a constant row) and
        ``offsets (N,)`` ($\ell$), both in ``y``'s dtype.
    """
    low = y.min(axis=1)  # (N,)
    step = (y.max(axis=1) - low) / LEVELS  # (N,)
    safe = np.where(step > 0, step, 1)  # (N,)
    codes = np.rint((y - low[:, None]) / safe[:, None])  # (N, d)
    return np.clip(codes, 0, LEVELS).astype(np.uint8), step.astype(y.dtype), low.astype(y.dtype)


def lvq_decode(codes: Array, scales: Array, offsets: Array) -> Array:
    r"""$\hat y = \ell + \Delta c$ ``(N, d)`` in the dtype of ``scales``."""
    return offsets[:, None] + scales[:, None] * codes.astype(scales.dtype)


def check_lvq_dot(queries: Any, codes: Any, scales: Any, offsets: Any) -> None:
    """Check the arguments of :func:`lvq_dot` (any array library)."""
    _checks.array("queries", queries, rank=2, layout="(Nq, d)")
    if not _arrays.is_array(codes) or _arrays.dtype_name(codes) != "uint8":
        raise DTypeError(
            f"codes: expected a uint8 array (N, d), got {getattr(codes, 'dtype', type(codes))}"
        )
    if codes.ndim != 2 or codes.shape[1] != queries.shape[1] or codes.shape[0] == 0:
        raise ShapeError(
            f"codes: expected (N, d) with N >= 1 and d = {queries.shape[1]} as queries, "
            f"got {tuple(codes.shape)}"
        )
    for name, x in (("scales", scales), ("offsets", offsets)):
        _checks.array(name, x, rank=1, layout="(N,)")
        if x.shape[0] != codes.shape[0]:
            raise ShapeError(f"{name}: expected ({codes.shape[0]},) as codes, got {x.shape}")
    _checks.same_dtype(queries=queries, scales=scales, offsets=offsets)


def lvq_dot(queries: Array, codes: Array, scales: Array, offsets: Array) -> Array:
    r"""Inner products of float queries with 8-bit vectors: $s_{ij} = \tilde q_i \cdot \hat y_j$.

    Written here as the decoded vectors' inner products; a kernel may use the equal form
    $s_{ij} = \ell_j \sum_t \tilde q_{it} + \Delta_j \sum_t \tilde q_{it} c_{jt}$, which reads
    only the codes.

    Args:
        queries: reduced queries ``(Nq, d)``.
        codes: 8-bit codes ``(N, d)`` uint8.
        scales: steps ``(N,)`` in the queries' dtype.
        offsets: offsets ``(N,)`` in the queries' dtype.

    Returns:
        Scores ``(Nq, N)`` in the queries' dtype.
    """
    return queries @ lvq_decode(codes, scales, offsets).T  # (Nq, d) @ (d, N)


# --------------------------------------------------------------------------- search


def top_k(scores: Array, k: int) -> Array:
    """Indices of the ``k`` largest scores per row ``(Nq, k)``, best first, ties to the lower index."""
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def exact_search(queries: Array, data: Array, k: int) -> Array:
    """The exact top-``k`` inner products, by brute force: indices ``(Nq, k)``, best first.

    Args:
        queries: ``(Nq, D)``.
        data: ``(N, D)``.
        k: neighbours per query (``<= N``).

    Returns:
        Indices ``(Nq, k)``.
    """
    check_vectors("data", data)
    check_vectors("queries", queries, dim=data.shape[1], layout="(Nq, D)")
    k = check_count("k", k, data.shape[0], "the number of data vectors")
    return top_k(queries @ data.T, k)  # (Nq, N) scores


@dataclass(frozen=True, eq=False)
class Search:
    """The result of :meth:`LeanVec.search`.

    Attributes:
        indices: the ``k`` neighbours per query ``(Nq, k)``, best first by full inner product.
        candidates: the first-stage candidates ``(Nq, k')``, best first by reduced score.
        multiply_adds: multiply-adds per query (``N d`` in reduced space + ``k' D`` re-ranking).
    """

    indices: Array
    candidates: Array
    multiply_adds: int


@dataclass(frozen=True, eq=False)
class LeanVec:
    """A LeanVec index: projections, 8-bit reduced data, full data for re-ranking.

    Build it with :meth:`build`; search with :meth:`search`.

    Attributes:
        query_matrix: ``A (D, d)``.
        data_matrix: ``B (D, d)``.
        mean: ``mu (D,)`` subtracted from the data before projecting (zero for OOD).
        codes: 8-bit reduced data ``(N, d)`` uint8.
        scales: per-vector steps ``(N,)``.
        offsets: per-vector offsets ``(N,)``.
        data: the full data ``(N, D)`` (re-ranking).
        kind: ``"id"`` or ``"ood"``.
    """

    query_matrix: Array
    data_matrix: Array
    mean: Array
    codes: Array
    scales: Array
    offsets: Array
    data: Array
    kind: str

    @classmethod
    def build(
        cls,
        data: Array,
        d: int,
        *,
        kind: Literal["id", "ood"] = "id",
        queries: Array | None = None,
        max_steps: int = 500,
        rel_tol: float = 1e-3,
    ) -> LeanVec:
        """Learn the projections and encode the data.

        Args:
            data: data vectors ``(N, D)``.
            d: reduced dimension (``1 <= d <= D``).
            kind: ``"id"`` (PCA, :func:`leanvec_id`) or ``"ood"`` (Frank-Wolfe,
                :func:`leanvec_ood`).
            queries: training queries ``(Nq, D)``, required for ``"ood"``.
            max_steps: most Frank-Wolfe steps (``"ood"``).
            rel_tol: Frank-Wolfe relative stopping tolerance (``"ood"``).

        Returns:
            The index.
        """
        check_vectors("data", data)
        if kind == "id":
            A, mu = leanvec_id(data, d)
            B = A
        elif kind == "ood":
            if queries is None:
                raise ParameterError("queries: LeanVec-OOD learns from training queries, got None")
            fit = leanvec_ood(queries, data, d, max_steps=max_steps, rel_tol=rel_tol)
            A, B = fit.query_matrix, fit.data_matrix
            mu = np.zeros(data.shape[1], dtype=data.dtype)
        else:
            raise ParameterError(f"kind: expected 'id' or 'ood', got {kind!r}")
        codes, scales, offsets = lvq_encode((data - mu) @ B)  # (N, d) reduced data
        return cls(A, B, mu, codes, scales, offsets, data, kind)

    def search(self, queries: Array, k: int = 10, *, candidates: int | None = None) -> Search:
        """Top-``k`` inner products: ``k'`` candidates by 8-bit reduced scores, re-ranked exactly.

        Args:
            queries: ``(Nq, D)``.
            k: neighbours per query (``<= N``).
            candidates: ``k'`` re-ranked per query (``k <= k' <= N``; default ``k``).

        Returns:
            The :class:`Search`.
        """
        N, D = self.data.shape
        check_vectors("queries", queries, dim=D, layout="(Nq, D)")
        k = check_count("k", k, N, "the number of data vectors")
        kc = k if candidates is None else check_count("candidates", candidates, N, "N")
        if kc < k:
            raise ParameterError(f"candidates: expected at least k = {k}, got {kc}")
        import qkv

        _checks.same_dtype(queries=queries, data=self.data)
        reduced = queries @ self.query_matrix  # (Nq, d)
        first = qkv.lvq_dot(reduced, self.codes, self.scales, self.offsets)  # (Nq, N)
        cand = top_k(first, kc)  # (Nq, k')
        full = np.einsum("qd,qcd->qc", queries, self.data[cand])  # (Nq, k') exact scores
        # best first; ties to the lower data index, as exact search
        order = np.lexsort((cand, -full), axis=1)[:, :k]  # (Nq, k)
        d = self.codes.shape[1]
        return Search(np.take_along_axis(cand, order, axis=1), cand, N * d + kc * D)


def recall_at(found: Array, truth: Array) -> float:
    """Mean fraction of the true neighbours ``truth (Nq, k)`` among ``found (Nq, k')``."""
    hits = [len(np.intersect1d(f, t)) / truth.shape[1] for f, t in zip(found, truth, strict=True)]
    return float(np.mean(hits))


#: The catalog id.
leanvec = LeanVec
