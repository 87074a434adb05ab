"""Properties of the reference bi-level routing attention (BiFormer; Zhu et al., arXiv 2303.08810).

Independent computations: region means, affinities and top-k written as explicit loops with a
sort on ``(-affinity, index)``; token attention per query token over the routed regions'
tokens; torch's ``conv2d`` for the LePE term; full softmax attention for the case where every
region is routed (the property the paper's design implies and the research notes state).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qkv
from qkv.reference.local.biformer import (
    bilevel_routing,
    dispatched_bilevel_routing,
    region_affinity,
    routing_indices,
)

torch = pytest.importorskip("torch")
F = torch.nn.functional


def softmax(s):
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def maps(rng, B=2, H=2, Hs=4, Ws=6, D=3, Dv=5):
    q = rng.standard_normal((B, H, Hs, Ws, D))
    k = rng.standard_normal((B, H, Hs, Ws, D))
    v = rng.standard_normal((B, H, Hs, Ws, Dv))
    return q, k, v


def region_of(y, x, Hs, Ws, S):
    return (y // (Hs // S)) * S + x // (Ws // S)


def routes_by_loop(q, k, S, topk):
    """Mean query and key of every region (heads concatenated), their dot products, and the
    top-k by sorting the pairs (-affinity, region index)."""
    B, H, Hs, Ws, D = q.shape
    sums_q = np.zeros((B, S * S, H * D))
    sums_k = np.zeros((B, S * S, H * D))
    counts = np.zeros(S * S)
    for y in range(Hs):
        for x in range(Ws):
            r = region_of(y, x, Hs, Ws, S)
            counts[r] += 1
            sums_q[:, r] += q[:, :, y, x].reshape(B, H * D)
            sums_k[:, r] += k[:, :, y, x].reshape(B, H * D)
    mean_q, mean_k = sums_q / counts[:, None], sums_k / counts[:, None]
    routes = np.zeros((B, S * S, topk), dtype=np.int64)
    for b in range(B):
        for i in range(S * S):
            scored = sorted((-float(mean_q[b, i] @ mean_k[b, j]), j) for j in range(S * S))
            routes[b, i] = [j for _, j in scored[:topk]]
    return routes


def tokens_by_loop(q, k, v, S, routes, scale):
    """Every query token attends to the tokens of the regions its own region routes to."""
    B, H, Hs, Ws, _ = q.shape
    out = np.zeros((*q.shape[:-1], v.shape[-1]))
    for b in range(B):
        for y in range(Hs):
            for x in range(Ws):
                allowed = set(routes[b, region_of(y, x, Hs, Ws, S)].tolist())
                keys = [
                    (yy, xx)
                    for yy in range(Hs)
                    for xx in range(Ws)
                    if region_of(yy, xx, Hs, Ws, S) in allowed
                ]
                ys, xs = np.array(keys).T
                for h in range(H):
                    weights = softmax(scale * k[b, h, ys, xs] @ q[b, h, y, x])
                    out[b, h, y, x] = weights @ v[b, h, ys, xs]
    return out


def full_attention(q, k, v, scale):
    B, H, Hs, Ws, _ = q.shape
    flat = [x.reshape(B, H, Hs * Ws, -1) for x in (q, k, v)]
    return (softmax(scale * flat[0] @ flat[1].swapaxes(-1, -2)) @ flat[2]).reshape(B, H, Hs, Ws, -1)


def torch_lepe(v, weight, bias):
    B, H, Hs, Ws, Dv = v.shape
    x = torch.from_numpy(v).permute(0, 1, 4, 2, 3).reshape(B, H * Dv, Hs, Ws)  # channel h*Dv+c
    kernel = torch.from_numpy(weight).reshape(H * Dv, 1, *weight.shape[2:])
    y = F.conv2d(
        x, kernel, torch.from_numpy(bias).reshape(-1), padding=weight.shape[2] // 2, groups=H * Dv
    )
    return y.reshape(B, H, Dv, Hs, Ws).permute(0, 1, 3, 4, 2).numpy()


# --------------------------------------------------------------------------- routing


@settings(max_examples=25, deadline=None)
@given(
    S=st.sampled_from([1, 2, 3]),
    region=st.sampled_from([(1, 1), (1, 2), (2, 2), (2, 1)]),
    data=st.data(),
    seed=st.integers(0, 2**16),
)
def test_routing_indices_equal_a_brute_force_topk_with_ties_to_the_lower_index(
    S, region, data, seed
):
    """Small integer inputs over regions of 1, 2 or 4 tokens make many exactly tied affinities."""
    rng = np.random.default_rng(seed)
    topk = data.draw(st.integers(1, S * S))
    shape = (2, 2, S * region[0], S * region[1], 2)
    q, k = (rng.integers(-1, 2, size=shape).astype(np.float64) for _ in range(2))
    routes = routing_indices(q, k, n_win=S, topk=topk)
    np.testing.assert_array_equal(routes, routes_by_loop(q, k, S, topk))


def test_affinity_is_the_dot_product_of_region_means():
    q, k, _ = maps(np.random.default_rng(0))
    A = region_affinity(q, k, n_win=2)  # regions of 2 x 3 tokens
    region = (slice(2, 4), slice(0, 3))  # bottom-left region: index 2
    mean_q = q[1][:, region[0], region[1]].mean(axis=(1, 2)).reshape(-1)
    mean_k = k[1][:, 0:2, 3:6].mean(axis=(1, 2)).reshape(-1)  # top-right region: index 1
    assert A.shape == (2, 4, 4)
    np.testing.assert_allclose(A[1, 2, 1], mean_q @ mean_k, rtol=1e-12)


# --------------------------------------------------------------------------- attention


@pytest.mark.parametrize(("S", "topk"), [(2, 1), (2, 3), (1, 1), (2, 4)])
def test_token_attention_over_the_routed_regions(S, topk):
    q, k, v = maps(np.random.default_rng(S * 10 + topk))
    routes = routes_by_loop(q, k, S, topk)
    scale = (2 * 3) ** -0.5  # the official qk_dim ** -0.5: H * D
    expected = tokens_by_loop(q, k, v, S, routes, scale)
    out = bilevel_routing(q, k, v, n_win=S, topk=topk)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)


def test_every_region_routed_and_no_lepe_is_full_attention_at_the_full_width_scale():
    q, k, v = maps(np.random.default_rng(1), H=3, Hs=6, Ws=6, D=4)
    out = bilevel_routing(q, k, v, n_win=3, topk=9)
    np.testing.assert_allclose(out, full_attention(q, k, v, (3 * 4) ** -0.5), atol=1e-12)
    per_head = bilevel_routing(q, k, v, n_win=3, topk=9, per_head_scale=True)
    np.testing.assert_allclose(per_head, full_attention(q, k, v, 4**-0.5), atol=1e-12)
    explicit = bilevel_routing(q, k, v, n_win=3, topk=9, scale=0.7)
    np.testing.assert_allclose(explicit, full_attention(q, k, v, 0.7), atol=1e-12)


@pytest.mark.parametrize("kernel", [3, 5])
def test_lepe_adds_the_depthwise_convolution_of_the_values(kernel):
    rng = np.random.default_rng(2)
    q, k, v = maps(rng)
    weight = rng.standard_normal((2, 5, kernel, kernel))
    bias = rng.standard_normal((2, 5))
    out = bilevel_routing(q, k, v, n_win=2, topk=4, lepe=weight, lepe_bias=bias)
    expected = full_attention(q, k, v, 6**-0.5) + torch_lepe(v, weight, bias)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)
    zero = bilevel_routing(q, k, v, n_win=2, topk=4, lepe=np.zeros_like(weight))
    np.testing.assert_allclose(zero, bilevel_routing(q, k, v, n_win=2, topk=4), atol=1e-15)


def test_float32_stays_float32():
    q, k, v = (x.astype(np.float32) for x in maps(np.random.default_rng(3)))
    out = bilevel_routing(q, k, v, n_win=2, topk=2, lepe=np.ones((2, 5, 3, 3), np.float32))
    assert out.dtype == np.float32


def test_dispatched_matches_the_reference_on_numba():
    pytest.importorskip("numba")
    rng = np.random.default_rng(4)
    q, k, v = maps(rng, H=2, Hs=8, Ws=8, D=8, Dv=8)
    lepe = 0.1 * rng.standard_normal((2, 8, 5, 5))
    f32 = [x.astype(np.float32) for x in (q, k, v, lepe)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", qkv.FallbackWarning)  # sdpa runs natively
        out = dispatched_bilevel_routing(*f32[:3], n_win=4, topk=3, lepe=f32[3], backend="numba")
    assert out.dtype == np.float32
    golden = bilevel_routing(q, k, v, n_win=4, topk=3, lepe=lepe)
    np.testing.assert_allclose(out, golden, rtol=1e-5, atol=1e-5)


def test_dispatched_returns_the_callers_array_type():
    q, k, v = maps(np.random.default_rng(5))
    out = qkv.bilevel_routing(*(torch.from_numpy(x) for x in (q, k, v)), n_win=2, topk=2)
    assert isinstance(out, torch.Tensor)
    np.testing.assert_allclose(out.numpy(), bilevel_routing(q, k, v, n_win=2, topk=2), atol=1e-12)


# --------------------------------------------------------------------------- bad input

BAD = {
    "spatial size not divisible by n_win": (
        dict(n_win=4, topk=1),
        qkv.ShapeError,
        "divisible by the number of routing windows",
    ),
    "default n_win 7 on a 4 x 6 map": ({}, qkv.ShapeError, "n_win = 7"),
    "topk above the region count": (dict(n_win=2, topk=5), qkv.ParameterError, "from 1 to"),
    "topk below 1": (dict(n_win=2, topk=0), qkv.ParameterError, "from 1 to"),
    "topk not an integer": (dict(n_win=2, topk=2.0), qkv.ParameterError, "topk"),
    "zero n_win": (dict(n_win=0, topk=1), qkv.ParameterError, "n_win"),
    "even LePE kernel": (
        dict(n_win=2, topk=1, lepe=np.ones((2, 5, 4, 4))),
        qkv.ShapeError,
        "odd",
    ),
    "LePE for the wrong heads": (
        dict(n_win=2, topk=1, lepe=np.ones((3, 5, 3, 3))),
        qkv.ShapeError,
        "lepe",
    ),
    "LePE bias without weights": (
        dict(n_win=2, topk=1, lepe_bias=np.ones((2, 5))),
        qkv.ParameterError,
        "lepe_bias",
    ),
    "scale with per_head_scale": (
        dict(n_win=2, topk=1, scale=0.5, per_head_scale=True),
        qkv.ParameterError,
        "per_head_scale",
    ),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
@pytest.mark.parametrize(
    "fn", [bilevel_routing, dispatched_bilevel_routing], ids=["reference", "dispatched"]
)
def test_bad_input(case, fn):
    kwargs, error, message = BAD[case]
    q, k, v = maps(np.random.default_rng(6))
    with pytest.raises(error, match=message):
        fn(q, k, v, **kwargs)


def test_grouped_kv_heads_are_rejected():
    q, k, v = maps(np.random.default_rng(7), H=2)
    with pytest.raises(qkv.ShapeError, match="shared by all heads"):
        bilevel_routing(q, k[:, :1], v[:, :1], n_win=2, topk=1)
