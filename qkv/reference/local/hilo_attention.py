r"""HiLo attention (LITv2; Pan, Cai and Zhuang, *Fast Vision Transformers with HiLo Attention*, arXiv 2205.13213).

Official code: `ziplab/LITv2 <https://github.com/ziplab/LITv2>`_ (``hilo.py``, class ``HiLo``).

High frequencies of an image carry local detail, low frequencies global structure. HiLo
splits the $H$ heads of one attention layer into two groups, one per band:

* **Hi-Fi** heads attend inside non-overlapping $s \times s$ windows (``window`` $= s$,
  default 2): local, fine-grained attention that keeps the high frequencies;
* **Lo-Fi** heads let every query (at full resolution) attend to keys and values that are
  **average-pooled** over each $s \times s$ window, a coarse global attention to
  $\tfrac{H_s W_s}{s^2}$ pooled tokens that keeps the low frequencies.

With $\operatorname{Attn}(Q, K, V) = \operatorname{softmax}(s_h\,QK^\top)\,V$ and
$s_h = D^{-1/2}$ (the head width),

$$
O^{\text{Hi}}_w = \operatorname{Attn}(Q_w, K_w, V_w) \ \text{for every window } w,
\qquad
O^{\text{Lo}} = \operatorname{Attn}\big(Q,\ \operatorname{AvgPool}_s(K),\ \operatorname{AvgPool}_s(V)\big),
$$

and the layer's output is the two groups' outputs side by side, $[O^{\text{Hi}}, O^{\text{Lo}}]$.

**Which group ``alpha`` counts.** As in the official code, ``alpha`` is the fraction of
**Lo-Fi** heads: $H_{\text{Lo}} = \alpha H$ and $H_{\text{Hi}} = H - H_{\text{Lo}}$. Heads
$0 \ldots H_{\text{Hi}} - 1$ are Hi-Fi and the last $H_{\text{Lo}}$ are Lo-Fi (the code
concatenates the Hi-Fi output first). So $\alpha = 1$ is all Lo-Fi, which at $s = 1$ is plain
multi-head self-attention, and $\alpha = 0$ is all Hi-Fi: window attention.

**Pooling the keys instead of the input.** The code average-pools the input features and then
projects them to keys and values. A projection is affine and an average of affine images is
the affine image of the average, so pooling the projected keys and values (what this
function does, taking $Q, K, V$ per head) gives the same result.

**Choices where the code is loose.** The code truncates ``int(H * alpha)``; here an ``alpha``
that does not give a whole number of heads is an error. At $s = 1$ the code makes every head
Lo-Fi whatever ``alpha`` says (a $1 \times 1$ window would let a token see only itself); this
function does the same. The map sides must be multiples of $s$ (the code's layer does not pad).

**Backends.** Both groups are ``sdpa`` calls: the Hi-Fi one batched over windows, the Lo-Fi
one over the pooled map. :func:`hilo` (the reference) calls :func:`qkv.reference.core.sdpa`;
:func:`dispatched_hilo` (exported as ``qkv.hilo``) runs them through the dispatched ``qkv.sdpa``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from qkv import _arrays, _checks
from qkv.errors import ParameterError, ShapeError
from qkv.reference import core
from qkv.reference.local import davit

Array = np.ndarray
#: The official defaults: half of the heads Lo-Fi, 2 x 2 windows.
DEFAULT_ALPHA = 0.5
DEFAULT_WINDOW = 2


def lofi_heads(heads: int, alpha: float, window: int) -> int:
    r"""The number of Lo-Fi heads $H_{\text{Lo}} = \alpha H$ (all heads when ``window == 1``).

    Raises ``ParameterError`` for ``alpha`` outside $[0, 1]$ or a fractional $\alpha H$.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.integer, np.floating)):
        raise ParameterError(f"alpha: expected a number in [0, 1], got {alpha!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ParameterError(f"alpha: expected a number in [0, 1], got {alpha!r}")
    count = alpha * heads
    if not math.isclose(count, round(count), abs_tol=1e-9):
        raise ParameterError(
            f"alpha: expected alpha * H to be a whole number of Lo-Fi heads, got "
            f"{alpha!r} * {heads} = {count:g} (a fractional head count)"
        )
    return heads if window == 1 else round(count)


def avg_pool(x: Array, window: int) -> Array:
    """Average ``x (B, H, Hs, Ws, D)`` over non-overlapping ``window x window`` blocks.

    Returns ``(B, H, Hs / window, Ws / window, D)``; the sides must be multiples of ``window``.
    """
    B, H, Hs, Ws, D = x.shape
    blocks = x.reshape(B, H, Hs // window, window, Ws // window, window, D)  # (B, H, h, s, w, s, D)
    return blocks.mean(axis=(3, 5))  # (B, H, Hs / s, Ws / s, D)


def check_hilo(
    q: Any,
    k: Any,
    v: Any,
    *,
    alpha: Any = DEFAULT_ALPHA,
    window: Any = DEFAULT_WINDOW,
    scale: Any = None,
    **_: Any,
) -> int:
    """All argument checks of HiLo attention; returns the number of Lo-Fi heads."""
    dims = davit.spatial_attention(q, k, v)
    if dims.Hkv != dims.H:
        raise ShapeError(
            f"k, v: expected as many heads as q (H = {dims.H}; HiLo splits the heads into "
            f"groups), got {dims.Hkv}"
        )
    window = _checks.positive_int("window", window)
    spatial = tuple(q.shape[2:4])
    davit.check_window_fits((window, window), spatial, "window")
    if spatial[0] % window or spatial[1] % window:
        raise ShapeError(
            f"q: expected spatial sizes (Hs, Ws) divisible by the window s = {window}, "
            f"got {spatial}"
        )
    davit.check_scale(scale)
    return lofi_heads(dims.H, alpha, window)


def _hifi(q: Array, k: Array, v: Array, attend: Callable[..., Array], window: int, s: float):
    """Hi-Fi heads on NumPy arrays in the arithmetic dtype: attention inside each window."""
    B, H, Hs, Ws, _ = q.shape
    pair = (window, window)
    qw, kw, vw = (davit.window_partition(x, pair) for x in (q, k, v))  # (B * nW, H, s^2, D)
    out = attend(qw, kw, vw, scale=s)  # (B * nW, H, s^2, Dv)
    return davit.window_unpartition(out, pair, (Hs, Ws))  # (B, H, Hs, Ws, Dv)


def _lofi(q: Array, k: Array, v: Array, attend: Callable[..., Array], window: int, s: float):
    """Lo-Fi heads on NumPy arrays in the arithmetic dtype: attention to pooled keys/values."""
    B, H, Hs, Ws, D = q.shape
    queries = q.reshape(B, H, Hs * Ws, D)  # (B, H, N, D): every position
    k_pool, v_pool = (avg_pool(x, window) for x in (k, v))  # (B, H, Hs / s, Ws / s, d)
    keys = k_pool.reshape(B, H, -1, D)  # (B, H, N / s^2, D)
    values = v_pool.reshape(B, H, -1, v.shape[-1])  # (B, H, N / s^2, Dv)
    return attend(queries, keys, values, scale=s).reshape(B, H, Hs, Ws, -1)  # (B, H, Hs, Ws, Dv)


def _hilo(
    q: Array,
    k: Array,
    v: Array,
    attend: Callable[..., Array],
    *,
    lo: int,
    window: int,
    scale: float | None,
) -> Array:
    """HiLo attention on checked NumPy arrays with ``lo`` Lo-Fi heads (the last ones)."""
    H, D = q.shape[1], q.shape[-1]
    work = core._work_dtype(q.dtype)
    qw, kw, vw = (x.astype(work, copy=False) for x in (q, k, v))
    s = float(D**-0.5 if scale is None else scale)
    hi = H - lo
    parts = []
    if hi:
        parts.append(_hifi(qw[:, :hi], kw[:, :hi], vw[:, :hi], attend, window, s))
    if lo:
        parts.append(_lofi(qw[:, hi:], kw[:, hi:], vw[:, hi:], attend, window, s))
    return np.concatenate(parts, axis=1).astype(q.dtype, copy=False)  # (B, H, Hs, Ws, Dv)


def hilo(
    q: Array,
    k: Array,
    v: Array,
    *,
    alpha: float = DEFAULT_ALPHA,
    window: int = DEFAULT_WINDOW,
    scale: float | None = None,
) -> Array:
    r"""HiLo attention: Hi-Fi window heads, then Lo-Fi heads over average-pooled keys and values.

    Args:
        q: queries ``(B, H, Hs, Ws, D)`` on a map of ``Hs x Ws`` tokens.
        k: keys ``(B, H, Hs, Ws, D)`` (as many heads as ``q``).
        v: values ``(B, H, Hs, Ws, Dv)``.
        alpha: the fraction of **Lo-Fi** heads (default 0.5, as the code); ``alpha * H`` must
            be a whole number. Heads ``0 .. H - alpha*H - 1`` are Hi-Fi, the rest Lo-Fi.
        window: the window and pooling side $s$ (default 2); ``Hs`` and ``Ws`` must be
            multiples of it, and it may not exceed the map. $s = 1$ makes every head Lo-Fi.
        scale: $s_h$; default $D^{-1/2}$.

    Returns:
        ``(B, H, Hs, Ws, Dv)`` in the dtype of ``q``: the Hi-Fi heads' output, then the Lo-Fi
        heads'.
    """
    lo = check_hilo(q, k, v, alpha=alpha, window=window, scale=scale)
    return _hilo(q, k, v, core.sdpa, lo=lo, window=window, scale=scale)


def dispatched_hilo(
    q: Any,
    k: Any,
    v: Any,
    *,
    alpha: float = DEFAULT_ALPHA,
    window: int = DEFAULT_WINDOW,
    scale: float | None = None,
    backend: Any = None,
) -> Any:
    """HiLo attention through the dispatched ``qkv.sdpa`` (``qkv.hilo``).

    Same arguments and result as :func:`hilo`, plus ``backend=`` (a name or module; default:
    the backend of ``qkv.use_backend`` / ``QKV_BACKEND``), which runs both groups' attention.
    The result has the array type of ``q``.
    """
    qn, kn, vn = (_arrays.to_numpy(x) for x in (q, k, v))
    lo = check_hilo(qn, kn, vn, alpha=alpha, window=window, scale=scale)
    out = _hilo(qn, kn, vn, davit.dispatched_sdpa(backend), lo=lo, window=window, scale=scale)
    return _arrays.from_numpy(out, q)
