"""The NumPy reference as a backend: it provides every registered op.

Other array types are copied to NumPy on the way in and back to the caller's type on the way out
(torch tensors are detached, so gradients do not flow through the reference).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qkv import _arrays

NAME = "reference"


def available() -> tuple[bool, str]:
    return True, "NumPy is always available"


def asarray(x: Any) -> np.ndarray:
    return _arrays.to_numpy(x)


def to_numpy(x: Any) -> np.ndarray:
    return np.asarray(x)
