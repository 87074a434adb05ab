"""Properties of the reference neighborhood attention (arXiv 2403.04690, NATTEN semantics).

The reference gathers neighbours by index; the tests compare it with independent computations:
an explicit float64 loop that walks each dilation group as a Python list, full softmax attention
(``qkv.reference.core.sdpa``) under the pairwise ``neighbor_mask``, and the identities NATTEN
states (full window = full attention, full causal window = causal attention, kernel = stride =
blocked attention, every row sees exactly ``kernel_size`` keys).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings

from qkv.errors import DTypeError, ParameterError, ShapeError
from qkv.reference import core
from qkv.reference.local.neighborhood_attention import (
    check_neighborhood,
    neighbor_indices,
    neighbor_mask,
    neighborhood,
)
from qkv.testing.ops_local import neighborhood_cases


def arrays(rng, spatial, B=2, H=4, Hkv=2, D=8, Dv=None, dtype=np.float64):
    Dv = D if Dv is None else Dv
    q = rng.standard_normal((B, H, *spatial, D)).astype(dtype)
    k = rng.standard_normal((B, Hkv, *spatial, D)).astype(dtype)
    v = rng.standard_normal((B, Hkv, *spatial, Dv)).astype(dtype)
    return q, k, v


def flat(x):
    """``(B, H, *spatial, D)`` as ``(B, H, N, D)``."""
    return x.reshape(*x.shape[:2], -1, x.shape[-1])


def loop_window(i, L, k, d, s, causal):
    """Key positions of query ``i`` along one axis, walking its dilation group as a list."""
    group = [x for x in range(L) if x % d == i % d]
    place = group.index(i)
    if causal:
        leader = min((place // s) * s + s - 1, len(group) - 1)
        return [group[j] for j in range(len(group)) if j <= place and leader - j < k]
    leader = min((place // s) * s + s // 2, len(group) - 1)
    start = leader - k // 2  # k // 2 keys on the left, the rest on the right
    start = max(0, min(start, len(group) - k))  # shifted inward at the borders
    return group[start : start + k]


def loop_neighborhood(q, k, v, kernel_size, dilation, stride, causal, scale=None):
    """The definition one query at a time: softmax over the product of per-axis windows."""
    B, H, *spatial, D = q.shape
    G = H // k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = np.zeros((B, H, *spatial, v.shape[-1]))
    for b, h in itertools.product(range(B), range(H)):
        for pos in itertools.product(*(range(L) for L in spatial)):
            windows = [
                loop_window(i, L, kk, d, s, c)
                for i, L, kk, d, s, c in zip(
                    pos, spatial, kernel_size, dilation, stride, causal, strict=True
                )
            ]
            keys = list(itertools.product(*windows))
            scores = [scale * float(q[(b, h, *pos)] @ k[(b, h // G, *key)]) for key in keys]
            top = max(scores)
            weights = [math.exp(x - top) for x in scores]
            total = sum(weights)
            for w, key in zip(weights, keys, strict=True):
                out[(b, h, *pos)] += (w / total) * v[(b, h // G, *key)]
    return out


CASES = {
    "1d-dilated": ((13,), (5,), (2,), (1,), (False,)),
    "1d-even-dilated": ((10,), (4,), (2,), (1,), (False,)),
    "1d-causal-stride": ((17,), (4,), (3,), (3,), (True,)),
    "2d-mixed": ((9, 11), (3, 4), (2, 1), (2, 3), (False, False)),
    "2d-causal-one-axis": ((7, 8), (3, 2), (1, 3), (1, 2), (True, False)),
    "3d": ((5, 6, 4), (2, 3, 3), (2, 1, 1), (1, 2, 3), (True, False, False)),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_explicit_loop_in_float64(case):
    spatial, ks, ds, ss, cs = case
    rng = np.random.default_rng(0)
    q, k, v = arrays(rng, spatial, B=1, H=2, Hkv=1, D=4, Dv=3)
    got = neighborhood(q, k, v, kernel_size=ks, dilation=ds, stride=ss, causal=cs, scale=0.7)
    want = loop_neighborhood(q, k, v, ks, ds, ss, cs, scale=0.7)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_even_kernel_with_dilation_at_the_borders():
    """Even k has k/2 keys left of the centre and k/2 - 1 right; with dilation 2 on 10 tokens
    each group holds 5 places, so the border windows are shifted inward (written out by hand)."""
    keys, valid = neighbor_indices((10,), kernel_size=4, dilation=2)
    assert valid.all()
    expected = {
        0: [0, 2, 4, 6],  # left border: window starts at the group's first place
        1: [1, 3, 5, 7],
        4: [0, 2, 4, 6],  # place 2: two places left, one right
        6: [2, 4, 6, 8],  # place 3: clamped to the last full window
        8: [2, 4, 6, 8],  # right border
        9: [3, 5, 7, 9],
    }
    for query, want in expected.items():
        assert sorted(keys[query]) == want, query


@settings(max_examples=25, deadline=None)
@given(case=neighborhood_cases())
def test_equals_sdpa_under_the_neighbor_mask(case):
    """The gathered form against full softmax attention with the pairwise (N, N) mask."""
    q, k, v = case.args
    kw = dict(case.kwargs)
    return_weights, return_lse = kw.pop("return_weights", False), kw.pop("return_lse", False)
    scale = kw.pop("scale", None)
    spatial = q.shape[2:-1]
    out, weights, lse = neighborhood(
        q, k, v, scale=scale, return_weights=True, return_lse=True, **kw
    )
    mask = neighbor_mask(spatial, **kw)  # (N, N)
    want, want_w, want_lse = core.sdpa(
        flat(q), flat(k), flat(v), mask=mask, scale=scale, return_weights=True, return_lse=True
    )
    np.testing.assert_allclose(flat(out), want, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(lse.reshape(want_lse.shape), want_lse, rtol=1e-10, atol=1e-10)
    # The weights, scattered from their slots to key positions, are sdpa's weights.
    keys, valid = neighbor_indices(spatial, **kw)  # (N, K)
    B, H, N = want_w.shape[:3]
    dense = np.zeros((B, H, N, N))
    rows = np.broadcast_to(np.arange(N)[:, None], keys.shape)
    dense[:, :, rows[valid], keys[valid]] = weights.reshape(B, H, N, -1)[:, :, valid]
    np.testing.assert_allclose(dense, want_w, rtol=1e-10, atol=1e-12)
    assert (weights.reshape(B, H, N, -1)[:, :, ~valid] == 0).all()
    results = neighborhood(
        q, k, v, scale=scale, return_weights=return_weights, return_lse=return_lse, **kw
    )
    assert len(results if isinstance(results, tuple) else (results,)) == 1 + int(
        return_weights
    ) + int(return_lse)


@pytest.mark.parametrize("spatial", [(9,), (4, 5), (3, 2, 4)])
def test_whole_window_without_dilation_is_full_attention(spatial):
    rng = np.random.default_rng(1)
    q, k, v = arrays(rng, spatial)
    got = neighborhood(q, k, v, kernel_size=spatial)
    np.testing.assert_allclose(
        flat(got), core.sdpa(flat(q), flat(k), flat(v)), rtol=1e-12, atol=1e-14
    )


def test_causal_whole_window_is_causal_attention():
    rng = np.random.default_rng(2)
    q, k, v = arrays(rng, (11,))
    got = neighborhood(q, k, v, kernel_size=11, causal=True)
    want = core.sdpa(q, k, v, causal=True)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(("spatial", "kernel"), [((12,), 4), ((6, 9), (3, 3)), ((4, 6, 4), 2)])
def test_kernel_equal_to_stride_is_blocked_attention(spatial, kernel):
    """Non-overlapping windows: query and key share a block along every axis."""
    rng = np.random.default_rng(3)
    q, k, v = arrays(rng, spatial)
    got = neighborhood(q, k, v, kernel_size=kernel, stride=kernel)
    ks = (kernel,) * len(spatial) if isinstance(kernel, int) else kernel
    block = np.stack(
        [c.ravel() // kk for c, kk in zip(np.indices(spatial), ks, strict=True)], axis=-1
    )  # (N, rank): each token's block coordinates
    mask = (block[:, None, :] == block[None, :, :]).all(-1)  # (N, N)
    np.testing.assert_allclose(
        flat(got), core.sdpa(flat(q), flat(k), flat(v), mask=mask), rtol=1e-12, atol=1e-14
    )


@pytest.mark.parametrize(
    ("spatial", "kw"),
    [
        ((15,), {"kernel_size": 5, "dilation": 3}),
        ((16,), {"kernel_size": 6, "dilation": 2}),
        ((7, 9), {"kernel_size": (3, 4), "dilation": (2, 2)}),
        ((5, 4, 6), {"kernel_size": (2, 3, 3), "dilation": (2, 1, 2)}),
    ],
)
def test_every_row_sees_exactly_kernel_size_keys(spatial, kw):
    mask = neighbor_mask(spatial, **kw)
    ks = kw["kernel_size"]
    K = ks ** len(spatial) if isinstance(ks, int) else math.prod(ks)
    assert (mask.sum(axis=1) == K).all()
    keys, valid = neighbor_indices(spatial, **kw)
    assert valid.all() and all(len(set(row)) == K for row in keys)


def test_causal_rows_see_the_causal_count():
    """Stride 1: place i' of its dilation group sees min(k, i' + 1) keys per causal axis."""
    spatial, ks, ds = (10, 7), (4, 3), (2, 1)
    mask = neighbor_mask(spatial, kernel_size=ks, dilation=ds, causal=(True, False))
    rows, cols = np.indices(spatial)
    want = np.minimum(ks[0], rows // ds[0] + 1) * ks[1]  # axis 1 is not causal: 3 keys
    np.testing.assert_array_equal(mask.sum(axis=1), want.ravel())


def test_grouped_heads_equal_repeated_kv_heads():
    rng = np.random.default_rng(4)
    q, k, v = arrays(rng, (6, 7), H=6, Hkv=2, Dv=5)
    kw = {"kernel_size": 3, "dilation": (2, 1)}
    want = neighborhood(q, np.repeat(k, 3, axis=1), np.repeat(v, 3, axis=1), **kw)
    np.testing.assert_allclose(neighborhood(q, k, v, **kw), want, rtol=1e-13)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtypes_are_kept_and_large_logits_stay_finite(dtype):
    rng = np.random.default_rng(5)
    q, k, v = arrays(rng, (20,), dtype=dtype)
    out, w, lse = neighborhood(1e4 * q, k, v, kernel_size=5, return_weights=True, return_lse=True)
    assert out.dtype == w.dtype == dtype and lse.dtype == dtype
    assert np.isfinite(out).all() and np.isfinite(lse).all()
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)


# --------------------------------------------------------------------------- bad input


def bad(rng, spatial=(10,), **kw):
    return arrays(rng, spatial, **kw)


@pytest.mark.parametrize(
    ("spatial", "kw", "match"),
    [
        ((10,), {"kernel_size": 4, "dilation": 3}, r"kernel_size \* dilation <= length"),
        ((10,), {"kernel_size": 11}, r"11 \* 1 = 11 > 10"),
        ((11,), {"kernel_size": 4, "dilation": 3}, r"4 \* 3 = 12 > 11"),  # even k, dilation
        ((8, 9), {"kernel_size": (3, 5), "dilation": (2, 2)}, "axis 1"),
        ((10,), {"kernel_size": 3, "stride": 0}, "1 <= stride <= kernel_size"),
        ((10,), {"kernel_size": 3, "stride": 4}, "stride 4 with kernel_size 3"),
        ((6, 6), {"kernel_size": (3, 3, 3)}, "tuple of 2"),
        ((6, 6), {"dilation": (1,)}, "dilation: expected an int or a tuple of 2"),
        ((6, 6), {"kernel_size": 3, "causal": (True,)}, "causal: expected a bool"),
        ((6,), {"kernel_size": 0}, "kernel_size: expected >= 1"),
        ((6,), {"kernel_size": 3, "dilation": 0}, "dilation: expected >= 1"),
        ((6,), {"kernel_size": 2.5}, "kernel_size: expected an int"),
        ((6,), {"kernel_size": 3, "causal": 1}, "causal: expected a bool"),
        ((6,), {"kernel_size": 3, "scale": -1.0}, "scale"),
    ],
)
def test_bad_hyperparameters(spatial, kw, match):
    q, k, v = bad(np.random.default_rng(0), spatial)
    with pytest.raises(ParameterError, match=match):
        neighborhood(q, k, v, **kw)


def test_even_kernel_with_dilation_is_accepted_when_every_group_holds_a_window():
    """The even-kernel border case is defined, not an error: 4 * 2 <= 9 leaves groups of 5 and
    4 places, and the shorter group's window covers it exactly."""
    q, k, v = bad(np.random.default_rng(0), (9,))
    keys, valid = neighbor_indices((9,), kernel_size=4, dilation=2)
    assert valid.all() and sorted(keys[7]) == [1, 3, 5, 7] and sorted(keys[8]) == [2, 4, 6, 8]
    assert np.isfinite(neighborhood(q, k, v, kernel_size=4, dilation=2)).all()


def test_wrong_ranks_and_shapes():
    rng = np.random.default_rng(0)
    q, k, v = bad(rng, (10,))
    with pytest.raises(ShapeError, match="rank 4, 5 or 6"):
        neighborhood(q[:, :, 0], k[:, :, 0], v[:, :, 0], kernel_size=1)
    q7 = rng.standard_normal((1, 1, 3, 3, 3, 3, 2))
    with pytest.raises(ShapeError, match="1-3 spatial axes"):
        neighborhood(q7, q7, q7, kernel_size=1)
    with pytest.raises(ShapeError, match="k: expected rank 4"):
        neighborhood(q, k[:, :, :, None], v, kernel_size=3)
    q2, k2, v2 = bad(rng, (4, 5))
    with pytest.raises(ShapeError, match="spatial sizes"):
        neighborhood(q2, k2[:, :, :, :4], v2[:, :, :, :4], kernel_size=3)
    with pytest.raises(ShapeError, match="head dim"):
        neighborhood(q, k[..., :3], v, kernel_size=3)
    qh, kh, vh = bad(rng, (10,), H=3, Hkv=2)
    with pytest.raises(ShapeError, match="divisible"):
        neighborhood(qh, kh, vh, kernel_size=3)
    with pytest.raises(DTypeError, match="one dtype"):
        neighborhood(q.astype(np.float32), k, v, kernel_size=3)
    with pytest.raises(DTypeError, match="floating"):
        neighborhood(q.astype(np.int64), k, v, kernel_size=3)


def test_check_returns_the_per_axis_tuples():
    q, k, v = bad(np.random.default_rng(0), (6, 8), D=4, Dv=3)
    dims = check_neighborhood(q, k, v, kernel_size=(3, 2), dilation=2, stride=(1, 2), causal=True)
    assert dims.spatial == (6, 8) and dims.kernel_size == (3, 2) and dims.dilation == (2, 2)
    assert dims.stride == (1, 2) and dims.causal == (True, True) and dims.K == 6
    assert (dims.N, dims.Dv, dims.group) == (48, 3, 2)
