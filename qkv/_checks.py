"""Input checks shared by the reference and the dispatcher.

They run on the caller's arrays (NumPy, torch or CuPy) before any backend sees them, so every
backend gets the same clear errors, and a compiled kernel never indexes out of bounds.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from qkv import _arrays
from qkv.errors import DTypeError, ParameterError, ShapeError

FLOATS = ("float16", "bfloat16", "float32", "float64")


class AttentionDims(NamedTuple):
    """Sizes of an attention call: ``q (B, H, N, D)``, ``k (B, Hkv, M, D)``, ``v (B, Hkv, M, Dv)``."""

    B: int
    H: int
    Hkv: int
    N: int
    M: int
    D: int
    Dv: int

    @property
    def group(self) -> int:
        """Query heads per KV head, ``G = H / Hkv``."""
        return self.H // self.Hkv


def array(name: str, x: Any, *, rank: int, layout: str) -> None:
    """``x`` is a floating array of the given rank (``layout`` names its axes for messages)."""
    if not _arrays.is_array(x):
        raise TypeError(
            f"{name}: expected a NumPy, torch or CuPy array {layout}, got {type(x).__name__}"
        )
    if x.ndim != rank:
        raise ShapeError(f"{name}: expected rank {rank} {layout}, got shape {tuple(x.shape)}")
    if _arrays.dtype_name(x) not in FLOATS:
        raise DTypeError(
            f"{name}: expected a floating dtype ({', '.join(FLOATS)}), got {_arrays.dtype_name(x)}"
        )
    if 0 in tuple(x.shape):
        raise ShapeError(f"{name}: expected no empty axis {layout}, got shape {tuple(x.shape)}")


def same_dtype(**arrays: Any) -> str:
    names = {name: _arrays.dtype_name(x) for name, x in arrays.items()}
    if len(set(names.values())) > 1:
        given = ", ".join(f"{n} {d}" for n, d in names.items())
        raise DTypeError(f"{', '.join(names)}: expected one dtype, got {given}")
    return next(iter(names.values()))


def attention(
    q: Any,
    k: Any,
    v: Any,
    *,
    mask: Any = None,
    causal: bool = False,
    scale: float | None = None,
    **_: Any,
) -> AttentionDims:
    """Check the arguments of an attention op and return its sizes.

    Raises ``ShapeError`` for ranks other than 4, head dims of ``q`` and ``k`` that differ,
    ``k`` and ``v`` that disagree in batch, heads or tokens, ``H % Hkv != 0``, empty axes or a
    mask that does not broadcast to ``(B, H, N, M)``; ``DTypeError`` for non-float or mixed
    dtypes; ``ParameterError`` for a non-finite or non-positive ``scale``.
    """
    array("q", q, rank=4, layout="(B, H, N, D)")
    array("k", k, rank=4, layout="(B, Hkv, M, D)")
    array("v", v, rank=4, layout="(B, Hkv, M, Dv)")
    same_dtype(q=q, k=k, v=v)
    B, H, N, D = q.shape
    Bk, Hkv, M, Dk = k.shape
    Bv, Hv, Mv, Dv = v.shape
    if Bk != B or Bv != B:
        raise ShapeError(f"k, v: expected batch B={B} as q, got k {Bk} and v {Bv}")
    if Dk != D:
        raise ShapeError(f"k: expected head dim D={D} as q, got {Dk} (k shape {tuple(k.shape)})")
    if Hv != Hkv:
        raise ShapeError(f"v: expected Hkv={Hkv} heads as k, got {Hv}")
    if Mv != M:
        raise ShapeError(f"v: expected M={M} tokens as k, got {Mv}")
    if H % Hkv:
        raise ShapeError(
            f"q, k: expected query heads H divisible by KV heads Hkv, got H={H}, Hkv={Hkv}"
        )
    if mask is not None:
        attention_mask(mask, (B, H, N, M))
    if not isinstance(causal, (bool, np.bool_)):
        raise ParameterError(f"causal: expected a bool, got {causal!r}")
    if scale is not None and not (
        isinstance(scale, (int, float, np.floating)) and math.isfinite(scale) and scale > 0
    ):
        raise ParameterError(f"scale: expected a finite number > 0 or None, got {scale!r}")
    return AttentionDims(B, H, Hkv, N, M, D, Dv)


def attention_mask(mask: Any, target: tuple[int, int, int, int]) -> None:
    """A boolean (True = attend) or additive float mask that broadcasts to ``(B, H, N, M)``."""
    if not _arrays.is_array(mask):
        raise TypeError(f"mask: expected an array broadcastable to {target}, got {type(mask)}")
    dtype = _arrays.dtype_name(mask)
    if dtype != "bool" and dtype not in FLOATS:
        raise DTypeError(f"mask: expected bool (True = attend) or a float dtype, got {dtype}")
    shape = tuple(mask.shape)
    if len(shape) > 4:
        raise ShapeError(f"mask: expected at most 4 axes broadcastable to {target}, got {shape}")
    try:
        ok = np.broadcast_shapes(shape, target) == target
    except ValueError:
        ok = False
    if not ok:
        raise ShapeError(
            f"mask: expected a shape broadcastable to (B, H, N, M)={target}, got {shape}"
        )


def positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ParameterError(f"{name}: expected an integer >= 1, got {value!r}")
    return int(value)


def attention_call(
    q: Any, k: Any, v: Any, *, block_q: int = 64, block_k: int = 64, **kw: Any
) -> AttentionDims:
    """Arguments of ``sdpa`` and ``flash`` (the latter adds the tile sizes)."""
    positive_int("block_q", block_q)
    positive_int("block_k", block_k)
    return attention(q, k, v, **kw)


def rope_call(
    x: Any, *, positions: Any = None, offset: int = 0, pairing: str = "adjacent", **_: Any
) -> None:
    """Arguments of ``rope``: ``x (B, H, N, D)`` with ``D`` even, integer positions."""
    array("x", x, rank=4, layout="(B, H, N, D)")
    B, H, N, D = x.shape
    if D % 2:
        raise ShapeError(f"x: expected an even head dim D for rotation pairs, got D={D}")
    if pairing not in ("adjacent", "half"):
        raise ParameterError(f"pairing: expected 'adjacent' or 'half', got {pairing!r}")
    if positions is not None:
        shape, dtype = tuple(positions.shape), str(positions.dtype).removeprefix("torch.")
        if shape not in ((N,), (B, N)) or not dtype.startswith(("int", "uint")):
            raise ShapeError(
                f"positions: expected integers of shape ({N},) or ({B}, {N}), got {dtype} {shape}"
            )
    elif isinstance(offset, bool) or not isinstance(offset, (int, np.integer)):
        raise ParameterError(f"offset: expected an integer, got {offset!r}")


def sigmoid_call(
    q: Any, k: Any, v: Any, *, bias: Any = None, alibi: bool = False, **kw: Any
) -> AttentionDims:
    """Arguments of ``sigmoid``: those of ``sdpa`` plus a finite scalar ``bias`` (or ``None``)
    and a bool ``alibi``."""
    dims = attention(q, k, v, **kw)
    if bias is not None and (
        isinstance(bias, (bool, np.bool_))
        or not isinstance(bias, (int, float, np.integer, np.floating))
        or not math.isfinite(bias)
    ):
        raise ParameterError(f"bias: expected a finite real number or None, got {bias!r}")
    if not isinstance(alibi, (bool, np.bool_)):
        raise ParameterError(f"alibi: expected a bool, got {alibi!r}")
    return dims


#: Degrees ``tensor_approx`` accepts: even, so that the Taylor polynomial of ``exp`` is positive
#: on the whole real line (odd ones go negative and the normaliser could vanish).
TENSOR_DEGREES = (2, 4, 6, 8, 10, 12)
#: Most polynomial features ``C(D + degree, degree)`` ``tensor_approx`` builds per head.
TENSOR_MAX_FEATURES = 2**18


def tensor_call(
    q: Any, k1: Any, k2: Any, v1: Any, v2: Any, *, scale: float = 1.0, **_: Any
) -> AttentionDims:
    """Check the arguments of triple-wise (Kronecker) attention and return its sizes.

    ``q (B, H, N, D)``, ``k1`` and ``k2`` both ``(B, Hkv, M, D)``, ``v1`` and ``v2`` both
    ``(B, Hkv, M, Dv)``, one floating dtype, ``H % Hkv == 0``, ``scale`` finite and > 0.
    ``Dv`` is the value head dim of the result; ``M`` counts the keys of *each* factor (the
    pairs number ``M**2``).
    """
    array("q", q, rank=4, layout="(B, H, N, D)")
    for name, x, layout in (
        ("k1", k1, "(B, Hkv, M, D)"),
        ("k2", k2, "(B, Hkv, M, D)"),
        ("v1", v1, "(B, Hkv, M, Dv)"),
        ("v2", v2, "(B, Hkv, M, Dv)"),
    ):
        array(name, x, rank=4, layout=layout)
    same_dtype(q=q, k1=k1, k2=k2, v1=v1, v2=v2)
    B, H, N, D = q.shape
    Bk, Hkv, M, Dk = k1.shape
    if tuple(k2.shape) != tuple(k1.shape):
        raise ShapeError(f"k2: expected the shape of k1 {tuple(k1.shape)}, got {tuple(k2.shape)}")
    if tuple(v2.shape) != tuple(v1.shape):
        raise ShapeError(f"v2: expected the shape of v1 {tuple(v1.shape)}, got {tuple(v2.shape)}")
    Bv, Hv, Mv, Dv = v1.shape
    if Bk != B or Bv != B:
        raise ShapeError(f"k1, v1: expected batch B={B} as q, got k1 {Bk} and v1 {Bv}")
    if Dk != D:
        raise ShapeError(f"k1: expected head dim D={D} as q, got {Dk} (k1 shape {tuple(k1.shape)})")
    if Hv != Hkv:
        raise ShapeError(f"v1: expected Hkv={Hkv} heads as k1, got {Hv}")
    if Mv != M:
        raise ShapeError(f"v1: expected M={M} tokens as k1, got {Mv}")
    if H % Hkv:
        raise ShapeError(
            f"q, k1: expected query heads H divisible by KV heads Hkv, got H={H}, Hkv={Hkv}"
        )
    if not (
        isinstance(scale, (int, float, np.integer, np.floating))
        and not isinstance(scale, bool)
        and math.isfinite(scale)
        and scale > 0
    ):
        raise ParameterError(f"scale: expected a finite number > 0, got {scale!r}")
    return AttentionDims(B, H, Hkv, N, M, D, Dv)


def tensor_approx_call(
    q: Any, k1: Any, k2: Any, v1: Any, v2: Any, *, degree: int = 4, **kw: Any
) -> AttentionDims:
    """Arguments of ``tensor_approx``: those of ``tensor`` and a supported ``degree``.

    ``degree`` must be one of :data:`TENSOR_DEGREES` and the number of monomials of total
    degree at most ``degree`` in ``D`` variables, ``C(D + degree, degree)``, at most
    :data:`TENSOR_MAX_FEATURES`.
    """
    dims = tensor_call(q, k1, k2, v1, v2, **kw)
    if isinstance(degree, bool) or not isinstance(degree, (int, np.integer)):
        raise ParameterError(f"degree: expected an even integer, got {degree!r}")
    if degree not in TENSOR_DEGREES:
        raise ParameterError(
            f"degree: expected one of {TENSOR_DEGREES} (an odd Taylor polynomial of exp takes "
            f"negative values, so its normaliser could vanish), got {degree!r}"
        )
    features = math.comb(dims.D + int(degree), int(degree))
    if features > TENSOR_MAX_FEATURES:
        raise ParameterError(
            f"degree: degree {degree} at head dim D={dims.D} needs C({dims.D + degree}, {degree})"
            f" = {features} polynomial features per head, more than {TENSOR_MAX_FEATURES}; "
            "lower the degree or compute exactly with tensor()"
        )
    return dims
