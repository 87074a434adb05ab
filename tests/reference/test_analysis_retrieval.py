"""Retrieval heads: the score against explicit loops, head ablation against zeroed weights."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qkv.errors import ParameterError, ShapeError
from qkv.lab import decoder as dec
from qkv.lab import tasks
from qkv.reference.analysis import retrieval_heads
from qkv.reference.analysis.retrieval_score import (
    answer_accuracy,
    causal_test,
    check_heads,
    needle_span,
    retrieval_score,
    zero_heads,
)

TINY = dec.DecoderConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_len=64)


def _one_hot_rows(targets: np.ndarray, n: int) -> np.ndarray:
    return np.eye(n)[targets]  # (..., n)


def test_a_head_reading_the_source_scores_one_and_a_bos_head_zero():
    context = np.array([1, 9, 9, 20, 21, 22, 9, 9, 4, 2])
    span, generated = (3, 6), np.array([20, 21, 22])
    n = len(context)
    copier = _one_hot_rows(np.array([3, 4, 5]), n)  # (T, N)
    bos = _one_hot_rows(np.zeros(3, int), n)
    attention = np.stack([np.stack([copier, bos])])  # (1, 2, T, N)
    assert retrieval_score(attention, context, generated, span).tolist() == [[1.0, 0.0]]


def test_a_wrong_token_inside_the_needle_does_not_count():
    context = np.array([1, 20, 21, 22, 4])
    attention = _one_hot_rows(np.array([[[2, 1, 3]]]), 5)  # (1, 1, T, N): reads 21 for 20
    score = retrieval_score(attention, context, np.array([20, 21, 22]), (1, 4))
    assert score[0, 0] == pytest.approx(1 / 3)  # only the last step copies


def test_dedupe_counts_a_position_once_the_code_counts_every_step():
    context = np.array([1, 20, 21, 4])
    attention = _one_hot_rows(np.array([[[1, 1]]]), 4)  # (1, 1, 2, 4)
    args = (attention, context, np.array([20, 20]), (1, 3))
    assert retrieval_score(*args)[0, 0] == pytest.approx(0.5)
    assert retrieval_score(*args, dedupe=False)[0, 0] == pytest.approx(1.0)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.booleans())
def test_score_matches_an_explicit_loop(seed, dedupe):
    rng = np.random.default_rng(seed)
    L, H, T, N = 2, 3, 4, 12
    logits = rng.standard_normal((L, H, T, N)) * 3
    attention = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    context = rng.integers(0, 4, N)
    generated = rng.integers(0, 4, T)
    start = int(rng.integers(0, N - 3))
    stop = start + 3
    expected = np.zeros((L, H))
    for i in range(L):
        for j in range(H):
            hits = []
            for t in range(T):
                p = int(np.argmax(attention[i, j, t]))
                if start <= p < stop and context[p] == generated[t]:
                    hits.append(p)
            expected[i, j] = len(set(hits) if dedupe else hits) / 3
    got = retrieval_score(attention, context, generated, (start, stop), dedupe=dedupe)
    np.testing.assert_allclose(got, expected)


def test_zeroing_a_head_equals_zeroing_its_output_rows():
    weights = dec.init_weights(TINY, seed=1)
    tokens = np.random.default_rng(0).integers(0, TINY.vocab, (2, 20))
    layer, head = 1, 2
    arrays = weights.to_arrays()
    wo = arrays[f"layers.{layer}.wo"].copy()
    hd = TINY.head_dim
    wo[head * hd : (head + 1) * hd] = 0.0  # the head writes nothing to the residual
    arrays[f"layers.{layer}.wo"] = wo
    ablated = dec.from_arrays(TINY, arrays)
    got = dec.forward(weights, tokens, attention=zero_heads([(layer, head)]))
    np.testing.assert_allclose(got, dec.forward(ablated, tokens), rtol=1e-5, atol=1e-5)


def _passkeys(n: int, length: int = 40) -> list[tasks.Example]:
    rng = np.random.default_rng(3)
    return [tasks.passkey(length, d, rng, digits=3) for d in np.linspace(0, 1, n)]


def test_retrieval_heads_on_a_small_model_gives_bounded_scores():
    weights = dec.init_weights(dataclasses.replace(TINY, vocab=tasks.VOCAB_SIZE), seed=0)
    found = retrieval_heads(weights, _passkeys(3), min_recall=0.0, threshold=0.05)
    assert found.scores.shape == (2, 4)
    assert np.all((found.scores >= 0) & (found.scores <= 1))
    assert all(found.scores[h] > 0.05 for h in found.heads)
    assert found.top(8)[0] == tuple(np.unravel_index(found.scores.argmax(), (2, 4)))


def test_causal_test_reports_three_accuracies_in_range():
    weights = dec.init_weights(dataclasses.replace(TINY, vocab=tasks.VOCAB_SIZE), seed=0)
    examples = _passkeys(2)
    found = retrieval_heads(weights, examples, min_recall=0.0)
    result = causal_test(weights, examples, found, k=2, draws=1)
    assert set(result) == {"clean", "top", "random"}
    assert result["clean"] == answer_accuracy(weights, examples)
    assert all(0.0 <= v <= 1.0 for v in result.values())


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("threshold", [0.0, 1.0, -0.2, 1.5])
def test_threshold_outside_open_unit_interval_is_refused(threshold):
    weights = dec.init_weights(dataclasses.replace(TINY, vocab=tasks.VOCAB_SIZE), seed=0)
    with pytest.raises(ParameterError, match="threshold"):
        retrieval_heads(weights, _passkeys(1), threshold=threshold)


@pytest.mark.parametrize("heads", [[(2, 0)], [(0, 4)], [(-1, 0)], [(0, 1, 2)]])
def test_head_indices_out_of_range_are_refused(heads):
    with pytest.raises(ParameterError, match="heads"):
        check_heads(TINY, heads)


def test_masking_an_out_of_range_head_is_refused():
    weights = dec.init_weights(dataclasses.replace(TINY, vocab=tasks.VOCAB_SIZE), seed=0)
    with pytest.raises(ParameterError, match="heads"):
        answer_accuracy(weights, _passkeys(1), masked=[(0, 9)])


def test_needle_absent_from_the_prompt_is_refused():
    example = _passkeys(1)[0]
    moved = dataclasses.replace(example, needle=example.needle + 1)
    with pytest.raises(ParameterError, match="needle is absent"):
        needle_span(moved)
    weights = dec.init_weights(dataclasses.replace(TINY, vocab=tasks.VOCAB_SIZE), seed=0)
    with pytest.raises(ParameterError, match="needle is absent"):
        retrieval_heads(weights, [moved])


def test_rows_that_are_not_stochastic_are_refused():
    attention = np.full((1, 1, 2, 4), 0.5)
    with pytest.raises(ParameterError, match="summing to one"):
        retrieval_score(attention, np.arange(4), np.arange(2), (0, 2))


def test_mismatched_shapes_are_refused():
    attention = np.full((1, 1, 2, 4), 0.25)
    with pytest.raises(ShapeError, match="context"):
        retrieval_score(attention, np.arange(5), np.arange(2), (0, 2))
    with pytest.raises(ShapeError, match="attention"):
        retrieval_score(attention[0], np.arange(4), np.arange(2), (0, 2))
