"""Errors and warnings raised by qkv.

Every error subclasses a built-in (``ValueError`` or ``RuntimeError``), so code that already
catches those keeps working. Messages name the argument, what was expected and what was given.
"""

from __future__ import annotations


class ShapeError(ValueError):
    """An array has the wrong rank, or sizes that do not agree with the other arguments."""


class DTypeError(ValueError):
    """An array has an unsupported dtype, or arrays that must share a dtype do not."""


class ParameterError(ValueError):
    """A hyperparameter (budget, window, block size, bits, ...) is out of its range."""


class UnknownBackend(ValueError):
    """A backend name that is neither built in, registered, nor an importable module."""


class BackendUnavailable(RuntimeError):
    """A known backend that cannot run on this machine (package missing, no GPU)."""


class MissingOp(RuntimeError):
    """The chosen backend lacks an op and ``QKV_STRICT=1`` forbids the reference fallback."""


class Unsupported(Exception):
    """Raised by a backend op, before any work, for inputs it does not handle.

    The dispatcher catches it and runs the reference instead, with a ``FallbackWarning``
    that carries the reason (or a ``MissingOp`` error under ``QKV_STRICT=1``).
    """


class FallbackWarning(UserWarning):
    """An op ran on the reference because the chosen backend lacks it (warned once per pair)."""
