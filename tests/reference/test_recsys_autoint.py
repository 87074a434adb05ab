"""AutoInt (arXiv 1810.11921) against an explicit per-field, per-head loop in float64."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qkv.errors import ParameterError, ShapeError
from qkv.reference.recsys import autoint
from qkv.reference.recsys.autoint_layer import AutoIntLayer, autoint_logit, embed_fields


def make_layer(rng, d, width, dtype=np.float64):
    return AutoIntLayer(
        *((rng.standard_normal((d, width)) / np.sqrt(d)).astype(dtype) for _ in range(4))
    )


def loop_autoint(e, layer, heads, released_code):
    """Equations 5-8 field by field and head by head (the code's extras where asked)."""
    B, F, d = e.shape
    dh = layer.w_q.shape[1] // heads
    relu = (lambda t: np.maximum(t, 0)) if released_code else (lambda t: t)
    out = np.zeros((B, F, heads * dh))
    for b in range(B):
        for m in range(F):
            parts = []
            for h in range(heads):
                cols = slice(h * dh, (h + 1) * dh)
                qm = relu(e[b, m] @ layer.w_q[:, cols])
                scores = np.array([qm @ relu(e[b, k] @ layer.w_k[:, cols]) for k in range(F)])
                if released_code:
                    scores = scores / np.sqrt(dh)
                alpha = np.exp(scores - scores.max())
                alpha /= alpha.sum()
                parts.append(sum(alpha[k] * relu(e[b, k] @ layer.w_v[:, cols]) for k in range(F)))
            out[b, m] = np.maximum(np.concatenate(parts) + relu(e[b, m] @ layer.w_res), 0)
            if released_code:
                x = out[b, m]
                out[b, m] = (x - x.mean()) / np.sqrt(x.var() + 1e-8)
    return out


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 3),
    F=st.integers(1, 7),
    d=st.integers(1, 9),
    heads=st.integers(1, 3),
    dh=st.integers(1, 5),
    released_code=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_matches_the_field_by_field_loop(B, F, d, heads, dh, released_code, seed):
    rng = np.random.default_rng(seed)
    e = rng.standard_normal((B, F, d))
    layer = make_layer(rng, d, heads * dh)
    got = autoint(e, layer, heads=heads, released_code=released_code)
    want = loop_autoint(e, layer, heads, released_code)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


def test_paper_and_code_variants_differ_and_dtype_is_kept():
    rng = np.random.default_rng(0)
    e = rng.standard_normal((2, 5, 8)).astype(np.float32)
    layer = make_layer(rng, 8, 8, np.float32)
    paper, code = autoint(e, layer), autoint(e, layer, released_code=True)
    assert paper.dtype == code.dtype == np.float32
    assert not np.allclose(paper, code)
    np.testing.assert_allclose(code.mean(-1), 0, atol=1e-5)  # the code's LayerNorm
    assert (paper >= 0).all()  # the paper's ReLU after the residual


def test_fields_are_permutation_equivariant():
    """Self-attention over fields has no field order: permuting the fields permutes the output."""
    rng = np.random.default_rng(1)
    e = rng.standard_normal((2, 6, 4))
    layer = make_layer(rng, 4, 6)
    perm = rng.permutation(6)
    np.testing.assert_allclose(
        autoint(e[:, perm], layer, heads=3), autoint(e, layer, heads=3)[:, perm]
    )


def test_embedding_and_logit():
    rng = np.random.default_rng(2)
    tables = [rng.standard_normal((v, 4)) for v in (3, 5, 2)]
    ids = np.array([[0, 4, 1], [2, 0, 0]])
    e = embed_fields(ids, tables)
    np.testing.assert_array_equal(e[1, 1], tables[1][0])
    layers = [make_layer(rng, 4, 6), make_layer(rng, 6, 4)]
    w = rng.standard_normal(3 * 4)
    x = autoint(autoint(e, layers[0]), layers[1])
    np.testing.assert_allclose(autoint_logit(e, layers, w, 0.5), x.reshape(2, -1) @ w + 0.5)


def test_bad_input():
    rng = np.random.default_rng(3)
    tables = [rng.standard_normal((3, 4)) for _ in range(2)]
    with pytest.raises(ShapeError, match="one table per field, F = 3"):
        embed_fields(np.zeros((2, 3), int), tables)  # mismatched field counts
    with pytest.raises(ParameterError, match=r"ids\[:, 1\]"):
        embed_fields(np.array([[0, 3]]), tables)
    e = rng.standard_normal((1, 3, 4))
    with pytest.raises(ShapeError, match="heads: expected to divide"):
        autoint(e, make_layer(rng, 4, 6), heads=4)
    with pytest.raises(ShapeError, match="w_q: expected 4 input rows"):
        autoint(e, make_layer(rng, 5, 6))
    with pytest.raises(ShapeError, match="w_out"):
        autoint_logit(e, [make_layer(rng, 4, 4)], np.zeros(5))
