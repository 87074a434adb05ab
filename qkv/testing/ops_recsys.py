"""Conformance-kit spec of ``sdim`` (SDIM SimHash bucket aggregation, arXiv 2205.10249).

Importing this module registers the op's :class:`qkv.testing.specs.OpSpec`. The strategy draws
the structure of a call (1-3 users, 1-6 candidates, 1-40 behaviours, dims 1-9, 1-6 hashes of
1 to 64 bits, padding masks including users with no valid behaviour, behaviours that copy or
negate candidates so that buckets collide or never do, value magnitudes, both ``normalize``
modes) and a seed for the values, so that no projection is drawn next to a hyperplane on
purpose: a code is a sign pattern, and both sides compute it in float64 from the same values.
Hypothesis is imported only when calls are drawn.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qkv.testing.cases import Case
from qkv.testing.specs import OpSpec, register


def sdim_cases() -> Any:
    """The hypothesis strategy of ``sdim`` calls, each a :class:`Case`."""
    from hypothesis import strategies as st

    @st.composite
    def cases(draw: st.DrawFn) -> Case:
        B = draw(st.integers(1, 3))
        C = draw(st.integers(1, 6))
        L = draw(st.integers(1, 40))
        d = draw(st.integers(1, 9))
        m = draw(st.integers(1, 6))
        tau = draw(st.sampled_from([1, 2, 3, 4, 8, 16, 64]))
        magnitude = draw(st.sampled_from([1.0, 1e-3, 1e3]))
        copies = draw(st.sampled_from([0.0, 0.3, 0.8]))
        padding = draw(st.sampled_from(["none", "some", "empty user"]))
        seed = draw(st.integers(0, 2**32 - 1))

        rng = np.random.default_rng(seed)
        targets = magnitude * rng.standard_normal((B, C, d))  # (B, C, d)
        behaviours = magnitude * rng.standard_normal((B, L, d))  # (B, L, d)
        for b in range(B):  # copies (always collide) and negations (never collide)
            for j in np.flatnonzero(rng.random(L) < copies):
                behaviours[b, j] = targets[b, rng.integers(C)] * rng.choice([1.0, -1.0, 2.0])
        planes = rng.standard_normal((d, m, tau))  # (d, m, tau)
        kwargs: dict[str, Any] = {"normalize": draw(st.booleans())}
        if padding != "none":
            valid = rng.random((B, L)) < 0.7
            if padding == "empty user":
                valid[0] = False
            kwargs["valid"] = valid
        notes = {"seed": seed, "|x|": f"~{magnitude:g}", "copies": copies, "padding": padding}
        return Case("sdim", (targets, behaviours, planes), kwargs, notes)

    return cases()


def _scales(case: Case) -> tuple[float | None, ...]:
    """Unit vectors averaged (``normalize``), else at most the sum of all ``|b_j|``."""
    if case.kwargs.get("normalize", True):
        return (1.0,)
    return (max(float(np.abs(case.args[1]).sum(axis=1).max()), np.finfo(float).tiny),)


register("sdim", OpSpec(cases=sdim_cases, scales=_scales))
