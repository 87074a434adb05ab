r"""OAT's object-level 3-D sinusoidal positional encoding (Fang et al., arXiv 2407.13335).

*OAT: Object-Level Attention Transformer for Gaze Scanpath Prediction* (ECCV 2024).
Official code: `HKUST-NISL/oat_eccv24 <https://github.com/HKUST-NISL/oat_eccv24>`_
(``src/model/positionalEncoding.py``, ``PositionalEncoding3D``).

OAT predicts where people look, object by object, while they search a shelf of products. Its
encoder sees one token per **object**, and each object sits in a cell $(x, y, z)$ of a coarse
grid (the official default grid is $3 \times 11 \times 2$). An object's positional encoding is
the encoding of its cell: one 1-D sinusoid per axis, concatenated,

$$
\operatorname{PE}(x, y, z) = \big[\,\phi(x) \;\|\; \phi(y) \;\|\; \phi(z)\,\big]_{:D},
\qquad
\phi(p) = \big(\sin p\,\omega_0,\ \cos p\,\omega_0,\ \sin p\,\omega_1,\ \cos p\,\omega_1,\ \dots\big)
\in \mathbb{R}^{c},
$$

with $c = 2\lceil D/6 \rceil$ channels per axis (sine and cosine interleaved per frequency) and
the result cut to the model width $D$. The frequencies $\omega_t$, $t = 0, \dots, c/2 - 1$, are
one of the official code's choices (``functionChoice``), with $\alpha = 0.9$ by default:

| choice | $\omega_t$ |
|---|---|
| ``original`` | $10000^{-2t/c}$ (the Transformer's sinusoid) |
| ``exp1`` | $(2t)^{\alpha} / c$ |
| ``exp2`` | $(2t / c)^{\alpha}$ |
| ``linear`` | $2t\,\alpha / c$ |

The last three start at $\omega_0 = 0$ (a constant $(0, 1)$ pair, so for $D \le 6$, one pair per
axis, they give every cell the same code) and stay below one radian per cell for $\alpha \le 1$, so nearby cells get similar codes and similarity falls off smoothly
with distance, the spatial relationship the paper asks its encoding to reflect. Every entry is
in $[-1, 1]$ and every complete $(\sin, \cos)$ pair has norm one.

The cut to $D$ comes off the z block: for $D = 7, 8$ it drops the z axis entirely, and for
$D = 6k + 1$ it keeps only z's first sine (zero for the choices with $\omega_0 = 0$), so such
widths cannot tell cells apart in z, as in the official code.

Coordinates may be any real numbers: the code's ``changeX`` option rescales the x or y
coordinates (for example $x \in \{0, 1.6, 3.2\}$), which is :func:`grid_cells` with a
``spacing``. The code's run default, ``functionChoice='learned'``, loads a table of encodings
trained offline from a ``.npy`` file; that table is data, not a formula, and is not reproduced.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from qkv import _checks
from qkv.errors import ParameterError, ShapeError

Array = np.ndarray
#: The official code's frequency choices (``functionChoice``), in the order of its branches.
FREQUENCIES = ("original", "exp1", "exp2", "linear")
#: $\alpha$ of the ``exp1``, ``exp2`` and ``linear`` choices in the official runs.
DEFAULT_ALPHA = 0.9
#: The object grid ``(x, y, z)`` the official code encodes.
DEFAULT_GRID = (3, 11, 2)


def _check_choice(frequency: Any, alpha: Any) -> float:
    if frequency not in FREQUENCIES:
        raise ParameterError(
            f"frequency: expected one of {', '.join(FREQUENCIES)}, got {frequency!r}"
        )
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, (int, float, np.integer, np.floating))
        or not math.isfinite(alpha)
        or alpha <= 0
    ):
        raise ParameterError(f"alpha: expected a finite number > 0, got {alpha!r}")
    return float(alpha)


def _check_channels(channels: Any) -> int:
    channels = _checks.positive_int("channels", channels)
    if channels % 2:
        raise ShapeError(
            f"channels: expected an even number (sine and cosine come in pairs), got {channels}"
        )
    return channels


def frequencies(
    channels: int, *, frequency: str = "original", alpha: float = DEFAULT_ALPHA
) -> Array:
    r"""The angular frequencies $\omega_t$ of one axis, float64 ``(channels // 2,)``.

    Args:
        channels: $c$, the (even) number of channels of the axis.
        frequency: one of :data:`FREQUENCIES` (see the module docstring's table).
        alpha: $\alpha$ of ``exp1``, ``exp2`` and ``linear`` (unused by ``original``).
    """
    c = _check_channels(channels)
    alpha = _check_choice(frequency, alpha)
    even = np.arange(0, c, 2, dtype=np.float64)  # 2t, t = 0 .. c/2 - 1
    if frequency == "original":
        return 10000.0 ** (-even / c)
    if frequency == "exp1":
        return even**alpha / c
    if frequency == "exp2":
        return (even / c) ** alpha
    return even * alpha / c  # linear


def sinusoid(
    positions: Array, channels: int, *, frequency: str = "original", alpha: float = DEFAULT_ALPHA
) -> Array:
    r"""The 1-D encoding $\phi(p)$: sine and cosine of $p\,\omega_t$, interleaved.

    With ``frequency="original"`` this is the Transformer's sinusoid,
    $\phi(p)_{2t} = \sin(p / 10000^{2t/c})$ and $\phi(p)_{2t+1} = \cos(p / 10000^{2t/c})$.

    Args:
        positions: real positions of any shape ``S``.
        channels: $c$, even.
        frequency: one of :data:`FREQUENCIES`.
        alpha: $\alpha$ of the non-original choices.

    Returns:
        float64 ``(*S, channels)``.
    """
    omega = frequencies(channels, frequency=frequency, alpha=alpha)  # (c/2,)
    angle = np.asarray(positions, dtype=np.float64)[..., None] * omega  # (*S, c/2)
    pairs = np.stack([np.sin(angle), np.cos(angle)], axis=-1)  # (*S, c/2, 2)
    return pairs.reshape(*angle.shape[:-1], 2 * omega.size)  # (*S, c): sin, cos interleaved


def axis_channels(dim: int) -> int:
    r"""Channels per axis, $c = 2\lceil D/6 \rceil$ (three axes cover at least $D$ channels)."""
    dim = _checks.positive_int("dim", dim)
    return 2 * math.ceil(dim / 6)


def grid_cells(
    shape: tuple[int, int, int] = DEFAULT_GRID, spacing: tuple[float, float, float] = (1, 1, 1)
) -> Array:
    r"""The coordinates of every cell of an ``(X, Y, Z)`` grid, float64 ``(X, Y, Z, 3)``.

    Cell $(a, b, e)$ has coordinates $(a\,s_x, b\,s_y, e\,s_z)$; a spacing other than one
    rescales an axis as the official ``changeX`` option does.
    """
    if len(shape) != 3 or len(spacing) != 3:
        raise ShapeError(f"shape, spacing: expected three axes each, got {shape} and {spacing}")
    sizes = [_checks.positive_int("shape", s) for s in shape]
    if not all(isinstance(s, (int, float, np.integer, np.floating)) for s in spacing) or not all(
        math.isfinite(s) and s > 0 for s in spacing
    ):
        raise ParameterError(f"spacing: expected three finite numbers > 0, got {spacing!r}")
    axes = [np.arange(n, dtype=np.float64) * s for n, s in zip(sizes, spacing, strict=True)]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)  # (X, Y, Z, 3)


def object_pe(
    cells: Array,
    dim: int,
    *,
    frequency: str = "original",
    alpha: float = DEFAULT_ALPHA,
    dtype: Any = np.float64,
) -> Array:
    r"""The object-level encoding $\operatorname{PE}(x, y, z)$ of each object's cell.

    Args:
        cells: the cell coordinates $(x, y, z)$ of each object, any shape ``(*S, 3)`` (for
            example ``grid_cells()`` for the whole grid, or the cells of a scene's objects).
        dim: $D$, the model width; any $D \ge 1$ (the three axis blocks are cut to $D$).
        frequency: one of :data:`FREQUENCIES`: ``"original"``, ``"exp1"``, ``"exp2"``,
            ``"linear"``.
        alpha: $\alpha$ of ``exp1``, ``exp2`` and ``linear`` (0.9 in the official runs).
        dtype: of the result (computed in float64).

    Returns:
        ``(*S, dim)``: the x block $\phi(x)$, then $\phi(y)$, then $\phi(z)$, each
        $c = 2\lceil D/6 \rceil$ channels, cut to ``dim``.
    """
    cells = np.asarray(cells)
    if cells.ndim < 1 or cells.shape[-1] != 3 or cells.dtype.kind not in "iuf":
        raise ShapeError(
            f"cells: expected real coordinates (x, y, z) of shape (..., 3), "
            f"got {cells.dtype} {cells.shape}"
        )
    if not np.isfinite(cells).all():
        raise ParameterError("cells: expected finite coordinates, got NaN or infinity")
    c = axis_channels(dim)
    blocks = [sinusoid(cells[..., a], c, frequency=frequency, alpha=alpha) for a in range(3)]
    pe = np.concatenate(blocks, axis=-1)[..., :dim]  # (*S, dim): x, y, z blocks, cut to D
    return pe.astype(dtype, copy=False)
