r"""Multi-head Gaussian adaptive attention (GAAM).

*Paper:* Ioannides et al., "Gaussian Adaptive Attention is All You Need: Robust Contextual
Representations Across Multiple Modalities" (arXiv 2401.11143).
*Official code:* https://github.com/gioannides/Gaussian-Adaptive-Attention.

GAAM re-weights the entries of ``x`` along one axis (the *normalisation axis*: features,
tokens or channels) by how typical each entry is of its own slice. The axis of length $L$ is cut
into $H$ heads: head $h$ owns entries $[h c, (h + 1) c)$ with $c = \lfloor L / H \rfloor$, and
the last head also takes the remainder (as the released ``MultiHeadGaussianAdaptiveAttention``).
For one slice $x_1, \dots, x_n$ of one head, with that head's $G$ learnable mean offsets
$\delta_i$ and scales $c_i$:

$$
\mu = \frac1n \sum_j x_j, \qquad
\sigma^2 = \frac{1}{n - 1} \sum_j (x_j - \mu)^2 + \varepsilon, \qquad
y_{ij} = \frac{x_j - \mu - \delta_i}{\sigma},
$$

(the unbiased variance, ``torch.var``'s default, as the code; $\varepsilon = 10^{-8}$). The two
released variants combine the $G$ Gaussians differently:

* ``mixture="product"`` (the default: ``GaussianBlock.py``, the class the package exports) takes
  the product of normal densities,
  $g_j = \prod_i \mathcal N(y_{ij}; 0, c_i^2) = \prod_i \frac{1}{\sqrt{2\pi c_i^2}}
  e^{-y_{ij}^2 / 2c_i^2}$;
* ``mixture="sum"`` (``MHGAAM.py``) takes a weighted sum without the normalising constants,
  $g_j = \sum_i \pi_i e^{-y_{ij}^2 / 2c_i^2}$ with $\pi = \operatorname{softmax}(a)$ of learnable
  logits $a$.

Both then normalise along the slice and scale the input:

$$
w_j = \frac{g_j}{\sum_t g_t}, \qquad \text{out}_j = x_j\, w_j .
$$

**Numerics.** The code evaluates $g$ in the linear domain and divides by ``sum.clamp(min=eps)``;
a slice whose Gaussians all underflow (a large offset against a small variance) then gets
weights that do not sum to one. Here $\log g_j$ is formed first (for ``"product"`` the constants
$1/\sqrt{2\pi c_i^2}$ are the same for every $j$ and cancel in $w$; for ``"sum"`` a log-sum-exp
over $i$) and $w = \operatorname{softmax}_j(\log g_j)$ with the maximum subtracted, which equals
the code's $w$ wherever the code's sum does not underflow, and sums to one always.

**Documented edge cases.** A constant slice (zero variance) has $\sigma^2 = \varepsilon$ and the
same $y_{ij}$ for every $j$, so its weights are uniform, $w_j = 1/n$, and $\text{out} = x / n$:
no NaN whatever the offsets. (The statistics are computed on $x_j - x_1$, which leaves every
$y_{ij}$ unchanged and makes the centred entries of a constant slice exact zeros, so that this
holds in float32 too; it also spares the variance a cancellation when the slice sits far from
0.) A head of one entry ($n = 1$) has no unbiased variance (torch
returns NaN); it is taken as 0 here, so that entry's weight is 1. An infinite or NaN entry of
$x$ makes the weights and outputs of its head's slice NaN (and only those).

**Invariances.** $y_{ij}$ is unchanged by adding a constant to the slice (whatever the offsets),
so the weights are shift invariant; with zero offsets they are also invariant to multiplying the
slice by a positive number (up to $\varepsilon$).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from qkv import _arrays
from qkv.errors import DTypeError, ParameterError, ShapeError

Array = np.ndarray

#: The two released ways of combining a head's Gaussians (see the module docstring).
MIXTURES = ("product", "sum")


@dataclass(frozen=True)
class GaussianParams:
    """The learnable parameters of GAAM, ``H`` heads of ``G`` Gaussians each.

    Attributes:
        offsets: mean offsets $\\delta$, ``(H, G)``.
        scales: scale parameters $c$ (the Gaussians' standard deviations in units of
            $\\sigma$), ``(H, G)``, nonzero.
        logits: mixture logits $a$ of ``mixture="sum"``, ``(H, G)``; ``None`` for
            ``"product"``.

    Pass them to the op as ``gaussian(x, p.offsets, p.scales, p.logits, mixture=...)``: the op
    takes the arrays themselves, so that the dispatcher and the conformance kit see (convert,
    round) every array.
    """

    offsets: Array
    scales: Array
    logits: Array | None = None

    @classmethod
    def init(
        cls, heads: int, gaussians: int, *, mixture: str = "product", rng: np.random.Generator
    ) -> GaussianParams:
        """The released initialisation, drawn from ``rng`` (float64).

        Offsets start at 0 in both variants. ``"product"`` draws $c = e^{z}$, $z \\sim \\mathcal
        N(0, 1)$ (``GaussianBlock.py``); ``"sum"`` starts at $c = 2$ and equal logits
        (``MHGAAM.py``), so ``rng`` is not used there.
        """
        _check_mixture(mixture)
        offsets = np.zeros((heads, gaussians))  # (H, G)
        if mixture == "sum":
            return cls(offsets, np.full((heads, gaussians), 2.0), np.zeros((heads, gaussians)))
        return cls(offsets, np.exp(rng.standard_normal((heads, gaussians))))


def head_bounds(length: int, heads: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of each head along an axis of ``length`` entries.

    Heads have ``length // heads`` entries; the last one also takes the remainder.
    """
    size = length // heads
    return [(h * size, length if h == heads - 1 else (h + 1) * size) for h in range(heads)]


def _check_mixture(mixture: Any) -> None:
    if mixture not in MIXTURES:
        raise ParameterError(f"mixture: expected one of {MIXTURES}, got {mixture!r}")


def check_gaussian(
    x: Any,
    offsets: Any,
    scales: Any,
    logits: Any = None,
    *,
    axis: int = -1,
    mixture: str = "product",
    eps: float = 1e-8,
    **_: Any,
) -> int:
    """Check the arguments of :func:`gaussian` and return the axis as a non-negative index.

    Raises ``ShapeError`` when ``offsets``, ``scales`` or ``logits`` are not ``(H, G)`` alike,
    ``x`` is a scalar or empty, or the normalisation axis is shorter than ``H``;
    ``DTypeError`` for non-float arrays or mixed dtypes; ``ParameterError`` for an unknown
    ``mixture``, ``logits`` given with ``"product"``, an axis out of range, zero or non-finite
    scales, or an ``eps`` that is not a finite number > 0.
    """
    named = {"x": x, "offsets": offsets, "scales": scales}
    if logits is not None:
        named["logits"] = logits
    for name, a in named.items():
        if not _arrays.is_array(a):
            raise TypeError(f"{name}: expected a NumPy, torch or CuPy array, got {type(a)}")
        if not _arrays.is_float(a):
            raise DTypeError(f"{name}: expected a floating dtype, got {_arrays.dtype_name(a)}")
    dtypes = {name: _arrays.dtype_name(a) for name, a in named.items()}
    if len(set(dtypes.values())) > 1:
        given = ", ".join(f"{n} {d}" for n, d in dtypes.items())
        raise DTypeError(f"{', '.join(dtypes)}: expected one dtype, got {given}")
    if x.ndim == 0 or 0 in tuple(x.shape):
        raise ShapeError(f"x: expected a non-empty array of rank >= 1, got shape {tuple(x.shape)}")
    if offsets.ndim != 2 or 0 in tuple(offsets.shape):
        raise ShapeError(f"offsets: expected (H, G) with H, G >= 1, got {tuple(offsets.shape)}")
    heads, gaussians = offsets.shape
    for name in ("scales", "logits"):
        a = named.get(name)
        if a is not None and tuple(a.shape) != (heads, gaussians):
            raise ShapeError(
                f"{name}: expected (H, G) = {(heads, gaussians)} as offsets, got {tuple(a.shape)}"
            )
    _check_mixture(mixture)
    if mixture == "product" and logits is not None:
        raise ParameterError("logits: the 'product' mixture has no mixture weights; pass None")
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise ParameterError(f"axis: expected an integer, got {axis!r}")
    if not -x.ndim <= axis < x.ndim:
        raise ParameterError(f"axis: expected -{x.ndim} <= axis < {x.ndim}, got {axis}")
    axis = int(axis) % x.ndim
    if x.shape[axis] < heads:
        raise ShapeError(
            f"x: expected at least H={heads} entries along axis {axis} (one per head), "
            f"got shape {tuple(x.shape)}"
        )
    c = np.asarray(_arrays.to_numpy(scales), dtype=np.float64)
    if not (np.all(np.isfinite(c)) and np.all(c != 0)):
        raise ParameterError(f"scales: expected finite nonzero values, got {c.tolist()}")
    if not (isinstance(eps, (int, float, np.floating)) and math.isfinite(eps) and eps > 0):
        raise ParameterError(f"eps: expected a finite number > 0, got {eps!r}")
    return axis


def _log_mixture(y: Array, scales: Array, log_pi: Array | None) -> Array:
    r"""$\log g$ up to a constant: ``y (..., n, G)`` standardised entries, returns ``(..., n)``.

    ``"product"`` (``log_pi`` None): $\sum_i -y_i^2 / 2c_i^2$. ``"sum"``:
    $\log \sum_i \pi_i e^{-y_i^2 / 2c_i^2}$, a log-sum-exp over the Gaussians.
    """
    e = -(y**2) / (2.0 * scales**2)  # (..., n, G)
    if log_pi is None:
        return e.sum(axis=-1)  # (..., n)
    e = e + log_pi  # (..., n, G)
    top = e.max(axis=-1, keepdims=True)  # (..., n, 1), finite
    return (top + np.log(np.exp(e - top).sum(axis=-1, keepdims=True)))[..., 0]  # (..., n)


def gaussian(
    x: Array,
    offsets: Array,
    scales: Array,
    logits: Array | None = None,
    *,
    axis: int = -1,
    mixture: str = "product",
    eps: float = 1e-8,
    return_weights: bool = False,
) -> Array | tuple[Array, Array]:
    r"""Multi-head Gaussian adaptive attention along ``axis`` (see the module docstring).

    $$
    w_j = \operatorname{softmax}_j\big(\log g_j\big), \qquad \text{out}_j = x_j w_j,
    $$

    per head slice of ``axis``, with $\log g_j = -\sum_i y_{ij}^2 / 2c_i^2$ (``"product"``) or
    $\log \sum_i \pi_i e^{-y_{ij}^2 / 2c_i^2}$ (``"sum"``), $y_{ij} = (x_j - \mu - \delta_i)/\sigma$.

    Args:
        x: any shape ``(..., L, ...)``; ``axis`` names the normalisation axis of length ``L``.
        offsets: mean offsets $\delta$, ``(H, G)``: ``H`` heads of ``G`` Gaussians.
        scales: scale parameters $c$, ``(H, G)``, finite and nonzero.
        logits: mixture logits $a$, ``(H, G)``, for ``mixture="sum"`` ($\pi = \operatorname
            {softmax}(a)$ per head; ``None`` means equal weights). Must be ``None`` for
            ``"product"``.
        axis: the normalisation axis (``norm_axis`` of the code); needs ``L >= H``.
        mixture: ``"product"`` (default, the exported ``GaussianBlock.py``) or ``"sum"``
            (``MHGAAM.py``).
        eps: added to the variance.
        return_weights: also return the weights ``w``.

    Returns:
        ``out``, shaped and typed as ``x``; with ``return_weights`` the pair ``(out, w)``, ``w``
        of the same shape and dtype, summing to one over each head's slice. The arithmetic is
        float64 for float64 inputs and float32 otherwise.
    """
    axis = check_gaussian(x, offsets, scales, logits, axis=axis, mixture=mixture, eps=eps)
    work = np.float64 if x.dtype == np.float64 else np.float32
    xm = np.moveaxis(x.astype(work, copy=False), axis, -1)  # (..., L), a view
    delta = offsets.astype(work, copy=False)  # (H, G)
    c = scales.astype(work, copy=False)  # (H, G)
    log_pi = None
    if mixture == "sum":
        a = np.zeros_like(delta) if logits is None else logits.astype(work, copy=False)  # (H, G)
        log_pi = a - a.max(axis=-1, keepdims=True)  # (H, G)
        log_pi = log_pi - np.log(np.exp(log_pi).sum(axis=-1, keepdims=True))  # log softmax
    weights = np.empty_like(xm)  # (..., L)
    # A non-finite slice turns NaN (inf - inf and the like): documented, so not warned about.
    with np.errstate(invalid="ignore"):
        for h, (start, stop) in enumerate(head_bounds(xm.shape[-1], delta.shape[0])):
            # Statistics of x_j - x_1: the same y (shift invariance), exact zeros for a constant slice.
            chunk = xm[..., start:stop] - xm[..., start : start + 1]  # (..., n)
            n = stop - start
            mean = chunk.mean(axis=-1, keepdims=True)  # (..., 1)
            var = ((chunk - mean) ** 2).sum(axis=-1, keepdims=True) / max(n - 1, 1) + work(eps)
            y = (chunk[..., None] - mean[..., None] - delta[h]) / np.sqrt(var)[
                ..., None
            ]  # (..., n, G)
            logit = _log_mixture(y, c[h], None if log_pi is None else log_pi[h])  # (..., n)
            p = np.exp(logit - logit.max(axis=-1, keepdims=True))  # (..., n), max entry 1
            weights[..., start:stop] = p / p.sum(axis=-1, keepdims=True)
    out = np.moveaxis(xm * weights, -1, axis).astype(x.dtype, copy=False)  # shape of x
    if not return_weights:
        return out
    return out, np.moveaxis(weights, -1, axis).astype(x.dtype, copy=False)
