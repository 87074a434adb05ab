r"""The tensor-attention section of ``qkv bench``: exact kernels, the brute force, the fast form.

Triple-wise attention $D^{-1}\exp(Q (K_1 \oslash K_2)^\top)(V_1 \oslash V_2)$ has a shape of its
own (one query against $n^2$ key pairs), so it is timed apart from the softmax rows, at head dim
:data:`D` and sizes ``n`` up to :data:`TARGET_N`, fp32:

* ``brute force`` is :func:`qkv.reference.forms.tensor_brute_force`: it builds the $n \times n^2$
  score matrix and runs its two products through BLAS;
* ``tensor`` is every backend's exact streaming op (:func:`qkv.tensor`), ``O(n d)`` extra memory;
* ``tensor_approx`` is the polynomial method (:func:`qkv.tensor_approx`, degree :data:`DEGREE`),
  near-linear in ``n`` and approximate.

Entries of $Q, K_1, K_2$ are uniform in $[-1, 1]$ with ``scale = 1/d``, so every score lies in
$[-1, 1]$, the bounded regime where the fast form is accurate. Each row records its error
against a float64 brute force.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

import qkv
from qkv import _dispatch
from qkv.reference.forms import tensor_attention

if TYPE_CHECKING:
    from qkv.bench import Settings, _Progress

#: Head dim of the tensor rows (the issue's ``d = 32``).
D = 32
#: The size the speed target is read at.
TARGET_N = 256
#: Taylor degree of ``tensor_approx`` (2 keeps its feature count at ``C(d+2, 2) = 561``).
DEGREE = 2
FULL_NS = (32, 64, 128, TARGET_N)
QUICK_NS = (8, 16)
#: The speed-up over the brute force that the forms issue asks of numba ``tensor`` at n=256.
SPEEDUP_TARGET = 20.0
OPS = ("tensor", "tensor_approx")


def _inputs(n: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """``q, k1, k2, v1, v2``, each ``(1, 1, n, D)`` fp32."""
    rng = np.random.default_rng(seed)
    qk = rng.uniform(-1, 1, (3, 1, 1, n, D)).astype(np.float32)  # q, k1, k2
    v = rng.standard_normal((2, 1, 1, n, D), dtype=np.float32)  # v1, v2
    return (*qk, *v)


def plan(quick: bool, modules: list[ModuleType]) -> list[tuple[int, str, str]]:
    """The ``(n, op, backend)`` rows to time: the brute force, then each op per backend."""
    ns = QUICK_NS if quick else FULL_NS
    steps = []
    for n in ns:
        steps.append((n, "brute force", "reference"))
        steps += [(n, op, m.NAME) for op in OPS for m in modules if _dispatch.provides(m, op)]
    return steps


def run(steps: list[tuple[int, str, str]], settings: Settings, bar: _Progress) -> dict[str, Any]:
    """Time every planned row; return the ``tensor`` part of the results."""
    from qkv.bench import _time_row  # the one timing rule of every bench row

    rows: list[dict[str, Any]] = []
    exact: dict[int, np.ndarray] = {}
    scale = 1.0 / D
    for n, op, backend in steps:
        bar.step(f"tensor n={n}: {backend} {op}")
        args = _inputs(n)
        if n not in exact:
            wide = [x.astype(np.float64) for x in args]
            exact[n] = tensor_attention.tensor_brute_force(*wide, scale=scale)[0, 0]  # (n, D)
        if op == "brute force":
            call = functools.partial(tensor_attention.tensor_brute_force, *args, scale=scale)
        else:
            extra = {"degree": DEGREE} if op == "tensor_approx" else {}
            call = functools.partial(getattr(qkv, op), *args, scale=scale, backend=backend, **extra)
        row: dict[str, Any] = {
            "n": n,
            "op": op,
            "backend": backend,
            "flops": 2.0 * n**3 * 2 * D,  # two n x n^2 x D products
            "bytes": 4 * 6 * n * D,  # five fp32 inputs read, one output written
            "status": "ok",
            "reason": "",
            "ms_median": None,
            "ms_best": None,
            "rel_err": None,
            "x_brute_force": None,
        }
        out = _time_row(row, call, None, settings)
        if out is not None:
            diff = out[0, 0] - exact[n]
            row["rel_err"] = float(np.linalg.norm(diff) / np.linalg.norm(exact[n]))
        rows.append(row)
        bar.done()
    brute = {r["n"]: r["ms_median"] for r in rows if r["op"] == "brute force"}
    for r in rows:
        if r["ms_median"] and brute.get(r["n"]):
            r["x_brute_force"] = brute[r["n"]] / r["ms_median"]
    return {"D": D, "degree": DEGREE, "dtype": "float32", "scale": "1/d", "rows": rows}


def _time(section: dict[str, Any], n: int, op: str, backend: str) -> float | None:
    row = next(
        (r for r in section["rows"] if (r["n"], r["op"], r["backend"]) == (n, op, backend)),
        None,
    )
    return row["ms_median"] if row is not None and row["status"] == "ok" else None


def targets(section: dict[str, Any]) -> list[dict[str, Any]]:
    """The forms issue's two tensor targets, each ``pass``, ``miss`` or ``n/a``."""
    speed = {
        "target": f"numba tensor, fp32, n={TARGET_N}, d={D}: at least {SPEEDUP_TARGET:g}x faster "
        "than the NumPy brute force (which runs its n x n^2 products through BLAS)",
        "status": "n/a",
        "measured": f"n={TARGET_N} is not in this run",
    }
    numba, brute = (
        _time(section, TARGET_N, op, b)
        for op, b in (("tensor", "numba"), ("brute force", "reference"))
    )
    if numba and brute:
        ratio = brute / numba
        speed["measured"] = f"{ratio:.1f}x ({brute:.0f} ms vs {numba:.1f} ms)"
        speed["status"] = "pass" if ratio >= SPEEDUP_TARGET else "miss"
    elif brute:
        speed["measured"] = "numba tensor was not timed"

    ns = sorted({r["n"] for r in section["rows"]})
    crossover = {
        "target": f"tensor_approx (degree {DEGREE}) beats the fastest exact tensor from some n on; "
        "the crossover is reported",
        "status": "n/a",
        "measured": "no size had both timed",
    }
    pairs = []
    for n in ns:
        fast = _time(section, n, "tensor_approx", "reference")
        exacts = [
            t
            for r in section["rows"]
            if r["n"] == n
            and r["op"] == "tensor"
            and (t := _time(section, n, "tensor", r["backend"]))
        ]
        if fast and exacts:
            pairs.append((n, fast, min(exacts)))
    if pairs:
        wins = [n for n, fast, best in pairs if fast < best]
        first = next((n for n in ns if n in wins and all(m in wins for m in ns if m >= n)), None)
        crossover["status"] = "pass" if first is not None else "miss"
        crossover["measured"] = (
            f"from n={first} on ({', '.join(f'n={n}: {b / f:.2f}x' for n, f, b in pairs)})"
            if first is not None
            else f"no crossover up to n={pairs[-1][0]}"
        )
    return [speed, crossover]


__all__ = ["DEGREE", "FULL_NS", "OPS", "QUICK_NS", "TARGET_N", "D", "plan", "run", "targets"]
