r"""Conformance-kit spec of ``neighborhood`` (neighborhood attention, NATTEN semantics).

Importing this module registers the op's :class:`qkv.testing.specs.OpSpec`. Calls are drawn by
:func:`neighborhood_cases`: 1-3 spatial axes, each with its own length, kernel size (odd and
even, from 1 to a whole axis), dilation, stride (1 to the kernel size) and causal flag, passed
as one int or a per-axis tuple; batch, grouped heads, head dims with ``Dv != D``, large logits,
and sometimes ``return_weights`` / ``return_lse``. Hypothesis is imported only when calls are
drawn.

Same-precision evaluations: the reference in the dtype as written and with the head dim summed
backwards; for float16/bfloat16 also a float64 evaluation that rounds the weights (the kernels'
``P V`` operand) and the output to the dtype.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qkv.reference.local.neighborhood_attention import neighbor_indices, neighborhood
from qkv.testing import precision
from qkv.testing.cases import Case
from qkv.testing.specs import OpSpec, register
from qkv.testing.tolerances import round_to

#: The per-axis hyperparameters of ``neighborhood``.
AXIS_ARGUMENTS = ("kernel_size", "dilation", "stride", "causal")


def axis_strategy(max_kernel: int = 5, max_dilation: int = 3, max_extra: int = 6) -> Any:
    """One axis: ``(length, kernel_size, dilation, stride, causal)`` with ``k d <= length`` and
    ``1 <= stride <= k``."""
    from hypothesis import strategies as st

    @st.composite
    def axis(draw: st.DrawFn) -> tuple[int, int, int, int, bool]:
        k = draw(st.integers(1, max_kernel))
        d = draw(st.integers(1, max_dilation))
        length = k * d + draw(st.integers(0, max_extra))
        s = draw(st.integers(1, k))
        causal = draw(st.integers(0, 3)) == 3
        return length, k, d, s, causal

    return axis()


def _per_axis(values: tuple, as_tuple: bool) -> Any:
    """One value for every axis when they agree and ``as_tuple`` is False, else the tuple."""
    return values if as_tuple or len(set(values)) > 1 else values[0]


def neighborhood_cases(max_rank: int = 3) -> Any:
    """The hypothesis strategy of ``neighborhood`` calls, each a :class:`Case`."""
    from hypothesis import strategies as st

    @st.composite
    def cases(draw: st.DrawFn) -> Case:
        rank = draw(st.integers(1, max_rank))
        limits = {1: (9, 3, 8), 2: (4, 2, 4), 3: (3, 2, 2)}[rank]
        axes = [draw(axis_strategy(*limits)) for _ in range(rank)]
        spatial, ks, ds, ss, cs = (tuple(a[i] for a in axes) for i in range(5))
        B = draw(st.integers(1, 2))
        Hkv = draw(st.integers(1, 2))
        H = Hkv * draw(st.integers(1, 2))
        D = draw(st.sampled_from([1, 4, 8, 16]))
        Dv = draw(st.sampled_from([D, 3]))
        logits = draw(st.sampled_from([1.0, 1.0, 30.0]))
        seed = draw(st.integers(0, 2**32 - 1))
        tuples = draw(st.booleans())
        rng = np.random.default_rng(seed)
        q = logits * rng.standard_normal((B, H, *spatial, D))  # (B, H, *spatial, D)
        k = rng.standard_normal((B, Hkv, *spatial, D))  # (B, Hkv, *spatial, D)
        v = rng.standard_normal((B, Hkv, *spatial, Dv))  # (B, Hkv, *spatial, Dv)
        kwargs: dict[str, Any] = {
            "kernel_size": _per_axis(ks, tuples),
            "dilation": _per_axis(ds, tuples),
            "stride": _per_axis(ss, tuples),
            "causal": _per_axis(cs, tuples),
        }
        if draw(st.integers(0, 3)) == 3:
            kwargs["scale"] = draw(st.sampled_from([0.05, 1.0, 2.5]))
        if draw(st.integers(0, 3)) == 3:
            kwargs["return_lse"] = True
        if draw(st.integers(0, 4)) == 4:
            kwargs["return_weights"] = True
        notes = {"seed": seed, "|logits|": f"~{logits:g}", "spatial": spatial}
        return Case("neighborhood", (q, k, v), kwargs, notes)

    return cases()


def _outputs(case: Case) -> tuple[str, ...]:
    names = ["out"]
    if case.kwargs.get("return_weights"):
        names.append("weights")
    if case.kwargs.get("return_lse"):
        names.append("lse")
    return tuple(names)


def _scales(case: Case) -> tuple[float | None, ...]:
    """Outputs are convex combinations of value rows, weights are probabilities."""
    scales = {"out": float(np.abs(case.args[2]).max()), "weights": 1.0, "lse": None}
    return tuple(scales[name] for name in _outputs(case))


def _emulated(args: tuple, kwargs: dict, dtype: str) -> tuple[np.ndarray, ...]:
    """Float64 weights rounded to ``dtype`` before ``P V``, the output rounded to ``dtype``."""
    q, k, v = args
    axes = {name: kwargs[name] for name in AXIS_ARGUMENTS if name in kwargs}
    out, weights, lse = neighborhood(
        q, k, v, scale=kwargs.get("scale"), return_weights=True, return_lse=True, **axes
    )
    B, H, *spatial, Dv = out.shape
    N = int(np.prod(spatial))
    keys, _ = neighbor_indices(tuple(spatial), **axes)  # (N, K)
    p = round_to(weights, dtype).reshape(B, k.shape[1], H // k.shape[1], N, -1)  # (B,Hkv,G,N,K)
    vn = v.reshape(B, k.shape[1], N, Dv)[:, :, keys]  # (B, Hkv, N, K, Dv)
    emulated = round_to(np.einsum("bhgnk,bhnkd->bhgnd", p, vn), dtype).reshape(out.shape)
    results = [emulated]
    if kwargs.get("return_weights"):
        results.append(round_to(weights, dtype))
    if kwargs.get("return_lse"):
        results.append(lse)
    return tuple(results)


def same_precision(op: str, args: tuple, kwargs: dict, dtype: str) -> list[tuple]:
    """Evaluations of ``neighborhood`` in ``dtype`` (see the module docstring)."""
    q, k, v = args
    evaluations = [
        precision.reference_in(op, args, kwargs, dtype),
        precision.reference_in(op, (q[..., ::-1], k[..., ::-1], v), kwargs, dtype),
    ]
    if dtype not in ("float32", "float64"):
        evaluations.append(_emulated(args, kwargs, dtype))
    return evaluations


register(
    "neighborhood",
    OpSpec(
        cases=neighborhood_cases,
        outputs=_outputs,
        scales=_scales,
        same_precision=same_precision,
    ),
)
