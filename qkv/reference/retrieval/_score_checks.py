"""Input checks shared by the score-based retrieval references (cosine adapter, ANNCUR)."""

from __future__ import annotations

from typing import Any

import numpy as np

from qkv.errors import DTypeError, ParameterError, ShapeError


def matrix(name: str, x: Any, layout: str, *, empty: str = "") -> np.ndarray:
    """``x`` as a finite floating 2-D NumPy array with no empty axis.

    Raises ``ShapeError`` for another rank or an empty axis (``empty`` says what an empty axis
    means, e.g. "an empty document list"), ``DTypeError`` for a non-float dtype and
    ``ParameterError`` for NaN or infinite entries.
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise ShapeError(f"{name}: expected a 2-D array {layout}, got shape {x.shape}")
    if 0 in x.shape:
        what = f" ({empty})" if empty else ""
        raise ShapeError(f"{name}: expected no empty axis {layout}, got shape {x.shape}{what}")
    if x.dtype not in (np.float32, np.float64):
        raise DTypeError(f"{name}: expected float32 or float64, got {x.dtype}")
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).sum())
        raise ParameterError(f"{name}: expected finite values, got {bad} NaN or infinite entries")
    return x


def top_count(name: str, k: Any, size: int, what: str) -> int:
    """``k`` as an int in ``[1, size]`` (``what`` names the set ``k`` is drawn from)."""
    if isinstance(k, bool) or not isinstance(k, int | np.integer):
        raise ParameterError(f"{name}: expected an integer, got {k!r}")
    if not 1 <= k <= size:
        raise ParameterError(f"{name}: expected 1 <= {name} <= {size} ({what}), got {k}")
    return int(k)


def indices(name: str, x: Any, size: int) -> np.ndarray:
    """``x`` as a non-empty 1-D int64 array of distinct indices in ``[0, size)``."""
    x = np.asarray(x)
    if x.ndim != 1 or x.size == 0:
        raise ShapeError(f"{name}: expected a non-empty 1-D index array, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.integer):
        raise DTypeError(f"{name}: expected integer indices, got {x.dtype}")
    if x.min() < 0 or x.max() >= size:
        raise ParameterError(f"{name}: expected indices in [0, {size}), got [{x.min()}, {x.max()}]")
    if np.unique(x).size != x.size:
        raise ParameterError(f"{name}: expected distinct indices, got repeats")
    return x.astype(np.int64)
