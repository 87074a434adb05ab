"""A call of an op, as the conformance kit draws, rounds, describes and replays it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qkv import _arrays
from qkv.testing.tolerances import round_to


def _is_float_array(x: Any) -> bool:
    return isinstance(x, np.ndarray) and np.issubdtype(x.dtype, np.floating)


def _show(value: Any) -> str:
    """A short description of an argument: shape and kind for arrays, ``repr`` otherwise."""
    if isinstance(value, np.ndarray):
        kind = {"b": "bool", "i": str(value.dtype), "u": str(value.dtype)}
        return f"{kind.get(value.dtype.kind, 'float')}{tuple(value.shape)}"
    return repr(value)


def host(x: Any, to_numpy: Callable[[Any], Any] = _arrays.to_numpy) -> Any:
    """An array as a NumPy array through ``to_numpy`` (a bfloat16 tensor widened to float32
    first: NumPy has no bfloat16); anything that is not an array is returned unchanged."""
    if not _arrays.is_array(x):
        return x
    if _arrays.kind(x) == "torch" and _arrays.dtype_name(x) == "bfloat16":
        x = x.float()
    return np.asarray(to_numpy(x))


@dataclass(frozen=True)
class Case:
    """One call of an op.

    Attributes:
        op: the op's name.
        args: positional arguments; drawn floating arrays are float64.
        kwargs: keyword arguments (arrays or plain values).
        notes: how the values were made (seed, magnitudes, fully masked rows...), for the
            reproducer.
    """

    op: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    notes: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of_call(cls, op: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Case:
        """The call ``op(*args, **kwargs)`` with arrays of any kind, floats widened to float64."""

        def widen(x: Any) -> Any:
            x = host(x)
            return x.astype(np.float64) if _is_float_array(x) else x

        return cls(op, tuple(widen(a) for a in args), {k: widen(v) for k, v in kwargs.items()})

    def map_floats(self, fn: Callable[[np.ndarray], np.ndarray]) -> Case:
        """The same call with ``fn`` applied to every floating array."""

        def f(x: Any) -> Any:
            return fn(x) if _is_float_array(x) else x

        return Case(
            self.op,
            tuple(f(a) for a in self.args),
            {key: f(value) for key, value in self.kwargs.items()},
            self.notes,
        )

    def rounded(self, dtype: str) -> Case:
        """The same call with every floating array rounded to ``dtype`` (kept as float64)."""
        return self.map_floats(lambda x: round_to(x, dtype))

    def astype(self, dtype: str) -> Case:
        """The same call with every floating array cast to the NumPy dtype ``dtype``."""
        return self.map_floats(lambda x: x.astype(dtype))

    def describe(self) -> str:
        """``op(arguments) [notes]``: enough to read what was called and to rebuild it."""
        parts = [_show(a) for a in self.args]
        parts += [f"{key}={_show(value)}" for key, value in self.kwargs.items()]
        notes = ", ".join(f"{key}={value}" for key, value in self.notes.items())
        return f"{self.op}({', '.join(parts)})" + (f" [{notes}]" if notes else "")
