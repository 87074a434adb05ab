"""A²ATS (``qkv.reference.sparse.a2ats``): windowed RoPE, query-aware VQ, top-k retrieval.

Independent computations: exact RoPE logits from ``qkv.rope`` at true positions, WRoPE logits
by rotating the keys (the selector rotates the query), k-means objectives recomputed from the
assignment, the query metric as an explicit quadratic form, and full attention in the engine.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qkv
from qkv.errors import ParameterError, ShapeError
from qkv.reference.kv.policy import CacheView
from qkv.reference.sparse import A2ATS, a2ats
from qkv.reference.sparse.a2ats_retrieval import (
    QueryAwareCodebook,
    a2ats_slots,
    kmeans,
    lab_codebooks,
    query_metric,
    rotate,
    wrope_logits,
)
from qkv.reference.sparse.decode_scores import all_slots

BASE = 10000.0


def make_view(rng, *, B=2, H=4, Hkv=2, C=40, D=8, length=None, dtype=np.float64):
    """A cache of ``length`` tokens (slots = tokens, RoPE applied) and the pre-RoPE q, k."""
    length = C if length is None else length
    k = rng.standard_normal((B, Hkv, C, D)).astype(dtype)  # pre-RoPE keys
    q = rng.standard_normal((B, H, D)).astype(dtype)  # pre-RoPE query
    pos = np.broadcast_to(np.arange(C), (B, Hkv, C)).copy()
    here = length - 1  # the query is the latest token
    k_rot = rotate(k, pos, base=BASE)
    q_rot = qkv.rope(q[:, :, None], positions=np.full(1, here), base=BASE)  # (B, H, 1, D)
    indices = np.where(pos < length, pos, -1)
    view = CacheView(
        keys=np.where(indices[..., None] >= 0, k_rot, 0),
        values=rng.standard_normal((B, Hkv, C, D)).astype(dtype),
        indices=indices,
        positions=np.where(indices >= 0, pos, 0),
        next_position=np.full((B, Hkv), length),
        n_tokens=length,
        queries=q_rot,
        rope_base=BASE,
    )
    return view, q, k


def identity_codebook(keys_one_row, D):
    """A codebook whose words are the keys themselves (each key its own code)."""
    Hkv = keys_one_row.shape[0]
    return QueryAwareCodebook(keys_one_row.copy(), np.broadcast_to(np.eye(D), (Hkv, D, D)).copy())


def test_catalog_name_is_the_selector():
    assert a2ats is A2ATS


@pytest.mark.parametrize("window", [1, 5, 40])
def test_wrope_inside_the_window_is_exact_rope(window):
    rng = np.random.default_rng(window)
    _, q, k = make_view(rng, B=1)
    C = k.shape[2]
    i = C - 1
    distance = np.broadcast_to(i - np.arange(C), (1, 2, C))
    got = wrope_logits(q, k, distance, window=window, relative_position=300, base=BASE)
    q_rot = qkv.rope(q[:, :, None], positions=np.full(1, i), base=BASE)[:, :, 0]  # (1, H, D)
    k_rot = qkv.rope(k, base=BASE)  # (1, Hkv, C, D) at 0..C-1
    exact = np.einsum("bhd,bhcd->bhc", q_rot, np.repeat(k_rot, 2, axis=1))  # (1, H, C)
    far_q = qkv.rope(q[:, :, None], positions=np.full(1, 300), base=BASE)[:, :, 0]
    far = np.einsum("bhd,bhcd->bhc", far_q, np.repeat(k, 2, axis=1))  # every key at delta
    inside = (i - np.arange(C)) < window
    np.testing.assert_allclose(got[..., inside], exact[..., inside], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(got[..., ~inside], far[..., ~inside], rtol=1e-10, atol=1e-10)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**31), st.integers(1, 30), st.sampled_from([0, 17, 2048]))
def test_codebook_equal_to_the_keys_gives_the_exact_wrope_logits(seed, window, delta):
    rng = np.random.default_rng(seed)
    view, q, k = make_view(rng, B=1, length=35)
    sel = A2ATS((identity_codebook(k[0], k.shape[-1]),), window=window, relative_position=delta)
    got = sel.logits(0, view)  # (1, H, C)
    distance = 34 - view.positions
    want = wrope_logits(q, k, distance, window=window, relative_position=delta, base=BASE)
    outside = (distance >= window)[0, 0] & (view.indices[0, 0] >= 0)
    np.testing.assert_allclose(got[..., outside], want[..., outside], rtol=1e-9, atol=1e-9)


def test_topk_one_reads_every_key():
    rng = np.random.default_rng(1)
    view, _, k = make_view(rng, C=50, length=44)
    books = (QueryAwareCodebook.fit(rng.standard_normal((2, 30, 8)), k[0], 6),)
    got = A2ATS(books, topk=1.0, n_sink=2, window=3).select(0, view)
    np.testing.assert_array_equal(got, all_slots(view, 4))


def test_topk_one_equals_full_attention_in_the_lab_engine():
    from qkv.lab import decoder as dec
    from qkv.lab import engine, tasks

    weights = dec.load()
    books = lab_codebooks(16, prompts=1, length=64)
    rng = np.random.default_rng(2)
    prompt = np.stack([tasks.passkey(96, d, rng).prompt for d in (0.2, 0.8)])
    full = engine.generate(weights, prompt, 4)
    sel = engine.generate(weights, prompt, 4, selector=A2ATS(books, topk=1.0, n_sink=2, window=4))
    np.testing.assert_array_equal(sel.tokens, full.tokens)
    np.testing.assert_allclose(sel.logits, full.logits, rtol=1e-5, atol=1e-5)


def test_selection_unions_each_group_and_keeps_sinks_and_window():
    rng = np.random.default_rng(3)
    view, _, k = make_view(rng, B=2, H=6, Hkv=2, C=60, length=57)
    books = (QueryAwareCodebook.fit(rng.standard_normal((2, 50, 8)), k[0], 12),)
    sel = A2ATS(books, top_k=5, n_sink=3, window=7)
    slots = sel.select(0, view)  # (B, H, S)
    logits = sel.logits(0, view)  # (B, H, C)
    for b in range(2):
        for g in range(2):
            group = slots[b, 3 * g : 3 * g + 3]
            assert (group == group[0]).all()  # one set per GQA group
            chosen = set(group[0][group[0] >= 0].tolist())
            assert set(range(3)) | set(range(50, 57)) <= chosen  # sinks and window
            assert max(chosen) < 57  # no empty slot
            own = set()
            for h in range(3 * g, 3 * g + 3):
                cand = logits[b, h, 3:50]
                best = 3 + np.argsort(-cand, kind="stable")[:5]
                own |= set(best.tolist())
            assert chosen == own | set(range(3)) | set(range(50, 57))
    codes = sel.codes(0, view)  # (B, Hkv, C): coded once, as on insertion into the cache
    np.testing.assert_array_equal(sel.select(0, view, codes), slots)
    np.testing.assert_array_equal(
        codes, books[0].assign(rotate(view.keys, -view.positions, base=BASE))
    )


def test_codes_are_kept_across_calls_and_only_changed_slots_are_coded(monkeypatch):
    """As the paper codes a key once, on insertion, the selector codes at each call only the
    slots whose key or position changed since its last call; its codes always equal coding
    every key afresh (a brute-force nearest codeword of each un-rotated key)."""
    rng = np.random.default_rng(8)
    view, _, k = make_view(rng, B=2, H=4, Hkv=2, C=30)
    book = QueryAwareCodebook.fit(rng.standard_normal((2, 40, 8)), k[0], 10)
    sel = A2ATS((book,), top_k=4, n_sink=2, window=3)
    coded_rows = []  # rows the selector codes at each call
    assign_rows = QueryAwareCodebook.assign_rows

    def counting(self, keys, heads):
        coded_rows.append(len(keys))
        return assign_rows(self, keys, heads)

    def selector_codes(v):
        with monkeypatch.context() as patch:
            patch.setattr(QueryAwareCodebook, "assign_rows", counting)
            return sel.codes(0, v)

    def afresh(v):  # brute force: each pre-RoPE key's nearest codeword, min_m |(k - c_m) L|^2
        pre = rotate(v.keys, -v.positions, base=BASE)  # (B, Hkv, C, D)
        diff = pre[:, :, :, None] - book.centroids[None, :, None]  # (B, Hkv, C, K, D)
        metric = np.einsum("bgckd,gde->bgcke", diff, book.cholesky)  # (B, Hkv, C, K, D)
        return np.argmin(np.sum(metric**2, axis=-1), axis=-1)  # (B, Hkv, C)

    np.testing.assert_array_equal(selector_codes(view), afresh(view))
    # a decode step: every (b, g) gains a slot; one key is overwritten, one position moved
    grown = CacheView(
        keys=np.concatenate([view.keys, rng.standard_normal((2, 2, 1, 8))], axis=2),
        values=np.concatenate([view.values, rng.standard_normal((2, 2, 1, 8))], axis=2),
        indices=np.concatenate([view.indices, np.full((2, 2, 1), 30)], axis=2),
        positions=np.concatenate([view.positions, np.full((2, 2, 1), 30)], axis=2),
        next_position=view.next_position + 1,
        n_tokens=31,
        queries=view.queries,
        rope_base=BASE,
    )
    grown.keys[0, 1, 5] = rng.standard_normal(8)
    grown.positions[1, 0, 7] = 12
    np.testing.assert_array_equal(selector_codes(grown), afresh(grown))
    other, _, _ = make_view(np.random.default_rng(9), B=2, H=4, Hkv=2, C=31)  # another cache
    np.testing.assert_array_equal(selector_codes(other), afresh(other))
    smaller, _, _ = make_view(np.random.default_rng(10), B=1, H=4, Hkv=2, C=31)  # another layout
    np.testing.assert_array_equal(selector_codes(smaller), afresh(smaller))
    assert coded_rows == [2 * 2 * 30, 2 * 2 + 2, 2 * 2 * 31, 1 * 2 * 31]
    np.testing.assert_array_equal(
        sel.select(0, smaller), A2ATS((book,), top_k=4, n_sink=2, window=3).select(0, smaller)
    )


def test_topk_fraction_counts_the_cached_tokens():
    sel = A2ATS((), topk=0.03)
    assert sel.count(1000) == 30 and sel.count(10) == 0
    assert A2ATS((), topk=0.5, top_k=7).count(1000) == 7


def test_a2ats_slots_clips_the_count_to_the_candidates():
    logits = np.arange(10.0)[None, None].repeat(2, axis=1)  # (1, 2, 10)
    candidate = np.zeros((1, 1, 10), bool)
    candidate[..., 2:5] = True
    keep = np.zeros_like(candidate)
    keep[..., 9] = True
    np.testing.assert_array_equal(a2ats_slots(logits, candidate, keep, 100)[0, 0], [2, 3, 4, 9])
    np.testing.assert_array_equal(a2ats_slots(logits, candidate, keep, 1)[0, 1], [4, 9])


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 80), st.integers(1, 6), st.integers(1, 12), st.integers(0, 2**31))
def test_kmeans_objective_never_increases(n, D, K, seed):
    K = min(K, n)
    rng = np.random.default_rng(seed)
    points = rng.standard_normal((n, D)) * rng.choice([1e-3, 1.0, 1e3])
    points[: n // 3] = points[0]  # duplicates (empty clusters after seeding are possible)
    fit = kmeans(points, K, iters=8, rng=seed)
    # distances are |x|^2 - 2 x.c + |c|^2: rounding of order eps |x|^2
    noise = 1e-12 * float(np.max(np.sum(points**2, axis=1)))
    assert np.all(np.diff(fit.objective) <= 1e-9 * fit.objective[0] + noise)
    d2 = ((points[:, None] - fit.centroids[None]) ** 2).sum(-1)  # (n, K) explicit
    assert np.allclose(d2[np.arange(n), fit.assignment], d2.min(axis=1), rtol=1e-7, atol=noise)
    assert fit.objective[-1] == pytest.approx(d2.min(axis=1).mean(), rel=1e-7, abs=noise)


def test_query_metric_is_the_expected_score_error():
    rng = np.random.default_rng(4)
    Q = rng.standard_normal((500, 6)) * np.array([4.0, 2.0, 1.0, 0.5, 0.1, 0.1])
    Hm, L = query_metric(Q)
    assert np.sqrt(np.mean(Hm**2)) == pytest.approx(1.0)
    np.testing.assert_allclose(np.triu(L, 1), 0)
    e = rng.standard_normal(6)  # k - c
    quad = np.sum((Q @ e) ** 2) / np.sqrt(np.mean((Q.T @ Q) ** 2))  # sum_q (q.(k-c))^2 / rms
    assert np.sum((e @ L) ** 2) == pytest.approx(quad + 1e-6 * e @ e, rel=1e-10)


def test_query_aware_codebook_beats_plain_kmeans_on_score_error():
    """Queries live mostly on two axes the keys barely vary on: the metric favours those."""
    rng = np.random.default_rng(5)
    D = 8
    keys = rng.standard_normal((1, 600, D)) * np.array([3, 3, 3, 3, 3, 3, 0.5, 0.5])
    queries = rng.standard_normal((1, 800, D)) * np.array([0.1] * 6 + [3.0, 3.0])
    aware = QueryAwareCodebook.fit(queries, keys, 16)
    plain = QueryAwareCodebook.fit(np.broadcast_to(np.eye(D), (1, D, D)).copy(), keys, 16)
    test_q = rng.standard_normal((200, D)) * np.array([0.1] * 6 + [3.0, 3.0])

    def error(book):
        words = book.centroids[0][book.assign(keys[None])[0, 0]]  # (600, D)
        return np.mean((test_q @ (keys[0] - words).T) ** 2)

    assert error(aware) < 0.5 * error(plain)


# ----------------------------------------------------------------------- bad input


def test_bad_input():
    rng = np.random.default_rng(6)
    keys = rng.standard_normal((2, 10, 4))
    with pytest.raises(ParameterError, match=r"n_centroids: expected a codebook size in \[1, 10\]"):
        QueryAwareCodebook.fit(rng.standard_normal((2, 5, 4)), keys, 11)
    with pytest.raises(ParameterError, match="n_centroids: expected a codebook size"):
        kmeans(keys[0], 11)
    for bad in (0, 0.0, -0.1, 1.5, True, "0.1"):
        with pytest.raises(ParameterError, match=r"topk: expected a fraction"):
            A2ATS((), topk=bad)
    with pytest.raises(ParameterError, match="window: expected an integer >= 1"):
        A2ATS((), window=0)
    with pytest.raises(ParameterError, match="codebooks: expected one QueryAwareCodebook"):
        A2ATS(("not a codebook",))
    view, _, k = make_view(rng, C=90, length=90)
    sel = A2ATS((identity_codebook(k[0], 8),), n_sink=1, window=2)
    with pytest.raises(ParameterError, match="layer: expected one of the 1 calibrated layers"):
        sel.select(3, view)
    with pytest.raises(ShapeError, match=r"codes: expected one code per cache slot"):
        sel.select(0, view, codes=np.zeros((2, 2, 89), dtype=np.int64))
