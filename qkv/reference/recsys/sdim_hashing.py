r"""SDIM: sampling-based deep interest modelling (Cao et al., "Sampling Is All You Need on
Modeling Long-Term User Behaviors for CTR Prediction", arXiv 2205.10249). There is no official
code; FuxiCTR's ``model_zoo/SDIM`` is a community re-implementation.

Target attention scores a candidate item $q \in \mathbb{R}^d$ against every one of a user's
$L$ behaviours $b_j$, at a cost of $O(L d)$ per candidate. SDIM replaces it with **SimHash**
collisions. Draw $m$ hash functions of $\tau$ bits each, $R \in \mathbb{R}^{d \times m \times
\tau}$ with Gaussian entries; hash $i$ of a vector $x$ is the $\tau$-bit code

$$
h_i(x) = \sum_{r=0}^{\tau - 1} [\,x^\top R_{:, i, r} > 0\,]\; 2^r .
$$

The user interest is the average over hashes of the (ℓ2-normalised) sum of the behaviours that
share the candidate's bucket:

$$
u(q) = \frac1m \sum_{i=1}^{m} \operatorname{norm}\Big(\sum_{j:\, h_i(b_j) = h_i(q)} b_j\Big),
\qquad \operatorname{norm}(x) = x / \lVert x\rVert_2 \;(0 \text{ for } x = 0).
$$

A random hyperplane separates two vectors at angle $\theta$ with probability $\theta / \pi$, so
$b_j$ collides with $q$ in one hash with probability $p_j = (1 - \theta_j / \pi)^\tau$
(:func:`collision_probability`): without normalisation, $u(q) \to \sum_j p_j b_j$ as $m$
grows, an attention whose weight falls off with the angle as sharply as $\tau$ asks, close to a
softmax over cosines at a temperature set by $\tau$ (:func:`target_attention`). The behaviours
are hashed once per user (the paper's BSE module), after which a candidate costs $O(m\, d)$
lookups whatever $L$ is; the numba backend's kernel works that way, while this reference
compares codes directly.

The paper ℓ2-normalises each bucket sum; FuxiCTR's code does not (``normalize=False``).
FuxiCTR's defaults are $m = 1$, $\tau = 4$ (the paper studies larger $m$ and $\tau$). The
projections $x^\top R$ are computed in float64 whatever the input dtype, so a vector's code does
not depend on the precision of the arithmetic, only on the values it holds; a projection of
exactly 0 gives a 0 bit.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from qkv import _arrays, _checks
from qkv.errors import ParameterError, ShapeError
from qkv.reference import core

Array = np.ndarray
#: FuxiCTR's defaults: one hash of four bits.
DEFAULT_HASHES = 1
DEFAULT_BITS = 4
#: Codes are uint64, so a hash has at most 64 bits.
MAX_BITS = 64


def hash_bits(bits: Any) -> int:
    """``bits`` as an int in ``[1, 64]`` (a code is a uint64), else a clear error."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 64:
        raise ParameterError(
            f"hash bits: expected an integer in [1, {MAX_BITS}] (codes are uint64), got {bits!r}"
        )
    return int(bits)


def random_planes(
    d: int, n_hashes: int = DEFAULT_HASHES, bits: int = DEFAULT_BITS, *, rng: Any = None
) -> Array:
    r"""Gaussian hyperplanes $R$ ``(d, m, tau)`` (float64) for ``n_hashes`` hashes of ``bits``."""
    d = _checks.positive_int("d", d)
    n_hashes = _checks.positive_int("n_hashes", n_hashes)
    bits = hash_bits(bits)
    return np.random.default_rng(rng).standard_normal((d, n_hashes, bits))


def check_planes(planes: Any, d: int) -> tuple[int, int]:
    """``planes (d, m, tau)`` for vectors of dim ``d``; returns ``(m, tau)``."""
    if not _arrays.is_array(planes) or planes.ndim != 3:
        raise ShapeError(f"planes: expected an array (d, m, tau), got {np.shape(planes)}")
    _checks.array("planes", planes, rank=3, layout="(d, m, tau)")
    if planes.shape[0] != d:
        raise ShapeError(f"planes: expected d = {d} rows as the vectors, got {tuple(planes.shape)}")
    return int(planes.shape[1]), hash_bits(int(planes.shape[2]))


def simhash(x: Array, planes: Array) -> Array:
    r"""SimHash codes $h_i(x) = \sum_r [x^\top R_{:, i, r} > 0]\, 2^r$ of the rows of ``x``.

    Args:
        x: vectors ``(..., d)``.
        planes: $R$ ``(d, m, tau)``, $1 \le \tau \le 64$.

    Returns:
        uint64 codes ``(..., m)``.
    """
    _checks.array("x", x, rank=np.ndim(x), layout="(..., d)")
    d = x.shape[-1]
    m, tau = check_planes(planes, d)
    proj = x.astype(np.float64) @ planes.astype(np.float64).reshape(d, m * tau)  # (..., m tau)
    bits = (proj > 0).reshape(*x.shape[:-1], m, tau).astype(np.uint64)  # (..., m, tau)
    weights = np.left_shift(np.uint64(1), np.arange(tau, dtype=np.uint64))  # (tau,): 2^r
    return (bits * weights).sum(axis=-1, dtype=np.uint64)  # (..., m); bits never overlap


def check_sdim(
    targets: Any,
    behaviours: Any,
    planes: Any,
    *,
    valid: Any = None,
    normalize: bool = True,
) -> tuple[int, int, int, int, int, int]:
    """Check the arguments of :func:`sdim`; return ``(B, C, L, d, m, tau)``."""
    _checks.array("targets", targets, rank=3, layout="(B, C, d)")
    _checks.array("behaviours", behaviours, rank=3, layout="(B, L, d)")
    _checks.same_dtype(targets=targets, behaviours=behaviours)
    B, C, d = targets.shape
    Bb, L, db = behaviours.shape
    if (Bb, db) != (B, d):
        raise ShapeError(
            f"behaviours: expected (B, L, d) with B = {B}, d = {d} as targets, "
            f"got {tuple(behaviours.shape)}"
        )
    m, tau = check_planes(planes, d)
    if valid is not None:
        if not _arrays.is_array(valid) or _arrays.dtype_name(valid) != "bool":
            raise ShapeError(f"valid: expected a bool array (B, L), got {type(valid).__name__}")
        if tuple(valid.shape) != (B, L):
            raise ShapeError(f"valid: expected (B, L) = {(B, L)}, got {tuple(valid.shape)}")
    if not isinstance(normalize, (bool, np.bool_)):
        raise ParameterError(f"normalize: expected a bool, got {normalize!r}")
    return B, C, L, d, m, tau


def sdim(
    targets: Array,
    behaviours: Array,
    planes: Array,
    *,
    valid: Array | None = None,
    normalize: bool = True,
) -> Array:
    r"""SDIM user interest of each candidate: $u(q) = \frac1m\sum_i
    \operatorname{norm}\big(\sum_{j: h_i(b_j) = h_i(q)} b_j\big)$.

    Args:
        targets: candidate items $q$ ``(B, C, d)``.
        behaviours: the behaviours $b_j$ ``(B, L, d)``.
        planes: hyperplanes $R$ ``(d, m, tau)`` (:func:`random_planes`).
        valid: bool ``(B, L)``, False for padding (never collides).
        normalize: ℓ2-normalise each bucket sum (the paper); False sums (FuxiCTR's code).

    Returns:
        ``u (B, C, d)`` in the dtype of ``targets``; a candidate that collides with no
        behaviour in any hash gets zeros.
    """
    B, C, L, d, m, tau = check_sdim(targets, behaviours, planes, valid=valid, normalize=normalize)
    work = core._work_dtype(targets.dtype)
    t_codes = simhash(targets, planes)  # (B, C, m)
    b_codes = simhash(behaviours, planes)  # (B, L, m)
    same = t_codes[:, :, None, :] == b_codes[:, None, :, :]  # (B, C, L, m)
    if valid is not None:
        same &= np.asarray(valid)[:, None, :, None]
    buckets = np.einsum("bclm,bld->bcmd", same.astype(work), behaviours.astype(work))  # (B,C,m,d)
    if normalize:
        norms = np.linalg.norm(buckets, axis=-1, keepdims=True)  # (B, C, m, 1)
        buckets = np.where(norms > 0, buckets / np.where(norms > 0, norms, 1.0), 0.0)
    return buckets.mean(axis=2).astype(targets.dtype, copy=False)  # (B, C, d)


def collision_probability(targets: Array, behaviours: Array, bits: int) -> Array:
    r"""$p_j = (1 - \theta_j/\pi)^\tau$, the probability that $b_j$ and $q$ share a
    $\tau$-bit SimHash bucket, $\theta_j$ their angle.

    Args:
        targets: ``(B, C, d)``.
        behaviours: ``(B, L, d)``.
        bits: $\tau$.

    Returns:
        ``(B, C, L)`` float64.
    """
    tau = hash_bits(bits)
    t = targets.astype(np.float64)
    b = behaviours.astype(np.float64)
    tn = t / np.maximum(np.linalg.norm(t, axis=-1, keepdims=True), np.finfo(float).tiny)
    bn = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), np.finfo(float).tiny)
    cos = np.clip(tn @ bn.swapaxes(-1, -2), -1.0, 1.0)  # (B, C, L)
    return (1.0 - np.arccos(cos) / math.pi) ** tau


def matching_temperature(bits: int) -> float:
    r"""$T = \pi / (2\tau)$: the softmax temperature whose weights $e^{\cos\theta / T}$ have
    the slope of $\log p = \tau \log(1 - \theta/\pi)$ at $\theta = \pi/2$, where random
    vectors sit ($d\log p / d\cos\theta = 2\tau/\pi$ there).

    Args:
        bits: $\tau$.
    """
    return math.pi / (2 * hash_bits(bits))


def target_attention(
    targets: Array, behaviours: Array, *, temperature: float, valid: Array | None = None
) -> Array:
    r"""Target attention over cosines, $\sum_j \operatorname{softmax}_j(\cos\theta_j / T)\, b_j$,
    the attention SDIM approximates (through :func:`qkv.reference.core.sdpa`).

    Args:
        targets: ``(B, C, d)``.
        behaviours: ``(B, L, d)``.
        temperature: $T > 0$.
        valid: bool ``(B, L)``, False for padding.

    Returns:
        ``(B, C, d)`` in the dtype of ``targets``.
    """
    if not (isinstance(temperature, (int, float, np.floating)) and temperature > 0
            and math.isfinite(temperature)):  # fmt: skip
        raise ParameterError(f"temperature: expected a finite number > 0, got {temperature!r}")
    work = core._work_dtype(targets.dtype)
    t = targets.astype(work)
    b = behaviours.astype(work)
    tn = t / np.maximum(np.linalg.norm(t, axis=-1, keepdims=True), np.finfo(work).tiny)
    bn = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), np.finfo(work).tiny)
    mask = None if valid is None else np.asarray(valid)[:, None, None, :]  # (B, 1, 1, L)
    out = core.sdpa(
        tn[:, None], bn[:, None], b[:, None], mask=mask, scale=1.0 / temperature
    )  # (B, 1, C, d)
    return out[:, 0].astype(targets.dtype, copy=False)
