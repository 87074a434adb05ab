"""Checks a policy runs on the :class:`~qkv.reference.kv.policy.CacheView` it is handed."""

from __future__ import annotations

import numpy as np

from qkv.errors import ShapeError
from qkv.reference.kv.policy import CacheView


def check_layout(cache: CacheView, *, who: str) -> tuple[int, int, int, int]:
    """The cache's ``(B, Hkv, C, H)``, or a :class:`ShapeError` naming the field that is off.

    Expected: keys ``(B, Hkv, C, D)``, values ``(B, Hkv, C, Dv)``, indices and positions
    ``(B, Hkv, C)``, next_position ``(B, Hkv)`` and queries ``(B, H, W, D)`` with ``H`` a
    multiple of ``Hkv``.
    """
    if not isinstance(cache, CacheView):
        raise TypeError(f"{who}: expected a CacheView, got {type(cache).__name__}")
    keys = np.shape(cache.keys)
    if len(keys) != 4:
        raise ShapeError(f"{who}: cache keys expected (B, Hkv, C, D), got shape {keys}")
    B, Hkv, C, D = keys
    expected = {
        "values": (B, Hkv, C, np.shape(cache.values)[-1] if np.ndim(cache.values) else -1),
        "indices": (B, Hkv, C),
        "positions": (B, Hkv, C),
        "next_position": (B, Hkv),
    }
    for name, shape in expected.items():
        got = tuple(np.shape(getattr(cache, name)))
        if got != shape:
            raise ShapeError(f"{who}: cache {name} expected shape {shape}, got {got}")
    q = tuple(np.shape(cache.queries))
    if len(q) != 4 or q[0] != B or q[3] != D or q[1] % Hkv:
        raise ShapeError(
            f"{who}: cache queries expected (B, H, W, D) = ({B}, a multiple of {Hkv}, W, {D}), "
            f"got {q}"
        )
    return B, Hkv, C, q[1]
