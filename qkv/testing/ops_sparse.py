"""Conformance-kit spec of ``sparse_attention`` (attention over per-head selected keys).

Importing this module registers the op's :class:`qkv.testing.specs.OpSpec`. The strategy draws
batch and grouped heads, 1-4 queries, 1-70 keys, head dims from
:func:`qkv.testing.strategies.head_dims`, 1-12 selection slots per head (or per query) with
``-1`` padding, rows with no key at all, repeated indices, logit magnitudes up to 1e3, value
magnitudes, ``scale``, ``return_lse`` and a per-slot ``bias`` in each of its layouts
(``(B, H, S)``, ``(B, Hkv, S)``, ``(B, H, N, S)``) with ``log`` counts, large values and ``-inf``
(dropped) slots. Hypothesis is imported only when calls are drawn.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qkv.testing.cases import Case
from qkv.testing.specs import OpSpec, register


def sparse_attention_cases() -> Any:
    """The hypothesis strategy of ``sparse_attention`` calls, each a :class:`Case`."""
    from hypothesis import strategies as st

    from qkv.testing.strategies import head_dims

    @st.composite
    def cases(draw: st.DrawFn) -> Case:
        B = draw(st.integers(1, 2))
        Hkv = draw(st.integers(1, 3))
        H = Hkv * draw(st.sampled_from([1, 2, 4]))
        N = draw(st.integers(1, 4))
        M = draw(st.one_of(st.sampled_from([1, 7, 64]), st.integers(1, 70)))
        D = draw(head_dims())
        Dv = draw(st.sampled_from([D, 1, 5]))
        S = draw(st.integers(1, 12))
        per_query = draw(st.booleans())
        logits = draw(st.sampled_from([1.0, 30.0, 1e3]))
        values = draw(st.sampled_from([1.0, 1e-3, 1e3]))
        empty = draw(st.sampled_from([0.0, 0.3, 1.0]))  # share of -1 slots
        seed = draw(st.integers(0, 2**32 - 1))

        rng = np.random.default_rng(seed)
        q = logits**0.5 * rng.standard_normal((B, H, N, D))  # (B, H, N, D)
        k = logits**0.5 * rng.standard_normal((B, Hkv, M, D))  # (B, Hkv, M, D)
        v = values * rng.standard_normal((B, Hkv, M, Dv))  # (B, Hkv, M, Dv)
        shape = (B, H, N, S) if per_query else (B, H, S)
        idx = rng.integers(0, M, size=shape)
        idx = np.where(rng.uniform(size=shape) < empty, -1, idx).astype(np.int64)
        kwargs: dict[str, Any] = {}
        if draw(st.booleans()):
            kwargs["return_lse"] = True
        if draw(st.integers(0, 3)) == 3:
            kwargs["scale"] = draw(st.sampled_from([0.05, 1.0]))
        layout = draw(st.sampled_from(["none", "none", "head", "kv head", "query"]))
        if layout != "none":
            bias_shape = {"head": (B, H, S), "kv head": (B, Hkv, S), "query": (B, H, N, S)}
            bias = np.log(rng.integers(1, 50, size=bias_shape[layout])).astype(np.float64)
            bias *= draw(st.sampled_from([1.0, 10.0]))
            dropped = draw(st.sampled_from([0.0, 0.3, 1.0]))  # share of -inf slots
            kwargs["bias"] = np.where(rng.uniform(size=bias.shape) < dropped, -np.inf, bias)
        notes = {"seed": seed, "|logits|": f"~{logits:g}", "|v|": f"~{values:g}",
                 "empty slots": empty, "per query": per_query, "bias": layout}  # fmt: skip
        return Case("sparse_attention", (q, k, v, idx), kwargs, notes)

    return cases()


def _outputs(case: Case) -> tuple[str, ...]:
    return ("out", "lse") if case.kwargs.get("return_lse") else ("out",)


def _scales(case: Case) -> tuple[float | None, ...]:
    """``out`` is a convex combination of values: bounded by ``max |v|``; ``lse``: its own."""
    bound = float(np.abs(case.args[2]).max())
    return (bound, None) if case.kwargs.get("return_lse") else (bound,)


register(
    "sparse_attention",
    OpSpec(cases=sparse_attention_cases, outputs=_outputs, scales=_scales),
)
