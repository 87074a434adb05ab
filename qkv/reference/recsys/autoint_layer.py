r"""AutoInt: multi-head self-attention over feature fields (Song et al., "AutoInt: Automatic
Feature Interaction Learning via Self-Attentive Neural Networks", arXiv 1810.11921; official
code: `shichence/AutoInt <https://github.com/shichence/AutoInt>`_, ``model.py``).

A click-through-rate model sees a record as $F$ **fields** (user id, age, item category, ...),
each embedded into $\mathbb{R}^d$: $e_1, \dots, e_F$. AutoInt lets every field attend to every
other field, so that one layer forms second-order feature interactions and a stack of layers
higher orders. For head $h$ with projections $W_Q^{(h)}, W_K^{(h)}, W_V^{(h)} \in
\mathbb{R}^{d' \times d}$ (the paper's equations 5-8):

$$
\alpha^{(h)}_{m,k} = \frac{\exp\langle W_Q^{(h)} e_m, W_K^{(h)} e_k\rangle}
{\sum_{l=1}^{F} \exp\langle W_Q^{(h)} e_m, W_K^{(h)} e_l\rangle}, \qquad
\tilde e^{(h)}_m = \sum_{k=1}^{F} \alpha^{(h)}_{m,k}\, W_V^{(h)} e_k,
$$

$$
\tilde e_m = \tilde e^{(1)}_m \oplus \dots \oplus \tilde e^{(H)}_m, \qquad
e^{\mathrm{Res}}_m = \operatorname{ReLU}\big(\tilde e_m + W_{\mathrm{Res}}\, e_m\big),
$$

with $\oplus$ concatenation. The paper's score is the plain inner product (no $1/\sqrt{d'}$)
and its projections are linear. The released code differs: $Q, K, V$ and the residual are
``ReLU(Dense(e))``, the scores are scaled by $1/\sqrt{d'}$, and a LayerNorm ($\epsilon = 10^{-8}$; its
gain and bias, initialised to 1 and 0, are left to the caller) follows the ReLU. :func:`autoint` computes
the paper's form by default and the code's with ``released_code=True``. The code's defaults are
3 layers of 2 heads with $H d' = 64$; the prediction is a linear map of the flattened fields
(:func:`autoint_logit`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from qkv import _checks
from qkv.errors import ParameterError, ShapeError
from qkv.reference import core

Array = np.ndarray
#: The released code's LayerNorm epsilon.
CODE_LN_EPS = 1e-8


@dataclass(frozen=True)
class AutoIntLayer:
    """Weights of one interacting layer (right-multiplied: ``x @ w``).

    Attributes:
        w_q: $W_Q$ of all heads side by side, ``(d, H * d')``.
        w_k: $W_K$, ``(d, H * d')``.
        w_v: $W_V$, ``(d, H * d')``.
        w_res: $W_{\\mathrm{Res}}$, ``(d, H * d')``.
    """

    w_q: Array
    w_k: Array
    w_v: Array
    w_res: Array


def embed_fields(ids: Array, tables: Sequence[Array]) -> Array:
    r"""Field embeddings $e_f = E_f[\text{id}_f]$, one table per categorical field.

    Args:
        ids: integer ids ``(B, F)``; column ``f`` indexes ``tables[f]``.
        tables: ``F`` embedding tables, table ``f`` of shape ``(V_f, d)``, one dtype.

    Returns:
        ``(B, F, d)``.
    """
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.dtype.kind not in "iu":
        raise ShapeError(f"ids: expected integers (B, F), got {ids.dtype} {ids.shape}")
    if len(tables) != ids.shape[1]:
        raise ShapeError(
            f"tables: expected one table per field, F = {ids.shape[1]} (ids.shape[1]), "
            f"got {len(tables)} tables"
        )
    for f, table in enumerate(tables):
        _checks.array(f"tables[{f}]", table, rank=2, layout="(V_f, d)")
        if table.shape[1] != tables[0].shape[1]:
            raise ShapeError(f"tables[{f}]: expected d = {tables[0].shape[1]}, got {table.shape}")
        if ids[:, f].min() < 0 or ids[:, f].max() >= table.shape[0]:
            raise ParameterError(f"ids[:, {f}]: expected ids in [0, {table.shape[0]})")
    _checks.same_dtype(**{f"tables[{f}]": t for f, t in enumerate(tables)})
    return np.stack([table[ids[:, f]] for f, table in enumerate(tables)], axis=1)  # (B, F, d)


def check_layer(e: Array, layer: AutoIntLayer, heads: int) -> tuple[int, int]:
    """Check ``e (B, F, d)`` against a layer; return ``(H, d')``."""
    _checks.array("e", e, rank=3, layout="(B, F, d)")
    heads = _checks.positive_int("heads", heads)
    d = e.shape[2]
    widths = set()
    for name in ("w_q", "w_k", "w_v", "w_res"):
        w = getattr(layer, name)
        _checks.array(name, w, rank=2, layout="(d, H * d')")
        if w.shape[0] != d:
            raise ShapeError(f"{name}: expected {d} input rows (the field dim d), got {w.shape}")
        _checks.same_dtype(e=e, **{name: w})
        widths.add(w.shape[1])
    if len(widths) != 1:
        raise ShapeError(f"w_q, w_k, w_v, w_res: expected one output width, got {sorted(widths)}")
    width = widths.pop()
    if width % heads:
        raise ShapeError(f"heads: expected to divide the width H * d' = {width}, got {heads}")
    return heads, width // heads


def _layer_norm(x: Array, eps: float) -> Array:
    """LayerNorm over the last axis at its initial gain 1 and bias 0 (the code's ``normalize``)."""
    mean = x.mean(axis=-1, keepdims=True)
    var = x.var(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps)


def autoint(e: Array, layer: AutoIntLayer, *, heads: int = 2, released_code: bool = False) -> Array:
    r"""One interacting layer: $e^{\mathrm{Res}}_m = \operatorname{ReLU}(\oplus_h \tilde e^{(h)}_m
    + W_{\mathrm{Res}} e_m)$ (see the module docstring).

    Args:
        e: field embeddings ``(B, F, d)``.
        layer: the projections, each ``(d, H * d')``.
        heads: $H$ (the code's default 2).
        released_code: the official code's variant: ReLU on $Q$, $K$, $V$ and the residual
            branch, scores scaled by $1/\sqrt{d'}$, and a LayerNorm after the final ReLU.

    Returns:
        ``(B, F, H * d')`` in the dtype of ``e`` (float64 arithmetic for float64).
    """
    H, dh = check_layer(e, layer, heads)
    B, F, _ = e.shape
    work = core._work_dtype(e.dtype)
    x = e.astype(work, copy=False)  # (B, F, d)
    act = (lambda t: np.maximum(t, 0.0)) if released_code else (lambda t: t)

    def split(w: Array) -> Array:
        y = act(x @ w.astype(work, copy=False))  # (B, F, H * d')
        return y.reshape(B, F, H, dh).transpose(0, 2, 1, 3)  # (B, H, F, d')

    q, k, v = split(layer.w_q), split(layer.w_k), split(layer.w_v)
    scale = 1.0 / np.sqrt(dh) if released_code else 1.0
    heads_out = core.sdpa(q, k, v, scale=scale)  # (B, H, F, d')
    tilde = heads_out.transpose(0, 2, 1, 3).reshape(B, F, H * dh)  # (B, F, H * d')
    out = np.maximum(tilde + act(x @ layer.w_res.astype(work, copy=False)), 0.0)  # (B, F, H d')
    if released_code:
        out = _layer_norm(out, CODE_LN_EPS)
    return out.astype(e.dtype, copy=False)


def autoint_logit(
    e: Array,
    layers: Sequence[AutoIntLayer],
    w_out: Array,
    b_out: float = 0.0,
    *,
    heads: int = 2,
    released_code: bool = False,
) -> Array:
    r"""The CTR logit $\hat y = w^\top(e^{\mathrm{Res}}_1 \oplus \dots \oplus e^{\mathrm{Res}}_F)
    + b$ after a stack of interacting layers (the paper's equation 9 before the sigmoid).

    Args:
        e: field embeddings ``(B, F, d)``.
        layers: the interacting layers, applied in order.
        w_out: ``(F * d_last,)`` with ``d_last`` the last layer's width.
        b_out: the bias $b$.
        heads: heads of every layer.
        released_code: see :func:`autoint`.

    Returns:
        ``(B,)`` logits.
    """
    x = e
    for layer in layers:
        x = autoint(x, layer, heads=heads, released_code=released_code)  # (B, F, H * d')
    flat = x.reshape(x.shape[0], -1)  # (B, F * d_last)
    w_out = np.asarray(w_out)
    if w_out.shape != (flat.shape[1],):
        raise ShapeError(
            f"w_out: expected (F * d_last,) = ({flat.shape[1]},) for {x.shape[1]} fields, "
            f"got {w_out.shape}"
        )
    return flat @ w_out.astype(flat.dtype, copy=False) + b_out
