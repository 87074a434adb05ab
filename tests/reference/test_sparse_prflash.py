"""PrFlashAttention (arXiv 2410.18441): random causal tiles by block distance, through flash.

Independent references: a per-row softmax over the allowed keys written with Python loops,
causal full attention from ``torch.nn.functional.scaled_dot_product_attention``, and binomial
bounds on the tile counts (mean and variance from the stated probabilities).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qkv.errors import ParameterError, ShapeError
from qkv.reference.sparse import prflash
from qkv.reference.sparse.prflash_mask import (
    distance_probabilities,
    expand_block_mask,
    expected_tile_fraction,
    prflash_block_mask,
    tile_fraction,
)


def loop_attention(q, k, v, allowed):
    """Softmax over the allowed keys of each row, one row at a time (float64)."""
    B, H, N, D = q.shape
    G = H // k.shape[1]
    out = np.zeros((B, H, N, v.shape[-1]))
    for b in range(B):
        for h in range(H):
            for i in range(N):
                js = [j for j in range(N) if allowed(i, j)]
                s = [float(q[b, h, i] @ k[b, h // G, j]) / math.sqrt(D) for j in js]
                top = max(s)
                e = [math.exp(x - top) for x in s]
                for w, j in zip(e, js, strict=True):
                    out[b, h, i] += w / sum(e) * v[b, h // G, j]
    return out


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    N=st.integers(1, 23),
    block=st.integers(1, 6),
    keep=st.floats(0, 1),
    first=st.booleans(),
)
def test_output_is_attention_over_the_kept_causal_tiles(seed, N, block, keep, first):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((1, 2, N, 4))
    k, v = rng.standard_normal((2, 1, 1, N, 4))
    out, tiles = prflash(
        q, k, v, block=block, keep=keep, seed=seed, first_column=first, return_mask=True
    )
    want = loop_attention(q, k, v, lambda i, j: j <= i and tiles[i // block, j // block])
    np.testing.assert_allclose(out, want, rtol=1e-10, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), nb=st.integers(1, 30), keep=st.floats(0, 1))
def test_mask_is_block_lower_triangular_with_its_diagonal(seed, nb, keep):
    m = prflash_block_mask(nb, keep=keep, seed=seed)
    assert not np.triu(m, 1).any()  # nothing above the diagonal
    assert m.diagonal().all()  # every query block keeps its own tile: no empty row
    assert m[:, 0].all()  # the first column (sinks)
    e = expand_block_mask(m, nb * 3 - 1, 3)
    assert e.any(axis=1).all() and not np.triu(e, 1).any()


def test_keep_one_is_causal_full_attention():
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((3, 2, 4, 50, 8))
    out = prflash(q, k, v, block=8, keep=1.0, seed=3, first_column=False)
    want = torch.nn.functional.scaled_dot_product_attention(
        *(torch.from_numpy(x) for x in (q, k, v)), is_causal=True
    ).numpy()
    np.testing.assert_allclose(out, want, rtol=1e-10, atol=1e-12)
    assert tile_fraction(prflash_block_mask(7, keep=1.0, seed=1)) == 1.0


def test_keep_zero_reads_only_the_diagonal_and_the_sinks():
    m = prflash_block_mask(6, keep=0.0, seed=0)
    want = np.eye(6, dtype=bool)
    want[:, 0] = True
    np.testing.assert_array_equal(m, want)


@pytest.mark.parametrize("keep", [0.9, 0.6, [1.0, 0.8, 0.5, 0.5, 0.2, 0.1, 0.0, 0.3] + [0.05] * 32])
def test_tiles_kept_match_the_distribution(keep):
    nb = 40
    p = distance_probabilities(nb, keep)
    m = prflash_block_mask(nb, keep=keep, seed=12345)
    # the random tiles: strictly below the diagonal, off the first column
    i, j = np.indices((nb, nb))
    free = (j < i) & (j > 0)
    probs = p[(i - j)[free]]
    count, mean, sd = m[free].sum(), probs.sum(), math.sqrt(np.sum(probs * (1 - probs)))
    assert abs(count - mean) <= 4 * sd
    # per distance, pooled over rounds: each count within 4.5 binomial standard deviations
    rng = np.random.default_rng(7)
    rounds = np.stack([prflash_block_mask(12, keep=keep, seed=rng) for _ in range(300)])
    p12 = distance_probabilities(12, keep)
    for d in range(1, 11):
        cells = [(r, c) for r in range(12) for c in range(1, 12) if r - c == d]
        n = len(cells) * len(rounds)
        got = sum(rounds[:, r, c].sum() for r, c in cells)
        assert abs(got - n * p12[d]) <= 4.5 * math.sqrt(n * p12[d] * (1 - p12[d])) + 1e-9
    # the expected fraction of causal tiles, against the fraction kept on average
    fr = np.mean([tile_fraction(x) for x in rounds])
    assert abs(fr - expected_tile_fraction(12, keep)) < 0.02


def test_geometric_decay_and_an_explicit_sequence():
    np.testing.assert_allclose(distance_probabilities(4, 0.5), [1, 0.5, 0.25, 0.125])
    np.testing.assert_allclose(distance_probabilities(3, [0.2, 0.7, 0.1, 0.9]), [1, 0.7, 0.1])
    # expected fraction of 3 blocks with keep 0.5, first column kept: (3 + 2 + 0.5) / 6
    assert math.isclose(expected_tile_fraction(3, 0.5), 5.5 / 6)


def test_seeded_draws_repeat_and_a_generator_advances():
    a = prflash_block_mask(20, keep=0.5, seed=4)
    np.testing.assert_array_equal(a, prflash_block_mask(20, keep=0.5, seed=4))
    rng = np.random.default_rng(4)
    first, second = prflash_block_mask(20, seed=rng), prflash_block_mask(20, seed=rng)
    assert not np.array_equal(first, second)


@pytest.mark.parametrize("keep", [1.5, -0.1, float("nan"), [1.0, 2.0], True, "half"])
def test_probabilities_outside_zero_one_are_rejected(keep):
    with pytest.raises(ParameterError, match="keep"):
        distance_probabilities(4, keep)


def test_too_few_distance_probabilities_are_rejected():
    with pytest.raises(ShapeError, match="keep: expected a probability for each of the 5"):
        distance_probabilities(5, [1.0, 0.5])


@pytest.mark.parametrize("block", [0, -2, 2.5])
def test_block_below_one_is_rejected(block):
    q = np.zeros((1, 1, 8, 4))
    with pytest.raises(ParameterError, match="block"):
        prflash(q, q, q, block=block)


@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_non_finite_inputs_are_rejected(name):
    arrays = {n: np.zeros((1, 1, 8, 4)) for n in "qkv"}
    arrays[name][0, 0, 3, 1] = np.inf
    with pytest.raises(ParameterError, match=f"{name}: expected finite"):
        prflash(arrays["q"], arrays["k"], arrays["v"], block=4)


def test_keys_not_matching_queries_and_bad_seeds_are_rejected():
    q = np.zeros((1, 1, 8, 4))
    with pytest.raises(ShapeError, match="as many keys as queries"):
        prflash(q, np.zeros((1, 1, 9, 4)), np.zeros((1, 1, 9, 4)))
    with pytest.raises(ParameterError, match="seed"):
        prflash_block_mask(4, seed=-1)
