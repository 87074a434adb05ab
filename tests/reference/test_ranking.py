"""``top_k`` against the stable sort it replaces: ties (many equal scores, as quantised keys
give), ``-inf`` (empty slots), NaN, every ``k``, several leading axes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qkv.reference.ranking import top_k


def stable(scores, k):
    return np.argsort(-scores, axis=-1, kind="stable")[..., :k]


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    shape=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 300)),
    levels=st.sampled_from([2, 5, 1000]),
    k_frac=st.floats(0.0, 1.0),
)
def test_top_k_equals_the_stable_sort(seed, shape, levels, k_frac):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, levels, size=shape).astype(np.float64)  # few levels: many ties
    scores[rng.uniform(size=shape) < 0.1] = -np.inf  # empty slots
    k = round(k_frac * shape[-1])
    np.testing.assert_array_equal(top_k(scores, k), stable(scores, k))


@pytest.mark.parametrize("k", [1, 3, 10])
def test_top_k_with_nan_matches_the_sort(k):
    scores = np.random.default_rng(0).standard_normal((4, 100))
    scores[0, :95] = np.nan  # the k-th score is NaN in this row
    scores[1, 7] = np.nan
    np.testing.assert_array_equal(top_k(scores, k), stable(scores, k))


def test_top_k_on_a_long_row_takes_the_partition_and_agrees():
    scores = np.round(np.random.default_rng(1).standard_normal((2, 8, 65536)), 1)  # ties
    np.testing.assert_array_equal(top_k(scores, 3277), stable(scores, 3277))
