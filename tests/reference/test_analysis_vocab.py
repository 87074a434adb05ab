"""Vocabulary keys: the query-key form equals the model, the bias statistic equals scipy's
Spearman, navigation lowers exactly the explored logits."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import special, stats

from qkv.errors import DTypeError, ParameterError, ShapeError
from qkv.lab import decoder as dec
from qkv.reference.analysis import vocab_keys
from qkv.reference.analysis.vocab_navigation import (
    diversity,
    explore,
    key_similarity_bias,
    navigate,
    rank_of,
)

TINY = dec.DecoderConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_len=64)
WEIGHTS = dec.init_weights(TINY, seed=2).astype(np.float64)


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_softmax_of_query_against_vocabulary_keys_is_the_models_distribution(seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, TINY.vocab, (2, 10))
    position = int(rng.integers(0, 10))
    got = vocab_keys(WEIGHTS, tokens, position=position)
    logits = dec.forward(WEIGHTS, tokens)[:, position]  # (B, V)
    np.testing.assert_allclose(got.logits, logits, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(got.probs, special.softmax(logits, axis=-1), rtol=1e-10)
    assert got.query.dtype == np.float64 and got.keys is WEIGHTS.embed


def test_the_distribution_is_finite_for_huge_logits():
    weights = dec.from_arrays(TINY, {**WEIGHTS.to_arrays(), "embed": WEIGHTS.embed * 1e4})
    got = vocab_keys(weights, np.arange(5))
    assert np.all(np.isfinite(got.probs)) and got.probs.sum() == pytest.approx(1.0)


def test_rank_of_matches_scipy():
    logits = np.random.default_rng(0).standard_normal((3, 50))
    expected = np.stack([stats.rankdata(-row, method="ordinal") - 1 for row in logits])
    np.testing.assert_array_equal(rank_of(logits), expected)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_bias_is_spearmans_correlation_of_rank_and_similarity_in_the_band(seed):
    rng = np.random.default_rng(seed)
    V, d = 60, 8
    keys = rng.standard_normal((V, d))
    query = rng.standard_normal((2, d))
    got = key_similarity_bias(query, keys, band=(0.1, 0.6))
    assert got.band == (6, 36)
    for b in range(2):
        logits = keys @ query[b]
        order = np.argsort(-logits)
        top = keys[order[0]]
        middle = order[6:36]
        cos = keys[middle] @ top / (np.linalg.norm(keys[middle], axis=1) * np.linalg.norm(top))
        expected = stats.spearmanr(np.arange(6, 36), cos).statistic
        assert got.correlation[b] == pytest.approx(expected, abs=1e-12)


def test_a_cluster_of_keys_like_the_top_one_takes_the_ranks_after_it():
    # Ten "letter" keys close to one direction, forty unrelated keys; the query picks a letter.
    rng = np.random.default_rng(1)
    d = 16
    letters = np.eye(d)[0] + 0.1 * rng.standard_normal((10, d))
    keys = np.concatenate([letters, rng.standard_normal((40, d)) / np.sqrt(d)])
    got = key_similarity_bias(3.0 * letters[0], keys, band=(0.02, 0.5))
    assert set(np.argsort(got.ranks[0])[:10]) == set(range(10))


def test_a_query_along_the_top_key_with_equal_norm_keys_gives_correlation_minus_one():
    # logit = |q| cos(k, top) for unit keys: rank order is similarity order.
    rng = np.random.default_rng(5)
    keys = rng.standard_normal((50, 6))
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    got = key_similarity_bias(2.0 * keys[7], keys)
    assert got.correlation[0] == pytest.approx(-1.0)
    assert got.ranks[0, 7] == 0


# --------------------------------------------------------------------------- navigation


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0.0, 1.0))
def test_projection_scales_every_explored_logit_by_one_minus_alpha(seed, alpha):
    rng = np.random.default_rng(seed)
    d, E = 12, int(rng.integers(1, 6))
    query, explored = rng.standard_normal(d), rng.standard_normal((E, d))
    moved = navigate(query, explored, alpha=alpha)
    np.testing.assert_allclose(explored @ moved, (1 - alpha) * explored @ query, atol=1e-10)
    # only the part of q inside the explored span changed
    step = moved - query
    residual = step - explored.T @ np.linalg.lstsq(explored.T, step, rcond=None)[0]
    np.testing.assert_allclose(residual, 0.0, atol=1e-10)
    assert np.linalg.norm(moved) <= np.linalg.norm(query) + 1e-12


def test_subtract_rule_moves_by_the_mean_explored_key():
    rng = np.random.default_rng(2)
    query, explored = rng.standard_normal(6), rng.standard_normal((3, 6))
    np.testing.assert_allclose(
        navigate(query, explored, alpha=0.5, rule="subtract"),
        query - 0.5 * (explored[0] + explored[1] + explored[2]) / 3,
    )


def test_nothing_explored_leaves_the_query():
    query = np.arange(4.0)
    np.testing.assert_array_equal(navigate(query, np.zeros((0, 4))), query)


def test_with_orthonormal_keys_navigation_walks_down_the_ranking():
    # Orthonormal keys: removing explored directions zeroes their logits and keeps the others,
    # so each round proposes the next k tokens of the original ranking (all logits positive).
    rng = np.random.default_rng(3)
    keys = np.linalg.qr(rng.standard_normal((20, 20)))[0]  # (V, d) orthonormal rows
    query = keys.T @ rng.uniform(0.5, 2.0, 20)  # every logit positive
    got = explore(query, keys, rounds=4, k=3)
    np.testing.assert_array_equal(got.ravel(), np.argsort(-(keys @ query))[:12])
    assert diversity(got) == 12


def test_without_navigation_strength_every_round_is_plain_top_k():
    rng = np.random.default_rng(4)
    keys, query = rng.standard_normal((30, 8)), rng.standard_normal(8)
    got = explore(query, keys, rounds=5, k=4, alpha=0.0)
    assert diversity(got) == 4
    np.testing.assert_array_equal(got[0], np.argsort(-(keys @ query))[:4])


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("band", [(0.0, 0.5), (0.2, 1.0), (0.5, 0.2), (-0.1, 0.5), (0.1,)])
def test_band_fractions_outside_the_open_unit_interval_are_refused(band):
    keys = np.random.default_rng(0).standard_normal((40, 4))
    with pytest.raises(ParameterError, match="band"):
        key_similarity_bias(keys[0], keys, band=band)


def test_mismatched_query_and_keys_are_refused():
    with pytest.raises(ShapeError, match="query"):
        key_similarity_bias(np.ones(5), np.ones((40, 4)))
    with pytest.raises(ShapeError, match="explored"):
        navigate(np.ones(4), np.ones((2, 5)))


@pytest.mark.parametrize("kw", [{"alpha": 1.5}, {"alpha": -0.1}, {"rule": "orthogonal"}])
def test_bad_navigation_parameters_are_refused(kw):
    with pytest.raises(ParameterError, match=next(iter(kw))):
        navigate(np.ones(4), np.eye(4)[:2], **kw)


@pytest.mark.parametrize(
    "kw", [{"rounds": 0, "k": 2}, {"rounds": 2, "k": 0}, {"rounds": 2, "k": 9}]
)
def test_bad_round_counts_are_refused(kw):
    with pytest.raises(ParameterError, match="rounds" if kw["rounds"] == 0 else "k"):
        explore(np.ones(4), np.eye(8)[:, :4], **kw)


def test_prompts_of_a_float_dtype_or_bad_position_are_refused():
    with pytest.raises(DTypeError, match="tokens"):
        vocab_keys(WEIGHTS, np.arange(5.0))
    with pytest.raises(ParameterError, match="position"):
        vocab_keys(WEIGHTS, np.arange(5), position=5)
    with pytest.raises(ShapeError, match="tokens"):
        vocab_keys(WEIGHTS, np.zeros((1, 2, 3), dtype=int))
