r"""In-context re-ranking (ICR): rank documents by the attention a query pays them.

Paper: *Attention in Large Language Models Yields Efficient Zero-Shot Re-Rankers* (Chen et al.,
arXiv 2410.02642). Official code: https://github.com/OSU-NLP-Group/In-Context-Reranking
(``src/in_context_reranker.py``).

The candidate documents are written into one prompt, documents first and the query last, so the
query's tokens can attend every document token. With $A^{(\ell, h)}$ the attention weights of
layer $\ell$, head $h$ and $\mathcal Q$ the query's token span, each document token $j$ gets

$$
s_j = \sum_{\ell=1}^{L} \sum_{h=1}^{H} \frac{1}{|\mathcal Q|}
\sum_{i \in \mathcal Q} A^{(\ell, h)}_{i j}.
$$

Models pay attention to some tokens whatever the question (the first tokens, punctuation,
recent text), so the same prompt is run again with a content-free query ("N/A") in place of the
real one, giving $s^{\mathrm{NA}}_j$ over the same document tokens, and

$$
d_j = s_j - s^{\mathrm{NA}}_j, \qquad
\mathrm{score}(D) = \sum_{j \in D,\; d_j > \mu_D - 2\sigma_D} d_j,
$$

with $\mu_D$, $\sigma_D$ the mean and (population) standard deviation of $d_j$ over the tokens
of document $D$: tokens far below their document's typical change are dropped as outliers
before the sum (the official code's default ``masked_NA_calibration``). Documents are then
sorted by score, largest first. A query identical to the content-free one gives $d = 0$, so
every score is zero.

:func:`icr` is the pure function of the two attention tensors and the spans: it has no notion
of position, so permuting the documents (their tokens and spans together) permutes the scores.
:mod:`qkv.lab.icr_minilm` runs it with MiniLM as the attention source.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from qkv.errors import ParameterError, ShapeError

Array = np.ndarray
Span = tuple[int, int]

#: The content-free query of the paper's calibration.
CONTENT_FREE = "N/A"


def _attention(name: str, a: Any) -> Array:
    if not isinstance(a, np.ndarray) or a.ndim != 4 or a.shape[2] != a.shape[3] or 0 in a.shape:
        got = tuple(a.shape) if hasattr(a, "shape") else type(a).__name__
        raise ShapeError(f"{name}: expected a NumPy array (L, H, N, N) of weights, got {got}")
    if not np.issubdtype(a.dtype, np.floating):
        raise ShapeError(f"{name}: expected floating attention weights, got {a.dtype}")
    if not np.isfinite(a).all():
        raise ParameterError(f"{name}: expected finite attention weights, got NaN or inf")
    return a


def _span(name: str, span: Any, n: int) -> Span:
    ok = (
        isinstance(span, (tuple, list))
        and len(span) == 2
        and all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in span)
    )
    if not ok or not 0 <= span[0] < span[1] <= n:
        raise ParameterError(
            f"{name}: expected a token span (start, stop) with 0 <= start < stop <= N={n}, "
            f"got {span!r}"
        )
    return int(span[0]), int(span[1])


def token_scores(attention: Array, query: Span) -> Array:
    r"""$s_j$: attention from the query's tokens to every token, mean over the query's tokens,
    summed over layers and heads.

    Args:
        attention: weights ``(L, H, N, N)`` (row ``i`` attends column ``j``).
        query: the query's token span ``(start, stop)``.

    Returns:
        ``s (N,)`` in float64.
    """
    start, stop = _span("query", query, _attention("attention", attention).shape[-1])
    rows = attention[:, :, start:stop].astype(np.float64)  # (L, H, |Q|, N)
    return rows.mean(axis=2).sum(axis=(0, 1))  # (N,)


def calibrated_score(d: Array, *, n_std: float = 2.0) -> float:
    r"""$\sum_j d_j$ over the tokens with $d_j > \mu - n_{std}\,\sigma$ (one document's ``d``)."""
    return float(d[d > d.mean() - n_std * d.std()].sum())


def icr(
    attention: Array,
    calibration: Array | None,
    documents: Sequence[Span],
    query: Span,
    calibration_query: Span | None = None,
    *,
    n_std: float = 2.0,
) -> Array:
    """Score every document by the calibrated attention the query pays its tokens.

    Args:
        attention: weights ``(L, H, N, N)`` of the prompt with the real query.
        calibration: weights ``(L, H, N', N')`` of the same prompt with the content-free query
            in its place (the documents at the same positions), or ``None`` for the
            uncalibrated score $\\sum_{j \\in D} s_j$ (the paper's ablation).
        documents: each document's token span ``(start, stop)`` (same in both prompts).
        query: the query's span in ``attention``.
        calibration_query: the content-free query's span in ``calibration``.
        n_std: outlier cut in standard deviations (default 2, the official code's).

    Returns:
        Scores ``(S,)`` float64, one per document, larger is more relevant.
    """
    if isinstance(documents, (str, bytes)) or not isinstance(documents, Sequence):
        raise TypeError(f"documents: expected a sequence of (start, stop) spans, got {documents!r}")
    if len(documents) == 0:
        raise ParameterError("documents: expected at least one document span, got none")
    if isinstance(n_std, bool) or not isinstance(n_std, (int, float)) or not np.isfinite(n_std):
        raise ParameterError(f"n_std: expected a finite number, got {n_std!r}")
    n = _attention("attention", attention).shape[-1]
    spans = [_span(f"documents[{i}]", s, n) for i, s in enumerate(documents)]
    s_q = token_scores(attention, query)  # (N,)
    if calibration is None:
        return np.array([s_q[a:b].sum() for a, b in spans])  # (S,)
    n_na = _attention("calibration", calibration).shape[-1]
    if calibration.shape[:2] != attention.shape[:2]:
        raise ShapeError(
            f"calibration: expected the layers and heads {attention.shape[:2]} of attention, "
            f"got {calibration.shape[:2]}"
        )
    if calibration_query is None:
        raise ParameterError("calibration_query: expected the content-free query's span, got None")
    for i, (_, b) in enumerate(spans):
        if b > n_na:
            raise ParameterError(
                f"documents[{i}]: expected spans inside the calibration prompt's N'={n_na} "
                f"tokens too, got stop {b}"
            )
    s_na = token_scores(calibration, calibration_query)  # (N',)
    return np.array([calibrated_score(s_q[a:b] - s_na[a:b], n_std=n_std) for a, b in spans])


def ranking(scores: Array) -> Array:
    """Document ids ``(S,)`` by decreasing score, ties to the lower id."""
    return np.argsort(-np.asarray(scores), kind="stable")
