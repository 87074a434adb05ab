"""qkv: queries, keys and values from recent attention research.

Every op below runs on the backend chosen by ``QKV_BACKEND``, ``qkv.use_backend(...)`` or a
per-call ``backend=`` keyword, and returns the array type it was given. The readable NumPy
definitions live in :mod:`qkv.reference`.
"""

from __future__ import annotations

from qkv import _checks
from qkv._dispatch import current_backend, known_backends, op, use_backend
from qkv.errors import (
    BackendUnavailable,
    DTypeError,
    FallbackWarning,
    MissingOp,
    ParameterError,
    ShapeError,
    UnknownBackend,
)
from qkv.reference import core as _core

__version__ = "0.1.0"

# core: softmax attention and positions
sdpa = op(_core.sdpa, check=_checks.attention_call)
flash = op(_core.flash, check=_checks.attention_call)
rope = op(_core.rope, check=_checks.rope_call)
alibi = _core.alibi  # a bias generator (no array input), not dispatched
alibi_slopes = _core.alibi_slopes

__all__ = [
    "BackendUnavailable",
    "DTypeError",
    "FallbackWarning",
    "MissingOp",
    "ParameterError",
    "ShapeError",
    "UnknownBackend",
    "alibi",
    "alibi_slopes",
    "current_backend",
    "flash",
    "known_backends",
    "rope",
    "sdpa",
    "use_backend",
]
