"""DARE (arXiv 2410.02604): search + target attention, and its two independence properties."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qkv.errors import ParameterError, ShapeError
from qkv.reference.recsys import dare
from qkv.reference.recsys.dare_attention import DareTables, decoupled_embeddings, target_interaction


def make_tables(rng, V=30, d_att=4, d_repr=6):
    return DareTables(rng.standard_normal((V, d_att)), rng.standard_normal((V, d_repr)))


def loop_dare(target, behaviours, tables, top_k, valid):
    """Sort each row's valid behaviours by score, keep the first top_k, softmax over them."""
    out = np.zeros((len(target), tables.representation.shape[1]))
    for b in range(len(target)):
        q = tables.attention[target[b]]
        cands = [j for j in range(behaviours.shape[1]) if valid[b, j]]
        scores = {j: tables.attention[behaviours[b, j]] @ q / np.sqrt(len(q)) for j in cands}
        chosen = sorted(cands, key=lambda j: (-scores[j], j))[:top_k]
        if not chosen:
            continue
        s = np.array([scores[j] for j in chosen])
        w = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
        out[b] = sum(
            wi * tables.representation[behaviours[b, j]] for wi, j in zip(w, chosen, strict=False)
        )
    return out


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 3), L=st.integers(1, 25), top_k=st.integers(1, 30), seed=st.integers(0, 2**31)
)
def test_matches_the_sorted_loop(B, L, top_k, seed):
    rng = np.random.default_rng(seed)
    tables = make_tables(rng)
    target = rng.integers(0, 30, B)
    behaviours = rng.integers(0, 30, (B, L))
    valid = rng.random((B, L)) < 0.8
    got, weights = dare(target, behaviours, tables, top_k=top_k, valid=valid, return_weights=True)
    np.testing.assert_allclose(got, loop_dare(target, behaviours, tables, top_k, valid), atol=1e-12)
    assert ((weights > 0).sum(axis=1) <= np.minimum(top_k, valid.sum(axis=1))).all()
    assert (weights[~valid] == 0).all()


def test_representation_table_leaves_the_weights_unchanged():
    rng = np.random.default_rng(0)
    tables = make_tables(rng)
    target, behaviours = rng.integers(0, 30, 4), rng.integers(0, 30, (4, 50))
    _, w1 = dare(target, behaviours, tables, return_weights=True)
    other = DareTables(tables.attention, 10 * rng.standard_normal(tables.representation.shape))
    _, w2 = dare(target, behaviours, other, return_weights=True)
    np.testing.assert_array_equal(w1, w2)


def test_attention_table_leaves_the_values_unchanged():
    """Changing E_att changes which behaviours are read and how much, never what is read."""
    rng = np.random.default_rng(1)
    tables = make_tables(rng)
    target, behaviours = rng.integers(0, 30, 4), rng.integers(0, 30, (4, 50))
    other = DareTables(rng.standard_normal(tables.attention.shape), tables.representation)
    _, _, v1 = decoupled_embeddings(target, behaviours, tables)
    _, _, v2 = decoupled_embeddings(target, behaviours, other)
    np.testing.assert_array_equal(v1, v2)
    u, w = dare(target, behaviours, other, return_weights=True)
    np.testing.assert_allclose(u, np.einsum("bl,bld->bd", w, v1))  # u is a mix of those values
    _, w_old = dare(target, behaviours, tables, return_weights=True)
    assert not np.allclose(w, w_old)


def test_padding_only_row_is_zero_and_interaction():
    rng = np.random.default_rng(2)
    tables = make_tables(rng)
    target, behaviours = np.array([1, 2]), rng.integers(0, 30, (2, 5))
    valid = np.array([[False] * 5, [True] * 5])
    u = dare(target, behaviours, tables, valid=valid)
    assert not np.isnan(u).any() and (u[0] == 0).all()
    np.testing.assert_array_equal(
        target_interaction(target, u, tables), tables.representation[target] * u
    )


def test_bad_input():
    rng = np.random.default_rng(3)
    tables = make_tables(rng)
    with pytest.raises(ShapeError, match="V = 30 items"):
        dare(
            np.array([0]), np.array([[1]]), DareTables(tables.attention, tables.representation[:5])
        )
    with pytest.raises(ParameterError, match="behaviours: expected item ids"):
        dare(np.array([0]), np.array([[30]]), tables)
    with pytest.raises(ParameterError, match="top_k"):
        dare(np.array([0]), np.array([[1]]), tables, top_k=0)
    with pytest.raises(ShapeError, match="valid"):
        dare(np.array([0]), np.array([[1]]), tables, valid=np.ones((1, 2), bool))
