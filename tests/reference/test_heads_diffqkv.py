"""Properties of DiffQKV attention (Sigma, arXiv 2501.13629) and of its cost function.

Independent computations: an explicit per-head loop in float64 (query map, key head and value
head chosen by index arithmetic), the reductions to MHA and GQA, and hand-counted cache sizes
and FLOPs.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qkv
from qkv import _dispatch
from qkv.reference import core
from qkv.reference.heads.grouped_query import gqa
from qkv.reference.heads.sigma_diffqkv import HeadConfig, diffqkv, diffqkv_cost, diffqkv_saving

HAS_NUMBA = _dispatch.availability(_dispatch.load("numba"))[0]


def softmax(s):
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def loop_diffqkv(q, k, v, a=None, causal=False):
    B, H, N, _ = q.shape
    Hk, M, Dk = k.shape[1:]
    Hv = v.shape[1]
    out = np.zeros((B, H, N, v.shape[3]))
    for b in range(B):
        for h in range(H):
            qh = q[b, h] if a is None else q[b, h] @ a[h]  # (N, Dk)
            s = qh @ k[b, h * Hk // H].T / np.sqrt(Dk)
            if causal:
                s = np.where(np.arange(M)[None] <= np.arange(N)[:, None] + M - N, s, -np.inf)
            out[b, h] = softmax(s) @ v[b, h * Hv // H]
    return out


def arrays(rng, B=2, H=8, Hk=2, Hv=4, N=5, M=6, Dq=12, Dk=4, Dv=6):
    return (
        rng.standard_normal((B, H, N, Dq)),
        rng.standard_normal((B, Hk, M, Dk)),
        rng.standard_normal((B, Hv, M, Dv)),
        rng.standard_normal((H, Dq, Dk)) / np.sqrt(Dq),
    )


@settings(max_examples=25, deadline=None)
@given(
    heads=st.sampled_from([(4, 1, 2), (4, 2, 4), (8, 2, 4), (8, 4, 2), (6, 1, 3), (4, 4, 4)]),
    dims=st.sampled_from([(8, 4, 6), (4, 4, 4), (6, 2, 8)]),
    N=st.integers(1, 5),
    causal=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_diffqkv_is_the_per_head_loop(heads, dims, N, causal, seed):
    H, Hk, Hv = heads
    Dq, Dk, Dv = dims
    q, k, v, a = arrays(
        np.random.default_rng(seed), H=H, Hk=Hk, Hv=Hv, N=N, M=N + 2, Dq=Dq, Dk=Dk, Dv=Dv
    )
    out = diffqkv(q, k, v, q_down=a, causal=causal)
    np.testing.assert_allclose(out, loop_diffqkv(q, k, v, a, causal), rtol=1e-10, atol=1e-12)


def test_equal_heads_and_dims_reduce_to_mha_and_gqa():
    rng = np.random.default_rng(1)
    q, k, v, _ = arrays(rng, H=6, Hk=6, Hv=6, Dq=4, Dk=4, Dv=4)
    np.testing.assert_array_equal(diffqkv(q, k, v), core.sdpa(q, k, v))  # MHA
    q, k, v, _ = arrays(rng, H=6, Hk=3, Hv=3, Dq=4, Dk=4, Dv=4)
    np.testing.assert_allclose(diffqkv(q, k, v), gqa(q, k, v), atol=1e-14)  # GQA
    identity = np.broadcast_to(np.eye(4), (6, 4, 4))
    np.testing.assert_allclose(diffqkv(q, k, v, q_down=identity), gqa(q, k, v), atol=1e-14)


def test_values_never_change_the_weights_and_keys_never_change_the_value_heads():
    """With one value per key and V = one-hot rows, the output is the weight matrix itself."""
    rng = np.random.default_rng(2)
    q, k, _, a = arrays(rng, H=4, Hk=1, Hv=2, M=6)
    eye = np.broadcast_to(np.eye(6), (2, 2, 6, 6))  # (B, Hv, M, M): values are one-hot
    weights = diffqkv(q, k, eye, q_down=a)  # (B, H, N, M): every head's attention weights
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-12)
    # query heads 0-3 share the single key head: their weights depend on q only through A_h q
    same_q = q.copy()
    same_q[:, 1] = same_q[:, 0]
    same_a = a.copy()
    same_a[1] = same_a[0]
    w = diffqkv(same_q, k, eye, q_down=same_a)
    np.testing.assert_allclose(w[:, 0], w[:, 1], atol=1e-14)


def test_float32_stays_float32_and_torch_in_torch_out():
    torch = pytest.importorskip("torch")
    q, k, v, a = arrays(np.random.default_rng(3))
    f32 = [x.astype(np.float32) for x in (q, k, v, a)]
    assert diffqkv(*f32[:3], q_down=f32[3]).dtype == np.float32
    out = diffqkv(*(torch.from_numpy(x) for x in (q, k, v)), q_down=torch.from_numpy(a))
    assert isinstance(out, torch.Tensor)
    np.testing.assert_allclose(out.numpy(), diffqkv(q, k, v, q_down=a), atol=1e-12)


@pytest.mark.skipif(not HAS_NUMBA, reason="numba is not installed")
def test_attention_runs_on_numba():
    q, k, v, a = arrays(np.random.default_rng(4), N=9, M=9, Dk=8, Dv=8)
    golden = diffqkv(q, k, v, q_down=a, causal=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", qkv.FallbackWarning)
        out = diffqkv(
            *(x.astype(np.float32) for x in (q, k, v)),
            q_down=a.astype(np.float32),
            causal=True,
            backend="numba",
        )
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, golden, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- cost


def test_cost_by_hand():
    config = HeadConfig(n_heads=32, n_k=4, n_v=8, d_q=192, d_k=64, d_v=128)
    cost = diffqkv_cost(config, context=1000)
    assert cost.k_cache_bytes == 1000 * 4 * 64 * 2
    assert cost.kv_cache_bytes == 1000 * (4 * 64 + 8 * 128) * 2
    assert cost.decode_flops == 2 * 32 * (192 * 64 + 1000 * 64 + 1000 * 128)
    assert cost.decode_bytes == cost.kv_cache_bytes


def test_saving_against_gqa():
    gqa8 = HeadConfig(n_heads=32, n_k=8, n_v=8, d_q=128, d_k=128, d_v=128)
    assert diffqkv_saving(gqa8, gqa8, context=100) == {
        "kv_cache": 0.0,
        "decode_flops": 0.0,
        "decode_bytes": 0.0,
    }
    half_k = HeadConfig(n_heads=32, n_k=4, n_v=8, d_q=128, d_k=128, d_v=128)
    assert diffqkv_saving(half_k, gqa8, context=100)["kv_cache"] == pytest.approx(0.25)
    augmented = HeadConfig(n_heads=32, n_k=8, n_v=8, d_q=256, d_k=128, d_v=128)
    saving = diffqkv_saving(augmented, gqa8, context=4096)
    assert saving["kv_cache"] == 0.0  # the query is never cached
    # the query map adds d_q d_k = 256 * 128 to L (d_k + d_v) = 4096 * 256 per head
    assert saving["decode_flops"] == pytest.approx(-(256 * 128) / (4096 * 256))


# --------------------------------------------------------------------------- bad input


def bad_cases():
    q, k, v, a = arrays(np.random.default_rng(5))
    return {
        "augmented q without a map": (
            lambda: diffqkv(q, k, v),
            qkv.ShapeError,
            "q_down: expected a \\(H, Dq, Dk\\) = \\(8, 12, 4\\) map",
        ),
        "map of the wrong shape": (
            lambda: diffqkv(q, k, v, q_down=a[:, :, :3]),
            qkv.ShapeError,
            "q_down: expected \\(H, Dq, Dk\\)",
        ),
        "key heads not dividing H": (
            lambda: diffqkv(q, k[:, :1].repeat(3, 1), v, q_down=a),
            qkv.ShapeError,
            "k: expected a head count dividing H=8, got 3",
        ),
        "value heads not dividing H": (
            lambda: diffqkv(q, k, v[:, :1].repeat(3, 1), q_down=a),
            qkv.ShapeError,
            "v: expected a head count dividing H=8, got 3",
        ),
        "keys and values of other lengths": (
            lambda: diffqkv(q, k, v[:, :, :4], q_down=a),
            qkv.ShapeError,
            "v: expected M=6 tokens",
        ),
        "q of rank 3": (lambda: diffqkv(q[0], k, v, q_down=a), qkv.ShapeError, "q: expected rank"),
        "mixed dtypes": (
            lambda: diffqkv(q, k, v, q_down=a.astype(np.float32)),
            qkv.DTypeError,
            "q_down",
        ),
        "mask of the wrong shape": (
            lambda: diffqkv(q, k, v, q_down=a, mask=np.ones((7, 7), bool)),
            qkv.ShapeError,
            "mask",
        ),
        "config heads not dividing": (
            lambda: HeadConfig(n_heads=8, n_k=3, n_v=4, d_q=4, d_k=4, d_v=4),
            qkv.ParameterError,
            "n_k: expected a divisor of n_heads=8, got 3",
        ),
        "context below 1": (
            lambda: diffqkv_cost(HeadConfig(8, 2, 4, 4, 4, 4), context=0),
            qkv.ParameterError,
            "context",
        ),
    }


BAD = bad_cases()


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_input(case):
    fn, error, message = BAD[case]
    with pytest.raises(error, match=message):
        fn()
