"""var: sink detection, segment-centric rows and redistribution against loops; bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qkv.errors import ParameterError, ShapeError
from qkv.reference.analysis import var
from qkv.reference.analysis.var_redistribution import massive_dims, segment_heads, sink_tokens


def loop_var(A, seg, snk, p, lo, rho):
    out = A.copy()
    H, T, _ = A.shape
    for h in range(H):
        for i in range(T):
            on_seg = sum(A[h, i, j] for j in range(T) if seg[j])
            on_seg_sinks = sum(A[h, i, j] for j in range(T) if seg[j] and snk[j])
            if not (on_seg >= lo and on_seg_sinks <= rho * on_seg):
                continue
            receivers = [j for j in range(T) if seg[j] and not snk[j]]
            base = sum(A[h, i, j] for j in receivers)
            if base == 0:
                continue
            freed = (1 - p) * sum(A[h, i, j] for j in range(T) if snk[j])
            for j in range(T):
                if snk[j]:
                    out[h, i, j] = p * A[h, i, j]
                elif j in receivers:
                    out[h, i, j] = A[h, i, j] + freed * A[h, i, j] / base
    return out


@settings(max_examples=25, deadline=None)
@given(
    T=st.integers(2, 10),
    seed=st.integers(0, 2**16),
    p=st.floats(0, 1),
    lo=st.floats(0.05, 0.6),
    rho=st.floats(0.1, 0.9),
)
def test_matches_loop_rows_sum_to_one(T, seed, p, lo, rho):
    rng = np.random.default_rng(seed)
    A = rng.dirichlet(np.full(T, 0.5), size=(3, T))  # (H, T, T)
    seg = rng.random(T) < 0.5
    snk = rng.random(T) < 0.3
    out = var(A, seg, snk, p=p, min_segment=lo, rho=rho)
    np.testing.assert_allclose(out, loop_var(A, seg, snk, p, lo, rho), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(out.sum(-1), 1.0, rtol=1e-12)
    chosen = segment_heads(A, seg, snk, min_segment=lo, rho=rho)
    np.testing.assert_array_equal(out[~chosen], A[~chosen])  # other rows untouched


def test_sink_tokens_hidden_state_criterion():
    rng = np.random.default_rng(0)
    h = rng.standard_normal((2, 7, 64))
    h[0, 3, 5] = 400.0  # massive activation on token 3, dim 5
    h[1, 0, 9] = -400.0
    assert massive_dims(h) == (5, 9) or massive_dims(h) == (9, 5)
    got = sink_tokens(h, (5, 9), tau=5.0)
    expected = np.zeros((2, 7), dtype=bool)
    expected[0, 3] = expected[1, 0] = True
    np.testing.assert_array_equal(got, expected)
    # |RMSNorm(h)_d| for one huge entry among d is close to sqrt(d) = 8
    assert not sink_tokens(h, (5, 9), tau=8.0).any()


def test_on_minilm_swaps_keep_shapes():
    from qkv.lab import encoder as E
    from qkv.reference.analysis.var_redistribution import var_encoder_swaps

    enc = E.Encoder.load()
    ids, keep = enc.tokenize(["the cat sat on the mat.", "a longer sentence, with a comma, here."])
    hidden = E.encode(enc.weights, ids, keep)
    segment = np.zeros(ids.shape, dtype=bool)
    segment[:, 2:5] = True
    swaps = var_encoder_swaps(hidden, segment, massive_dims(hidden[3]), tau=6.0)
    assert len(swaps) == enc.weights.n_layers - 1
    out = E.encode(enc.weights, ids, keep, swaps=swaps)
    assert out[-1].shape == hidden[-1].shape and np.isfinite(out[-1]).all()


@pytest.mark.parametrize("name", ["min_segment", "rho"])
@pytest.mark.parametrize("value", [0.0, 1.0, 1.2])
def test_thresholds_outside_unit_interval(name, value):
    A = np.full((1, 4, 4), 0.25)
    seg = np.array([True, True, False, False])
    with pytest.raises(ParameterError, match=name):
        var(A, seg, ~seg, **{name: value})


def test_bad_weights_masks_and_dims():
    A = np.full((1, 4, 4), 0.25)
    seg = np.array([True, True, False, False])
    with pytest.raises(ParameterError, match="row-stochastic"):
        var(A * 1.1, seg, ~seg)
    with pytest.raises(ShapeError, match="segment"):
        var(A, seg[:3], ~seg)
    with pytest.raises(ShapeError, match="sinks"):
        var(A, seg, np.zeros(4))
    with pytest.raises(ParameterError, match="dims"):
        sink_tokens(np.ones((4, 8)), (8,))
    with pytest.raises(ParameterError, match="p"):
        var(A, seg, ~seg, p=1.5)
