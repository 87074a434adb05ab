"""Conformance-kit spec of ``gaussian`` (multi-head Gaussian adaptive attention).

Importing this module registers the op's :class:`qkv.testing.specs.OpSpec`. The strategy draws
the structure of a call (rank 1-4, the normalisation axis, 1-4 heads of 1-5 Gaussians, axis
lengths from ``H`` to 70 so that the last head takes a remainder, both mixtures, offsets and
value magnitudes, constant slices with zero variance, ``return_weights``) and a seed for the
values. Hypothesis is imported only when calls are drawn.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qkv.testing.cases import Case
from qkv.testing.specs import OpSpec, register


def gaussian_cases() -> Any:
    """The hypothesis strategy of ``gaussian`` calls, each a :class:`Case`."""
    from hypothesis import strategies as st

    @st.composite
    def cases(draw: st.DrawFn) -> Case:
        rank = draw(st.integers(1, 4))
        axis = draw(st.integers(-rank, rank - 1))
        H = draw(st.integers(1, 4))
        G = draw(st.integers(1, 5))
        L = draw(st.one_of(st.sampled_from([H, H + 1, 2 * H + 1, 16, 33]), st.integers(H, 70)))
        shape = [draw(st.integers(1, 3)) for _ in range(rank)]
        shape[axis] = L
        mixture = draw(st.sampled_from(["product", "sum"]))
        values = draw(st.sampled_from([1.0, 1e-3, 1e3]))
        shift = draw(st.sampled_from([0.0, 5.0, -100.0]))
        offsets_scale = draw(st.sampled_from([0.0, 0.5, 2.0]))
        constant = draw(st.integers(0, 4)) == 4
        seed = draw(st.integers(0, 2**32 - 1))

        rng = np.random.default_rng(seed)
        x = values * (shift + rng.standard_normal(shape))  # (..., L, ...)
        if constant:  # the slice at index 0 of every other axis is constant: zero variance
            x[tuple(slice(None) if i == axis % rank else 0 for i in range(rank))] = values * shift
        offsets = offsets_scale * rng.standard_normal((H, G))  # (H, G)
        scales = np.exp(rng.standard_normal((H, G))) * rng.choice([-1.0, 1.0], (H, G))  # (H, G)
        args: tuple[Any, ...] = (x, offsets, scales)
        if mixture == "sum" and draw(st.booleans()):
            args = (*args, rng.standard_normal((H, G)))  # mixture logits
        kwargs: dict[str, Any] = {"axis": axis, "mixture": mixture}
        if draw(st.integers(0, 2)) == 2:
            kwargs["return_weights"] = True
        notes = {
            "seed": seed,
            "|x|": f"~{values:g}",
            "shift": shift,
            "|offsets|": offsets_scale,
            "constant slice": constant,
        }
        return Case("gaussian", args, kwargs, notes)

    return cases()


def _outputs(case: Case) -> tuple[str, ...]:
    return ("out", "weights") if case.kwargs.get("return_weights") else ("out",)


def _scales(case: Case) -> tuple[float | None, ...]:
    """``out = x * w`` with ``0 <= w <= 1``: bounded by ``max |x|``; weights are fractions."""
    bound = float(np.abs(case.args[0]).max())
    return (bound, 1.0) if case.kwargs.get("return_weights") else (bound,)


register("gaussian", OpSpec(cases=gaussian_cases, outputs=_outputs, scales=_scales))
