"""RetrievalAttention's graph search (``qkv.graph_search_batch``) on the numba backend.

The numba kernel runs each greedy best-first search in compiled code
(:mod:`qkv.backends.numba._graph_search`); the reference walks the graph in Python with
``heapq`` (:func:`qkv.reference.retrieval.attention_index.graph_search_batch`). Both return
integers, which must match exactly.
"""

from __future__ import annotations

import numpy as np
import pytest

import qkv
from qkv import _outputs
from qkv.backends import numba as numba_backend
from qkv.errors import Unsupported
from qkv.reference.retrieval import build_index, build_knn_index, retrieval_attention
from qkv.reference.retrieval.attention_index import graph_search_batch

pytestmark = pytest.mark.skipif(
    not numba_backend.available()[0], reason=f"numba: {numba_backend.available()[1]}"
)


def make_inputs(dtype, seed=0, M=120):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((2, 4, 5, 8)).astype(dtype)
    k = rng.standard_normal((2, 2, M, 8)).astype(dtype)
    prefill = (rng.standard_normal((2, 4, 20, 8)) + 0.7).astype(dtype)
    return q, k, prefill


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("kind", ["attention", "knn"])
@pytest.mark.parametrize("ef", [4, 15, 200])
def test_numba_matches_reference(dtype, kind, ef):
    q, k, prefill = make_inputs(dtype)
    if kind == "attention":
        index = build_index(prefill, k, n_sink=2, n_recent=5, links=6, max_degree=5)
    else:
        index = build_knn_index(k, n_sink=2, n_recent=5, max_degree=5)
    args = (q, k, index.neighbours, index.entry)
    kw = {"start": index.start, "top_k": 4, "ef": ef}
    with _outputs.poisoned():
        found, scanned = numba_backend.graph_search_batch(*args, **kw)
    want_found, want_scanned = graph_search_batch(*args, **kw)
    np.testing.assert_array_equal(found, want_found)
    np.testing.assert_array_equal(scanned, want_scanned)


def test_retrieval_attention_through_numba_equals_the_reference():
    q, k, prefill = make_inputs(np.float64, seed=1)
    v = np.random.default_rng(2).standard_normal(k.shape)
    index = build_index(prefill, k, n_sink=2, n_recent=5, links=6, max_degree=5)
    want = retrieval_attention(q, k, v, index, top_k=6, ef=10)
    with qkv.use_backend("numba"):
        got = retrieval_attention(q, k, v, index, top_k=6, ef=10)
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13)


def test_conformance_kit():
    from qkv.testing import check_backend

    report = check_backend("numba", ops=["graph_search_batch"], max_examples=25)
    assert report.ok, report


def test_numba_declines_half_precision():
    q, k, prefill = make_inputs(np.float32)
    index = build_knn_index(k, n_sink=2, n_recent=5, max_degree=5)
    with pytest.raises(Unsupported, match="float32 and float64"):
        numba_backend.graph_search_batch(
            q.astype(np.float16), k.astype(np.float16), index.neighbours, index.entry,
            start=2, top_k=3, ef=3,
        )  # fmt: skip
