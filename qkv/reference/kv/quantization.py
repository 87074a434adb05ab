r"""Asymmetric min-max quantisation of a KV cache at 2, 4 or 8 bits, packed into ``uint8``.

The quantiser shared by the KV-quantisation methods (ZipCache, SAQ; KIVI-style caches). A group
$g$ of elements is stored as $b$-bit integer codes plus a scale and a zero point:

$$
s_g = \frac{\max_g x - \min_g x}{2^b - 1}, \qquad
z_g = \min_g x, \qquad
q = \operatorname{clip}\Big(\Big\lfloor \frac{x - z_g}{s_g} + \tfrac12 \Big\rfloor,\;
0,\; 2^b - 1\Big), \qquad
\hat x = q\, s_g + z_g .
$$

A group with $\max = \min$ has $s_g = 0$, codes $0$ and $\hat x = z_g$ exactly. Rounding is
half-up (``floor(t + 1/2)``) so that every backend gives the same codes; then
$|x - \hat x| \le s_g / 2$ up to the rounding of the arithmetic.

Two groupings of a cache ``x (B, H, N, D)``:

* ``axis="token"``: per token, over ``group_size`` consecutive channels (default all $D$);
  scales and zero points ``(B, H, N, D / group_size)``;
* ``axis="channel"``: per channel, over ``group_size`` consecutive tokens (default all $N$);
  scales and zero points ``(B, H, N / group_size, D)``.

Codes are packed along the channel axis, $8/b$ codes a byte, the first code in the low bits:
``packed (B, H, N, ceil(D b / 8))`` ``uint8``. :func:`storage_bits` counts the bits the packed
codes and the parameters take, exactly (scales and zero points at ``param_bits`` each, 16 by
default as in fp16 caches).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from qkv import _arrays
from qkv.errors import DTypeError, ParameterError, ShapeError

Array = np.ndarray

#: The supported code widths.
BITS = (2, 4, 8)
#: The groupings: statistics per token (over channels) or per channel (over tokens).
AXES = ("token", "channel")
_FLOATS = ("float16", "float32", "float64")


def check_bits(bits: Any, name: str = "bits") -> int:
    """A code width in :data:`BITS`, or a clear error."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or bits not in BITS:
        raise ParameterError(f"{name}: expected one of {BITS}, got {bits!r}")
    return int(bits)


def _check_axis(axis: Any) -> str:
    if axis not in AXES:
        raise ParameterError(f"axis: expected one of {AXES}, got {axis!r}")
    return axis


def _group(group_size: Any, length: int, what: str) -> int:
    """The group size along an axis of ``length`` (``None``: the whole axis)."""
    if group_size is None:
        return length
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)):
        raise ParameterError(f"group_size: expected a positive int or None, got {group_size!r}")
    if group_size < 1 or length % group_size:
        raise ParameterError(
            f"group_size: expected a positive divisor of the {what} ({length}), got {group_size}"
        )
    return int(group_size)


def check_quantize(
    x: Any, *, bits: int = 4, axis: str = "token", group_size: int | None = None
) -> tuple[int, int]:
    """Check the arguments of :func:`quantize`; return ``(group along tokens, along channels)``."""
    if not _arrays.is_array(x):
        raise TypeError(f"x: expected an array (B, H, N, D), got {type(x).__name__}")
    if x.ndim != 4 or 0 in tuple(x.shape):
        raise ShapeError(f"x: expected a non-empty (B, H, N, D) array, got shape {tuple(x.shape)}")
    if _arrays.dtype_name(x) not in _FLOATS:
        raise DTypeError(f"x: expected one of {_FLOATS}, got {_arrays.dtype_name(x)}")
    check_bits(bits)
    _, _, N, D = x.shape
    if _check_axis(axis) == "token":
        return 1, _group(group_size, D, "head dim D")
    return _group(group_size, N, "token count N"), 1


def check_dequantize(
    packed: Any,
    scale: Any,
    zero: Any,
    *,
    bits: int = 4,
    axis: str = "token",
    dim: int | None = None,
) -> tuple[int, int, int]:
    """Check the arguments of :func:`dequantize`; return ``(D, group along tokens, channels)``."""
    check_bits(bits)
    _check_axis(axis)
    if not _arrays.is_array(packed) or _arrays.dtype_name(packed) != "uint8" or packed.ndim != 4:
        raise DTypeError(
            f"packed: expected a uint8 array (B, H, N, bytes), got "
            f"{getattr(packed, 'dtype', type(packed).__name__)} {tuple(np.shape(packed))}"
        )
    for name, a in (("scale", scale), ("zero", zero)):
        if not _arrays.is_array(a) or _arrays.dtype_name(a) not in _FLOATS or a.ndim != 4:
            raise DTypeError(f"{name}: expected a floating (B, H, ., .) array, got {a!r:.60}")
    if tuple(scale.shape) != tuple(zero.shape) or _arrays.dtype_name(scale) != _arrays.dtype_name(
        zero
    ):
        raise ShapeError(
            f"zero: expected the shape and dtype of scale {tuple(scale.shape)} "
            f"{_arrays.dtype_name(scale)}, got {tuple(zero.shape)} {_arrays.dtype_name(zero)}"
        )
    B, H, N, nbytes = packed.shape
    D = nbytes * 8 // bits if dim is None else dim
    if isinstance(D, bool) or not isinstance(D, (int, np.integer)) or D < 1:
        raise ParameterError(f"dim: expected a positive int or None, got {dim!r}")
    if math.ceil(D * bits / 8) != nbytes:
        raise ShapeError(
            f"packed: {D} codes of {bits} bits take {math.ceil(D * bits / 8)} bytes, got {nbytes}"
        )
    gn, gd = scale.shape[2:]
    if axis == "token":
        ok = gn == N and D % gd == 0
        expected = f"(B, H, N, D / group) = ({B}, {H}, {N}, a divisor of {D})"
    else:
        ok = gd == D and N % gn == 0
        expected = f"(B, H, N / group, D) = ({B}, {H}, a divisor of {N}, {D})"
    if not ok or tuple(scale.shape[:2]) != (B, H):
        raise ShapeError(f"scale: expected {expected}, got {tuple(scale.shape)}")
    return int(D), N // gn, D // gd


def _affine(x: Array, group_n: int, group_d: int, levels: int) -> tuple[Array, Array, Array]:
    """Codes ``(B, H, N, D)`` uint8, scale and zero point per group, in ``x``'s dtype."""
    B, H, N, D = x.shape
    g = x.reshape(B, H, N // group_n, group_n, D // group_d, group_d)  # groups as axes 3, 5
    lo = g.min(axis=(3, 5), keepdims=True)  # (B, H, N/gn, 1, D/gd, 1)
    hi = g.max(axis=(3, 5), keepdims=True)
    scale = (hi - lo) / x.dtype.type(levels)
    nonzero = scale > 0
    t = (g - lo) / np.where(nonzero, scale, x.dtype.type(1))  # (B, H, N/gn, gn, D/gd, gd)
    q = np.clip(np.floor(t + x.dtype.type(0.5)), 0, levels)
    q = np.where(nonzero, q, 0).astype(np.uint8).reshape(B, H, N, D)  # (B, H, N, D)
    shape = (B, H, N // group_n, D // group_d)
    return q, scale.reshape(shape), lo.reshape(shape)


def pack(codes: Array, bits: int) -> Array:
    """Pack ``codes (..., D)`` of ``bits`` bits into bytes ``(..., ceil(D bits / 8))``."""
    per = 8 // bits
    D = codes.shape[-1]
    padded = np.zeros((*codes.shape[:-1], -(-D // per) * per), dtype=np.uint8)
    padded[..., :D] = codes
    lanes = padded.reshape(*codes.shape[:-1], -1, per)  # (..., bytes, per)
    shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)  # (per,)
    return np.bitwise_or.reduce(lanes << shifts, axis=-1).astype(np.uint8)


def unpack(packed: Array, bits: int, dim: int) -> Array:
    """The first ``dim`` codes of each row of ``packed (..., bytes)``, ``(..., dim)`` uint8."""
    per = 8 // bits
    shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)  # (per,)
    lanes = (packed[..., None] >> shifts) & np.uint8((1 << bits) - 1)  # (..., bytes, per)
    return lanes.reshape(*packed.shape[:-1], -1)[..., :dim]  # (..., dim)


def quantize(
    x: Array, *, bits: int = 4, axis: str = "token", group_size: int | None = None
) -> tuple[Array, Array, Array]:
    r"""Quantise ``x`` to ``bits``-bit codes with a scale and zero point per group.

    Args:
        x: keys or values ``(B, H, N, D)``, float16/32/64 (computed in that dtype).
        bits: code width, 2, 4 or 8.
        axis: ``"token"`` (statistics per token over channels) or ``"channel"`` (per channel
            over tokens).
        group_size: channels (``"token"``) or tokens (``"channel"``) per group; must divide
            that axis (default: the whole axis).

    Returns:
        ``(packed, scale, zero)``: codes ``(B, H, N, ceil(D bits / 8))`` uint8, and scale and
        zero point ``(B, H, N, D / group)`` (``"token"``) or ``(B, H, N / group, D)``
        (``"channel"``) in ``x``'s dtype.
    """
    group_n, group_d = check_quantize(x, bits=bits, axis=axis, group_size=group_size)
    codes, scale, zero = _affine(np.asarray(x), group_n, group_d, (1 << bits) - 1)
    return pack(codes, bits), scale, zero


def dequantize(
    packed: Array,
    scale: Array,
    zero: Array,
    *,
    bits: int = 4,
    axis: str = "token",
    dim: int | None = None,
) -> Array:
    r"""Rebuild $\hat x = q\,s_g + z_g$ from :func:`quantize`'s output.

    Args:
        packed: codes ``(B, H, N, bytes)`` uint8.
        scale: per-group scales, shaped as :func:`quantize` returns them.
        zero: per-group zero points, shaped as ``scale``.
        bits: the code width the codes were packed with.
        axis: the grouping the codes were made with.
        dim: the head dim ``D`` (default ``bytes * 8 / bits``; needed when ``D bits`` is not a
            multiple of 8).

    Returns:
        ``x_hat (B, H, N, D)`` in ``scale``'s dtype.
    """
    D, group_n, group_d = check_dequantize(packed, scale, zero, bits=bits, axis=axis, dim=dim)
    q = unpack(np.asarray(packed), bits, D).astype(scale.dtype)  # (B, H, N, D)
    B, H, N, _ = q.shape
    s = np.repeat(np.repeat(scale, group_n, axis=2), group_d, axis=3)  # (B, H, N, D)
    z = np.repeat(np.repeat(zero, group_n, axis=2), group_d, axis=3)  # (B, H, N, D)
    return q * s + z


def fake_quantize(
    x: Array, *, bits: int, axis: str = "token", group_size: int | None = None
) -> tuple[Array, int]:
    """``x`` quantised and dequantised, and the exact bits its storage takes (:func:`storage_bits`)."""
    packed, scale, zero = quantize(x, bits=bits, axis=axis, group_size=group_size)
    out = dequantize(packed, scale, zero, bits=bits, axis=axis, dim=x.shape[-1])
    return out, storage_bits(packed, scale, zero)


def storage_bits(packed: Array, scale: Array, zero: Array, *, param_bits: int = 16) -> int:
    """Bits a quantised tensor takes: the packed bytes plus a scale and zero point per group."""
    return 8 * int(np.asarray(packed).size) + param_bits * int(scale.size + zero.size)


def bits_per_element(
    shape: tuple[int, ...],
    *,
    bits: int,
    axis: str = "token",
    group_size: int | None = None,
    param_bits: int = 16,
) -> float:
    r"""Average bits per element of a ``(B, H, N, D)`` tensor quantised so, padding included:
    $\big(8\,\lceil D b / 8\rceil\, BHN + 2\,p\,n_\text{groups}\big) / (BHND)$."""
    check_bits(bits)
    B, H, N, D = shape
    groups = (
        N * (D // _group(group_size, D, "head dim D"))
        if _check_axis(axis) == "token"
        else (N // _group(group_size, N, "token count N")) * D
    )
    total = 8 * math.ceil(D * bits / 8) * B * H * N + 2 * param_bits * B * H * groups
    return total / (B * H * N * D)
