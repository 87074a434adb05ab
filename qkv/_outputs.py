"""Output buffers for backend kernels, poisoned while the conformance kit runs.

A kernel that forgets to write part of its output would pass a test by luck if the buffer
happened to hold the right bytes. Backends therefore allocate their outputs with :func:`empty`;
inside :func:`poisoned` (which the conformance kit enters) the buffer is filled with NaN
(floats) or the most negative integer (indices), so every unwritten element fails the check.
``QKV_POISON=1`` turns poisoning on for a whole process.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from qkv import _arrays

_poison: contextvars.ContextVar[bool] = contextvars.ContextVar("qkv_poison", default=False)


def poisoning() -> bool:
    """Whether :func:`empty` fills its buffers with poison now."""
    return _poison.get() or os.environ.get("QKV_POISON", "") == "1"


@contextlib.contextmanager
def poisoned() -> Iterator[None]:
    """Poison every output buffer allocated inside the block."""
    token = _poison.set(True)
    try:
        yield
    finally:
        _poison.reset(token)


def empty(shape: tuple[int, ...], *, like: Any, dtype: Any = None) -> Any:
    """An uninitialised array of ``shape`` in the library and on the device of ``like``.

    ``dtype`` defaults to ``like.dtype`` and is a dtype of that library (``np.float32``,
    ``torch.float16``, ...).
    """
    dtype = like.dtype if dtype is None else dtype
    kind = _arrays.kind(like)
    if kind == "torch":
        import torch

        if not poisoning():
            return torch.empty(shape, dtype=dtype, device=like.device)
        fill = float("nan") if dtype.is_floating_point else torch.iinfo(dtype).min
        return torch.full(shape, fill, dtype=dtype, device=like.device)
    xp = np
    if kind == "cupy":
        import cupy as xp
    if not poisoning():
        return xp.empty(shape, dtype=dtype)
    fill = np.nan if np.issubdtype(np.dtype(dtype), np.floating) else np.iinfo(dtype).min
    return xp.full(shape, fill, dtype=dtype)
