r"""Conformance-kit spec of ``sigmoid`` (sigmoid attention, arXiv 2409.04431).

Importing this module registers the op's :class:`qkv.testing.specs.OpSpec`. Calls are drawn by
:func:`qkv.testing.strategies.attention_cases` (shapes, grouped heads, masks of every layout,
fully masked rows, ``causal``, ``scale``, logits up to 1e4, value magnitudes,
``return_weights``) without ``return_lse`` (sigmoid attention has no normaliser), plus the
scalar ``bias`` (the default $-\log M$, zero, moderate and strongly negative values) and
``alibi``. Hypothesis is imported only when calls are drawn.

Same-precision evaluations (see :mod:`qkv.testing.precision`): for float32/float64 the reference
in that dtype, as written and with the head dim summed backwards, and the exact output moved by
a first-order bound of the rounding error; for float16/bfloat16 emulations in float64 that round
the weights (the kernels' ``P V`` operand) and the output to the dtype.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from qkv.reference.core import alibi
from qkv.reference.forms.sigmoid_attention import default_bias, logistic
from qkv.testing import precision
from qkv.testing.cases import Case
from qkv.testing.specs import OpSpec, register
from qkv.testing.tolerances import UNIT_ROUNDOFF, round_to

#: Biases drawn besides the default ``-log M`` (``None``), which comes first for shrinking.
BIASES = (None, 0.0, -3.0, 2.5, -20.0)


def sigmoid_cases() -> Any:
    """The hypothesis strategy of ``sigmoid`` calls, each a :class:`Case`."""
    from hypothesis import strategies as st

    from qkv.testing.strategies import attention_cases

    @st.composite
    def cases(draw: st.DrawFn) -> Case:
        base = draw(attention_cases("sigmoid"))
        kwargs = {k: v for k, v in base.kwargs.items() if k != "return_lse"}
        bias = draw(st.sampled_from(BIASES))
        if bias is not None:
            kwargs["bias"] = bias
        if draw(st.integers(0, 3)) == 3:
            kwargs["alibi"] = True
        return Case("sigmoid", base.args, kwargs, base.notes)

    return cases()


def _outputs(case: Case) -> tuple[str, ...]:
    return ("out", "weights") if case.kwargs.get("return_weights") else ("out",)


def _weights_and_scores(
    args: tuple, kwargs: dict
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """Float64 ``(P, s, allowed, v per query head, scale)`` of a call: ``s`` the scores with
    mask, ALiBi and bias ``(B, H, N, M)``, ``P = sigmoid(s)`` where allowed, else 0."""
    q, k, v = args
    k, v, scale = precision._grouped(q, k, v, kwargs.get("scale"))  # (B, H, M, D), (B, H, M, Dv)
    s, allowed = precision._scores(q, k, kwargs.get("mask"), kwargs.get("causal", False), scale)
    B, H, N, M = s.shape
    if kwargs.get("alibi"):
        s = s + alibi(H, N, M, symmetric=True)  # (H, N, M) broadcast
    bias = kwargs.get("bias")
    s = s + (default_bias(M) if bias is None else bias)
    p = np.where(allowed, logistic(np.where(allowed, s, 0.0)), 0.0)  # (B, H, N, M)
    return p, s, allowed, v, scale


def _scales(case: Case) -> tuple[float | None, ...]:
    r"""``out``: the largest $\sum_j P_{ij} |v_{jd}|$ (no normaliser bounds it by $|v|$);
    ``weights``: 1."""
    p, _, _, v, _ = _weights_and_scores(case.args, case.kwargs)
    out = float(np.einsum("bhnm,bhmd->bhnd", p, np.abs(v)).max(initial=0.0))
    return (out, 1.0)[: len(_outputs(case))]


def _first_order(args: tuple, kwargs: dict, dtype: str) -> tuple[np.ndarray, ...]:
    r"""The exact outputs moved by a first-order bound of the rounding error in ``dtype``.

    A score may be off by $\delta_{ij} = c\,u\,(\sqrt D\,\text{scale}\sum_d |q_{id} k_{jd}|
    + |s_{ij}|)$; since $\sigma' = \sigma(1 - \sigma)$, $P_{ij}$ moves by at most
    $P_{ij}(1 - P_{ij})\delta_{ij} + c\,u\,P_{ij}$ and $O_{id}$ by at most
    $\sum_j (P_{ij}(1 - P_{ij})\delta_{ij} + c\,u\,P_{ij})\,|v_{jd}|$ (plus the sum's rounding,
    $c\,u \sum_j P_{ij} |v_{jd}|$).
    """
    u = precision.NOISE * UNIT_ROUNDOFF[dtype]
    q, k, _ = args
    p, s, allowed, v, scale = _weights_and_scores(args, kwargs)
    kg = np.repeat(k, q.shape[1] // k.shape[1], axis=1)  # (B, H, M, D)
    typical = math.sqrt(q.shape[-1]) * scale * np.einsum("bhnd,bhmd->bhnm", np.abs(q), np.abs(kg))
    delta = u * np.where(allowed, typical + np.abs(np.where(allowed, s, 0.0)), 0.0)
    dp = p * (1.0 - p) * delta + u * p  # (B, H, N, M)
    out = np.einsum("bhnm,bhmd->bhnd", p, v) + np.einsum("bhnm,bhmd->bhnd", dp + u * p, np.abs(v))
    return (out, p + dp)[: 2 if kwargs.get("return_weights") else 1]


def _emulated(args: tuple, kwargs: dict, dtype: str) -> tuple[np.ndarray, ...]:
    """Weights in float64 rounded to ``dtype`` before ``P V``, the output rounded to ``dtype``."""
    p, _, _, v, _ = _weights_and_scores(args, kwargs)
    p = round_to(p, dtype)  # (B, H, N, M)
    out = round_to(np.einsum("bhnm,bhmd->bhnd", p, v), dtype)  # (B, H, N, Dv)
    return (out, p)[: 2 if kwargs.get("return_weights") else 1]


def same_precision(op: str, args: tuple, kwargs: dict, dtype: str) -> list[tuple]:
    """Evaluations of ``sigmoid`` in ``dtype`` (see the module docstring)."""
    q, k, v = args
    if dtype in ("float32", "float64"):
        return [
            precision.reference_in(op, args, kwargs, dtype),
            precision.reference_in(op, (q[..., ::-1], k[..., ::-1], v), kwargs, dtype),
            _first_order(args, kwargs, dtype),
        ]
    return [
        precision.reference_in(op, args, kwargs, dtype),
        _emulated(args, kwargs, dtype),
        _first_order(args, kwargs, "float32"),
    ]


register(
    "sigmoid",
    OpSpec(
        cases=sigmoid_cases,
        outputs=_outputs,
        scales=_scales,
        same_precision=same_precision,
    ),
)
