r"""Margin-MSE cross-architecture distillation (Hofstätter et al., "Improving Efficient Neural
Ranking Models with Cross-Architecture Knowledge Distillation", arXiv 2010.02666; official
code and teacher scores: `sebastian-hofstaetter/neural-ranking-kd
<https://github.com/sebastian-hofstaetter/neural-ranking-kd>`_).

Rankers of different architectures output scores on different scales: a concatenated BERT
teacher and a dot-product (ColBERT, BERT-CLS, TK) student cannot match each other's scores,
and need not: a ranking only depends on **differences** of scores for one query. For training
triples $(q, p^+, p^-)$ of a query, a relevant and a non-relevant passage, Margin-MSE matches
the student's margin to the teacher's:

$$
\mathcal{L}(q, p^+, p^-) = \operatorname{MSE}\Big(M_s(q, p^+) - M_s(q, p^-),\;
M_t(q, p^+) - M_t(q, p^-)\Big),
$$

averaged over the batch. Two properties follow from the form: the loss is 0 when the margins
agree, whatever the scores themselves are, and it is unchanged when either model's scores of
one query are shifted by a constant (a per-query offset cancels in the margin).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qkv.errors import DTypeError, ShapeError

Array = np.ndarray


def _scores(name: str, x: Any) -> Array:
    x = np.asarray(x)
    if x.dtype.kind != "f":
        raise DTypeError(f"{name}: expected floating scores, got {x.dtype}")
    if x.ndim != 1 or x.size == 0:
        raise ShapeError(f"{name}: expected scores of one triple each, (n,), got {x.shape}")
    return x


def margin_mse(
    student_pos: Array, student_neg: Array, teacher_pos: Array, teacher_neg: Array
) -> float:
    r"""$\frac1n\sum_i \big((s^+_i - s^-_i) - (t^+_i - t^-_i)\big)^2$ over ``n`` triples.

    Args:
        student_pos: the student's scores of the positives $M_s(q_i, p^+_i)$, ``(n,)``.
        student_neg: the student's scores of the negatives, ``(n,)``.
        teacher_pos: the teacher's scores of the positives, ``(n,)``.
        teacher_neg: the teacher's scores of the negatives, ``(n,)``.

    Returns:
        the loss (a float, computed in float64).
    """
    arrays = {
        "student_pos": _scores("student_pos", student_pos),
        "student_neg": _scores("student_neg", student_neg),
        "teacher_pos": _scores("teacher_pos", teacher_pos),
        "teacher_neg": _scores("teacher_neg", teacher_neg),
    }
    shapes = {name: a.shape for name, a in arrays.items()}
    if len(set(shapes.values())) != 1:
        raise ShapeError(f"scores: expected one shape (n,) for all four, got {shapes}")
    s = arrays["student_pos"].astype(np.float64) - arrays["student_neg"]  # (n,)
    t = arrays["teacher_pos"].astype(np.float64) - arrays["teacher_neg"]  # (n,)
    return float(np.mean((s - t) ** 2))


def margin_mse_grad(
    student_pos: Array, student_neg: Array, teacher_pos: Array, teacher_neg: Array
) -> tuple[Array, Array]:
    r"""Gradients of :func:`margin_mse` with respect to the student's scores:
    $\partial/\partial s^+_i = \frac2n\big((s^+_i - s^-_i) - (t^+_i - t^-_i)\big) =
    -\partial/\partial s^-_i$.

    Args:
        student_pos: ``(n,)``.
        student_neg: ``(n,)``.
        teacher_pos: ``(n,)``.
        teacher_neg: ``(n,)``.

    Returns:
        ``(d_pos, d_neg)``, each ``(n,)`` float64.
    """
    margin_mse(student_pos, student_neg, teacher_pos, teacher_neg)  # the checks
    s = np.asarray(student_pos, np.float64) - np.asarray(student_neg, np.float64)
    t = np.asarray(teacher_pos, np.float64) - np.asarray(teacher_neg, np.float64)
    d = 2.0 * (s - t) / s.size
    return d, -d
