r"""Sparse attention over selected keys: the op every KV-selection method feeds.

A decode-time selection method (and a KV cache whose heads keep different tokens) tells each
query head which cached keys to read. With $\mathcal I_{h,i}$ the selected key indices of query
$i$ in head $h$, and $g(h) = \lfloor h / (H / H_{kv}) \rfloor$ its KV head,

$$
o_{h,i} = \sum_{j \in \mathcal I_{h,i}} \frac{e^{s_{h,i,j}}}{\sum_{j' \in \mathcal I_{h,i}}
e^{s_{h,i,j'}}}\, v_{g(h),j}, \qquad s_{h,i,j} = \text{scale}\cdot q_{h,i}\cdot k_{g(h),j},
\qquad \mathrm{lse}_{h,i} = \log \sum_{j \in \mathcal I_{h,i}} e^{s_{h,i,j}} .
$$

When a selection is split into parts (static sink and window keys, plus retrieved keys; or
key blocks), the partial results combine exactly by their log-sum-exps
(:func:`merge_partials`):

$$
\mathrm{lse} = \log\!\big(e^{\mathrm{lse}_a} + e^{\mathrm{lse}_b}\big), \qquad
o = e^{\mathrm{lse}_a - \mathrm{lse}}\,o_a + e^{\mathrm{lse}_b - \mathrm{lse}}\,o_b .
$$

Indices are padded with ``-1`` (an empty slot reads nothing), so heads may select different
numbers of keys. A query with no selected key gets a zero output and ``lse = -inf``. A key
selected twice is counted twice (selections are expected to be distinct).

An optional per-slot ``bias`` $b_{h,i,t}$ is added to the scaled score of slot $t$,
$s_{h,i,t} = \text{scale}\cdot q_{h,i}\cdot k_{g(h),j_t} + b_{h,i,t}$, in the softmax and in
the log-sum-exp alike. A bias of $\log c$ on a slot weighs its key as if it were listed $c$
times (RazorAttention's compensation token counts the $|\mathcal D|$ tokens it stands for
this way), and $-\infty$ drops the slot. The bias is given per head ``(B, H, S)``, per KV head
``(B, Hkv, S)`` (shared by the query heads of a group) or per query ``(B, H, N, S)``; it is
ignored on empty slots.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qkv import _arrays, _checks
from qkv.errors import DTypeError, ParameterError, ShapeError

Array = np.ndarray


def check_sparse_attention(
    q: Any,
    k: Any,
    v: Any,
    indices: Any,
    *,
    scale: float | None = None,
    bias: Any = None,
    return_lse: bool = False,
) -> _checks.AttentionDims:
    """Check the arguments of :func:`sparse_attention`; returns the attention sizes.

    Raises ``ShapeError`` for an ``indices`` array that is not ``(B, H, S)`` or
    ``(B, H, N, S)``, ``DTypeError`` for non-integer indices and ``ParameterError`` for indices
    outside ``[-1, M)``, besides the checks of :func:`qkv.sdpa`'s arguments; for ``bias``,
    ``ShapeError`` unless it is ``(B, H, S)``, ``(B, Hkv, S)`` or ``(B, H, N, S)`` with the
    indices' ``S``, ``DTypeError`` unless it is a float array and ``ParameterError`` for NaN or
    ``+inf`` entries.
    """
    dims = _checks.attention(q, k, v, scale=scale)
    B, H, _, N, M, _, _ = dims
    if not _arrays.is_array(indices):
        raise TypeError(f"indices: expected an integer array, got {type(indices).__name__}")
    shape = tuple(indices.shape)
    if len(shape) not in (3, 4) or shape[:2] != (B, H) or (len(shape) == 4 and shape[2] != N):
        raise ShapeError(
            f"indices: expected shape (B, H, S)=({B}, {H}, S) or (B, H, N, S)=({B}, {H}, {N}, S),"
            f" got {shape}"
        )
    if not _arrays.dtype_name(indices).startswith(("int", "uint")):
        raise DTypeError(f"indices: expected an integer dtype, got {_arrays.dtype_name(indices)}")
    if shape[-1] > 0:
        lo, hi = int(indices.min()), int(indices.max())
        if lo < -1 or hi >= M:
            raise ParameterError(
                f"indices: expected key indices in [0, M={M}) or -1 for an empty slot, "
                f"got values in [{lo}, {hi}]"
            )
    if bias is not None:
        check_bias(bias, dims, shape[-1])
    if not isinstance(return_lse, (bool, np.bool_)):
        raise TypeError(f"return_lse: expected a bool, got {return_lse!r}")
    return dims


def check_bias(bias: Any, dims: _checks.AttentionDims, S: int) -> None:
    """Check a per-slot ``bias`` for ``S`` slots (see :func:`check_sparse_attention`)."""
    B, H, Hkv, N = dims.B, dims.H, dims.Hkv, dims.N
    if not _arrays.is_array(bias):
        raise TypeError(f"bias: expected a float array, got {type(bias).__name__}")
    shape = tuple(bias.shape)
    if shape not in {(B, H, S), (B, Hkv, S), (B, H, N, S)}:
        raise ShapeError(
            f"bias: expected shape (B, H, S)=({B}, {H}, {S}), (B, Hkv, S)=({B}, {Hkv}, {S}) or "
            f"(B, H, N, S)=({B}, {H}, {N}, {S}) (S as in indices), got {shape}"
        )
    dtype = _arrays.dtype_name(bias)
    if dtype not in _checks.FLOATS:
        raise DTypeError(f"bias: expected a float dtype, got {dtype}")
    if bias.size and bool((bias != bias).any() | (bias == float("inf")).any()):
        raise ParameterError(
            "bias: expected finite values or -inf (a dropped slot), got NaN or +inf"
        )


def bias_rows(bias: Array, H: int) -> Array:
    """A checked ``bias`` as ``(B, H, 1, S)`` (one row per head) or ``(B, H, N, S)``.

    ``(B, Hkv, S)`` is repeated over the ``H // Hkv`` query heads of each KV head.
    """
    if bias.ndim == 4:
        return bias  # (B, H, N, S)
    return np.repeat(bias, H // bias.shape[1], axis=1)[:, :, None]  # (B, H, 1, S)


def sparse_attention(
    q: Array,
    k: Array,
    v: Array,
    indices: Array,
    *,
    scale: float | None = None,
    bias: Array | None = None,
    return_lse: bool = False,
) -> Array | tuple[Array, Array]:
    """Attention of each query head over its own selected keys.

    Args:
        q: queries ``(B, H, N, D)``.
        k: keys ``(B, Hkv, M, D)``; query head ``h`` reads KV head ``h // (H // Hkv)``.
        v: values ``(B, Hkv, M, Dv)``.
        indices: selected key positions in ``[0, M)``, ``-1`` for an empty slot; ``(B, H, S)``
            (every query of a head reads the same keys) or ``(B, H, N, S)`` (per query).
        scale: multiplies the scores; default ``1/sqrt(D)``.
        bias: added to the scaled score of each slot (``-inf`` drops the slot; any float
            dtype, used in the computing dtype): ``(B, H, S)``, ``(B, Hkv, S)`` (shared by a
            KV head's query heads) or ``(B, H, N, S)``; ``S`` as in ``indices``.
        return_lse: also return the log-sum-exp of the selected (biased) scores ``(B, H, N)``.

    Returns:
        ``O (B, H, N, Dv)`` in the dtype of ``q``, and ``lse`` (float64 for float64 inputs,
        float32 otherwise) if asked. Rows with no selected key (or only ``-inf``-biased ones)
        are zero, with ``lse = -inf``.
    """
    dims = check_sparse_attention(q, k, v, indices, scale=scale, bias=bias)
    B, H, Hkv, N, M, D, Dv = dims
    work = np.float64 if q.dtype == np.float64 else np.float32
    scale = float(1.0 / np.sqrt(D) if scale is None else scale)
    idx = np.asarray(indices, dtype=np.int64)
    if idx.ndim == 3:
        idx = np.broadcast_to(idx[:, :, None], (B, H, N, idx.shape[-1]))  # (B, H, N, S)
    valid = idx >= 0  # (B, H, N, S)
    safe = np.where(valid, idx, 0)  # (B, H, N, S)
    kv_head = np.arange(H) // (H // Hkv)  # (H,)
    b = np.arange(B)[:, None, None, None]  # (B, 1, 1, 1)
    h = kv_head[None, :, None, None]  # (1, H, 1, 1)
    k_sel = k.astype(work, copy=False)[b, h, safe]  # (B, H, N, S, D)
    v_sel = v.astype(work, copy=False)[b, h, safe]  # (B, H, N, S, Dv)
    v_sel = np.where(valid[..., None], v_sel, 0.0)  # an empty slot adds nothing, not 0 * v_0
    s = scale * np.einsum("bhnd,bhnsd->bhns", q.astype(work, copy=False), k_sel)  # (B, H, N, S)
    if bias is not None:
        s = s + bias_rows(np.asarray(bias), H).astype(work, copy=False)  # (B, H, N, S)
    s = np.where(valid, s, -np.inf)
    row_max = s.max(axis=-1, keepdims=True, initial=-np.inf)  # (B, H, N, 1)
    p = np.exp(s - np.where(np.isneginf(row_max), 0.0, row_max))  # (B, H, N, S)
    row_sum = p.sum(axis=-1, keepdims=True)  # (B, H, N, 1)
    out = np.einsum("bhns,bhnsd->bhnd", p / np.where(row_sum > 0, row_sum, 1.0), v_sel)
    if not return_lse:
        return out.astype(q.dtype, copy=False)  # (B, H, N, Dv)
    with np.errstate(divide="ignore"):
        lse = (np.log(row_sum) + row_max)[..., 0]  # (B, H, N)
    return out.astype(q.dtype, copy=False), lse


def merge_partials(outs: list[Array], lses: list[Array]) -> tuple[Array, Array]:
    r"""Combine attention results over disjoint key sets into the result over their union.

    Args:
        outs: partial outputs, each ``(B, H, N, Dv)``.
        lses: their log-sum-exps, each ``(B, H, N)`` (``-inf`` for an empty part).

    Returns:
        ``(O, lse)`` over the union: ``lse = log sum_p exp(lse_p)`` and
        ``O = sum_p exp(lse_p - lse) O_p``; a row empty in every part stays zero with
        ``lse = -inf``.
    """
    if len(outs) != len(lses) or not outs:
        raise ShapeError(f"outs, lses: expected equally many (>= 1), got {len(outs)}, {len(lses)}")
    lse_stack = np.stack(lses)  # (P, B, H, N)
    top = lse_stack.max(axis=0)  # (B, H, N)
    shift = np.where(np.isneginf(top), 0.0, top)  # (B, H, N)
    w = np.exp(lse_stack - shift)  # (P, B, H, N)
    total = w.sum(axis=0)  # (B, H, N)
    with np.errstate(divide="ignore"):
        lse = np.log(total) + shift  # (B, H, N)
    frac = w / np.where(total > 0, total, 1.0)  # (P, B, H, N)
    out = sum(f[..., None] * o for f, o in zip(frac, outs, strict=True))  # (B, H, N, Dv)
    return out.astype(outs[0].dtype, copy=False), lse.astype(lses[0].dtype, copy=False)
