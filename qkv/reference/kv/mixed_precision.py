r"""Attention over a mixed-precision KV cache: packed low-bit slots next to floating ones.

The read side of the KV-quantisation methods (ZipCache, arXiv 2405.14256; SAQ; KIVI-style
caches): some cached tokens are stored as $b$-bit codes with a scale and zero point per group
(:func:`qkv.reference.kv.quantization.quantize`), the others (recent or salient tokens) in
floating point. A query attends over both sets at once:

$$
\hat K = \begin{bmatrix} Q_b(K_q)\, s_K + z_K \\ K_f \end{bmatrix},\qquad
\hat V = \begin{bmatrix} Q_b(V_q)\, s_V + z_V \\ V_f \end{bmatrix},\qquad
O = \operatorname{softmax}\big(\text{scale}\; q \hat K^\top\big)\, \hat V ,
$$

the quantised slots first. No mask and no causality: every query reads every cached slot (a
decode step over a cache), so the order of the slots does not change the result. The reference
dequantises with :func:`~qkv.reference.kv.quantization.dequantize` and calls
:func:`qkv.reference.core.sdpa`; backend kernels dequantise each code as they read it, so no
floating copy of the quantised slots is made.

Keys and values may use either grouping of :mod:`qkv.reference.kv.quantization`
(``key_axis``, ``value_axis``); ``"channel"`` keys and ``"token"`` values are KIVI's and
ZipCache's choice and the defaults here. One code width ``bits`` serves both.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qkv import _arrays
from qkv.errors import DTypeError, ParameterError, ShapeError
from qkv.reference.core import sdpa
from qkv.reference.kv.quantization import check_bits, check_dequantize, dequantize

Array = np.ndarray

_FLOATS = ("float16", "float32", "float64")


def check_mixed_attention(
    q: Any,
    k: Any,
    v: Any,
    k_codes: Any,
    k_scale: Any,
    k_zero: Any,
    v_codes: Any,
    v_scale: Any,
    v_zero: Any,
    *,
    bits: int = 4,
    key_axis: str = "channel",
    value_axis: str = "token",
    scale: float | None = None,
    return_lse: bool = False,
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Check the arguments of :func:`mixed_attention`; return the key and value groups
    ``((tokens, channels), (tokens, channels))``."""
    check_bits(bits)
    for name, a in (("q", q), ("k", k), ("v", v)):
        if not _arrays.is_array(a) or a.ndim != 4:
            raise ShapeError(
                f"{name}: expected a 4-d array (B, heads, tokens, dim), got "
                f"{getattr(a, 'shape', type(a).__name__)}"
            )
        if _arrays.dtype_name(a) not in _FLOATS or _arrays.dtype_name(a) != _arrays.dtype_name(q):
            raise DTypeError(
                f"{name}: expected q's floating dtype {_arrays.dtype_name(q)}, got "
                f"{_arrays.dtype_name(a)}"
            )
    B, H, N, D = q.shape
    Hkv, M = k.shape[1], k.shape[2]
    if N == 0 or D == 0 or Hkv == 0 or H % Hkv or k.shape[0] != B or k.shape[3] != D:
        raise ShapeError(
            f"k: expected floating keys (B, Hkv, Mf, D) = ({B}, a divisor of H={H}, Mf, {D}) "
            f"for a non-empty q, got k {tuple(k.shape)}, q {tuple(q.shape)}"
        )
    Dv = v.shape[3]
    if tuple(v.shape[:3]) != (B, Hkv, M) or Dv == 0:
        raise ShapeError(f"v: expected (B, Hkv, Mf, Dv) = ({B}, {Hkv}, {M}, Dv), got {v.shape}")
    groups = []
    for side, codes, sc, zp, dim, axis in (
        ("k", k_codes, k_scale, k_zero, D, key_axis),
        ("v", v_codes, v_scale, v_zero, Dv, value_axis),
    ):
        try:
            _, group_n, group_d = check_dequantize(codes, sc, zp, bits=bits, axis=axis, dim=dim)
        except (ShapeError, DTypeError, ParameterError) as why:
            raise type(why)(f"{side}_{str(why).replace('packed', 'codes', 1)}") from None
        if tuple(codes.shape[:2]) != (B, Hkv) or codes.shape[2] == 0:
            raise ShapeError(
                f"{side}_codes: expected (B, Hkv, Mq, bytes) = ({B}, {Hkv}, Mq >= 1, bytes), "
                f"got {tuple(codes.shape)}"
            )
        if _arrays.dtype_name(sc) != _arrays.dtype_name(q):
            raise DTypeError(
                f"{side}_scale: expected q's dtype {_arrays.dtype_name(q)}, got "
                f"{_arrays.dtype_name(sc)}"
            )
        groups.append((group_n, group_d))
    if k_codes.shape[2] != v_codes.shape[2]:
        raise ShapeError(
            f"v_codes: expected as many quantised slots as k_codes ({k_codes.shape[2]}), got "
            f"{v_codes.shape[2]}"
        )
    if scale is not None and (isinstance(scale, bool) or not np.isfinite(scale) or scale <= 0):
        raise ParameterError(f"scale: expected a positive finite number or None, got {scale!r}")
    if not isinstance(return_lse, bool):
        raise ParameterError(f"return_lse: expected a bool, got {return_lse!r}")
    return groups[0], groups[1]


def mixed_attention(
    q: Array,
    k: Array,
    v: Array,
    k_codes: Array,
    k_scale: Array,
    k_zero: Array,
    v_codes: Array,
    v_scale: Array,
    v_zero: Array,
    *,
    bits: int = 4,
    key_axis: str = "channel",
    value_axis: str = "token",
    scale: float | None = None,
    return_lse: bool = False,
) -> Array | tuple[Array, Array]:
    r"""Softmax attention of ``q`` over quantised slots followed by floating slots.

    Args:
        q: queries ``(B, H, N, D)``, float16/32/64.
        k: floating keys ``(B, Hkv, Mf, D)`` (``Mf`` may be 0), ``q``'s dtype, ``H % Hkv == 0``.
        v: floating values ``(B, Hkv, Mf, Dv)``.
        k_codes: packed key codes ``(B, Hkv, Mq, ceil(D bits / 8))`` uint8, ``Mq >= 1``.
        k_scale: key scales as :func:`~qkv.reference.kv.quantization.quantize` returns them
            for ``key_axis``, ``q``'s dtype.
        k_zero: key zero points, shaped as ``k_scale``.
        v_codes: packed value codes ``(B, Hkv, Mq, ceil(Dv bits / 8))`` uint8.
        v_scale: value scales for ``value_axis``.
        v_zero: value zero points, shaped as ``v_scale``.
        bits: code width of keys and values, 2, 4 or 8.
        key_axis: grouping of the key codes, ``"channel"`` or ``"token"``.
        value_axis: grouping of the value codes.
        scale: score scale (default $1/\sqrt D$).
        return_lse: also return the log-sum-exp of each row's scores.

    Returns:
        ``O (B, H, N, Dv)`` in ``q``'s dtype, and with ``return_lse`` ``lse (B, H, N)``.
    """
    check_mixed_attention(
        q, k, v, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero,
        bits=bits, key_axis=key_axis, value_axis=value_axis, scale=scale, return_lse=return_lse,
    )  # fmt: skip
    D, Dv = q.shape[3], v.shape[3]
    k_hat = dequantize(k_codes, k_scale, k_zero, bits=bits, axis=key_axis, dim=D)  # (B, Hkv, Mq, D)
    v_hat = dequantize(v_codes, v_scale, v_zero, bits=bits, axis=value_axis, dim=Dv)
    keys = np.concatenate([k_hat, k], axis=2)  # (B, Hkv, Mq + Mf, D)
    values = np.concatenate([v_hat, v], axis=2)  # (B, Hkv, Mq + Mf, Dv)
    return sdpa(q, keys, values, scale=scale, return_lse=return_lse)
