"""Properties of the reference agent attention (Han et al., arXiv 2312.08874).

Independent computations: torch's adaptive average pooling and depth-wise convolutions,
explicit softmax products in NumPy, and the properties the paper states (one agent broadcasts
one aggregate; the agents are the pooled queries).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import qkv
from qkv import _dispatch
from qkv.reference import core
from qkv.reference.forms.agent_attention import (
    agent,
    agent_tokens,
    depthwise_conv,
    dispatched_agent,
    pooling_matrix,
)

torch = pytest.importorskip("torch")
F = torch.nn.functional

BACKENDS = [
    name
    for name in ("reference", "numba", "torch", "cupy")
    if _dispatch.availability(_dispatch.load(name))[0]
]


def arrays(rng, B=2, H=4, Hkv=2, N=20, M=20, D=8, Dv=6):
    q = rng.standard_normal((B, H, N, D))
    k = rng.standard_normal((B, Hkv, M, D))
    v = rng.standard_normal((B, Hkv, M, Dv))
    return q, k, v


def softmax(s):
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def two_hops(q, a, k, v, b1=0.0, b2=0.0):
    """softmax(s Q A^T + B2) softmax(s A K^T + B1) V with KV heads repeated per query head."""
    G = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, G, axis=1), np.repeat(v, G, axis=1)
    s = 1 / np.sqrt(q.shape[-1])
    hop1 = softmax(s * np.einsum("bhad,bhmd->bham", a, k) + b1)  # (B, H, n, M)
    hop2 = softmax(s * np.einsum("bhnd,bhad->bhna", q, a) + b2)  # (B, H, N, n)
    return hop2 @ (hop1 @ v)


def torch_pool_1d(q, n):
    B, H, N, D = q.shape
    x = torch.from_numpy(q).reshape(B * H, N, D).transpose(1, 2)  # (BH, D, N)
    return F.adaptive_avg_pool1d(x, n).transpose(1, 2).reshape(B, H, n, D).numpy()


def torch_pool_2d(q, grid, out):
    B, H, N, D = q.shape
    x = torch.from_numpy(q).reshape(B * H, *grid, D).permute(0, 3, 1, 2)  # (BH, D, h, w)
    pooled = F.adaptive_avg_pool2d(x, out).permute(0, 2, 3, 1)  # (BH, ah, aw, D)
    return pooled.reshape(B, H, out[0] * out[1], D).numpy()


@pytest.mark.parametrize(("N", "n"), [(20, 5), (20, 7), (13, 13), (7, 1), (49, 49), (50, 49)])
def test_agents_are_torch_adaptive_average_pooling_of_the_queries(N, n):
    q = np.random.default_rng(N * n).standard_normal((2, 3, N, 4))
    np.testing.assert_allclose(agent_tokens(q, n), torch_pool_1d(q, n), rtol=1e-12, atol=1e-12)
    assert np.allclose(pooling_matrix(N, n).sum(axis=1), 1.0)


@pytest.mark.parametrize(("grid", "n"), [((14, 14), 49), ((3, 4), (2, 3)), ((5, 7), (5, 2))])
def test_grid_agents_are_torch_adaptive_average_pooling_2d(grid, n):
    q = np.random.default_rng(0).standard_normal((1, 2, grid[0] * grid[1], 4))
    out = (7, 7) if n == 49 else n
    np.testing.assert_allclose(
        agent_tokens(q, n, grid=grid), torch_pool_2d(q, grid, out), rtol=1e-12, atol=1e-12
    )


def test_zero_biases_no_dwc_is_the_two_hop_product():
    rng = np.random.default_rng(1)
    q, k, v = arrays(rng)
    expected = two_hops(q, torch_pool_1d(q, 5), k, v)
    np.testing.assert_allclose(agent(q, k, v, n_agents=5), expected, rtol=1e-12, atol=1e-12)
    zeros = dict(agent_bias=np.zeros((5, 20)), query_bias=np.zeros((20, 5)))
    np.testing.assert_allclose(agent(q, k, v, n_agents=5, **zeros), expected, atol=1e-12)


def test_biases_enter_their_hops():
    rng = np.random.default_rng(2)
    q, k, v = arrays(rng, M=11)
    b1 = rng.standard_normal((4, 5, 11))  # (H, n, M)
    b2 = rng.standard_normal((2, 4, 20, 5))  # (B, H, N, n)
    expected = two_hops(q, torch_pool_1d(q, 5), k, v, b1, b2)
    out = agent(q, k, v, n_agents=5, agent_bias=b1, query_bias=b2)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)


def test_one_agent_gives_every_token_the_same_aggregate():
    rng = np.random.default_rng(3)
    q, k, v = arrays(rng)
    out = agent(q, k, v, n_agents=1)  # (B, H, N, Dv)
    mean_q = q.mean(axis=2, keepdims=True)  # the single agent: (B, H, 1, D)
    aggregate = core.sdpa(mean_q, k, v)  # (B, H, 1, Dv)
    np.testing.assert_allclose(out, np.broadcast_to(aggregate, out.shape), atol=1e-12)


def test_as_many_agents_as_tokens_makes_the_agents_the_queries():
    rng = np.random.default_rng(4)
    q, k, v = arrays(rng, N=9, M=12)
    expected = two_hops(q, q, k, v)  # A = Q: softmax(s Q Q^T) softmax(s Q K^T) V
    np.testing.assert_allclose(agent(q, k, v, n_agents=9), expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(agent(q, k, v, agents=q), expected, rtol=1e-12, atol=1e-12)


def test_constant_values_pass_through_both_hops():
    rng = np.random.default_rng(5)
    q, k, _ = arrays(rng)
    v = np.broadcast_to(rng.standard_normal((1, 2, 1, 6)), (2, 2, 20, 6)).copy()
    out = agent(q, k, v, n_agents=4, agent_bias=rng.standard_normal((4, 20)))
    np.testing.assert_allclose(out, np.repeat(v, 2, axis=1), atol=1e-12)


def test_dwc_on_a_grid_is_torch_depthwise_conv2d():
    rng = np.random.default_rng(6)
    B, Hkv, h, w, Dv = 2, 2, 4, 5, 3
    v = rng.standard_normal((B, Hkv, h * w, Dv))
    weight = rng.standard_normal((Hkv, Dv, 3, 3))
    bias = rng.standard_normal((Hkv, Dv))
    x = torch.from_numpy(v).reshape(B, Hkv, h, w, Dv).permute(0, 1, 4, 2, 3)
    x = x.reshape(B, Hkv * Dv, h, w)  # channels c = head * Dv + feature
    y = F.conv2d(
        x,
        torch.from_numpy(weight).reshape(-1, 1, 3, 3),
        torch.from_numpy(bias).reshape(-1),
        padding=1,
        groups=Hkv * Dv,
    )
    expected = y.reshape(B, Hkv, Dv, h * w).permute(0, 1, 3, 2).numpy()
    out = depthwise_conv(v, weight, bias, grid=(h, w))
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)


def test_dwc_is_added_to_every_query_head_of_its_kv_head():
    rng = np.random.default_rng(7)
    q, k, v = arrays(rng, N=12, M=12)
    weight = rng.standard_normal((2, 6, 5))  # a 1-D kernel of 5 taps
    x = torch.from_numpy(v).permute(0, 1, 3, 2).reshape(2, 12, 12)  # (B, Hkv * Dv, M)
    conv = F.conv1d(x, torch.from_numpy(weight).reshape(12, 1, 5), padding=2, groups=12)
    conv = conv.reshape(2, 2, 6, 12).permute(0, 1, 3, 2).numpy()  # (B, Hkv, M, Dv)
    expected = two_hops(q, torch_pool_1d(q, 4), k, v) + np.repeat(conv, 2, axis=1)
    out = agent(q, k, v, n_agents=4, dwc=weight)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)


def test_float32_stays_float32():
    rng = np.random.default_rng(8)
    q, k, v = (x.astype(np.float32) for x in arrays(rng))
    out = agent(q, k, v, n_agents=5, dwc=np.ones((2, 6, 3), np.float32))
    assert out.dtype == np.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_dispatched_hops_match_the_reference_on_every_backend(backend):
    rng = np.random.default_rng(9)
    q, k, v = arrays(rng, N=16, M=16)
    kwargs = dict(
        n_agents=(2, 2),
        grid=(4, 4),
        agent_bias=rng.standard_normal((4, 16)),
        query_bias=rng.standard_normal((16, 4)),
        dwc=rng.standard_normal((2, 6, 3, 3)),
    )
    golden = agent(q, k, v, **kwargs)
    f32 = {
        key: x.astype(np.float32) if isinstance(x, np.ndarray) else x for key, x in kwargs.items()
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error", qkv.FallbackWarning)  # the hops run natively
        out = dispatched_agent(*(x.astype(np.float32) for x in (q, k, v)), backend=backend, **f32)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, golden, rtol=1e-5, atol=1e-5)


def test_dispatched_returns_the_callers_array_type():
    rng = np.random.default_rng(10)
    q, k, v = arrays(rng)
    out = dispatched_agent(*(torch.from_numpy(x) for x in (q, k, v)), n_agents=5)
    assert isinstance(out, torch.Tensor)
    np.testing.assert_allclose(out.numpy(), agent(q, k, v, n_agents=5), atol=1e-12)


BAD = {
    "more agents than tokens": (dict(n_agents=21), qkv.ParameterError, "agent count larger"),
    "default 49 agents, 20 tokens": ({}, qkv.ParameterError, r"got \(49,\)"),
    "more agents than a grid axis": (
        dict(n_agents=(5, 1), grid=(4, 5)),
        qkv.ParameterError,
        "agent count larger",
    ),
    "non-square agent count on a grid": (
        dict(n_agents=6, grid=(4, 5)),
        qkv.ParameterError,
        "square number",
    ),
    "grid does not cover the tokens": (dict(n_agents=4, grid=(3, 5)), qkv.ShapeError, "h \\* w"),
    "too many explicit agents": (
        dict(agents=np.zeros((2, 4, 21, 8))),
        qkv.ParameterError,
        "at most N = 20",
    ),
    "n_agents and agents": (
        dict(n_agents=3, agents=np.zeros((2, 4, 3, 8))),
        qkv.ParameterError,
        "n_agents",
    ),
    "non-finite agent bias": (
        dict(n_agents=5, agent_bias=np.full((5, 20), np.inf)),
        qkv.ParameterError,
        "finite",
    ),
    "query bias of the wrong shape": (
        dict(n_agents=5, query_bias=np.zeros((20, 6))),
        qkv.ShapeError,
        "query_bias",
    ),
    "even DWC kernel": (dict(n_agents=5, dwc=np.ones((2, 6, 4))), qkv.ShapeError, "odd"),
    "DWC bias without weights": (
        dict(n_agents=5, dwc_bias=np.ones((2, 6))),
        qkv.ParameterError,
        "dwc_bias",
    ),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
@pytest.mark.parametrize("fn", [agent, dispatched_agent], ids=["reference", "dispatched"])
def test_bad_input(case, fn):
    kwargs, error, message = BAD[case]
    q, k, v = arrays(np.random.default_rng(11))
    with pytest.raises(error, match=message):
        fn(q, k, v, **kwargs)


def test_dwc_needs_as_many_values_as_queries():
    q, k, v = arrays(np.random.default_rng(12), M=9)
    with pytest.raises(qkv.ShapeError, match="M=9, N=20"):
        agent(q, k, v, n_agents=5, dwc=np.ones((2, 6, 3)))
