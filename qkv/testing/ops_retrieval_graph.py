r"""Conformance-kit spec of ``graph_search_batch`` (RetrievalAttention's search, arXiv 2409.10516).

Importing this module registers the op's :class:`qkv.testing.specs.OpSpec`. The strategy draws
1-2 batches, 1-2 KV heads with 1-2 query heads each, 1-4 queries, 2-60 cached keys of 1-16
features, an index that starts 0-3 keys in, and a random graph of out-degree 1-6 whose slots
are ``-1`` with probability 0-0.6 (so graphs may be disconnected, or reach few keys and pad
the result with ``-1``), a random entry, ``top_k`` 1-8 and ``ef`` from ``top_k`` up, sometimes at
least the graph's size (exhaustive search). Both outputs are integers (positions and counts)
and must match exactly; backends accumulate scores in float64 so that a float32 run follows
the same path as the float64 reference on the same values.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qkv.testing.cases import Case
from qkv.testing.specs import OpSpec, register


def graph_search_cases() -> Any:
    """The hypothesis strategy of ``graph_search_batch`` calls, each a :class:`Case`."""
    from hypothesis import strategies as st

    @st.composite
    def cases(draw: st.DrawFn) -> Case:
        B, Hkv, G = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
        N, D = draw(st.integers(1, 4)), draw(st.integers(1, 16))
        start = draw(st.integers(0, 3))
        size = draw(st.integers(1, 56))
        M = start + size + draw(st.integers(0, 4))
        R = draw(st.integers(1, 6))
        holes = draw(st.sampled_from([0.0, 0.3, 0.6]))
        top_k = draw(st.integers(1, min(8, size)))
        ef = draw(st.one_of(st.integers(top_k, top_k + 10), st.just(max(top_k, size))))
        seed = draw(st.integers(0, 2**32 - 1))

        rng = np.random.default_rng(seed)
        q = rng.standard_normal((B, Hkv * G, N, D))  # (B, H, N, D)
        k = rng.standard_normal((B, Hkv, M, D))  # (B, Hkv, M, D)
        neighbours = rng.integers(0, size, (B, Hkv, size, R))  # (B, Hkv, M_idx, R)
        neighbours[rng.random(neighbours.shape) < holes] = -1
        entry = rng.integers(0, size, (B, Hkv))  # (B, Hkv)
        notes = {"seed": seed, "holes": holes}
        kwargs = {"start": start, "top_k": top_k, "ef": ef}
        return Case("graph_search_batch", (q, k, neighbours, entry), kwargs, notes)

    return cases()


register(
    "graph_search_batch",
    OpSpec(
        cases=graph_search_cases,
        outputs=lambda case: ("found", "scanned"),
        scales=lambda case: (1.0, 1.0),
    ),
)
