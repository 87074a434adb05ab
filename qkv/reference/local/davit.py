r"""DaViT's two attentions: channel-group attention and spatial window attention.

Paper: Ding et al., *DaViT: Dual Attention Vision Transformers* (arXiv 2204.03645).
Official code: `dingmyu/davit <https://github.com/dingmyu/davit>`_ (``timm/models/davit.py``).

DaViT alternates two self-attentions over the same feature map $X \in \mathbb{R}^{P \times C}$
($P$ spatial tokens, $C$ channels), each with its channels split into groups (heads).

**Channel attention** swaps the roles of tokens and features: every channel is a token whose
feature vector is its whole spatial map. With $N_g$ groups of $C_g = C / N_g$ channels and
$Q_i, K_i, V_i \in \mathbb{R}^{P \times C_g}$ the slices of group $i$,

$$
A_i = \operatorname{softmax}\!\Big(\frac{Q_i^\top K_i}{\sqrt{C_g}}\Big) \in \mathbb{R}^{C_g \times C_g},
\qquad
\operatorname{Attn}_{\text{channel}}(Q_i, K_i, V_i) = \big(A_i\, V_i^\top\big)^\top
\in \mathbb{R}^{P \times C_g},
$$

the softmax running over each row of the $C_g \times C_g$ channel map. Its cost is
$O(P\,C_g^2)$ per group, linear in the tokens, and every output channel mixes information from
the whole image. The scale is set by the channels per group, not by the number of tokens.

**Window attention** is Swin's non-shifted window attention: the map is cut into
non-overlapping $w \times w$ windows (``window``, default $w = 7$), and each token attends to
the tokens of its own window with the usual $\operatorname{softmax}(QK^\top / \sqrt d)\,V$.
When a side is not a multiple of $w$, the map is padded at the right and bottom.

**Where the official code differs.**

* Channel attention: the code computes ``softmax((k * s)^T v)`` and applies it to ``q``, so
  its ``(q, k, v)`` play the paper's $(V, Q, K)$. The two are the same layer up to renaming
  the projection weights; here the arguments follow the paper, and the code's call is
  ``channel_attention(k, v, q)``.
* Window attention: the code pads the *input* features with zeros before the projections, so
  a padded token's key and value are the projections' biases, and real queries attend to
  them. By default (``mask_padding=True``) padded tokens are masked out of every softmax, so
  padding never changes a real token's output; ``mask_padding=False`` lets zero-padded keys
  and values take part, which is the code's behaviour for projections without bias.

**Backends.** Both attentions are plain softmax attention after a reshape: channel attention
is ``sdpa`` over channel tokens, window attention is ``sdpa`` batched over windows. The
reference functions call :func:`qkv.reference.core.sdpa`; :func:`dispatched_channel_attention`
and :func:`dispatched_window_attention` (exported as ``qkv.channel_attention`` and
``qkv.window_attention``) route the same reshaped calls through the dispatched ``qkv.sdpa``.

The window partition helpers here are shared by the other window-based modules of the family.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from qkv import _arrays, _checks
from qkv.errors import ParameterError, ShapeError
from qkv.reference import core

Array = np.ndarray
#: The official window side (DaViT and Swin use 7 x 7 windows).
DEFAULT_WINDOW = 7
SPATIAL_LAYOUT = "(B, H, Hs, Ws, D)"


# --------------------------------------------------------------------------- windows


def window_pair(window: Any, name: str = "window") -> tuple[int, int]:
    """``window`` as ``(wh, ww)``: an int ``w`` means ``(w, w)``; each entry an int >= 1."""
    if isinstance(window, tuple):
        if len(window) != 2:
            raise ParameterError(f"{name}: expected an int or a pair (wh, ww), got {window!r}")
        return _checks.positive_int(name, window[0]), _checks.positive_int(name, window[1])
    side = _checks.positive_int(name, window)
    return side, side


def check_window_fits(window: tuple[int, int], spatial: tuple[int, int], name: str) -> None:
    """A window no larger than the map on either side (a larger one is an error, not a clamp)."""
    if window[0] > spatial[0] or window[1] > spatial[1]:
        raise ParameterError(
            f"{name}: expected a window no larger than the map (Hs, Ws) = {spatial}, "
            f"got {window} (window larger than the map)"
        )


def pad_to_windows(x: Array, window: tuple[int, int]) -> Array:
    """Zero-pad the bottom and right of ``x (B, H, Hs, Ws, D)`` to multiples of the window.

    Returns ``(B, H, Hp, Wp, D)`` with ``Hp = wh * ceil(Hs / wh)``, ``Wp = ww * ceil(Ws / ww)``
    (``x`` itself when nothing is padded).
    """
    Hs, Ws = x.shape[2], x.shape[3]
    pad_h, pad_w = -Hs % window[0], -Ws % window[1]
    if pad_h == 0 and pad_w == 0:
        return x
    return np.pad(x, [(0, 0), (0, 0), (0, pad_h), (0, pad_w), (0, 0)])  # (B, H, Hp, Wp, D)


def window_partition(x: Array, window: tuple[int, int]) -> Array:
    """Cut ``x (B, H, Hs, Ws, D)`` into non-overlapping windows, one batch row per window.

    ``Hs`` and ``Ws`` must be multiples of ``window = (wh, ww)``. Windows are ordered batch
    first, then row-major over the window grid; the tokens of a window row-major inside it.

    Returns:
        ``(B * nh * nw, H, wh * ww, D)`` with ``nh = Hs / wh`` and ``nw = Ws / ww``.
    """
    B, H, Hs, Ws, D = x.shape
    wh, ww = window
    nh, nw = Hs // wh, Ws // ww
    grid = x.reshape(B, H, nh, wh, nw, ww, D)  # (B, H, nh, wh, nw, ww, D)
    grid = grid.transpose(0, 2, 4, 1, 3, 5, 6)  # (B, nh, nw, H, wh, ww, D)
    return grid.reshape(B * nh * nw, H, wh * ww, D)  # (B * nW, H, wh * ww, D)


def window_unpartition(windows: Array, window: tuple[int, int], spatial: tuple[int, int]) -> Array:
    """The inverse of :func:`window_partition`: ``(B * nW, H, wh * ww, D)`` to ``(B, H, Hs, Ws, D)``."""
    _, H, _, D = windows.shape
    wh, ww = window
    nh, nw = spatial[0] // wh, spatial[1] // ww
    grid = windows.reshape(-1, nh, nw, H, wh, ww, D)  # (B, nh, nw, H, wh, ww, D)
    grid = grid.transpose(0, 3, 1, 4, 2, 5, 6)  # (B, H, nh, wh, nw, ww, D)
    return grid.reshape(-1, H, spatial[0], spatial[1], D)  # (B, H, Hs, Ws, D)


# --------------------------------------------------------------------------- channel groups


def split_groups(x: Array, groups: int) -> Array:
    """Channels-last features ``(B, *spatial, C)`` into ``groups`` heads ``(B, groups, *spatial, C / groups)``.

    Channel ``c`` goes to group ``c // (C / groups)`` (contiguous slices, as the official
    ``reshape(B, N, heads, C // heads)``). Raises ``ParameterError`` when ``groups`` does not
    divide ``C``.
    """
    groups = _checks.positive_int("groups", groups)
    C = x.shape[-1]
    if C % groups:
        raise ParameterError(
            f"groups: expected a divisor of the channel count C = {C}, got {groups} "
            "(channel groups must divide the channels)"
        )
    split = x.reshape(*x.shape[:-1], groups, C // groups)  # (B, *spatial, G, Cg)
    return np.moveaxis(split, -2, 1)  # (B, G, *spatial, Cg)


def merge_groups(x: Array) -> Array:
    """The inverse of :func:`split_groups`: ``(B, G, *spatial, Cg)`` to ``(B, *spatial, G * Cg)``."""
    last = np.moveaxis(x, 1, -2)  # (B, *spatial, G, Cg)
    return last.reshape(*last.shape[:-2], -1)  # (B, *spatial, C)


# --------------------------------------------------------------------------- channel attention


def check_channel_attention(
    q: Any, k: Any, v: Any, *, scale: float | None = None, **_: Any
) -> None:
    """Arguments of channel attention: ``q, k, v`` all ``(B, G, *spatial, Cg)``, one shape."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not _arrays.is_array(x) or x.ndim not in (4, 5):
            given = tuple(x.shape) if _arrays.is_array(x) else type(x).__name__
            raise ShapeError(f"{name}: expected (B, G, N, Cg) or (B, G, Hs, Ws, Cg), got {given}")
        _checks.array(name, x, rank=x.ndim, layout="(B, G, *spatial, Cg)")
    _checks.same_dtype(q=q, k=k, v=v)
    if tuple(k.shape) != tuple(q.shape) or tuple(v.shape) != tuple(q.shape):
        raise ShapeError(
            f"k, v: expected the shape of q {tuple(q.shape)} (channel tokens share their "
            f"spatial features), got k {tuple(k.shape)} and v {tuple(v.shape)}"
        )
    check_scale(scale)


def check_scale(scale: Any) -> None:
    """``scale`` is ``None`` or a finite number > 0."""
    if scale is not None and not (
        isinstance(scale, (int, float, np.floating))
        and not isinstance(scale, bool)
        and math.isfinite(scale)
        and scale > 0
    ):
        raise ParameterError(f"scale: expected a finite number > 0 or None, got {scale!r}")


def _channel_attention(
    q: Array, k: Array, v: Array, attend: Callable[..., Array], scale: float | None
) -> Array:
    """Channel attention on checked NumPy arrays, the channel-token softmax run by ``attend``."""
    B, G = q.shape[:2]
    spatial, Cg = q.shape[2:-1], q.shape[-1]
    work = core._work_dtype(q.dtype)
    # Channels become tokens and the P spatial positions their features.
    qt, kt, vt = (
        x.astype(work, copy=False).reshape(B, G, -1, Cg).swapaxes(-1, -2)  # (B, G, Cg, P)
        for x in (q, k, v)
    )
    s = float(Cg**-0.5 if scale is None else scale)
    out = attend(qt, kt, vt, scale=s)  # A V^T: (B, G, Cg, P)
    out = out.swapaxes(-1, -2).reshape(B, G, *spatial, Cg)  # (B, G, *spatial, Cg)
    return out.astype(q.dtype, copy=False)


def channel_attention(q: Array, k: Array, v: Array, *, scale: float | None = None) -> Array:
    r"""DaViT channel-group attention, $\big(\operatorname{softmax}(s\,Q_i^\top K_i)\, V_i^\top\big)^\top$ per group.

    Args:
        q: queries ``(B, G, *spatial, Cg)``: ``G`` channel groups of ``Cg`` channels over one
            or two spatial axes (``(B, G, N, Cg)`` or ``(B, G, Hs, Ws, Cg)``); use
            :func:`split_groups` to make them from channels-last features.
        k: keys, the shape of ``q``.
        v: values, the shape of ``q``.
        scale: $s$; default $C_g^{-1/2}$ (channels per group, as paper and code).

    Returns:
        ``(B, G, *spatial, Cg)`` in the dtype of ``q``. Permuting the spatial tokens of
        ``q, k, v`` permutes the output the same way, and leaves the $C_g \times C_g$ channel
        map unchanged.
    """
    check_channel_attention(q, k, v, scale=scale)
    return _channel_attention(q, k, v, core.sdpa, scale)


def channel_map(q: Array, k: Array, *, scale: float | None = None) -> Array:
    r"""The channel attention map $A_i = \operatorname{softmax}(s\,Q_i^\top K_i)$, ``(B, G, Cg, Cg)``."""
    check_channel_attention(q, k, k, scale=scale)
    B, G, Cg = q.shape[0], q.shape[1], q.shape[-1]
    work = core._work_dtype(q.dtype)
    qt, kt = (x.astype(work, copy=False).reshape(B, G, -1, Cg).swapaxes(-1, -2) for x in (q, k))
    s = float(Cg**-0.5 if scale is None else scale)
    return core.sdpa(qt, kt, kt, scale=s, return_weights=True)[1]  # (B, G, Cg, Cg)


def dispatched_channel_attention(
    q: Any, k: Any, v: Any, *, scale: float | None = None, backend: Any = None
) -> Any:
    """Channel attention through the dispatched ``qkv.sdpa`` (``qkv.channel_attention``).

    Same arguments and result as :func:`channel_attention`, plus ``backend=`` (a name or
    module; default: the backend of ``qkv.use_backend`` / ``QKV_BACKEND``), which runs the
    softmax over channel tokens. The result has the array type of ``q``.
    """
    qn, kn, vn = (_arrays.to_numpy(x) for x in (q, k, v))
    check_channel_attention(qn, kn, vn, scale=scale)
    out = _channel_attention(qn, kn, vn, dispatched_sdpa(backend), scale)
    return _arrays.from_numpy(out, q)


# --------------------------------------------------------------------------- window attention


def check_window_attention(
    q: Any, k: Any, v: Any, *, window: Any = DEFAULT_WINDOW, scale: float | None = None, **_: Any
) -> tuple[int, int]:
    """Arguments of window attention; returns the window as ``(wh, ww)``.

    ``q (B, H, Hs, Ws, D)``, ``k (B, Hkv, Hs, Ws, D)``, ``v (B, Hkv, Hs, Ws, Dv)``,
    ``H % Hkv == 0``, a window no larger than the map.
    """
    spatial_attention(q, k, v)
    pair = window_pair(window)
    check_window_fits(pair, tuple(q.shape[2:4]), "window")
    check_scale(scale)
    return pair


def spatial_attention(q: Any, k: Any, v: Any) -> _checks.AttentionDims:
    """Checks of an attention over a 2-D map, ``(B, H, Hs, Ws, D)``, with grouped KV heads."""
    _checks.array("q", q, rank=5, layout=SPATIAL_LAYOUT)
    _checks.array("k", k, rank=5, layout="(B, Hkv, Hs, Ws, D)")
    _checks.array("v", v, rank=5, layout="(B, Hkv, Hs, Ws, Dv)")
    if tuple(k.shape[2:4]) != tuple(q.shape[2:4]) or tuple(v.shape[2:4]) != tuple(q.shape[2:4]):
        raise ShapeError(
            f"k, v: expected the map (Hs, Ws) = {tuple(q.shape[2:4])} of q, "
            f"got k {tuple(k.shape[2:4])} and v {tuple(v.shape[2:4])}"
        )
    flat = [x.reshape(*x.shape[:2], -1, x.shape[-1]) for x in (q, k, v)]  # (B, H, Hs * Ws, D)
    return _checks.attention(*flat)


def _window_attention(
    q: Array,
    k: Array,
    v: Array,
    attend: Callable[..., Array],
    window: tuple[int, int],
    scale: float | None,
    mask_padding: bool,
) -> Array:
    """Window attention on checked NumPy arrays, the per-window softmax run by ``attend``."""
    B, H, Hs, Ws, D = q.shape
    work = core._work_dtype(q.dtype)
    padded = [pad_to_windows(x.astype(work, copy=False), window) for x in (q, k, v)]
    Hp, Wp = padded[0].shape[2:4]
    qw, kw, vw = (window_partition(x, window) for x in padded)  # (B * nW, H, wh * ww, D)
    mask = None
    if mask_padding and (Hp, Wp) != (Hs, Ws):
        real = np.zeros((1, 1, Hp, Wp, 1), dtype=bool)  # (1, 1, Hp, Wp, 1)
        real[:, :, :Hs, :Ws] = True
        real = np.broadcast_to(real, (B, 1, Hp, Wp, 1))  # (B, 1, Hp, Wp, 1)
        keys = window_partition(real, window)  # (B * nW, 1, wh * ww, 1)
        mask = keys.swapaxes(-1, -2)  # (B * nW, 1, 1, wh * ww): True = a real key
    s = float(D**-0.5 if scale is None else scale)
    out = attend(qw, kw, vw, mask=mask, scale=s)  # (B * nW, H, wh * ww, Dv)
    out = window_unpartition(out, window, (Hp, Wp))  # (B, H, Hp, Wp, Dv)
    return out[:, :, :Hs, :Ws].astype(q.dtype, copy=False)  # (B, H, Hs, Ws, Dv)


def window_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    window: int | tuple[int, int] = DEFAULT_WINDOW,
    scale: float | None = None,
    mask_padding: bool = True,
) -> Array:
    r"""Non-shifted window attention: $\operatorname{softmax}(s\,Q_w K_w^\top)\,V_w$ in every window $w$.

    Args:
        q: queries ``(B, H, Hs, Ws, D)`` on a map of ``Hs x Ws`` tokens.
        k: keys ``(B, Hkv, Hs, Ws, D)``, ``H % Hkv == 0`` (grouped heads as in ``sdpa``).
        v: values ``(B, Hkv, Hs, Ws, Dv)``.
        window: the window side ``w`` or ``(wh, ww)``; default 7 (the official value). A window
            larger than the map on either side is a ``ParameterError``; sides that are not a
            multiple of the window are zero-padded at the bottom and right.
        scale: $s$; default $D^{-1/2}$.
        mask_padding: mask padded tokens out of every softmax (default), so padding never
            changes a real token's output; ``False`` lets the zero-padded keys and values take
            part, as the official code does (there a padded key is the projection's bias).

    Returns:
        ``(B, H, Hs, Ws, Dv)`` in the dtype of ``q``. A window covering the whole map is full
        attention over the map.
    """
    pair = check_window_attention(q, k, v, window=window, scale=scale)
    check_flag("mask_padding", mask_padding)
    return _window_attention(q, k, v, core.sdpa, pair, scale, mask_padding)


def dispatched_window_attention(
    q: Any,
    k: Any,
    v: Any,
    *,
    window: int | tuple[int, int] = DEFAULT_WINDOW,
    scale: float | None = None,
    mask_padding: bool = True,
    backend: Any = None,
) -> Any:
    """Window attention through the dispatched ``qkv.sdpa`` (``qkv.window_attention``).

    Same arguments and result as :func:`window_attention`, plus ``backend=`` (a name or
    module; default: the backend of ``qkv.use_backend`` / ``QKV_BACKEND``), which runs one
    ``sdpa`` call batched over all windows. The result has the array type of ``q``.
    """
    qn, kn, vn = (_arrays.to_numpy(x) for x in (q, k, v))
    pair = check_window_attention(qn, kn, vn, window=window, scale=scale)
    check_flag("mask_padding", mask_padding)
    out = _window_attention(qn, kn, vn, dispatched_sdpa(backend), pair, scale, mask_padding)
    return _arrays.from_numpy(out, q)


def check_flag(name: str, value: Any) -> None:
    """``value`` is a bool."""
    if not isinstance(value, (bool, np.bool_)):
        raise ParameterError(f"{name}: expected a bool, got {value!r}")


def dispatched_sdpa(backend: Any) -> Callable[..., Array]:
    """``qkv.sdpa`` bound to ``backend``, for the ``attend`` argument of the private forms."""
    import qkv  # here, not at the top: qkv's __init__ imports this module

    def attend(q: Array, k: Array, v: Array, **kwargs: Any) -> Array:
        return qkv.sdpa(q, k, v, backend=backend, **kwargs)

    return attend
