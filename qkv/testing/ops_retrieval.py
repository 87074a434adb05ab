r"""Conformance-kit spec of ``lvq_dot`` (LeanVec's first stage, arXiv 2312.16335).

Importing this module registers the op's :class:`qkv.testing.specs.OpSpec`. The strategy draws
1-9 queries, 1-300 data vectors, reduced dimensions 1-70, codes uniform over 0-255 or stuck at
the extremes (all 0 / all 255, the largest products), steps including 0 (a constant vector),
offsets of both signs, and magnitudes from 1e-2 to 4 (scores stay within float16); the values come from a drawn seed.
The natural size of a score is $|\ell_j| \sum_t |\tilde q_{it}| + \Delta_j \sum_t |\tilde q_{it}|
c_{jt}$, the sum of the absolute terms, which bounds the rounding of any summation order.
Hypothesis is imported only when calls are drawn.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qkv.testing.cases import Case
from qkv.testing.specs import OpSpec, register


def lvq_dot_cases() -> Any:
    """The hypothesis strategy of ``lvq_dot`` calls, each a :class:`Case`."""
    from hypothesis import strategies as st

    @st.composite
    def cases(draw: st.DrawFn) -> Case:
        Nq = draw(st.integers(1, 9))
        N = draw(st.integers(1, 300))
        d = draw(st.integers(1, 70))
        codes_kind = draw(st.sampled_from(["uniform", "extremes"]))
        magnitude = draw(st.sampled_from([1.0, 1e-2, 4.0]))
        seed = draw(st.integers(0, 2**32 - 1))

        rng = np.random.default_rng(seed)
        queries = magnitude * rng.standard_normal((Nq, d))  # (Nq, d)
        if codes_kind == "uniform":
            codes = rng.integers(0, 256, (N, d)).astype(np.uint8)  # (N, d)
        else:
            codes = np.where(rng.random((N, d)) < 0.5, 0, 255).astype(np.uint8)  # (N, d)
        scales = magnitude * rng.random(N) / 255.0  # (N,)
        scales[rng.random(N) < 0.1] = 0.0  # constant vectors
        offsets = magnitude * rng.standard_normal(N)  # (N,)
        notes = {"seed": seed, "|x|": f"~{magnitude:g}", "codes": codes_kind}
        return Case("lvq_dot", (queries, codes, scales, offsets), {}, notes)

    return cases()


def _scales(case: Case) -> tuple[float | None, ...]:
    """The largest sum of absolute terms of a score (see the module docstring)."""
    queries, codes, scales, offsets = case.args
    q = np.abs(queries)  # (Nq, d)
    size = np.abs(offsets)[None] * q.sum(axis=1, keepdims=True) + scales[None] * (
        q @ codes.T.astype(np.float64)
    )  # (Nq, N)
    return (max(float(size.max()), np.finfo(float).tiny),)


register("lvq_dot", OpSpec(cases=lvq_dot_cases, scales=_scales))
