"""The conformance kit: check any backend against the float64 reference.

``check_backend(name)`` (also ``qkv check NAME`` and ``pytest --qkv-backend=NAME``) draws calls
of every op the backend provides with hypothesis and compares the backend's outputs with the
reference's. :mod:`qkv.testing.tolerances` holds the comparison rule (``compare``,
``compare_indices``), and ``compare_op(op, result, args, kwargs)`` applies it to one call of an
op, for the tour and backend tests; neither needs hypothesis.

Names are imported on first use, so that importing the pytest plugin stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what the lazy names below resolve to, for readers and static tools
    from qkv.testing.cases import Case
    from qkv.testing.check import DTYPES, Failure, OpResult, Report, check_backend
    from qkv.testing.specs import SPECS, OpSpec, compare_op, register
    from qkv.testing.tolerances import (
        TOLERANCES,
        Comparison,
        Tolerance,
        assert_close,
        compare,
        compare_indices,
        round_to,
    )

_EXPORTS = {
    "check_backend": "qkv.testing.check",
    "Report": "qkv.testing.check",
    "OpResult": "qkv.testing.check",
    "Failure": "qkv.testing.check",
    "DTYPES": "qkv.testing.check",
    "Case": "qkv.testing.cases",
    "compare_op": "qkv.testing.specs",
    "OpSpec": "qkv.testing.specs",
    "SPECS": "qkv.testing.specs",
    "register": "qkv.testing.specs",
    "compare": "qkv.testing.tolerances",
    "assert_close": "qkv.testing.tolerances",
    "compare_indices": "qkv.testing.tolerances",
    "round_to": "qkv.testing.tolerances",
    "Comparison": "qkv.testing.tolerances",
    "Tolerance": "qkv.testing.tolerances",
    "TOLERANCES": "qkv.testing.tolerances",
}

__all__ = [
    "DTYPES",
    "SPECS",
    "TOLERANCES",
    "Case",
    "Comparison",
    "Failure",
    "OpResult",
    "OpSpec",
    "Report",
    "Tolerance",
    "assert_close",
    "check_backend",
    "compare",
    "compare_indices",
    "compare_op",
    "register",
    "round_to",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'qkv.testing' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
