r"""Observation-window scoring of cached keys: attention column sums, then a 1-D pool.

The scoring step of SnapKV (*SnapKV: LLM Knows What You are Looking for Before Generation*,
Li et al., arXiv 2404.14469; official code https://github.com/FasterDecoding/SnapKV) as an op
of its own, so that backends can fuse it. The last $W$ prompt queries (the observation
window, at tokens $n - W, \dots, n - 1$ of an $n$-token prompt) attend causally over the
cached keys; each cached key $j$ whose token lies before the window collects the attention it
received:

$$
A_{h,i,j} = \operatorname{softmax}_j\Big(\text{scale}\; q_{h,i} \cdot k_{g(h),j}
\;\big|\; 0 \le t_j \le n - W + i\Big), \qquad
C_{h,j} = \sum_{i=0}^{W-1} A_{h,i,j}, \qquad
\tilde C_{h} = \operatorname{pool}_k(C_h),
$$

with $t_j$ the token index of slot $j$ ($-1$ = empty slot), $g(h)$ the KV head of query head
$h$ (grouped heads), and the pool stride 1 over the slot axis with padding $\lfloor k/2
\rfloor$: ``"avgpool"`` sums the $k$ neighbours and divides by $k$ (zeros pad, and slots that
are not before the window count as 0), ``"maxpool"`` takes their maximum (ignoring slots that
are not before the window). The result is $-\infty$ on every slot that is not before the
window (window slots and empty slots), so a top-$k$ of it picks prefix tokens only.

Slots are pooled in the order the cache holds them (token order for the lab engine's caches),
as the official code pools the sequence axis of its key tensor.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qkv import _arrays
from qkv.errors import DTypeError, ParameterError, ShapeError

Array = np.ndarray

#: The pooling kinds of SnapKV's code.
POOLINGS = ("avgpool", "maxpool")
_FLOATS = ("float16", "float32", "float64")


def pool1d(x: Array, kernel: int, pooling: str) -> Array:
    """Stride-1 pooling over the last axis with ``kernel // 2`` padding (same length out).

    Args:
        x: scores ``(..., C)``; ``-inf`` entries take no part in a max and count as 0 in an
            average, like the padding.
        kernel: odd window length.
        pooling: ``"avgpool"`` (zero padding, divided by ``kernel``) or ``"maxpool"``.

    Returns:
        The pooled scores ``(..., C)``.
    """
    pad = kernel // 2
    fill = 0.0 if pooling == "avgpool" else -np.inf
    base = np.where(np.isneginf(x), fill, x)
    padded = np.pad(base, [(0, 0)] * (x.ndim - 1) + [(pad, pad)], constant_values=fill)
    windows = np.lib.stride_tricks.sliding_window_view(padded, kernel, axis=-1)  # (..., C, k)
    return windows.mean(-1) if pooling == "avgpool" else windows.max(-1)


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ParameterError(f"{name}: expected a positive int, got {value!r}")
    return int(value)


def check_window_scores(
    q: Any,
    k: Any,
    indices: Any,
    *,
    n_tokens: int | None = None,
    kernel: int = 5,
    pooling: str = "avgpool",
    scale: float | None = None,
) -> int:
    """Check the arguments of :func:`window_scores`; return the prompt length ``n``."""
    for name, a in (("q", q), ("k", k)):
        if not _arrays.is_array(a) or a.ndim != 4:
            raise ShapeError(
                f"{name}: expected a 4-d array (B, heads, tokens, D), got "
                f"{getattr(a, 'shape', type(a).__name__)}"
            )
        if _arrays.dtype_name(a) not in _FLOATS:
            raise DTypeError(f"{name}: expected one of {_FLOATS}, got {_arrays.dtype_name(a)}")
    B, H, W, D = q.shape
    if k.shape[0] != B or k.shape[3] != D or k.shape[1] == 0 or H % k.shape[1]:
        raise ShapeError(
            f"k: expected (B, Hkv, C, D) = ({B}, a divisor of H={H}, C, {D}), got {tuple(k.shape)}"
        )
    if _arrays.dtype_name(k) != _arrays.dtype_name(q):
        raise DTypeError(f"k: expected q's dtype {_arrays.dtype_name(q)}, got {k.dtype}")
    if W == 0 or k.shape[2] == 0:
        raise ShapeError(
            f"q, k: expected at least one query and one slot, got W={W}, C={k.shape[2]}"
        )
    idx = np.asarray(_arrays.to_numpy(indices) if _arrays.is_array(indices) else indices)
    if idx.shape != tuple(k.shape[:3]) or not np.issubdtype(idx.dtype, np.integer):
        raise ShapeError(
            f"indices: expected integer token indices (B, Hkv, C) = {tuple(k.shape[:3])}, got "
            f"{idx.dtype} {idx.shape}"
        )
    top = int(idx.max())
    n = top + 1 if n_tokens is None else _positive_int("n_tokens", n_tokens)
    if n < W or top >= n or int(idx.min()) < -1:
        raise ParameterError(
            f"n_tokens: expected a prompt length >= the window W={W} and above every token "
            f"index (indices in [-1, {top}]), got {n}"
        )
    if _positive_int("kernel", kernel) % 2 == 0:
        raise ParameterError(f"kernel: expected an odd pooling kernel, got {kernel}")
    if pooling not in POOLINGS:
        raise ParameterError(f"pooling: expected one of {POOLINGS}, got {pooling!r}")
    if scale is not None and (isinstance(scale, bool) or not np.isfinite(scale) or scale <= 0):
        raise ParameterError(f"scale: expected a positive finite number or None, got {scale!r}")
    return n


def window_scores(
    q: Array,
    k: Array,
    indices: Array,
    *,
    n_tokens: int | None = None,
    kernel: int = 5,
    pooling: str = "avgpool",
    scale: float | None = None,
) -> Array:
    r"""Pooled observation-window votes $\tilde C$ of every cached slot, per query head.

    Args:
        q: the window's queries ``(B, H, W, D)``, query ``i`` at token ``n - W + i``.
        k: cached keys ``(B, Hkv, C, D)``, same dtype, ``H % Hkv == 0``.
        indices: token index of each slot ``(B, Hkv, C)``, integer, ``-1`` = empty slot.
        n_tokens: the prompt length ``n`` (default: the largest index plus one).
        kernel: odd pooling kernel (5 in SnapKV's ``init_snapkv``).
        pooling: ``"avgpool"`` or ``"maxpool"``.
        scale: score scale (default $1/\sqrt D$).

    Returns:
        ``(B, H, C)`` in ``q``'s dtype: the pooled votes on slots before the window, ``-inf``
        on window and empty slots.
    """
    n = check_window_scores(
        q, k, indices, n_tokens=n_tokens, kernel=kernel, pooling=pooling, scale=scale
    )
    B, H, W, D = q.shape
    group = H // k.shape[1]
    idx = np.repeat(np.asarray(indices), group, axis=1)  # (B, H, C)
    kk = np.repeat(k, group, axis=1)  # (B, H, C, D)
    s = q.dtype.type(D**-0.5 if scale is None else scale)
    logits = (q @ np.swapaxes(kk, -1, -2)) * s  # (B, H, W, C)
    at = n - W + np.arange(W)  # token of each window query (W,)
    seen = (idx[:, :, None, :] >= 0) & (idx[:, :, None, :] <= at[:, None])  # (B, H, W, C)
    logits = np.where(seen, logits, -np.inf)
    peak = logits.max(-1, keepdims=True)  # (B, H, W, 1)
    e = np.where(seen, np.exp(logits - np.where(np.isfinite(peak), peak, 0)), 0)
    attn = e / np.maximum(e.sum(-1, keepdims=True), np.finfo(e.dtype).tiny)  # (B, H, W, C)
    prefix = (idx >= 0) & (idx < n - W)  # (B, H, C)
    votes = np.where(prefix, attn.sum(axis=2), -np.inf)  # (B, H, C)
    return np.where(prefix, pool1d(votes, kernel, pooling), -np.inf).astype(q.dtype)
