"""Ops evaluated *in a given precision*, for the same-precision tolerance rule.

:func:`qkv.testing.tolerances.compare` widens its bound to a multiple of the error that an
honest evaluation in the backend's own precision makes. Each function here returns several such
evaluations (each a tuple of outputs, like the op's), because one evaluation may be lucky on a
small output; the rule takes the worst of them element by element.

Float32 and float64 evaluations run the NumPy reference itself in that dtype, once as written
and again in equivalent forms that round elsewhere (tiled, or summing the head dim in reverse).
Those three round alike enough to be lucky together where few scores matter (one dominant key,
logits of 1e4), so the set also holds the exact output moved by a first-order bound of the
rounding error in the dtype (``NOISE`` times the textbook bound of each dot product): as far
as an honest kernel may stray, and orders of magnitude short of a wrong one.

Float16 and bfloat16 have no NumPy arithmetic worth the name (bfloat16 no NumPy dtype at all),
so those are emulated in float64 with rounding to the dtype wherever the usual pipelines round
(plus the first-order bound for float32 scores):

* the *kernel* pipeline (FlashAttention-style): scores in float32, probabilities rounded to the
  dtype before ``P V``, output rounded;
* the *eager* pipeline (``softmax(q @ k.T) @ v`` in the dtype, what FlexAttention's tests use as
  their low-precision reference): scores, probabilities and output each rounded to the dtype.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from qkv import _dispatch
from qkv.reference import core
from qkv.testing.tolerances import UNIT_ROUNDOFF, round_to

Outputs = tuple[np.ndarray, ...]

#: The constant ``c`` of the first-order error bounds (multiples of the unit roundoff).
NOISE = 2.0


def as_tuple(out: Any) -> tuple[Any, ...]:
    """An op's result as a tuple of outputs (a single array becomes a 1-tuple)."""
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _cast(value: Any, dtype: str) -> Any:
    """A float64 array as a NumPy array of ``dtype``; anything else unchanged."""
    if isinstance(value, np.ndarray) and np.issubdtype(value.dtype, np.floating):
        return value.astype(dtype)
    return value


def reference_in(op: str, args: tuple, kwargs: dict, dtype: str) -> Outputs:
    """The NumPy reference of ``op`` run on the inputs cast to ``dtype``.

    bfloat16 is emulated: the reference runs in float32 and every output it returns in the
    input dtype is rounded to bfloat16 (outputs documented as float32, like ``lse``, stay).
    """
    run_in = "float32" if dtype == "bfloat16" else dtype
    out = as_tuple(
        _dispatch.OPS[op](
            *(_cast(a, run_in) for a in args), **{k: _cast(v, run_in) for k, v in kwargs.items()}
        )
    )
    if dtype != "bfloat16":
        return out
    return tuple(
        round_to(o, "bfloat16") if getattr(o, "dtype", None) == np.float32 else o for o in out
    )


def _scores(
    q: np.ndarray,
    k: np.ndarray,
    mask: np.ndarray | None,
    causal: bool,
    scale: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Scores ``scale * q k^T + mask`` in float64 and where they may be attended.

    ``q (B, H, N, D)``, ``k (B, H, M, D)`` (KV heads already repeated per query head); returns
    ``s (B, H, N, M)`` (masked entries hold their unmasked value) and ``allowed (B, H, N, M)``.
    """
    B, H, N, _ = q.shape
    M = k.shape[2]
    s = scale * np.einsum("bhnd,bhmd->bhnm", q, k)  # (B, H, N, M)
    allowed = np.ones((B, H, N, M), dtype=bool)
    if mask is not None:
        mask = np.broadcast_to(mask, (B, H, N, M))
        if mask.dtype == np.bool_:
            allowed &= mask
        else:
            allowed &= ~np.isneginf(mask)
            s = s + np.where(allowed, mask, 0.0)
    if causal:
        allowed &= core.causal_allowed(N, M)
    return s, allowed


def _softmax(s: np.ndarray, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row softmax of the allowed scores (zero rows where nothing is allowed) and the lse."""
    s = np.where(allowed, s, -np.inf)  # (B, H, N, M)
    m = s.max(axis=-1, keepdims=True)  # (B, H, N, 1)
    p = np.exp(s - np.where(np.isneginf(m), 0.0, m))  # (B, H, N, M)
    total = p.sum(axis=-1, keepdims=True)  # (B, H, N, 1)
    with np.errstate(divide="ignore"):
        lse = (np.log(total) + m)[..., 0]  # (B, H, N)
    return p / np.where(total > 0, total, 1.0), lse


def _grouped(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float | None) -> tuple:
    """KV heads repeated per query head (head ``h`` reads ``h // G``) and the actual scale."""
    G = q.shape[1] // k.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return np.repeat(k, G, axis=1), np.repeat(v, G, axis=1), scale  # (B, H, M, D), (B, H, M, Dv)


def _attention_emulated(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    *,
    mask: np.ndarray | None = None,
    causal: bool = False,
    scale: float | None = None,
    return_weights: bool = False,
    return_lse: bool = False,
    scores: str,
    probs: str,
    out: str,
) -> Outputs:
    """Softmax attention in float64, rounding scores, probabilities and output to the dtypes
    ``scores``, ``probs`` and ``out``; ``lse`` is rounded to float32 (its documented dtype)."""
    k, v, scale = _grouped(q, k, v, scale)
    s, allowed = _scores(q, k, mask, causal, scale)
    w, lse = _softmax(round_to(s, scores), allowed)
    w = round_to(w, probs)  # (B, H, N, M)
    o = round_to(np.einsum("bhnm,bhmd->bhnd", w, v), out)  # (B, H, N, Dv)
    weights = [round_to(w, out)] if return_weights else []
    return (o, *weights, *([round_to(lse, "float32")] if return_lse else []))


def _attention_first_order(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    *,
    mask: np.ndarray | None = None,
    causal: bool = False,
    scale: float | None = None,
    return_weights: bool = False,
    return_lse: bool = False,
    dtype: str,
) -> Outputs:
    r"""The exact outputs moved by a first-order bound of the rounding error in ``dtype``.

    Every score may be off by $\delta_{ij} = c\,u\,(\sqrt D\,\text{scale}\sum_d|q_{id}k_{jd}|
    + |s_{ij}|)$ (a dot product of length $D$, the scaling and the mask addition; $c$ is
    ``NOISE``). To first order that moves $\mathrm{lse}_i$ by at most
    $\sum_j P_{ij}\delta_{ij}$, $P_{ij}$ by at most $P_{ij}(\delta_{ij} + \sum_k P_{ik}\delta_{ik})$
    and $O_{id} = \sum_j P_{ij} v_{jd}$ by at most
    $\sum_j P_{ij}\delta_{ij}(|v_{jd}| + |O_{id}|) + c\,u\sum_j P_{ij}|v_{jd}|$.
    """
    u = NOISE * UNIT_ROUNDOFF[dtype]
    k, v, scale = _grouped(q, k, v, scale)
    s, allowed = _scores(q, k, mask, causal, scale)
    p, lse = _softmax(s, allowed)  # (B, H, N, M), (B, H, N)
    o = np.einsum("bhnm,bhmd->bhnd", p, v)  # (B, H, N, Dv)
    typical = math.sqrt(q.shape[-1]) * scale * np.einsum("bhnd,bhmd->bhnm", np.abs(q), np.abs(k))
    delta = u * np.where(allowed, typical + np.abs(s), 0.0)  # (B, H, N, M)
    pd = p * delta  # (B, H, N, M)
    row = pd.sum(axis=-1, keepdims=True)  # (B, H, N, 1)
    o_err = np.einsum("bhnm,bhmd->bhnd", pd + u * p, np.abs(v)) + row * np.abs(o)
    weights = [p + p * (delta + row)] if return_weights else []
    return (o + o_err, *weights, *([lse + row[..., 0]] if return_lse else []))


def attention(op: str, args: tuple, kwargs: dict, dtype: str) -> list[Outputs]:
    """Same-precision evaluations of ``sdpa`` or ``flash`` (any block sizes are dropped)."""
    kwargs = {k: v for k, v in kwargs.items() if k not in ("block_q", "block_k")}
    q, k, v = args
    if dtype in ("float32", "float64"):
        reversed_d = (q[..., ::-1], k[..., ::-1], v)  # the same dot products, summed backwards
        return [
            reference_in("sdpa", args, kwargs, dtype),
            reference_in("flash", args, {**kwargs, "block_q": 16, "block_k": 16}, dtype),
            reference_in("sdpa", reversed_d, kwargs, dtype),
            _attention_first_order(q, k, v, **kwargs, dtype=dtype),
        ]
    first = (
        reference_in("sdpa", args, kwargs, dtype)
        if dtype == "float16"
        else _attention_emulated(q, k, v, **kwargs, scores="float32", probs="float32", out=dtype)
    )
    return [
        first,
        _attention_emulated(q, k, v, **kwargs, scores="float32", probs=dtype, out=dtype),
        _attention_emulated(q, k, v, **kwargs, scores=dtype, probs=dtype, out=dtype),
        _attention_first_order(q, k, v, **kwargs, dtype="float32"),
    ]


def _rope_pairs(
    x: np.ndarray, positions: np.ndarray | None, offset: int, base: float, pairing: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, Any]:
    """The rotation pairs ``a, b (B, H, N, D/2)`` of ``x``, their float64 angles
    (broadcastable to them) and the function that puts rotated pairs back in ``x``'s layout."""
    B, H, N, D = x.shape
    p = offset + np.arange(N) if positions is None else np.asarray(positions)
    angle = p[..., None] * core.rope_frequencies(D, base)  # (N, D/2) or (B, N, D/2)
    if angle.ndim == 3:
        angle = angle[:, None]  # (B, 1, N, D/2)
    if pairing == "adjacent":

        def join(ra: np.ndarray, rb: np.ndarray) -> np.ndarray:
            return np.stack([ra, rb], axis=-1).reshape(B, H, N, D)  # interleave back

        return x[..., 0::2], x[..., 1::2], angle, join
    return x[..., : D // 2], x[..., D // 2 :], angle, lambda ra, rb: np.concatenate([ra, rb], -1)


def _rope_emulated(
    x: np.ndarray,
    *,
    positions: np.ndarray | None = None,
    offset: int = 0,
    base: float = 10000.0,
    pairing: str = "adjacent",
    angles: str,
    trig: str,
    out: str,
) -> np.ndarray:
    """Rope in float64 with the angles ``p * theta`` formed in ``angles``, their cosines and
    sines rounded to ``trig`` (a cached table in that dtype) and the output rounded to ``out``."""
    a, b, exact, join = _rope_pairs(x, positions, offset, base, pairing)
    D = x.shape[-1]
    p = offset + np.arange(x.shape[2]) if positions is None else np.asarray(positions)
    theta = round_to(core.rope_frequencies(D, base), angles)  # (D/2,)
    angle = round_to(round_to(p, angles)[..., None] * theta, angles).reshape(exact.shape)
    cos, sin = round_to(np.cos(angle), trig), round_to(np.sin(angle), trig)
    return round_to(join(a * cos - b * sin, a * sin + b * cos), out)  # (B, H, N, D)


def _rope_first_order(
    x: np.ndarray,
    *,
    positions: np.ndarray | None = None,
    offset: int = 0,
    base: float = 10000.0,
    pairing: str = "adjacent",
    angles: str,
    dtype: str,
) -> np.ndarray:
    r"""The exact rope moved by a first-order bound of its rounding error: an angle $\phi$
    formed in ``angles`` precision is off by $c\,u|\phi|$, which moves a pair by that times its
    radius; the rotation in ``dtype`` adds $c\,u(|a| + |b|)$ ($c$ is ``NOISE``)."""
    a, b, angle, join = _rope_pairs(x, positions, offset, base, pairing)
    cos, sin = np.cos(angle), np.sin(angle)
    err = NOISE * (
        UNIT_ROUNDOFF[angles] * np.abs(angle) * np.hypot(a, b)
        + UNIT_ROUNDOFF[dtype] * (np.abs(a) + np.abs(b))
    )  # (B, H, N, D/2)
    return join(a * cos - b * sin + err, a * sin + b * cos + err)  # (B, H, N, D)


def rope(op: str, args: tuple, kwargs: dict, dtype: str) -> list[Outputs]:
    """Same-precision evaluations of ``rope``: the reference in ``dtype``, the common
    implementations that form angles in float32 and keep cosine/sine tables in ``dtype``, and
    the first-order error bound."""
    (x,) = args
    angles = "float32" if dtype in ("float16", "bfloat16") else dtype
    return [
        reference_in(op, args, kwargs, dtype),
        (_rope_emulated(x, **kwargs, angles=angles, trig=dtype, out=dtype),),
        (_rope_emulated(x, **kwargs, angles="float64", trig=dtype, out=dtype),),
        (_rope_first_order(x, **kwargs, angles=angles, dtype=dtype),),
    ]
