"""Properties of OAT's object-level 3-D sinusoidal encoding (Fang et al., arXiv 2407.13335).

Independent computations: the frequency table of the official code written as explicit loops,
the Transformer's 1-D sinusoid written from its textbook formula, and the properties the
encoding has by construction (bounded, unit-norm pairs, distinct cells, shift-invariant
similarity along an axis, the 1-D sinusoid on one axis).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import qkv
from qkv.errors import ParameterError, ShapeError
from qkv.reference.positions.oat_encoding import (
    DEFAULT_GRID,
    FREQUENCIES,
    axis_channels,
    frequencies,
    grid_cells,
    object_pe,
    sinusoid,
)


def table(c, choice, alpha):
    """The frequency table of the official code's four branches, one t at a time."""
    rows = []
    for t in range(c // 2):
        rows.append(
            {
                "original": math.exp(-math.log(10000.0) * 2 * t / c),
                "exp1": (2 * t) ** alpha / c,
                "exp2": (2 * t / c) ** alpha,
                "linear": 2 * t * alpha / c,
            }[choice]
        )
    return np.array(rows)


@pytest.mark.parametrize("choice", FREQUENCIES)
@pytest.mark.parametrize("alpha", [0.9, 0.5, 1.3])
def test_frequencies_follow_the_official_table(choice, alpha):
    for c in (2, 8, 86):
        np.testing.assert_allclose(frequencies(c, frequency=choice, alpha=alpha),
                                   table(c, choice, alpha), rtol=1e-12)  # fmt: skip


def test_original_sinusoid_is_the_transformer_encoding():
    c, positions = 16, np.arange(40)
    expected = np.zeros((40, c))
    for p in positions:
        for t in range(c // 2):
            expected[p, 2 * t] = math.sin(p / 10000 ** (2 * t / c))
            expected[p, 2 * t + 1] = math.cos(p / 10000 ** (2 * t / c))
    np.testing.assert_allclose(sinusoid(positions, c), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("choice", FREQUENCIES)
@pytest.mark.parametrize("dim", [6, 12, 64, 256])
def test_one_axis_is_the_one_dimensional_sinusoid(choice, dim):
    c = axis_channels(dim)
    x = np.arange(3)
    cells = np.stack([x, np.zeros(3), np.zeros(3)], axis=-1)  # (3, 3): (x, 0, 0)
    pe = object_pe(cells, dim, frequency=choice)
    np.testing.assert_allclose(pe[:, :c], sinusoid(x, c, frequency=choice), rtol=1e-12)
    at_zero = np.tile([0.0, 1.0], (3, c))[:, : dim - c]  # sin 0, cos 0 on the y and z blocks
    np.testing.assert_array_equal(pe[:, c:], at_zero)


def test_y_and_z_blocks_follow_their_axes():
    cells = grid_cells((2, 5, 3))  # (2, 5, 3, 3)
    pe = object_pe(cells, 36)  # c = 12: blocks [0, 12), [12, 24), [24, 36)
    np.testing.assert_allclose(pe[..., 12:24], sinusoid(cells[..., 1], 12))
    np.testing.assert_allclose(pe[..., 24:], sinusoid(cells[..., 2], 12))


@pytest.mark.parametrize("choice", FREQUENCIES)
def test_bounded_with_unit_pairs(choice):
    pe = object_pe(grid_cells(), 96, frequency=choice)  # 96 = 6 * 16: three whole blocks
    assert np.abs(pe).max() <= 1.0
    pairs = pe.reshape(*pe.shape[:-1], 48, 2)
    np.testing.assert_allclose(np.linalg.norm(pairs, axis=-1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(pe, axis=-1), np.sqrt(48), rtol=1e-12)


def cell_gaps(choice, dim):
    pe = object_pe(grid_cells(DEFAULT_GRID), dim, frequency=choice).reshape(-1, dim)  # (66, D)
    gaps = np.linalg.norm(pe[:, None] - pe[None, :], axis=-1)  # (66, 66)
    np.fill_diagonal(gaps, np.inf)
    return gaps


@pytest.mark.parametrize("choice", FREQUENCIES)
@pytest.mark.parametrize("dim", [12, 18, 64, 256])
def test_every_cell_of_the_official_grid_is_distinct(choice, dim):
    assert cell_gaps(choice, dim).min() > 1e-3


@pytest.mark.parametrize("choice", ["exp1", "exp2", "linear"])
def test_one_pair_per_axis_cannot_tell_cells_apart_with_a_zero_frequency(choice):
    assert cell_gaps(choice, 6).min() == 0.0  # D <= 6: c = 2, omega_0 = 0 only: one code
    assert np.ptp(object_pe(grid_cells(), 6, frequency=choice), axis=(0, 1, 2)).max() == 0.0
    assert cell_gaps("original", 6).min() > 1e-3  # omega_0 = 1 radian per cell


def test_the_width_cut_can_drop_the_z_axis():
    cells = grid_cells(DEFAULT_GRID)  # z in {0, 1}
    pe = object_pe(cells, 8)  # c = 4: x in [0, 4), y in [4, 8), no z channel left
    np.testing.assert_array_equal(pe[:, :, 0], pe[:, :, 1])


@pytest.mark.parametrize("choice", FREQUENCIES)
def test_similarity_along_an_axis_depends_on_the_distance_only(choice):
    c = 20
    phi = sinusoid(np.arange(12), c, frequency=choice)  # (12, c)
    gram = phi @ phi.T  # (12, 12): sum_t cos((p - p') w_t)
    omega = frequencies(c, frequency=choice)
    lag = np.arange(12)[:, None] - np.arange(12)[None, :]
    np.testing.assert_allclose(gram, np.cos(lag[..., None] * omega).sum(-1), atol=1e-12)


def test_spacing_rescales_coordinates_as_change_x_does():
    scaled = grid_cells((3, 4, 2), spacing=(1.6, 1, 1))
    np.testing.assert_allclose(scaled[:, 0, 0, 0], [0.0, 1.6, 3.2])
    pe = object_pe(scaled, 24, frequency="linear")
    np.testing.assert_allclose(pe[:, 0, 0, :8], sinusoid([0.0, 1.6, 3.2], 8, frequency="linear"))


def test_width_cut_and_dtype():
    cells = grid_cells((3, 4, 2))
    full = object_pe(cells, 12)  # c = 4 for every D in 7 .. 12
    for dim in range(7, 12):
        np.testing.assert_array_equal(object_pe(cells, dim), full[..., :dim])
    assert object_pe(cells, 12, dtype=np.float32).dtype == np.float32
    assert qkv.object_pe is object_pe


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: object_pe(grid_cells(), 16, frequency="learned"), ParameterError, "frequency"),
        (lambda: frequencies(8, frequency="cosine"), ParameterError, "frequency: expected one"),
        (lambda: sinusoid(np.arange(4), 7), ShapeError, "channels: expected an even number"),
        (lambda: object_pe(np.zeros((4, 2)), 16), ShapeError, r"cells: expected .* \(\.\.\., 3\)"),
        (
            lambda: object_pe(np.array([[0, np.nan, 1]]), 16),
            ParameterError,
            "cells: expected finite",
        ),
        (lambda: object_pe(grid_cells(), 16, alpha=np.inf), ParameterError, "alpha: expected"),
        (lambda: object_pe(grid_cells(), 0), ParameterError, "dim: expected an integer >= 1"),
        (lambda: grid_cells((3, 4)), ShapeError, "three axes"),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()
