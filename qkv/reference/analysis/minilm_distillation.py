r"""MiniLM deep self-attention distillation (Wang et al., "MiniLM: Deep Self-Attention
Distillation for Task-Agnostic Compression of Pre-Trained Transformers", arXiv 2002.10957; the
official ``microsoft/unilm/minilm`` release ships models, not the training code).

The student mimics the **last** self-attention layer of the teacher, through two relations
that do not depend on the hidden size, so the student may be narrower. With $A_h$ heads and
$|x|$ tokens, teacher layer $L$ and student layer $M$:

$$
\mathbf{A}_{l,a} = \operatorname{softmax}\Big(\frac{Q_{l,a} K_{l,a}^\top}{\sqrt{d_k}}\Big),
\qquad
\mathcal{L}_{\mathrm{AT}} = \frac{1}{A_h |x|}\sum_{a=1}^{A_h}\sum_{t=1}^{|x|}
D_{\mathrm{KL}}\big(\mathbf{A}^T_{L,a,t} \,\Vert\, \mathbf{A}^S_{M,a,t}\big),
$$

$$
\mathbf{VR}_{l,a} = \operatorname{softmax}\Big(\frac{V_{l,a} V_{l,a}^\top}{\sqrt{d_k}}\Big),
\qquad
\mathcal{L}_{\mathrm{VR}} = \frac{1}{A_h |x|}\sum_{a=1}^{A_h}\sum_{t=1}^{|x|}
D_{\mathrm{KL}}\big(\mathbf{VR}^T_{L,a,t} \,\Vert\, \mathbf{VR}^S_{M,a,t}\big),
$$

and $\mathcal{L} = \mathcal{L}_{\mathrm{AT}} + \mathcal{L}_{\mathrm{VR}}$. The relations are
compared head by head, so teacher and student need the **same number of heads** (their head
dims $d_k$ may differ; each side scales by its own). Both losses are $\ge 0$ and vanish when the
student's relations equal the teacher's. A batch is averaged over its sequences; padded tokens
(``valid``) are neither queries nor keys.

Gradients: with $P^S = \operatorname{softmax}(S)$ row-wise, $\partial D_{\mathrm{KL}}(P^T_t \Vert
P^S_t) / \partial S_{tj} = P^S_{tj} - P^T_{tj}$, and $S = c\,QK^\top$ gives
$\nabla_Q = c\,G K$, $\nabla_K = c\,G^\top Q$; for $S = c\,VV^\top$, $\nabla_V = c\,(G +
G^\top) V$ (:func:`minilm_distill_grad`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from qkv import _checks
from qkv.errors import ShapeError
from qkv.reference import core

Array = np.ndarray


class Relations(NamedTuple):
    """The two relations of one attention layer, each ``(B, H, N, N)``."""

    attention: Array
    value: Array


def relations(q: Array, k: Array, v: Array, valid: Array | None = None) -> Relations:
    r"""$\operatorname{softmax}(QK^\top/\sqrt{d_k})$ and $\operatorname{softmax}(VV^\top/\sqrt{d_k})$.

    Args:
        q: ``(B, H, N, d_k)``.
        k: ``(B, H, N, d_k)``.
        v: ``(B, H, N, d_k)``.
        valid: bool ``(B, N)``, False for padding keys.

    Returns:
        :class:`Relations`, rows over the keys (a padding key gets weight 0).
    """
    mask = None if valid is None else np.asarray(valid)[:, None, None, :]  # (B, 1, 1, N)
    _, attention = core.sdpa(q, k, v, mask=mask, return_weights=True)  # (B, H, N, N)
    _, value = core.sdpa(v, v, v, mask=mask, scale=1.0 / np.sqrt(q.shape[-1]), return_weights=True)
    return Relations(attention, value)


def check_distill(
    teacher: tuple[Array, Array, Array],
    student: tuple[Array, Array, Array],
    valid: Array | None = None,
) -> tuple[int, int, int]:
    """Check teacher and student ``(q, k, v)``; return ``(B, H, N)``."""
    for who, qkv in (("teacher", teacher), ("student", student)):
        if len(qkv) != 3:
            raise ShapeError(f"{who}: expected a triple (q, k, v), got {len(qkv)} arrays")
        for name, x in zip("qkv", qkv, strict=True):
            _checks.array(f"{who} {name}", x, rank=4, layout="(B, H, N, d_k)")
        if not (qkv[0].shape == qkv[1].shape == qkv[2].shape):
            raise ShapeError(
                f"{who}: expected q, k, v of one shape (B, H, N, d_k), got "
                f"{[tuple(x.shape) for x in qkv]}"
            )
    B, H, N, _ = teacher[0].shape
    Bs, Hs, Ns, _ = student[0].shape
    if Hs != H:
        raise ShapeError(
            f"student: expected the teacher's head count H = {H} (relations are compared head "
            f"by head), got {Hs}"
        )
    if (Bs, Ns) != (B, N):
        raise ShapeError(f"student: expected (B, N) = {(B, N)} as the teacher, got {(Bs, Ns)}")
    _checks.same_dtype(teacher=teacher[0], student=student[0])
    if valid is not None and (np.asarray(valid).dtype != np.bool_ or np.shape(valid) != (B, N)):
        raise ShapeError(f"valid: expected bool (B, N) = {(B, N)}, got {np.shape(valid)}")
    return B, H, N


def _kl_rows(p: Array, q: Array, rows: Array) -> Array:
    r"""$\sum_a\sum_t D_{\mathrm{KL}}(p_{a,t} \Vert q_{a,t})$ per sequence over the rows kept by
    ``rows (B, N)``: ``(B,)``. Entries with $p = 0$ contribute 0."""
    ratio = np.log(np.where(p > 0, p, 1.0)) - np.log(np.where(p > 0, q, 1.0))
    kl = (p * ratio).sum(axis=-1)  # (B, H, N)
    return (kl * rows[:, None, :]).sum(axis=(1, 2))


def minilm_distill(
    teacher: tuple[Array, Array, Array],
    student: tuple[Array, Array, Array],
    *,
    valid: Array | None = None,
    return_parts: bool = False,
) -> float | tuple[float, float]:
    r"""$\mathcal{L} = \mathcal{L}_{\mathrm{AT}} + \mathcal{L}_{\mathrm{VR}}$ of the last
    attention layers (see the module docstring).

    Args:
        teacher: the teacher's last-layer ``(q, k, v)``, each ``(B, H, N, d_T)``.
        student: the student's last-layer ``(q, k, v)``, each ``(B, H, N, d_S)``; same ``H``.
        valid: bool ``(B, N)``, False for padding tokens.
        return_parts: return ``(L_AT, L_VR)`` instead of the sum.

    Returns:
        the loss, averaged over the batch's sequences (a float).
    """
    B, H, N = check_distill(teacher, student, valid)
    rows = np.ones((B, N)) if valid is None else np.asarray(valid, dtype=np.float64)
    rt = relations(*teacher, valid)
    rs = relations(*student, valid)
    per_seq = H * np.maximum(rows.sum(axis=1), 1.0)  # (B,): A_h |x|
    at = float((_kl_rows(rt.attention, rs.attention, rows) / per_seq).mean())
    vr = float((_kl_rows(rt.value, rs.value, rows) / per_seq).mean())
    return (at, vr) if return_parts else at + vr


def minilm_distill_grad(
    teacher: tuple[Array, Array, Array],
    student: tuple[Array, Array, Array],
    *,
    valid: Array | None = None,
) -> tuple[Array, Array, Array]:
    r"""Analytic gradient of :func:`minilm_distill` with respect to the student's
    ``(q, k, v)``: $G = (P^S - P^T)\,/\,(B A_h |x|)$ per relation, then the chain rule through
    $cQK^\top$ and $cVV^\top$.

    Args:
        teacher: ``(q, k, v)`` of the teacher.
        student: ``(q, k, v)`` of the student.
        valid: bool ``(B, N)``.

    Returns:
        ``(dq, dk, dv)``, shaped as the student's arrays.
    """
    B, H, N = check_distill(teacher, student, valid)
    rows = np.ones((B, N)) if valid is None else np.asarray(valid, dtype=np.float64)
    rt = relations(*teacher, valid)
    rs = relations(*student, valid)
    q, k, v = student
    c = 1.0 / np.sqrt(q.shape[-1])
    weight = (
        rows[:, None, :, None] / (B * H * np.maximum(rows.sum(axis=1), 1.0))[:, None, None, None]
    )
    g_at = (rs.attention - rt.attention) * weight  # (B, H, N, N)
    g_vr = (rs.value - rt.value) * weight  # (B, H, N, N)
    dq = c * g_at @ k  # (B, H, N, d_S)
    dk = c * g_at.swapaxes(-1, -2) @ q  # (B, H, N, d_S)
    dv = c * (g_vr + g_vr.swapaxes(-1, -2)) @ v  # (B, H, N, d_S)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)
