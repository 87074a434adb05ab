r"""CODA-Prompt: decomposed, attention-weighted prompts (Smith et al., "CODA-Prompt: COntinual
Decomposed Attention-based Prompting for Rehearsal-Free Continual Learning", arXiv 2211.13218;
official code: `GT-RIPL/CODA-Prompt <https://github.com/GT-RIPL/CODA-Prompt>`_,
``models/zoo.py``).

A frozen vision transformer learns new tasks through prompts. CODA-Prompt keeps a pool of $M$
prompt **components** $P_m \in \mathbb{R}^{L_p \times D}$, each with a **key** $K_m$ and an
**attention vector** $A_m$ (both in $\mathbb{R}^D$). The query $x$ is the frozen model's
``[CLS]`` feature; the component weights are cosines of the attention-masked query with the
keys, and the prompt is their weighted sum:

$$
\alpha_m = \cos(x \odot A_m,\; K_m)
= \frac{\langle x \odot A_m, K_m\rangle}{\lVert x \odot A_m\rVert\,\lVert K_m\rVert},
\qquad p = \sum_{m=1}^{M} \alpha_m P_m .
$$

The prompt enters a layer by **prefix-tuning**: its first $L_p/2$ rows $p_k$ are prepended to
that layer's keys and the rest $p_v$ to its values,

$$
\operatorname{Attn}\big(x W_Q,\; [p_k; x W_K],\; [p_v; x W_V]\big),
$$

(heads split $D$ as usual; the prefixes are not projected, as in the code). Continual learning
grows the pool task by task: the components of past tasks are frozen and, at evaluation, the
first ``n_active`` are used. An **orthogonality penalty** $\lVert T T^\top - I\rVert^2$ on the
rows of $P$, $K$ and $A$ (flattened) keeps new components away from old ones; the code averages
the squared entries, multiplies by $\mu = 0.1$ and by $10^{-6}$ (its defaults ``100 8 0.1``:
$M = 100$, $L_p = 8$, $\mu = 0.1$).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qkv import _checks
from qkv.errors import ParameterError, ShapeError
from qkv.reference import core

Array = np.ndarray
#: The official ``100 8 0.1``: components, prompt length, orthogonality weight.
DEFAULT_COMPONENTS = 100
DEFAULT_PROMPT_LENGTH = 8
DEFAULT_MU = 0.1


@dataclass(frozen=True)
class PromptPool:
    """CODA-Prompt's learnable pool for one layer.

    Attributes:
        components: $P$ ``(M, Lp, D)``.
        keys: $K$ ``(M, D)``.
        attention: $A$ ``(M, D)``.
    """

    components: Array
    keys: Array
    attention: Array


def _check_pool(x: Array, pool: PromptPool, n_active: int | None) -> int:
    _checks.array("x", x, rank=2, layout="(B, D)")
    _checks.array("components", pool.components, rank=3, layout="(M, Lp, D)")
    _checks.array("keys", pool.keys, rank=2, layout="(M, D)")
    _checks.array("attention", pool.attention, rank=2, layout="(M, D)")
    M, Lp, D = pool.components.shape
    for name in ("keys", "attention"):
        if getattr(pool, name).shape != (M, D):
            raise ShapeError(
                f"{name}: expected (M, D) = {(M, D)} as components, got {getattr(pool, name).shape}"
            )
    if x.shape[1] != D:
        raise ShapeError(f"x: expected feature dim D = {D}, got {x.shape}")
    _checks.same_dtype(x=x, components=pool.components, keys=pool.keys, attention=pool.attention)
    if n_active is None:
        return M
    n_active = _checks.positive_int("n_active", n_active)
    if n_active > M:
        raise ParameterError(f"n_active: expected at most M = {M} components, got {n_active}")
    return n_active


def _unit(x: Array) -> Array:
    """Rows of ``x`` over their ℓ2 norm (a zero row stays zero)."""
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(n > 0, n, 1.0)


def coda_prompt(
    x: Array, pool: PromptPool, *, n_active: int | None = None, return_weights: bool = False
) -> Array | tuple[Array, Array]:
    r"""The assembled prompt $p = \sum_m \cos(x \odot A_m, K_m)\, P_m$ of each query.

    Args:
        x: query features ``(B, D)`` (the frozen encoder's ``[CLS]``).
        pool: the components, keys and attention vectors.
        n_active: use components ``[0, n_active)`` (the tasks seen so far); default all.
        return_weights: also return $\alpha$ ``(B, n_active)``.

    Returns:
        ``p (B, Lp, D)`` in the dtype of ``x``, or ``(p, alpha)``.
    """
    f = _check_pool(x, pool, n_active)
    work = core._work_dtype(x.dtype)
    xw = x.astype(work, copy=False)
    a = pool.attention[:f].astype(work, copy=False)  # (f, D)
    k = pool.keys[:f].astype(work, copy=False)  # (f, D)
    masked = xw[:, None, :] * a[None]  # (B, f, D): x ⊙ A_m
    alpha = (_unit(masked) * _unit(k)[None]).sum(axis=-1)  # (B, f)
    p = np.einsum("bm,mld->bld", alpha, pool.components[:f].astype(work, copy=False))  # (B,Lp,D)
    p = p.astype(x.dtype, copy=False)
    return (p, alpha.astype(x.dtype, copy=False)) if return_weights else p


def orthogonality_penalty(t: Array) -> float:
    r"""$\operatorname{mean}\big((T T^\top - I)^2\big)$ over the ``M`` rows of ``t`` (each
    flattened); 0 exactly when the rows are orthonormal.

    Args:
        t: ``(M, ...)``, e.g. components ``(M, Lp, D)``, keys or attention ``(M, D)``.
    """
    _checks.array("t", t, rank=np.ndim(t), layout="(M, ...)")
    flat = t.reshape(t.shape[0], -1).astype(np.float64)  # (M, Lp * D)
    gram = flat @ flat.T  # (M, M)
    return float(((gram - np.eye(t.shape[0])) ** 2).mean())


def prefix_attention(
    x: Array,
    prompt: Array | None,
    w_q: Array,
    w_k: Array,
    w_v: Array,
    *,
    heads: int,
) -> Array:
    r"""Prefix-tuning of one attention layer: $\operatorname{Attn}(xW_Q, [p_k; xW_K],
    [p_v; xW_V])$ with $p_k$, $p_v$ the two halves of the prompt.

    Args:
        x: tokens ``(B, N, D)``.
        prompt: $p$ ``(B, Lp, D)``, ``Lp`` even (:func:`coda_prompt`); ``None``: no prefix
            (the frozen layer itself).
        w_q: ``(D, D)``.
        w_k: ``(D, D)``.
        w_v: ``(D, D)``.
        heads: attention heads (dividing ``D``).

    Returns:
        ``(B, N, D)`` (heads concatenated; the output projection is the caller's).
    """
    _checks.array("x", x, rank=3, layout="(B, N, D)")
    B, N, D = x.shape
    heads = _checks.positive_int("heads", heads)
    if D % heads:
        raise ShapeError(f"heads: expected to divide D = {D}, got {heads}")
    dh = D // heads
    k, v = x @ w_k, x @ w_v  # (B, N, D)
    if prompt is not None:
        _checks.array("prompt", prompt, rank=3, layout="(B, Lp, D)")
        Lp = prompt.shape[1]
        if prompt.shape[0] != B or prompt.shape[2] != D:
            raise ShapeError(
                f"prompt: expected (B, Lp, D) with B = {B}, D = {D}, got {prompt.shape}"
            )
        if Lp % 2:
            raise ShapeError(f"prompt: expected an even length Lp (keys, then values), got {Lp}")
        k = np.concatenate([prompt[:, : Lp // 2], k], axis=1)  # (B, Lp/2 + N, D)
        v = np.concatenate([prompt[:, Lp // 2 :], v], axis=1)  # (B, Lp/2 + N, D)

    def split(y: Array) -> Array:
        return y.reshape(B, y.shape[1], heads, dh).transpose(0, 2, 1, 3)  # (B, H, n, dh)

    out = core.sdpa(split(x @ w_q), split(k), split(v))  # (B, H, N, dh)
    return out.transpose(0, 2, 1, 3).reshape(B, N, D)  # (B, N, D)
