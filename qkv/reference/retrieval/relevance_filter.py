r"""Cosine Adapter: a query-dependent monotone map of cosine scores and one global threshold.

Paper: *Relevance Filtering for Embedding-based Retrieval* (Rossi, Lin, Liu, Yang, Lee,
Magnani, Liao; CIKM 2024; arXiv 2408.04887). No official code was found.

Dense retrieval has no natural cutoff: the cosine $c(q, d) = e_q^\top e_d$ of a relevant
document is high for one query and middling for another, so neither a fixed top-$k$ nor one
cosine cutoff separates relevant from irrelevant results. The paper maps each query's cosine
scores through a **monotone transform whose parameters a small network predicts from the query
embedding**, reads the mapped score as a relevance probability, and keeps the results above
**one global threshold** $\tau$. Here the network is one linear layer,
$\theta(q) = e_q W + w_0$, and with $u = (1 + c)/2 \in [0, 1]$ the transforms are

$$
m(c) = a\,c + b \;\;\text{(linear)},\quad
m(c) = a\sqrt{u} + b \;\;\text{(sqrt)},\quad
m(c) = a\,u^2 + b \;\;\text{(quadratic)},\quad
m(c) = a\,u^{p} + b \;\;\text{(power)},
$$

$$
a = \operatorname{softplus}(\theta_0) > 0,\qquad b = \theta_1,\qquad
p = \operatorname{softplus}(\theta_2) > 0,\qquad
r(q, d) = \sigma\big(m(c(q, d))\big),\qquad
\text{keep } d \iff r(q, d) \ge \tau .
$$

Because $a > 0$ (and $p > 0$), $m$ is increasing in $c$ for every query: the ranking within a
query never changes, and the kept set of a query is a prefix of its cosine ranking whose length
depends on the query. The map is fitted on labelled pairs by minimising the binary
cross-entropy of $r$ against the labels (plus $\tfrac{\lambda}{2}\lVert W \rVert^2$) with Adam,
full batch, in NumPy (:func:`fit_cosine_adapter`).

Where the paper is silent or only summarised (its text names linear, square-root and power
transforms and a trained network; the exact network, loss and transform parametrisation are
not given in what we could read), qkv chooses: one linear layer, softplus for the positive
parameters, the cosine shifted to $u \in [0, 1]$ for the root and power forms (clipped there,
so rounding outside $[-1, 1]$ cannot produce NaN), BCE with Adam, and $\tau = 0.5$.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from qkv.errors import DTypeError, ParameterError, ShapeError
from qkv.reference.retrieval import _score_checks as checks

Array = np.ndarray
Transform = Literal["linear", "sqrt", "quadratic", "power"]
#: Parameters each transform takes from the query: ``(a, b)`` or ``(a, b, p)``.
TRANSFORMS: dict[str, int] = {"linear": 2, "sqrt": 2, "quadratic": 2, "power": 3}


@dataclass(frozen=True, eq=False)
class CosineAdapter:
    r"""The fitted map: $\theta(q) = e_q W + w_0$, then the transform ``transform``.

    Attributes:
        weight: ``W`` of shape ``(D, P)``, ``P = TRANSFORMS[transform]``.
        bias: ``w_0`` of shape ``(P,)``.
        transform: ``"linear"``, ``"sqrt"``, ``"quadratic"`` or ``"power"``.
    """

    weight: Array
    bias: Array
    transform: Transform = "linear"

    def __post_init__(self) -> None:
        check_transform(self.transform)
        P = TRANSFORMS[self.transform]
        checks.matrix("weight", self.weight, f"(D, {P})")
        if self.weight.shape[1] != P or np.shape(self.bias) != (P,):
            raise ShapeError(
                f"weight, bias: expected (D, {P}) and ({P},) for transform {self.transform!r}, "
                f"got {self.weight.shape} and {np.shape(self.bias)}"
            )

    @property
    def dim(self) -> int:
        """The embedding dimension ``D`` the adapter reads."""
        return self.weight.shape[0]


def check_transform(transform: Any) -> str:
    """``transform`` as one of :data:`TRANSFORMS`."""
    if transform not in TRANSFORMS:
        raise ParameterError(f"transform: expected one of {sorted(TRANSFORMS)}, got {transform!r}")
    return transform


def check_threshold(threshold: Any) -> float:
    """``threshold`` as a probability strictly inside (0, 1)."""
    if isinstance(threshold, bool) or not isinstance(threshold, int | float | np.floating):
        raise ParameterError(f"threshold: expected a number in (0, 1), got {threshold!r}")
    if not 0.0 < float(threshold) < 1.0:
        raise ParameterError(f"threshold: expected a number in (0, 1), got {threshold!r}")
    return float(threshold)


def check_inputs(query_embeddings: Any, scores: Any, dim: int | None = None) -> tuple[Array, Array]:
    """Checked ``query_embeddings (Q, D)`` and ``scores (Q, K)`` of one float dtype.

    ``dim`` is the embedding dimension the adapter expects (``None``: any).
    """
    e = checks.matrix("query_embeddings", query_embeddings, "(Q, D)")
    c = checks.matrix("scores", scores, "(Q, K)", empty="an empty document list")
    if c.shape[0] != e.shape[0]:
        raise ShapeError(f"scores: expected one row per query, Q={e.shape[0]}, got shape {c.shape}")
    if dim is not None and e.shape[1] != dim:
        raise ShapeError(
            f"query_embeddings: expected dimension D={dim} (the adapter's), got {e.shape[1]}"
        )
    if e.dtype != c.dtype:
        raise DTypeError(
            f"query_embeddings, scores: expected one dtype, got {e.dtype} and {c.dtype}"
        )
    return e, c


def softplus(x: Array) -> Array:
    r"""$\log(1 + e^x)$, computed without overflow."""
    return np.logaddexp(0, x)


def sigmoid(x: Array) -> Array:
    r"""$\sigma(x) = 1 / (1 + e^{-x})$, computed without overflow."""
    return np.exp(-np.logaddexp(0, -x))


def adapter_params(adapter: CosineAdapter, query_embeddings: Array) -> tuple[Array, ...]:
    r"""The per-query transform parameters ``(a, b)`` or ``(a, b, p)``, each ``(Q,)``.

    $\theta = e_q W + w_0$; $a = \operatorname{softplus}(\theta_0)$, $b = \theta_1$,
    $p = \operatorname{softplus}(\theta_2)$. Computed in the embeddings' dtype.
    """
    dtype = query_embeddings.dtype
    theta = query_embeddings @ adapter.weight.astype(dtype) + adapter.bias.astype(dtype)  # (Q, P)
    a, b = softplus(theta[:, 0]), theta[:, 1]
    if adapter.transform == "power":
        return a, b, softplus(theta[:, 2])
    return a, b


def _shape(transform: str, scores: Array, p: Array | None) -> Array:
    """The transform's increasing function of the cosine, before ``a`` and ``b``: ``(Q, K)``."""
    if transform == "linear":
        return scores
    u = np.clip((1 + scores) / 2, 0, 1)  # (Q, K), the cosine moved to [0, 1]
    if transform == "sqrt":
        return np.sqrt(u)
    if transform == "quadratic":
        return u * u
    return u ** p[:, None]  # power, p (Q,) > 0


def mapped_logits(adapter: CosineAdapter, query_embeddings: Array, scores: Array) -> Array:
    r"""$m(c(q, d))$, the mapped score before the sigmoid: ``(Q, K)``, inputs unchecked."""
    params = adapter_params(adapter, query_embeddings)
    p = params[2] if adapter.transform == "power" else None
    return params[0][:, None] * _shape(adapter.transform, scores, p) + params[1][:, None]


def cosine_adapter(query_embeddings: Array, scores: Array, adapter: CosineAdapter) -> Array:
    r"""Relevance $r(q, d) = \sigma(m_q(c(q, d)))$ of each scored document (module docstring).

    Args:
        query_embeddings: ``(Q, D)`` query embeddings (the adapter's input).
        scores: ``(Q, K)`` cosine scores of each query's ``K`` candidate documents.
        adapter: the fitted map (:func:`fit_cosine_adapter`).

    Returns:
        ``(Q, K)`` relevance in ``(0, 1)``, in the dtype of the inputs; increasing in
        ``scores`` along each row.
    """
    e, c = check_inputs(query_embeddings, scores, adapter.dim)
    return sigmoid(mapped_logits(adapter, e, c))


def filter_relevant(
    query_embeddings: Array, scores: Array, adapter: CosineAdapter, *, threshold: float = 0.5
) -> Array:
    r"""The kept documents, $r(q, d) \ge \tau$ with one global ``threshold`` $\tau$.

    Args:
        query_embeddings: ``(Q, D)`` query embeddings.
        scores: ``(Q, K)`` cosine scores.
        adapter: the fitted map.
        threshold: the global threshold $\tau \in (0, 1)$ on the relevance.

    Returns:
        bool ``(Q, K)``; in each row, the kept documents are a prefix of the cosine ranking.
    """
    tau = check_threshold(threshold)
    return cosine_adapter(query_embeddings, scores, adapter) >= tau


def adapter_loss(
    adapter: CosineAdapter,
    query_embeddings: Array,
    scores: Array,
    labels: Array,
    *,
    weight_decay: float = 0.0,
) -> float:
    r"""Mean binary cross-entropy of $r$ against ``labels`` plus $\tfrac{\lambda}{2}\lVert W\rVert^2$.

    ``labels`` is ``(Q, K)`` of 0/1 (1: relevant). Inputs are not checked here.
    """
    m = mapped_logits(adapter, query_embeddings, scores)  # (Q, K)
    y = labels.astype(m.dtype)
    bce = np.logaddexp(0, m) - y * m  # -[y log sigma(m) + (1 - y) log(1 - sigma(m))]
    return float(bce.mean() + 0.5 * weight_decay * np.sum(adapter.weight**2))


def adapter_gradient(
    adapter: CosineAdapter,
    query_embeddings: Array,
    scores: Array,
    labels: Array,
    *,
    weight_decay: float = 0.0,
) -> tuple[Array, Array]:
    r"""Gradient of :func:`adapter_loss` with respect to ``(W, w_0)``, by the chain rule.

    With $g = (\sigma(m) - y) / (QK)$ per pair: $\partial/\partial\theta_0 = \sum_d g\,
    f(c)\,\sigma(\theta_0)$, $\partial/\partial\theta_1 = \sum_d g$, $\partial/\partial\theta_2
    = \sum_d g\,a\,u^p \log u\;\sigma(\theta_2)$ (power), then $\nabla_W = E^\top
    \nabla_\theta + \lambda W$ and $\nabla_{w_0} = \sum_q \nabla_\theta$.
    """
    e = query_embeddings
    theta = e @ adapter.weight + adapter.bias  # (Q, P)
    params = adapter_params(adapter, e)
    p = params[2] if adapter.transform == "power" else None
    f = _shape(adapter.transform, scores, p)  # (Q, K)
    m = params[0][:, None] * f + params[1][:, None]  # (Q, K)
    g = (sigmoid(m) - labels.astype(m.dtype)) / m.size  # (Q, K)
    grad_theta = np.empty_like(theta)  # (Q, P)
    grad_theta[:, 0] = (g * f).sum(axis=1) * sigmoid(theta[:, 0])
    grad_theta[:, 1] = g.sum(axis=1)
    if p is not None:
        u = np.clip((1 + scores) / 2, 0, 1)  # (Q, K)
        log_u = np.log(np.where(u > 0, u, 1))  # u**p * log(u) -> 0 as u -> 0
        grad_theta[:, 2] = (g * params[0][:, None] * f * log_u).sum(axis=1) * sigmoid(theta[:, 2])
    return e.T @ grad_theta + weight_decay * adapter.weight, grad_theta.sum(axis=0)


def fit_cosine_adapter(
    query_embeddings: Array,
    scores: Array,
    labels: Array,
    *,
    transform: Transform = "linear",
    steps: int = 1000,
    lr: float = 0.1,
    weight_decay: float = 1e-3,
) -> CosineAdapter:
    r"""Fit the adapter on labelled pairs by full-batch Adam on :func:`adapter_loss`.

    Starts from $W = 0$ and $w_0 = (\operatorname{softplus}^{-1}(1), 0[, \operatorname{softplus}
    ^{-1}(1)])$ (every query the same map $m = f(c)$), so the fit is deterministic. Works in
    float64 whatever the input dtype; the returned weights are float64.

    Args:
        query_embeddings: ``(Q, D)`` training query embeddings.
        scores: ``(Q, K)`` cosine scores of each training query's candidates.
        labels: ``(Q, K)`` 0/1 or bool, 1 where the candidate is relevant.
        transform: ``"linear"``, ``"sqrt"``, ``"quadratic"`` or ``"power"``.
        steps: Adam steps.
        lr: Adam step size.
        weight_decay: $\lambda$, the L2 penalty on $W$.

    Returns:
        The fitted :class:`CosineAdapter`.
    """
    check_transform(transform)
    e, c = check_inputs(query_embeddings, scores)
    y = np.asarray(labels)
    if y.shape != c.shape:
        raise ShapeError(f"labels: expected the shape {c.shape} of scores, got {y.shape}")
    if not (y.dtype == np.bool_ or np.isin(y, (0, 1)).all()):
        raise ParameterError("labels: expected bool or 0/1 entries (1 = relevant)")
    steps = checks.top_count("steps", steps, 10**7, "Adam steps")
    for name, value in (("lr", lr), ("weight_decay", weight_decay)):
        if not np.isfinite(value) or value < 0 or (name == "lr" and value == 0):
            raise ParameterError(f"{name}: expected a finite number >= 0 (lr > 0), got {value!r}")
    e, c, y = e.astype(np.float64), c.astype(np.float64), y.astype(np.float64)
    P = TRANSFORMS[transform]
    one = np.log(np.expm1(1.0))  # softplus^{-1}(1)
    weight, bias = np.zeros((e.shape[1], P)), np.array([one, 0.0, one][:P])
    moments = (
        [np.zeros_like(weight), np.zeros_like(bias)],
        [np.zeros_like(weight), np.zeros_like(bias)],
    )
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    for t in range(1, steps + 1):
        grads = adapter_gradient(
            CosineAdapter(weight, bias, transform), e, c, y, weight_decay=weight_decay
        )
        for i, (x, grad) in enumerate(zip((weight, bias), grads, strict=True)):
            moments[0][i] = beta1 * moments[0][i] + (1 - beta1) * grad
            moments[1][i] = beta2 * moments[1][i] + (1 - beta2) * grad**2
            m_hat = moments[0][i] / (1 - beta1**t)
            v_hat = moments[1][i] / (1 - beta2**t)
            x -= lr * m_hat / (np.sqrt(v_hat) + eps)
    return CosineAdapter(weight, bias, transform)


def precision_recall(kept: Array, labels: Array) -> tuple[float, float, float]:
    r"""Micro-averaged precision, recall and F1 of a kept set against relevance labels.

    Over all queries together: $P = TP / |\text{kept}|$, $R = TP / |\text{relevant}|$,
    $F_1 = 2PR / (P + R)$; a quantity whose denominator is 0 is reported as 0.

    Args:
        kept: bool ``(Q, K)``, the returned documents.
        labels: ``(Q, K)`` 0/1 or bool, the relevant ones.

    Returns:
        ``(precision, recall, f1)``.
    """
    kept, rel = np.asarray(kept, dtype=bool), np.asarray(labels, dtype=bool)
    if kept.shape != rel.shape:
        raise ShapeError(f"kept, labels: expected one shape, got {kept.shape} and {rel.shape}")
    tp = float((kept & rel).sum())
    precision = tp / kept.sum() if kept.any() else 0.0
    recall = tp / rel.sum() if rel.any() else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return float(precision), float(recall), float(f1)


__all__ = [
    "TRANSFORMS",
    "CosineAdapter",
    "adapter_gradient",
    "adapter_loss",
    "adapter_params",
    "cosine_adapter",
    "filter_relevant",
    "fit_cosine_adapter",
    "precision_recall",
]
