"""retrieval_attention: graph indexes over keys, greedy search, merged static + retrieved attention."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qkv.errors import ParameterError, ShapeError
from qkv.reference.retrieval import (
    AttentionIndex,
    build_index,
    build_knn_index,
    graph_search,
    retrieval_attention,
)
from qkv.reference.retrieval.attention_index import exact_top_k, graph_search_batch, recall, search


def _qkv(seed, B=1, H=4, Hkv=2, N=3, M=40, D=8, Dv=5, dtype=np.float64):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, H, N, D)).astype(dtype)
    k = rng.standard_normal((B, Hkv, M, D)).astype(dtype)
    v = rng.standard_normal((B, Hkv, M, Dv)).astype(dtype)
    prefill = rng.standard_normal((B, H, 12, D)).astype(dtype) + 1.0  # shifted: OOD queries
    return q, k, v, prefill


def _brute_top(q_vec, keys, k):
    """Exact top-k by an explicit loop over the keys (ties to the lower index)."""
    scores = [(-float(np.dot(q_vec, key)), j) for j, key in enumerate(keys)]
    return [j for _, j in sorted(scores)[:k]]


def _attention_over(q_vec, keys, values, positions, scale):
    """Float64 softmax attention of one query over the listed positions, written as a loop."""
    logits = np.array([scale * float(np.dot(q_vec, keys[j])) for j in positions])
    w = np.exp(logits - logits.max())
    return sum(wi * values[j] for wi, j in zip(w / w.sum(), positions, strict=True))


def _reachable(neighbours, entry):
    seen, todo = {entry}, [entry]
    while todo:
        for u in neighbours[todo.pop()]:
            if u >= 0 and u not in seen:
                seen.add(int(u))
                todo.append(int(u))
    return seen


@pytest.mark.parametrize("kind", ["attention", "knn"])
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), M=st.integers(8, 50), top_k=st.integers(1, 6))
def test_search_with_ef_at_least_the_keys_is_exact(kind, seed, M, top_k):
    q, k, _, prefill = _qkv(seed, M=M)
    if kind == "attention":
        index = build_index(prefill, k, n_sink=1, n_recent=2, links=3, max_degree=3)
    else:
        index = build_knn_index(k, n_sink=1, n_recent=2, max_degree=3)
    top_k = min(top_k, index.size)
    found, scanned = search(q, k, index, top_k=top_k, ef=index.size)
    assert (scanned == index.size).all()
    for h in range(q.shape[1]):
        for n in range(q.shape[2]):
            mid = k[0, h // 2, index.start : index.stop]
            want = [j + index.start for j in _brute_top(q[0, h, n], mid, top_k)]
            assert found[0, h, n].tolist() == want


@pytest.mark.parametrize("kind", ["attention", "knn"])
def test_every_key_is_reachable_from_the_entry(kind):
    _, k, _, prefill = _qkv(3, B=2, M=60)
    if kind == "attention":
        index = build_index(prefill, k, n_sink=2, n_recent=3, links=4, max_degree=2)
    else:
        index = build_knn_index(k, n_sink=2, n_recent=3, max_degree=2)
    for b in range(2):
        for g in range(2):
            nb = index.neighbours[b, g]
            assert _reachable(nb, int(index.entry[b, g])) == set(range(index.size))
            rows = np.arange(index.size)[:, None]
            assert not ((nb == rows) & (nb >= 0)).any(), "no self loops"
            assert nb.max() < index.size


def test_knn_graph_links_each_key_to_its_nearest_keys():
    _, k, _, _ = _qkv(4, M=30)
    index = build_knn_index(k, n_sink=0, n_recent=1, max_degree=3)
    keys = k[0, 0, :29]
    for a in range(29):
        d = [(float(np.sum((keys[a] - keys[b]) ** 2)), b) for b in range(29) if b != a]
        nearest = {b for _, b in sorted(d)[:3]}
        assert nearest <= set(index.neighbours[0, 0, a].tolist())


def test_projection_links_keys_that_share_a_query():
    # one query, links to keys 1, 2 and 3 in that order: the pivot 1 gets 2 and 3 (both kept:
    # they lie in opposite directions from 1), and they get the reverse edge back to 1
    k = np.zeros((1, 1, 5, 2))
    k[0, 0] = [[0.0, 0.0], [3.0, 0.0], [3.0, 1.0], [3.0, -1.2], [-5.0, 0.0]]
    q = np.array([1.0, 0.0]).reshape(1, 1, 1, 2)
    index = build_index(q, k, n_sink=0, n_recent=0 + 1, links=3, max_degree=4)
    nb = index.neighbours[0, 0]
    assert int(index.entry[0, 0]) in (1, 2, 3)
    assert {2, 3} <= set(nb[1].tolist())
    assert 1 in nb[2].tolist() and 1 in nb[3].tolist()


def test_graph_search_on_a_path_follows_the_scores():
    keys = np.arange(10, dtype=np.float64)[:, None]  # (10, 1): scores grow along the path
    nb = np.full((10, 2), -1)
    for a in range(10):
        nb[a, : len([x for x in (a - 1, a + 1) if 0 <= x < 10])] = [
            x for x in (a - 1, a + 1) if 0 <= x < 10
        ]
    found, scanned = graph_search(np.array([1.0]), keys, nb, 0, top_k=2, ef=2)
    assert found.tolist() == [9, 8]
    assert scanned == 10  # the whole path, one key at a time


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), M=st.integers(6, 40), n_new=st.integers(0, 4))
def test_an_index_that_returns_every_key_gives_full_attention(seed, M, n_new):
    q, k, v, prefill = _qkv(seed, M=M + n_new)
    index = build_index(prefill, k[:, :, :M], n_sink=1, n_recent=1, links=2, max_degree=3)
    out = retrieval_attention(q, k, v, index, top_k=index.size, ef=index.size)
    scale = 1 / np.sqrt(q.shape[-1])
    for h in range(4):
        for n in range(3):
            want = _attention_over(q[0, h, n], k[0, h // 2], v[0, h // 2], range(M + n_new), scale)
            np.testing.assert_allclose(out[0, h, n], want, rtol=1e-10, atol=1e-12)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), top_k=st.integers(1, 8), ef=st.integers(8, 12))
def test_merged_partials_equal_attention_over_the_union(seed, top_k, ef):
    q, k, v, prefill = _qkv(seed, M=50)
    index = build_index(prefill, k, n_sink=3, n_recent=5, links=4, max_degree=4)
    out, scanned = retrieval_attention(q, k, v, index, top_k=top_k, ef=ef, return_scanned=True)
    found, _ = search(q, k, index, top_k=top_k, ef=ef)
    assert ((scanned >= 1) & (scanned <= index.size)).all()
    scale = 1 / np.sqrt(q.shape[-1])
    for h in range(4):
        for n in range(3):
            union = [*range(3), *found[0, h, n].tolist(), *range(45, 50)]
            assert len(set(union)) == len(union), "static and retrieved are disjoint"
            want = _attention_over(q[0, h, n], k[0, h // 2], v[0, h // 2], union, scale)
            np.testing.assert_allclose(out[0, h, n], want, rtol=1e-10, atol=1e-12)


def test_exact_top_k_and_recall():
    q, k, _, prefill = _qkv(5, M=30)
    index = build_knn_index(k, n_sink=0, n_recent=1, max_degree=4)
    exact = exact_top_k(q, k, index, 4)
    for h in range(4):
        assert exact[0, h, 0].tolist() == _brute_top(q[0, h, 0], k[0, h // 2, :29], 4)
    assert recall(exact, exact) == 1.0
    assert recall(np.full_like(exact, 29), exact) == 0.0


def test_float32_stays_float32():
    q, k, v, prefill = _qkv(6, M=30, dtype=np.float32)
    index = build_index(prefill, k, n_sink=1, n_recent=1, links=3, max_degree=3)
    out = retrieval_attention(q, k, v, index, top_k=5, ef=8)
    assert out.dtype == np.float32 and out.shape == (1, 4, 3, 5)


# --------------------------------------------------------------------------- bad input


def test_k_above_the_data_size():
    q, k, v, prefill = _qkv(7, M=20)
    index = build_index(prefill, k, n_sink=2, n_recent=2, links=3, max_degree=3)
    with pytest.raises(ParameterError, match="top_k: expected at most the 16"):
        retrieval_attention(q, k, v, index, top_k=17)
    with pytest.raises(ParameterError, match="links: expected at most the 16"):
        build_index(prefill, k, n_sink=2, n_recent=2, links=17)
    with pytest.raises(ParameterError, match="n_sink, n_recent"):
        build_index(prefill, k, n_sink=10, n_recent=10, links=3)
    with pytest.raises(ParameterError, match="ef: expected ef >= top_k=5"):
        search(q, k, index, top_k=5, ef=4)


def test_query_and_key_dimensions_that_differ():
    q, k, v, prefill = _qkv(8, M=20)
    index = build_knn_index(k, n_sink=1, n_recent=1, max_degree=3)
    with pytest.raises(ShapeError, match="k: expected head dim D=7"):
        search(q[..., :7], k, index, top_k=2)
    with pytest.raises(ShapeError, match="queries, keys"):
        build_index(prefill[..., :7], k, n_sink=1, n_recent=1, links=2)
    with pytest.raises(ShapeError, match="neighbours: expected a shape starting with"):
        search(q, k[:, :1], index, top_k=2)
    with pytest.raises(ShapeError, match="neighbours: expected graphs"):
        search(q, k[:, :, :10], index, top_k=2)
    with pytest.raises(ParameterError, match=r"entry: expected values in \[0, 18\)"):
        graph_search_batch(q, k, index.neighbours, index.entry + 18, start=1, top_k=2)
    with pytest.raises(TypeError, match="index: expected an AttentionIndex"):
        search(q, k, object(), top_k=2)


def test_non_finite_inputs():
    q, k, v, prefill = _qkv(9, M=20)
    index = build_knn_index(k, n_sink=1, n_recent=1, max_degree=3)
    bad = k.copy()
    bad[0, 0, 3, 1] = np.nan
    with pytest.raises(ParameterError, match="keys: expected finite"):
        build_knn_index(bad, n_sink=1, n_recent=1)
    q_bad = q.copy()
    q_bad[0, 1, 0, 0] = np.inf
    with pytest.raises(ParameterError, match="q: expected finite"):
        retrieval_attention(q_bad, k, v, index, top_k=2)
    with pytest.raises(ParameterError, match="k: expected finite"):
        search(q, bad, index, top_k=2)
    with pytest.raises(ParameterError, match="queries: expected finite"):
        build_index(prefill * np.nan, k, n_sink=1, n_recent=1, links=2)


def test_index_dataclass():
    _, k, _, _ = _qkv(10, M=20)
    index = build_knn_index(k, n_sink=2, n_recent=3, max_degree=3)
    assert isinstance(index, AttentionIndex)
    assert (index.start, index.stop, index.size) == (2, 17, 15)
    assert (index.degrees() >= 3).all()
