"""The Numba backend: compiled CPU kernels (``@njit``, ``parallel=True`` where it pays).

Takes and returns NumPy arrays; torch tensors and CuPy arrays are copied in and out by the
dispatcher. Kernels compile on first use and are cached on disk.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qkv import _arrays

NAME = "numba"


def available() -> tuple[bool, str]:
    try:
        import numba  # noqa: F401
    except ImportError:
        return False, "the numba package is not installed; fix: pip install 'qkv[numba]'"
    return True, "numba is installed"


def asarray(x: Any) -> np.ndarray:
    return _arrays.to_numpy(x)


def to_numpy(x: Any) -> np.ndarray:
    return np.asarray(x)
