"""Conformance-kit specs of ``tensor`` and ``tensor_approx`` (tensor / Kronecker attention).

Importing this module registers both ops' :class:`qkv.testing.specs.OpSpec`. The strategy draws
the structure of a call (batch 1-2, 1-2 KV heads with 1-3 query heads each, 1-40 queries and
1-24 keys per key set, with one token and odd sizes favoured, head dims 1-32, value head dims
that differ from the key's, an explicit ``scale``, the largest score ``|S_{a,ij}|`` set to 1,
10 or 100, magnitudes of the value products ``v1[i] * v2[j]`` from 1e-3 to 1e3, and for
``tensor_approx`` a degree of 2, 4 or 6 with at most ``MAX_FEATURES`` features) and a seed for
the values. Hypothesis is imported only when calls are drawn.

The golden output of ``tensor`` is the brute-force form (the equation as it reads, independent
of the streaming loop). Same-precision evaluations: the reference in the backend's dtype, the
same with the head dim summed in reverse, and the brute force in that dtype.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from qkv import _checks
from qkv.reference.forms.tensor_attention import tensor_brute_force
from qkv.testing import precision
from qkv.testing.cases import Case
from qkv.testing.specs import OpSpec, register

#: Token counts drawn often: one token, tile and block edges of the kernels, odd sizes.
SPECIAL_QUERIES = (1, 2, 3, 5, 15, 16, 17, 31, 32, 33)
SPECIAL_KEYS = (1, 2, 3, 5, 7, 8, 9, 16, 17)
#: Most polynomial features of a drawn ``tensor_approx`` call (keeps each example fast).
MAX_FEATURES = 2**13


def tensor_cases(op: str = "tensor") -> Any:
    """The hypothesis strategy of ``tensor`` (or ``tensor_approx``) calls, each a :class:`Case`."""
    from hypothesis import strategies as st

    @st.composite
    def cases(draw: st.DrawFn) -> Case:
        B = draw(st.integers(1, 2))
        Hkv = draw(st.integers(1, 2))
        H = Hkv * draw(st.integers(1, 3))
        N = draw(st.one_of(st.sampled_from(SPECIAL_QUERIES), st.integers(1, 40)))
        M = draw(st.one_of(st.sampled_from(SPECIAL_KEYS), st.integers(1, 24)))
        D = draw(st.one_of(st.sampled_from([1, 2, 3, 8, 16, 32]), st.integers(1, 32)))
        Dv = D if draw(st.integers(0, 3)) < 3 else draw(st.integers(1, 32))
        seed = draw(st.integers(0, 2**32 - 1))
        logits = draw(st.sampled_from([1.0, 10.0, 100.0]))
        values = draw(st.sampled_from([1.0, 1e-3, 1e3]))
        scale = draw(st.sampled_from([1.0, 0.5, 0.125, 2.0]))

        rng = np.random.default_rng(seed)
        q = rng.standard_normal((B, H, N, D))  # (B, H, N, D)
        k1, k2 = rng.standard_normal((2, B, Hkv, M, D))  # (B, Hkv, M, D) each
        # Products v1[i] * v2[j] of magnitude `values` (1e3 stays within float16's range).
        v1, v2 = math.sqrt(values) * rng.standard_normal((2, B, Hkv, M, Dv))  # (B, Hkv, M, Dv)
        # Rescale q, k1 and k2 alike so that the largest |scale * S_{a,ij}| is `logits`.
        qg = q.reshape(B, Hkv, H // Hkv, N, D)  # (B, Hkv, G, N, D)
        s = np.einsum("bhgnd,bhid,bhjd->bhgnij", qg, k1, k2)  # (B, Hkv, G, N, M, M)
        factor = (logits / (scale * float(np.abs(s).max()))) ** (1 / 3)
        q, k1, k2 = q * factor, k1 * factor, k2 * factor

        kwargs: dict[str, Any] = {"scale": scale} if scale != 1.0 else {}
        if op == "tensor_approx":
            allowed = [g for g in _checks.TENSOR_DEGREES[:3] if math.comb(D + g, g) <= MAX_FEATURES]
            kwargs["degree"] = draw(st.sampled_from(allowed))
        notes = {"seed": seed, "max|score|": f"{logits:g}", "|v1 v2|": f"~{values:g}"}
        return Case(op, (q, k1, k2, v1, v2), kwargs, notes)

    return cases()


def _scales(case: Case) -> tuple[float]:
    """Each output row is a convex combination of rows ``v1[i] * v2[j]``."""
    _, _, _, v1, v2 = case.args
    return (float(np.abs(v1).max() * np.abs(v2).max()),)


def _same_precision(op: str, args: tuple, kwargs: dict, dtype: str) -> list[tuple[np.ndarray, ...]]:
    """The op in ``dtype`` as written, with the head dim reversed, and (``tensor``) the brute
    force; float16/bfloat16 get the reference in that dtype only."""
    evaluations = [precision.reference_in(op, args, kwargs, dtype)]
    if dtype not in ("float32", "float64"):
        return evaluations
    q, k1, k2, v1, v2 = args
    reversed_d = (q[..., ::-1], k1[..., ::-1], k2[..., ::-1], v1, v2)  # the same scores
    evaluations.append(precision.reference_in(op, reversed_d, kwargs, dtype))
    if op == "tensor":
        cast = tuple(x.astype(dtype) for x in args)
        evaluations.append((tensor_brute_force(*cast, **kwargs),))
    return evaluations


def _brute_force_golden(case: Case) -> np.ndarray:
    return tensor_brute_force(*case.args, **case.kwargs)


register(
    "tensor",
    OpSpec(
        cases=lambda: tensor_cases("tensor"),
        scales=_scales,
        same_precision=_same_precision,
        golden=_brute_force_golden,
    ),
)
register(
    "tensor_approx",
    OpSpec(
        cases=lambda: tensor_cases("tensor_approx"),
        scales=_scales,
        same_precision=_same_precision,
    ),
)
