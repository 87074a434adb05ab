r"""Positional attention: weights from positional encodings only (Back de Luca et al., arXiv 2410.01686).

*Positional Attention: Expressivity and Learnability of Algorithmic Computation* (ICML 2025).
Official code: `opallab/positional_attention <https://github.com/opallab/positional_attention>`_
(``model.py``).

Many parallel algorithms move data between processors by address alone: processor $i$ reads
processor $i - 2^\ell$ at step $\ell$, whatever the data holds. Positional attention gives a
Transformer exactly that kind of communication: the queries and keys are computed from the
positional encodings $P \in \mathbb{R}^{N \times d_p}$ alone, and only the values see the
input $X \in \mathbb{R}^{N \times d}$. For head $h$,

$$
A_h = \operatorname{softmax}\!\Big(\text{scale}\;(P W^Q_h + b^Q_h)(P W^K_h + b^K_h)^\top\Big),
\qquad
O = \sum_h A_h\,(X W^V_h + b^V_h)\,W^O_h + b^O,
$$

with $\text{scale} = 1/\sqrt{d_k}$. Two consequences, which the tests check:

* the attention weights $A_h$ are **the same for every input** $X$ (they are computed once per
  forward pass and shared by the whole batch);
* the output is **linear in** $X$ (affine with the value and output biases): the layer is a
  fixed linear map of the input, chosen by the positions.

**As in the official code.** Per-head queries and keys have dimension $d_k = d_p$ (one linear
map ``qk_proj: d_p -> 2 d_p H`` with bias, split into $q$ and $k$); values and output are
``nn.Linear`` maps of the model width; there is no mask and the softmax scale is
$1/\sqrt{d_p}$. The experiments use one-hot positions, $P = I_N$ (``identity_pe``), so each
head's score matrix can be any $N \times N$ matrix of rank up to $d_k$. The weights here are a
:class:`PositionalAttentionWeights` of per-head matrices, so $d_k$ may differ from $d_p$; the
official layer is the case $d_k = d_p$. A layer of the code is
``MLP(concat[x, attention(x, p)])`` with no residual and no normalisation: the MLP belongs to the
caller (the tutorial builds it in torch). ``causal`` is an addition for prefix tasks.

**Batch folding.** Since $A_h$ does not depend on the input, a batch of $B$ inputs needs one
attention call, not $B$: the batch is folded into the value features,
$V \in \mathbb{R}^{H \times N \times (B\,d_v)}$, and $A_h V$ computes every sample at once. The
reference calls :func:`qkv.reference.core.sdpa` that way; :func:`dispatched_positional_attention`
(``qkv.positional_attention``) calls the dispatched ``qkv.sdpa``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from qkv import _arrays, _checks
from qkv.errors import ParameterError, ShapeError
from qkv.reference import core

Array = np.ndarray


def _matrix_shape(name: str, x: Any, shape: tuple[int | None, ...], layout: str) -> None:
    """``x`` is a float array whose shape matches ``shape`` (``None`` = any size)."""
    _checks.array(name, x, rank=len(shape), layout=layout)
    if any(s is not None and s != g for s, g in zip(shape, x.shape, strict=True)):
        expected = tuple("any" if s is None else s for s in shape)
        raise ShapeError(f"{name}: expected {layout} = {expected}, got {tuple(x.shape)}")


@dataclass(frozen=True)
class PositionalAttentionWeights:
    """The learned weights of one positional attention layer (per-head matrices).

    Attributes:
        w_q: query map of the positional encodings ``(H, d_p, d_k)``.
        w_k: key map of the positional encodings ``(H, d_p, d_k)``.
        w_v: value map of the input ``(H, d, d_v)``.
        w_o: output map ``(H, d_v, d_out)``; ``None`` returns the heads concatenated.
        b_q: query bias ``(H, d_k)`` or ``None``.
        b_k: key bias ``(H, d_k)`` or ``None``.
        b_v: value bias ``(H, d_v)`` or ``None``.
        b_o: output bias ``(d_out,)`` or ``None`` (needs ``w_o``).

    The shapes are checked against each other at construction (``ShapeError``).
    """

    w_q: Array
    w_k: Array
    w_v: Array
    w_o: Array | None = None
    b_q: Array | None = None
    b_k: Array | None = None
    b_v: Array | None = None
    b_o: Array | None = None

    def __post_init__(self) -> None:
        _matrix_shape("w_q", self.w_q, (None, None, None), "(H, d_p, d_k)")
        H, P, Dk = self.w_q.shape
        _matrix_shape("w_k", self.w_k, (H, P, Dk), "(H, d_p, d_k)")
        _matrix_shape("w_v", self.w_v, (H, None, None), "(H, d, d_v)")
        Dv = self.w_v.shape[2]
        if self.w_o is not None:
            _matrix_shape("w_o", self.w_o, (H, Dv, None), "(H, d_v, d_out)")
        for name, bias, size in (
            ("b_q", self.b_q, Dk),
            ("b_k", self.b_k, Dk),
            ("b_v", self.b_v, Dv),
        ):
            if bias is not None:
                _matrix_shape(name, bias, (H, size), f"(H, {'d_v' if name == 'b_v' else 'd_k'})")
        if self.b_o is not None:
            if self.w_o is None:
                raise ShapeError("b_o: expected None without w_o (no output map to add it to)")
            _matrix_shape("b_o", self.b_o, (self.w_o.shape[2],), "(d_out,)")

    @property
    def n_heads(self) -> int:
        return int(self.w_q.shape[0])

    @classmethod
    def random(
        cls,
        rng: np.random.Generator,
        *,
        n_heads: int,
        pos_dim: int,
        d_model: int,
        head_dim: int | None = None,
        dtype: Any = np.float64,
    ) -> PositionalAttentionWeights:
        """Weights drawn like the official layer's: Xavier-uniform matrices and zero biases.

        Args:
            rng: the random generator.
            n_heads: ``H``.
            pos_dim: ``d_p``, which is also ``d_k`` as in the official code.
            d_model: the model width ``d``, of the input and of the output.
            head_dim: ``d_v``; default ``d_model // n_heads``.
            dtype: of every array.
        """
        H = _checks.positive_int("n_heads", n_heads)
        P = _checks.positive_int("pos_dim", pos_dim)
        d = _checks.positive_int("d_model", d_model)
        Dv = _checks.positive_int("head_dim", d // H if head_dim is None else head_dim)

        def xavier(fan_in: int, fan_out: int, shape: tuple[int, ...]) -> Array:
            bound = np.sqrt(6.0 / (fan_in + fan_out))
            return rng.uniform(-bound, bound, shape).astype(dtype)

        return cls(
            w_q=xavier(P, 2 * P * H, (H, P, P)),
            w_k=xavier(P, 2 * P * H, (H, P, P)),
            w_v=xavier(d, H * Dv, (H, d, Dv)),
            w_o=xavier(H * Dv, d, (H, Dv, d)),
            b_q=np.zeros((H, P), dtype),
            b_k=np.zeros((H, P), dtype),
            b_v=np.zeros((H, Dv), dtype),
            b_o=np.zeros(d, dtype),
        )


def check_positional_attention(
    x: Any, p: Any, weights: Any, *, scale: float | None = None, causal: bool = False, **_: Any
) -> tuple[int, int, int]:
    """Check the arguments; return ``(B, N, d)``.

    Raises ``TypeError`` when ``weights`` is not a :class:`PositionalAttentionWeights`,
    ``ShapeError`` for ``x`` not ``(B, N, d)``, positional encodings ``p`` not ``(N, d_p)``
    (one row per token of ``x``, the width of the weights), ``DTypeError`` for non-float or
    differing dtypes of ``x`` and ``p``, ``ParameterError`` for a bad ``scale`` or ``causal``.
    """
    if not isinstance(weights, PositionalAttentionWeights):
        raise TypeError(
            f"weights: expected a PositionalAttentionWeights, got {type(weights).__name__}"
        )
    _checks.array("x", x, rank=3, layout="(B, N, d)")
    _checks.array("p", p, rank=2, layout="(N, d_p)")
    _checks.same_dtype(x=x, p=p)
    B, N, d = x.shape
    H, P, _ = weights.w_q.shape
    if tuple(p.shape) != (N, P):
        raise ShapeError(
            f"p: expected positional encodings (N, d_p) = ({N}, {P}), one row per token of x "
            f"and the width of w_q, got {tuple(p.shape)}"
        )
    if weights.w_v.shape[1] != d:
        raise ShapeError(f"x: expected width d = {weights.w_v.shape[1]} as w_v, got {d}")
    if not isinstance(causal, (bool, np.bool_)):
        raise ParameterError(f"causal: expected a bool, got {causal!r}")
    if scale is not None and not (
        isinstance(scale, (int, float, np.integer, np.floating))
        and not isinstance(scale, bool)
        and math.isfinite(scale)
        and scale > 0
    ):
        raise ParameterError(f"scale: expected a finite number > 0 or None, got {scale!r}")
    return B, N, d


def _positional_attention(
    x: Array,
    p: Array,
    weights: PositionalAttentionWeights,
    attend: Callable[..., Any],
    *,
    scale: float | None,
    causal: bool,
    return_weights: bool = False,
) -> Array | tuple[Array, Array]:
    """The layer on checked NumPy arrays, with the softmax attention done by ``attend``."""
    B, N, d = x.shape
    H, _, Dk = weights.w_q.shape
    Dv = weights.w_v.shape[2]
    work = core._work_dtype(x.dtype)

    def cast(a: Array | None) -> Array | None:
        return None if a is None else np.asarray(a).astype(work, copy=False)

    pw, xw = p.astype(work, copy=False), x.astype(work, copy=False)
    q = np.einsum("np,hpk->hnk", pw, cast(weights.w_q))  # (H, N, d_k): from positions only
    k = np.einsum("np,hpk->hnk", pw, cast(weights.w_k))  # (H, N, d_k)
    v = np.einsum("bnd,hdv->hnbv", xw, cast(weights.w_v))  # (H, N, B, d_v): from the input
    if weights.b_q is not None:
        q = q + cast(weights.b_q)[:, None]  # (H, N, d_k)
    if weights.b_k is not None:
        k = k + cast(weights.b_k)[:, None]  # (H, N, d_k)
    if weights.b_v is not None:
        v = v + cast(weights.b_v)[:, None, None]  # (H, N, B, d_v)
    folded = v.reshape(1, H, N, B * Dv)  # (1, H, N, B d_v): the batch folded into features
    s = 1.0 / np.sqrt(Dk) if scale is None else scale
    result = attend(q[None], k[None], folded, scale=s, causal=causal, return_weights=return_weights)
    out, a = result if return_weights else (result, None)
    heads = np.asarray(out).reshape(H, N, B, Dv)  # (H, N, B, d_v)
    if weights.w_o is None:
        y = heads.transpose(2, 1, 0, 3).reshape(B, N, H * Dv)  # (B, N, H d_v), heads concatenated
    else:
        y = np.einsum("hnbv,hvo->bno", heads, cast(weights.w_o))  # (B, N, d_out)
        if weights.b_o is not None:
            y = y + cast(weights.b_o)  # (B, N, d_out)
    y = y.astype(x.dtype, copy=False)
    return (y, np.asarray(a)[0]) if return_weights else y  # weights (H, N, N)


def positional_attention(
    x: Array,
    p: Array,
    weights: PositionalAttentionWeights,
    *,
    scale: float | None = None,
    causal: bool = False,
    return_weights: bool = False,
) -> Array | tuple[Array, Array]:
    r"""Multi-head positional attention, $O = \sum_h \operatorname{softmax}(s\,Q_h K_h^\top)\,V_h W^O_h$.

    $Q_h = P W^Q_h + b^Q_h$ and $K_h = P W^K_h + b^K_h$ come from the positional encodings,
    $V_h = X W^V_h + b^V_h$ from the input (see the module docstring).

    Args:
        x: the input ``(B, N, d)``.
        p: positional encodings ``(N, d_p)`` shared by the batch (one-hot ``eye(N)`` in the
            official experiments), in the dtype of ``x``.
        weights: the layer's :class:`PositionalAttentionWeights`.
        scale: multiplies $Q_h K_h^\top$; default $1/\sqrt{d_k}$.
        causal: token ``i`` attends only tokens ``j <= i`` (not in the official code).
        return_weights: also return the attention weights ``(H, N, N)``, one matrix per head
            for the whole batch.

    Returns:
        ``O (B, N, d_out)`` (``(B, N, H d_v)`` without ``w_o``) in the dtype of ``x``, float64
        arithmetic for float64; or ``(O, A)`` with ``return_weights``.
    """
    check_positional_attention(x, p, weights, scale=scale, causal=causal)
    return _positional_attention(
        x, p, weights, core.sdpa, scale=scale, causal=causal, return_weights=return_weights
    )


def dispatched_positional_attention(
    x: Any,
    p: Any,
    weights: PositionalAttentionWeights,
    *,
    scale: float | None = None,
    causal: bool = False,
    backend: Any = None,
) -> Any:
    """Positional attention with its one softmax call run by the dispatched ``qkv.sdpa``.

    Same arguments and result as :func:`positional_attention` (without ``return_weights``),
    plus ``backend=`` (a name or module; default: the backend of ``qkv.use_backend`` /
    ``QKV_BACKEND``). The projections run in NumPy. Arrays of any kind are accepted and the
    result has the type of ``x`` (torch tensors are detached: no gradient flows through it).
    """
    import qkv  # here, not at the top: qkv's __init__ imports this module

    xn, pn = _arrays.to_numpy(x), _arrays.to_numpy(p)
    check_positional_attention(xn, pn, weights, scale=scale, causal=causal)

    def attend(*args: Any, return_weights: bool, **kwargs: Any) -> Any:
        return qkv.sdpa(*args, backend=backend, **kwargs)

    out = _positional_attention(xn, pn, weights, attend, scale=scale, causal=causal)
    return _arrays.from_numpy(out, x)
