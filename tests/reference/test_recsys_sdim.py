"""SDIM (arXiv 2205.10249): SimHash codes, bucket aggregation, and the attention it approaches."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qkv.errors import ParameterError, ShapeError
from qkv.reference.recsys import sdim
from qkv.reference.recsys.sdim_hashing import (
    collision_probability,
    matching_temperature,
    random_planes,
    simhash,
    target_attention,
)


def loop_sdim(targets, behaviours, planes, valid, normalize):
    """Bit by bit: codes as tuples of signs, buckets as Python sums, per hash."""
    B, C, d = targets.shape
    m = planes.shape[1]
    out = np.zeros((B, C, d))
    for b in range(B):
        for c in range(C):
            for i in range(m):
                code = tuple(targets[b, c] @ planes[:, i] > 0)
                total = np.zeros(d)
                for j in range(behaviours.shape[1]):
                    if valid[b, j] and tuple(behaviours[b, j] @ planes[:, i] > 0) == code:
                        total += behaviours[b, j]
                n = np.linalg.norm(total)
                out[b, c] += (total / n if normalize and n > 0 else total) / m
    return out


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 2),
    C=st.integers(1, 4),
    L=st.integers(1, 30),
    d=st.integers(1, 6),
    m=st.integers(1, 5),
    tau=st.integers(1, 5),
    normalize=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_matches_the_bitwise_loop(B, C, L, d, m, tau, normalize, seed):
    rng = np.random.default_rng(seed)
    targets, behaviours = rng.standard_normal((B, C, d)), rng.standard_normal((B, L, d))
    behaviours[:, ::3] = targets[:, :1]  # some exact collisions
    valid = rng.random((B, L)) < 0.8
    planes = random_planes(d, m, tau, rng=rng)
    got = sdim(targets, behaviours, planes, valid=valid, normalize=normalize)
    want = loop_sdim(targets, behaviours, planes, valid, normalize)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_simhash_collision_properties():
    """A vector always collides with itself and positive multiples; never with its negation."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 8))
    planes = random_planes(8, 6, 64, rng=rng)
    codes = simhash(x, planes)
    assert codes.dtype == np.uint64 and codes.shape == (50, 6)
    np.testing.assert_array_equal(simhash(3.0 * x, planes), codes)
    assert (simhash(-x, planes) != codes).all()
    assert (simhash(-x, planes) == ~codes).all()  # every one of the 64 bits flips


def test_collision_rate_matches_one_minus_theta_over_pi_to_the_tau():
    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, 1, 16))
    b = rng.standard_normal((1, 40, 16)) + 1.5 * q  # a range of angles to q
    planes = random_planes(16, 4000, 3, rng=rng)
    rate = (simhash(q, planes)[:, :, None, :] == simhash(b, planes)[:, None]).mean(axis=-1)
    np.testing.assert_allclose(rate, collision_probability(q, b, 3), atol=0.03)


def test_more_hashes_approach_target_attention():
    """tau = 4 bits, T = pi / (2 tau): the direction of SDIM's interest approaches that of
    softmax target attention as the number of hashes m grows (fixed seeds)."""
    rng = np.random.default_rng(7)
    d, L = 16, 400
    targets = rng.standard_normal((1, 8, d))
    behaviours = rng.standard_normal((1, L, d))
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    errors = []
    for m in (1, 4, 16, 64, 256):
        planes = random_planes(d, m, 4, rng=np.random.default_rng(m))
        got = unit(sdim(targets, behaviours, planes))
        want = unit(target_attention(targets, behaviours, temperature=matching_temperature(4)))
        errors.append(np.linalg.norm(got - want, axis=-1).mean())
    assert errors[-1] < 0.2 and errors[0] > 0.7
    assert all(later < earlier for earlier, later in itertools.pairwise(errors))


def test_no_collision_gives_zeros_and_padding_never_collides():
    q = np.ones((1, 1, 2))
    b = -np.ones((1, 3, 2))
    planes = random_planes(2, 3, 4, rng=0)
    assert (sdim(q, b, planes) == 0).all()
    b2 = np.ones((1, 3, 2))
    assert (sdim(q, b2, planes, valid=np.zeros((1, 3), bool)) == 0).all()
    np.testing.assert_allclose(sdim(q, b2, planes), b2[:, :1] / np.sqrt(2))
    assert sdim(q.astype(np.float32), b2.astype(np.float32), planes).dtype == np.float32


def test_bad_input():
    with pytest.raises(ParameterError, match=r"hash bits: expected an integer in \[1, 64\]"):
        random_planes(4, 2, 0)
    with pytest.raises(ParameterError, match="hash bits"):
        sdim(np.ones((1, 1, 4)), np.ones((1, 2, 4)), np.ones((4, 2, 65)))
    with pytest.raises(ShapeError, match="planes: expected d = 4"):
        sdim(np.ones((1, 1, 4)), np.ones((1, 2, 4)), np.ones((3, 2, 4)))
    with pytest.raises(ShapeError, match="behaviours"):
        sdim(np.ones((1, 1, 4)), np.ones((2, 2, 4)), np.ones((4, 2, 4)))
    with pytest.raises(ParameterError, match="temperature"):
        target_attention(np.ones((1, 1, 4)), np.ones((1, 2, 4)), temperature=0)
