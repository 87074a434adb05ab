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
from qkv.reference import forms as _forms
from qkv.reference.forms import agent_attention as _agent_attention
from qkv.reference.forms import gaussian_attention as _gaussian
from qkv.reference.forms import selective_attention as _selective_attention

__version__ = "0.1.0"

# core: softmax attention and positions
sdpa = op(_core.sdpa, check=_checks.attention_call)
flash = op(_core.flash, check=_checks.attention_call)
rope = op(_core.rope, check=_checks.rope_call)
alibi = _core.alibi  # a bias generator (no array input), not dispatched
alibi_slopes = _core.alibi_slopes

# forms: other score functions
sigmoid = op(_forms.sigmoid, check=_checks.sigmoid_call)
gaussian = op(_gaussian.gaussian, check=_gaussian.check_gaussian)
tensor = op(_forms.tensor, check=_checks.tensor_call)
tensor_approx = op(_forms.tensor_approx, check=_checks.tensor_approx_call)
# forms built from sdpa calls: their hops run on the chosen backend's sdpa
agent = _agent_attention.dispatched_agent
selective = _selective_attention.dispatched_selective

__all__ = [
    "BackendUnavailable",
    "DTypeError",
    "FallbackWarning",
    "MissingOp",
    "ParameterError",
    "ShapeError",
    "UnknownBackend",
    "agent",
    "alibi",
    "alibi_slopes",
    "current_backend",
    "flash",
    "gaussian",
    "known_backends",
    "rope",
    "sdpa",
    "selective",
    "sigmoid",
    "tensor",
    "tensor_approx",
    "use_backend",
]
