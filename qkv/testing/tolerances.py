r"""How close a backend's output must be to the float64 "golden" output.

The golden output is the reference evaluated in float64 on the inputs the backend received
(rounded to the backend's dtype, then widened exactly to float64), so input rounding is never
counted against a backend: only its arithmetic is.

An output array passes when its special values agree and its finite part passes either the
**fixed rule** or the **same-precision rule**.

Special values (checked first, never excused):
    * NaN passes only where the golden output is NaN at the same place; a NaN anywhere else
      (a poisoned, never-written element included) fails, and so does a missing NaN.
    * ``inf`` and ``-inf`` must be matched exactly (a fully masked row's ``lse = -inf``
      compares equal to ``-inf``); an infinity where the golden value is finite fails.

Fixed rule (well-conditioned problems), with error $e = a - g$ over the $n$ finite elements,
$u$ the unit roundoff of the dtype and $s$ the output's natural scale (by default
$\max|g|$; for attention $\max|v|$, since every output row is a convex combination of rows
of $v$):

$$
\|e\|_2 \le r_{\text{norm}} \|g\|_2 + a_{\text{tol}}\, s \sqrt n
\qquad\text{and}\qquad
|e_i| \le r_{\text{tol}} |g_i| + a_{\text{tol}}\, s \ \text{ for every } i .
$$

| dtype    | $r_\text{norm}$ | $r_\text{tol}$ | $a_\text{tol}$ | fudge |
|----------|-----------------|----------------|----------------|-------|
| float64  | 1e-12           | 1e-10          | 1e-12          | 3     |
| float32  | 1e-5            | 1e-4           | 1e-5           | 3     |
| float16  | 2e-3 (4u)       | 7.8e-3 (16u)   | 7.8e-3 (16u)   | 1.1   |
| bfloat16 | 1.6e-2 (4u)     | 6.3e-2 (16u)   | 6.3e-2 (16u)   | 1.1   |

Same-precision rule (ill-conditioned problems, after PyTorch FlexAttention's tests): when
logits are large (up to 1e4 here), rounding a score by one unit in the last place moves the
softmax a lot, and no fixed bound is both tight and fair. The op is then also evaluated *in the
backend's precision* in one or more equivalent ways (the reference run in that dtype, a tiled
evaluation, another summation order, an emulation of the usual low-precision kernel and eager
pipelines; see :mod:`qkv.testing.precision`). Let $E_i$ be the largest error of those
evaluations at element $i$. The output passes when

$$
\operatorname{mean}|e| \le \text{fudge}\cdot\operatorname{mean} E
\qquad\text{and}\qquad
\max|e| \le \text{fudge}\cdot\max E .
$$

The fudge is 1.1 for float16/bfloat16 (FlexAttention's value: a kernel may be at most 10% less
accurate than the straightforward evaluation in its own precision). For float32 and float64 it
is 3. FlexAttention uses 10 for fp32, against a single fp32 evaluation; but a single evaluation
can be lucky: on a small output two honest evaluations that round at different places differ by
many times (we saw 25x: torch's CPU SDPA against the fp32 reference, logits of 1e4, one
dominant key). Here one of the evaluations is instead the exact output moved by a first-order
bound of the dtype's rounding error, which is never lucky, so a smaller fudge suffices. Over
some 3,000 float32 comparisons of honest kernels (torch's CPU SDPA, the Numba kernels, the
Triton kernel under the interpreter, an exp2 online softmax), about 100 of which needed this
rule, the error stayed below 0.07 of the allowed one; a wrong kernel is off by orders of
magnitude more.

Index outputs (top-k selections, future ops) compare as sets: see :func:`compare_indices`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Unit roundoff (half the distance from 1 to the next float) of each floating dtype.
UNIT_ROUNDOFF: dict[str, float] = {
    "float64": 2.0**-53,
    "float32": 2.0**-24,
    "float16": 2.0**-11,
    "bfloat16": 2.0**-8,
}


@dataclass(frozen=True)
class Tolerance:
    """The bounds of the fixed rule and the fudge of the same-precision rule for one dtype."""

    rtol_norm: float
    rtol: float
    atol: float
    fudge: float


TOLERANCES: dict[str, Tolerance] = {
    "float64": Tolerance(rtol_norm=1e-12, rtol=1e-10, atol=1e-12, fudge=3.0),
    "float32": Tolerance(rtol_norm=1e-5, rtol=1e-4, atol=1e-5, fudge=3.0),
    "float16": Tolerance(
        rtol_norm=4 * UNIT_ROUNDOFF["float16"],
        rtol=16 * UNIT_ROUNDOFF["float16"],
        atol=16 * UNIT_ROUNDOFF["float16"],
        fudge=1.1,
    ),
    "bfloat16": Tolerance(
        rtol_norm=4 * UNIT_ROUNDOFF["bfloat16"],
        rtol=16 * UNIT_ROUNDOFF["bfloat16"],
        atol=16 * UNIT_ROUNDOFF["bfloat16"],
        fudge=1.1,
    ),
}


def tolerance(dtype: str) -> Tolerance:
    """The :class:`Tolerance` of a dtype name (``"float32"``, ``"bfloat16"``, ...)."""
    try:
        return TOLERANCES[dtype]
    except KeyError:
        raise ValueError(f"dtype: expected one of {', '.join(TOLERANCES)}, got {dtype!r}") from None


def round_to(x: Any, dtype: str) -> np.ndarray:
    """``x`` rounded to nearest-even in ``dtype``, returned as float64 (exactly representable).

    bfloat16 is rounded from float32 (as ``torch.tensor(x, dtype=float32).bfloat16()`` does),
    so values built here agree bit for bit with bfloat16 tensors made from them.
    """
    x = np.asarray(x, dtype=np.float64)
    if dtype == "float64":
        return x.copy()
    if dtype in ("float32", "float16"):
        with np.errstate(over="ignore"):  # beyond the dtype's range is +-inf, as intended
            return x.astype(dtype).astype(np.float64)
    if dtype != "bfloat16":
        raise ValueError(f"dtype: expected a floating dtype name, got {dtype!r}")
    with np.errstate(over="ignore"):
        bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    halfway = np.uint64(0x7FFF) + ((bits >> np.uint64(16)) & np.uint64(1))  # ties to even
    rounded = ((bits + halfway) & np.uint64(0xFFFF0000)).astype(np.uint32).view(np.float32)
    return np.where(np.isnan(x), x, rounded.astype(np.float64))


@dataclass(frozen=True)
class Comparison:
    """The verdict on one output array, with the numbers behind it."""

    ok: bool
    reason: str
    max_abs_error: float = 0.0
    norm_rel_error: float = 0.0

    def __bool__(self) -> bool:
        return self.ok


def _where(index: tuple[np.intp, ...]) -> str:
    return "(" + ", ".join(str(int(i)) for i in index) + ")"


def _special_values(a: np.ndarray, g: np.ndarray) -> str | None:
    """Why the NaN/inf pattern of ``a`` differs from that of ``g``, or ``None`` if it agrees."""
    a_nan, g_nan = np.isnan(a), np.isnan(g)
    pattern = (
        (a_nan & ~g_nan, "NaN where a number was expected"),
        (g_nan & ~a_nan, "a number where NaN was expected"),
    )
    for bad, what in pattern:
        if bad.any():
            first = np.argwhere(bad)[0]
            return (
                f"{int(bad.sum())} of {a.size} elements: {what}, first at {_where(first)} "
                f"(got {float(a[tuple(first)])!r}, expected {float(g[tuple(first)])!r})"
            )
    a_inf, g_inf = np.isinf(a), np.isinf(g)
    bad = (a_inf | g_inf) & (a != g) & ~g_nan
    if bad.any():
        first = tuple(np.argwhere(bad)[0])
        return (
            f"{int(bad.sum())} of {a.size} elements: infinities differ, first at {_where(first)} "
            f"(got {float(a[first])!r}, expected {float(g[first])!r})"
        )
    return None


def compare(
    actual: Any,
    golden: Any,
    *,
    dtype: str,
    same_precision: Sequence[Any] = (),
    scale: float | None = None,
) -> Comparison:
    """Whether ``actual`` (computed in ``dtype``) matches the float64 ``golden`` output.

    Args:
        actual: the backend's output, any NumPy-convertible array.
        golden: the reference's output in float64 on the same (rounded) inputs.
        dtype: the precision the backend computed in; selects :data:`TOLERANCES`.
        same_precision: the op evaluated in ``dtype`` in equivalent ways (arrays shaped like
            ``golden``); enables the same-precision rule. Empty: the fixed rule only.
        scale: the output's natural magnitude for the absolute bounds (default ``max|golden|``).

    Returns:
        a :class:`Comparison`; its ``reason`` says which rule passed or why both failed.
    """
    tol = tolerance(dtype)
    a = np.asarray(actual, dtype=np.float64)
    g = np.asarray(golden, dtype=np.float64)
    if a.shape != g.shape:
        return Comparison(False, f"shape {a.shape}, expected {g.shape}")
    special = _special_values(a, g)
    if special is not None:
        return Comparison(False, special, max_abs_error=float("inf"), norm_rel_error=float("inf"))
    finite = np.isfinite(g)
    if not finite.any():
        return Comparison(True, "no finite elements; special values agree")
    a, g = a[finite], g[finite]
    error = np.abs(a - g)
    max_err = float(error.max())
    g_norm = float(np.linalg.norm(g))
    e_norm = float(np.linalg.norm(error))
    rel = e_norm / g_norm if g_norm > 0 else (0.0 if e_norm == 0 else float("inf"))
    s = float(np.abs(g).max()) if scale is None else float(scale)
    norm_ok = e_norm <= tol.rtol_norm * g_norm + tol.atol * s * np.sqrt(g.size)
    bound = tol.rtol * np.abs(g) + tol.atol * s
    elem_ok = bool((error <= bound).all())
    if norm_ok and elem_ok:
        return Comparison(True, "within the fixed tolerance", max_err, rel)
    worst = int(np.argmax(error - bound))
    failed = (
        f"norm-wise relative error {rel:.3g} (bound {tol.rtol_norm:g} + absolute floor); "
        if not norm_ok
        else ""
    ) + (
        f"element error {error[worst]:.3g} (bound {bound[worst]:.3g}) at "
        f"{_where(np.argwhere(finite)[worst])}: got {float(a[worst])!r}, "
        f"expected {float(g[worst])!r}"
    )
    if len(same_precision):
        errors = [np.abs(np.asarray(r, dtype=np.float64)[finite] - g) for r in same_precision]
        # A variant that overflowed or went NaN somewhere excuses nothing there.
        ref_err = np.max([np.where(np.isfinite(e), e, 0.0) for e in errors], axis=0)
        mean_ok = error.mean() <= tol.fudge * ref_err.mean()
        max_ok = max_err <= tol.fudge * ref_err.max()
        if mean_ok and max_ok:
            return Comparison(
                True,
                f"within {tol.fudge:g}x the error of the op evaluated in {dtype} "
                f"(mean {error.mean():.3g} vs {ref_err.mean():.3g})",
                max_err,
                rel,
            )
        failed += (
            f"; and mean/max error {error.mean():.3g}/{max_err:.3g} exceed {tol.fudge:g}x "
            f"those of the op evaluated in {dtype} ({ref_err.mean():.3g}/{ref_err.max():.3g})"
        )
    return Comparison(False, failed, max_err, rel)


def assert_close(
    actual: Any,
    golden: Any,
    *,
    dtype: str,
    same_precision: Sequence[Any] = (),
    scale: float | None = None,
    name: str = "output",
) -> None:
    """Raise ``AssertionError`` naming ``name`` unless :func:`compare` passes."""
    result = compare(actual, golden, dtype=dtype, same_precision=same_precision, scale=scale)
    if not result.ok:
        raise AssertionError(f"{name} ({dtype}): {result.reason}")


def compare_indices(
    actual: Any, golden: Any, *, scores: Any | None = None, rtol: float = 1e-5
) -> Comparison:
    r"""Whether selected indices match as sets, row by row along the last axis.

    ``actual`` and ``golden`` are integer arrays ``(..., k)`` of selected positions; their order
    within a row does not matter. Negative entries mean "no selection" and must agree in number.

    Tie rule: with ``scores`` (``(..., n)``, the values the selection ranked, higher first), a
    row passes when both selections have the same size and the actual one is *a* valid top-k:
    every selected score is at least the k-th best score, up to ``rtol`` of the largest
    magnitude in the row. So where several positions tie at the boundary, any of them may be
    picked; the reference itself breaks ties by the lowest index. Without ``scores`` the sets
    must be equal.
    """
    a = np.asarray(actual)
    g = np.asarray(golden)
    if a.shape != g.shape:
        return Comparison(False, f"shape {a.shape}, expected {g.shape}")
    if not (np.issubdtype(a.dtype, np.integer) and np.issubdtype(g.dtype, np.integer)):
        return Comparison(False, f"expected integer indices, got {a.dtype} and {g.dtype}")
    s = None if scores is None else np.asarray(scores, dtype=np.float64)
    for row in np.ndindex(*a.shape[:-1]):
        got = {int(i) for i in a[row] if i >= 0}
        want = {int(i) for i in g[row] if i >= 0}
        if len(got) != int((a[row] >= 0).sum()):
            return Comparison(False, f"row {_where(row)}: repeated index in {sorted(a[row])}")
        if got == want:
            continue
        if s is None or len(got) != len(want):
            return Comparison(
                False, f"row {_where(row)}: selected {sorted(got)}, expected {sorted(want)}"
            )
        values = s[row]
        if any(not 0 <= i < values.size for i in got):
            return Comparison(False, f"row {_where(row)}: index out of range in {sorted(got)}")
        kth = min(values[i] for i in want)
        slack = rtol * float(np.abs(values[np.isfinite(values)]).max(initial=0.0))
        if any(values[i] < kth - slack for i in got):
            return Comparison(
                False,
                f"row {_where(row)}: selected {sorted(got)}, expected {sorted(want)} "
                f"(scores below the k-th best {kth!r} were chosen)",
            )
    return Comparison(True, "same selections (ties at the boundary accepted)")
