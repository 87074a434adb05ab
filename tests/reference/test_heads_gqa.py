"""Properties of GQA, KDGQA, DGQA and PGQA (Khan et al., arXiv 2408.08454).

Independent computations: explicit per-head loops with a float64 softmax, hand-computed
allocations, torch for the official code's batch-coupled, min-max KDGQA, and the identities the
paper states (G = H is MHA, G = 1 is MQA, a fixed uniform allocation is GQA, counts sum to H).
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
from qkv.reference.heads.grouped_query import (
    AttentionWeights,
    DGQAState,
    allocate_queries,
    dgqa,
    dgqa_update,
    gqa,
    group_noise,
    kdgqa,
    key_norms,
    pgqa,
    pool_heads,
    project,
    uptrain,
)

torch = pytest.importorskip("torch")
HAS_NUMBA = _dispatch.availability(_dispatch.load("numba"))[0]


def softmax(s):
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def loop_attention(q, k, v, kv_head_of, causal=False):
    """O[b, h] = softmax(Q K^T / sqrt(D)) V with query head h reading kv_head_of[b][h]."""
    B, H, N, D = q.shape
    M = k.shape[2]
    out = np.zeros((B, H, N, v.shape[3]))
    for b in range(B):
        for h in range(H):
            g = kv_head_of[b][h]
            s = q[b, h] @ k[b, g].T / np.sqrt(D)
            if causal:
                s = np.where(np.arange(M)[None, :] <= np.arange(N)[:, None] + M - N, s, -np.inf)
            with np.errstate(invalid="ignore"):  # rows that see no key: NaN, zeroed by the caller
                out[b, h] = softmax(s) @ v[b, g]
    return out


def arrays(rng, B=2, H=6, G=3, N=5, M=7, D=4, Dv=3):
    return (
        rng.standard_normal((B, H, N, D)),
        rng.standard_normal((B, G, M, D)),
        rng.standard_normal((B, G, M, Dv)),
    )


# --------------------------------------------------------------------------- GQA and uptraining


@settings(max_examples=25, deadline=None)
@given(
    H_G=st.sampled_from([(1, 1), (4, 1), (4, 2), (4, 4), (6, 2), (6, 3), (12, 4)]),
    N=st.integers(1, 6),
    M=st.integers(1, 6),
    causal=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_gqa_is_the_per_head_loop(H_G, N, M, causal, seed):
    H, G = H_G
    q, k, v = arrays(np.random.default_rng(seed), H=H, G=G, N=N, M=M)
    r = H // G
    expected = loop_attention(q, k, v, [[h // r for h in range(H)]] * 2, causal=causal)
    if causal and N > M:  # rows that see no key are zeros
        expected[:, :, : N - M] = 0.0
    np.testing.assert_allclose(gqa(q, k, v, causal=causal), expected, rtol=1e-10, atol=1e-12)


def test_pool_heads_is_the_mean_of_contiguous_heads():
    x = np.random.default_rng(0).standard_normal((2, 6, 3, 4))
    pooled = pool_heads(x, 2)
    assert pooled.shape == (2, 2, 3, 4)
    np.testing.assert_allclose(pooled[:, 0], (x[:, 0] + x[:, 1] + x[:, 2]) / 3, atol=1e-14)
    np.testing.assert_allclose(pooled[:, 1], (x[:, 3] + x[:, 4] + x[:, 5]) / 3, atol=1e-14)
    np.testing.assert_array_equal(pool_heads(x, 6), x)


def mha_weights(rng, H=6, C=10, D=4, Dv=3, bias=True):
    def b(*shape):
        return rng.standard_normal(shape) if bias else None

    return AttentionWeights(
        w_q=rng.standard_normal((H, C, D)),
        w_k=rng.standard_normal((H, C, D)),
        w_v=rng.standard_normal((H, C, Dv)),
        b_q=b(H, D),
        b_k=b(H, D),
        b_v=b(H, Dv),
    )


def test_uptrained_weights_with_g_equal_h_reproduce_mha_exactly():
    rng = np.random.default_rng(1)
    w = mha_weights(rng)
    x = rng.standard_normal((2, 5, 10))
    q, k, v = project(x, w)
    same = uptrain(w, 6)
    for a, b in zip(project(x, same), (q, k, v), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(gqa(*project(x, same)), core.sdpa(q, k, v))


def test_uptraining_weights_equals_pooling_the_projected_heads():
    """Projection is linear: pooling W^K, b^K then projecting = projecting then pooling heads."""
    rng = np.random.default_rng(2)
    w = mha_weights(rng)
    x = rng.standard_normal((2, 5, 10))
    q, k, v = project(x, w)
    for G in (1, 2, 3):
        qg, kg, vg = project(x, uptrain(w, G))
        np.testing.assert_array_equal(qg, q)  # the query projection is kept
        np.testing.assert_allclose(kg, pool_heads(k, G), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(gqa(qg, kg, vg), gqa(q, k, v, groups=G), rtol=1e-12, atol=1e-12)


def test_g_equal_one_is_multi_query_attention():
    rng = np.random.default_rng(3)
    q, k, v = arrays(rng, G=6)
    k_mean, v_mean = k.mean(axis=1), v.mean(axis=1)  # (B, M, D): one KV head for all
    expected = np.stack(
        [
            np.stack([softmax(q[b, h] @ k_mean[b].T / 2.0) @ v_mean[b] for h in range(6)])
            for b in range(2)
        ]
    )
    np.testing.assert_allclose(gqa(q, k, v, groups=1), expected, rtol=1e-12, atol=1e-12)


def test_float32_stays_float32_and_torch_in_torch_out():
    q, k, v = arrays(np.random.default_rng(4))
    assert gqa(*(x.astype(np.float32) for x in (q, k, v))).dtype == np.float32
    out = kdgqa(*(torch.from_numpy(x) for x in (q, k, v)))
    assert isinstance(out, torch.Tensor)
    np.testing.assert_allclose(out.numpy(), kdgqa(q, k, v), atol=1e-12)


# --------------------------------------------------------------------------- allocation


@pytest.mark.parametrize(
    ("scores", "H", "normalisation", "expected"),
    [
        ([1.0, 2.0, 3.0], 6, "ratio", [1, 2, 3]),  # exact proportions
        ([1.0, 2.0, 3.0], 6, "minmax", [0, 2, 4]),  # (0, .5, 1) / 1.5 * 6
        ([1.0, 1.0, 2.0], 6, "ratio", [2, 2, 2]),  # (1.5, 1.5, 3) -> 2, 2, 3 -> largest gives 1
        ([0.45, 0.45, 0.1], 3, "ratio", [1, 1, 1]),  # (1.35, 1.35, .3) -> 1, 1, 0 -> smallest +1
        ([5.0, 5.0, 5.0], 6, "minmax", [2, 2, 2]),  # equal norms: uniform, not NaN
        ([0.0, 0.0], 4, "ratio", [2, 2]),  # all zero: uniform
        ([0.0, 7.0], 4, "ratio", [0, 4]),  # a group may get no query head
    ],
)
def test_allocation_by_hand(scores, H, normalisation, expected):
    got = allocate_queries(np.array(scores), H, normalisation=normalisation)
    np.testing.assert_array_equal(got, expected)


@settings(max_examples=25, deadline=None)
@given(
    scores=st.lists(st.floats(0, 1e3, allow_nan=False), min_size=1, max_size=6),
    r=st.integers(1, 4),
    normalisation=st.sampled_from(["ratio", "minmax"]),
    seed=st.none() | st.integers(0, 100),
)
def test_allocation_is_non_negative_and_sums_to_h(scores, r, normalisation, seed):
    H = r * len(scores)
    rng = None if seed is None else np.random.default_rng(seed)
    a = allocate_queries(np.array(scores), H, normalisation=normalisation, rng=rng)
    assert a.sum() == H and (a >= 0).all()
    if len(set(scores)) == 1:
        np.testing.assert_array_equal(a, r)


def test_random_repair_is_deterministic_given_the_generator():
    scores = np.array([0.3, 0.3, 0.3, 0.1])  # 8 heads: (2.4, 2.4, 2.4, .8) -> 2, 2, 2, 1
    a1 = allocate_queries(scores, 8, rng=np.random.default_rng(5))
    a2 = allocate_queries(scores, 8, rng=np.random.default_rng(5))
    np.testing.assert_array_equal(a1, a2)
    assert a1.sum() == 8
    np.testing.assert_array_equal(allocate_queries(scores, 8), [2, 2, 2, 2])  # smallest +1


# --------------------------------------------------------------------------- KDGQA


def test_fixed_uniform_allocation_equals_gqa():
    q, k, v = arrays(np.random.default_rng(6))
    np.testing.assert_array_equal(kdgqa(q, k, v, allocation=np.array([2, 2, 2])), gqa(q, k, v))


def test_kdgqa_is_the_loop_over_its_key_norm_allocation():
    rng = np.random.default_rng(7)
    q, k, v = arrays(rng, H=8, G=4)
    k = k * np.array([0.2, 1.0, 2.0, 0.5])[None, :, None, None]  # distinct head norms
    out, counts = kdgqa(q, k, v, return_allocation=True)
    kv_head_of = []
    for b in range(2):
        norms = [np.linalg.norm(k[b, g]) for g in range(4)]  # Frobenius norm of one head
        np.testing.assert_array_equal(counts[b], allocate_queries(np.array(norms), 8))
        kv_head_of.append([g for g in range(4) for _ in range(counts[b, g])])
    assert (counts.sum(axis=1) == 8).all()
    np.testing.assert_allclose(out, loop_attention(q, k, v, kv_head_of), rtol=1e-10, atol=1e-12)


def test_equal_key_norms_fall_back_to_gqa():
    rng = np.random.default_rng(8)
    q, k, v = arrays(rng)
    k = k / np.linalg.norm(k, axis=(2, 3), keepdims=True)  # every head norm 1
    for normalisation in ("ratio", "minmax"):
        out = kdgqa(q, k, v, normalisation=normalisation)
        np.testing.assert_allclose(out, gqa(q, k, v), rtol=1e-12, atol=1e-12)


def test_per_sample_allocation_does_not_couple_the_batch_but_the_code_variant_does():
    rng = np.random.default_rng(9)
    q, k, v = arrays(rng, B=2, H=6, G=3)
    k2 = k.copy()
    k2[1] *= np.array([10.0, 0.1, 0.1])[:, None, None]  # only sample 1 changes
    np.testing.assert_array_equal(kdgqa(q, k, v)[0], kdgqa(q, k2, v)[0])
    code = dict(batch_coupled=True, normalisation="minmax")
    assert not np.allclose(kdgqa(q, k, v, **code)[0], kdgqa(q, k2, v, **code)[0])


def torch_code_kdgqa(q, k, v):
    """The official batch-coupled, min-max KDGQA, in torch, on (B, H, P, d) inputs."""
    q, k, v = (torch.from_numpy(x) for x in (q, k, v))
    H = q.shape[1]
    n = torch.linalg.matrix_norm(k, dim=(2, 3)).sum(dim=0)
    n = (n - n.min()) / (n.max() - n.min())
    alloc = (n / n.sum() * H).round().int()
    while alloc.sum() > H:
        alloc[torch.argmax(alloc)] -= 1
    while alloc.sum() < H:
        alloc[torch.argmin(alloc)] += 1
    outs = []
    for i, qg in enumerate(torch.split(q, alloc.tolist(), dim=1)):
        w = torch.softmax(qg @ k[:, i : i + 1].transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1)
        outs.append(w @ v[:, i : i + 1])
    return torch.cat(outs, dim=1).numpy()


@pytest.mark.parametrize("seed", range(4))
def test_code_variant_matches_the_official_algorithm_in_torch(seed):
    rng = np.random.default_rng(seed)
    q, k, v = arrays(rng, B=3, H=8, G=4)
    k = k * rng.uniform(0.2, 2.0, size=(1, 4, 1, 1))
    out = kdgqa(q, k, v, batch_coupled=True, normalisation="minmax")
    np.testing.assert_allclose(out, torch_code_kdgqa(q, k, v), rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- DGQA


def test_dgqa_ema_step_by_hand():
    rng = np.random.default_rng(10)
    _, k, _ = arrays(rng, B=2, H=6, G=3)
    k = k * np.array([1.0, 2.0, 3.0])[None, :, None, None]
    state = DGQAState.initial(6, 3)
    n = np.linalg.norm(k, axis=(2, 3)).mean(axis=0)  # batch-mean head norms
    new = dgqa_update(state, k, kind="ema", beta=0.9)
    np.testing.assert_allclose(new.cache, 0.9 * n, rtol=1e-12)  # 0.9 n + 0.1 * 0
    np.testing.assert_array_equal(new.allocation, allocate_queries(n, 6))
    assert new.step == 1 and state.step == 0 and not state.cache.any()  # input unchanged
    newer = dgqa_update(new, k, kind="ema", beta=0.9)
    np.testing.assert_allclose(newer.cache, 0.9 * n + 0.1 * 0.9 * n, rtol=1e-12)


def test_dgqa_diff_follows_the_change_of_the_norms():
    rng = np.random.default_rng(11)
    _, k, _ = arrays(rng, G=3)
    first = dgqa_update(DGQAState.initial(6, 3), k, kind="diff")
    k_moved = k * np.array([1.0, 1.0, 3.0])[None, :, None, None]  # only head 2 changes
    second = dgqa_update(first, k_moved, kind="diff")
    np.testing.assert_array_equal(second.allocation, [0, 0, 6])


def test_dgqa_window_updates_only_every_window_steps():
    rng = np.random.default_rng(12)
    state = DGQAState.initial(6, 3)
    allocations = []
    for step in range(6):
        k = rng.standard_normal((2, 3, 5, 4)) * rng.uniform(0.1, 3, size=(1, 3, 1, 1))
        new = dgqa_update(state, k, window=3)
        if step % 3:
            assert new.cache is state.cache and new.allocation is state.allocation
        allocations.append(new.allocation)
        state = new
    assert state.step == 6


def test_dgqa_code_cache_rule():
    rng = np.random.default_rng(13)
    _, k, _ = arrays(rng, G=3)
    n = np.linalg.norm(k, axis=(2, 3)).mean(axis=0)
    start = DGQAState(np.array([1.0, 2.0, 3.0]), np.array([2, 2, 2]), 0)
    trained = dgqa_update(start, k, window=2, cache_update="code")
    np.testing.assert_allclose(trained.cache, (start.cache + n) / 2, rtol=1e-12)
    inference = dgqa_update(start, k, training=False, cache_update="code")
    np.testing.assert_allclose(inference.cache, n, rtol=1e-12)
    assert inference.step == 0


def test_dgqa_forward_uses_the_updated_allocation():
    rng = np.random.default_rng(14)
    q, k, v = arrays(rng, H=6, G=3)
    k = k * np.array([0.5, 1.0, 2.0])[None, :, None, None]
    out, state = dgqa(q, k, v, DGQAState.initial(6, 3), kind="ema")
    np.testing.assert_array_equal(out, kdgqa(q, k, v, allocation=state.allocation))
    out2, state2 = dgqa(q, k, v, state, rng=np.random.default_rng(0))
    again, _ = dgqa(q, k, v, state, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(out2, again)
    assert state2.allocation.sum() == 6


# --------------------------------------------------------------------------- PGQA


def loop_pgqa(q, k, v, seed):
    """GQA minus per-group noise, the official recipe written element by element."""
    rng = np.random.default_rng(seed)
    B, H, N, _ = q.shape
    G, Dv = k.shape[1], v.shape[3]
    r, P = H // G, N * Dv
    out = gqa(q, k, v)
    result = out.copy()
    for g in range(G):
        u = rng.random((r, P))
        for i in range(min(r, P)):
            u[i, i] = 0.0
        for b in range(B):
            for j in range(r):
                row = out[b, g * r + j].ravel()
                z = (u[j] - u[j].mean()) / u[j].std(ddof=1)
                noise = z * row.std(ddof=1) + row.mean()
                result[b, g * r + j] = (row - noise).reshape(N, Dv)
    return result


@pytest.mark.parametrize(("H", "G"), [(6, 3), (4, 1), (4, 4)])
def test_pgqa_is_the_official_recipe(H, G):
    q, k, v = arrays(np.random.default_rng(15), H=H, G=G)
    np.testing.assert_allclose(pgqa(q, k, v, rng=3), loop_pgqa(q, k, v, 3), atol=1e-12)


def test_pgqa_rows_have_zero_mean_and_the_noise_matches_the_output_statistics():
    q, k, v = arrays(np.random.default_rng(16))
    out = gqa(q, k, v)
    for noise in ("uniform", "gaussian"):
        e = group_noise(out, 3, np.random.default_rng(1), noise=noise)
        flat_e, flat_o = e.reshape(2, 6, -1), out.reshape(2, 6, -1)
        np.testing.assert_allclose(flat_e.mean(-1), flat_o.mean(-1), atol=1e-12)
        np.testing.assert_allclose(flat_e.std(-1, ddof=1), flat_o.std(-1, ddof=1), rtol=1e-12)
        perturbed = pgqa(q, k, v, rng=np.random.default_rng(1), noise=noise)
        np.testing.assert_allclose(perturbed.reshape(2, 6, -1).mean(-1), 0.0, atol=1e-12)
    np.testing.assert_array_equal(pgqa(q, k, v, rng=2), pgqa(q, k, v, rng=2))
    assert not np.allclose(pgqa(q, k, v, rng=2), pgqa(q, k, v, rng=3))


# --------------------------------------------------------------------------- backends


@pytest.mark.skipif(not HAS_NUMBA, reason="numba is not installed")
def test_forwards_run_their_attention_on_numba():
    rng = np.random.default_rng(17)
    q, k, v = arrays(rng, H=8, G=4, N=9, M=11, D=8, Dv=8)
    f32 = [x.astype(np.float32) for x in (q, k, v)]
    state = DGQAState.initial(8, 4)
    cases = {
        "gqa": (lambda *a, **kw: gqa(*a, **kw), {}),
        "gqa pooled": (lambda *a, **kw: gqa(*a, groups=2, **kw), {}),
        "kdgqa": (lambda *a, **kw: kdgqa(*a, **kw), {}),
        "dgqa": (lambda *a, **kw: dgqa(*a, state, **kw)[0], {}),
        "pgqa": (lambda *a, **kw: pgqa(*a, rng=0, **kw), {}),
    }
    for name, (fn, kwargs) in cases.items():
        golden = fn(q, k, v, causal=True, **kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("error", qkv.FallbackWarning)  # sdpa runs natively
            out = fn(*f32, causal=True, backend="numba", **kwargs)
        assert out.dtype == np.float32, name
        np.testing.assert_allclose(out, golden, rtol=1e-5, atol=1e-5, err_msg=name)


# --------------------------------------------------------------------------- bad input


def bad_cases():
    q, k, v = arrays(np.random.default_rng(18))
    state = DGQAState.initial(6, 3)
    return {
        "groups not dividing H": (
            lambda: gqa(q, k[:, :1].repeat(6, 1), v[:, :1].repeat(6, 1), groups=4),
            qkv.ShapeError,
            "groups: expected a divisor of H=6, got 4",
        ),
        "G not dividing H": (
            lambda: kdgqa(q, k[:, :2].repeat(2, 1), v[:, :2].repeat(2, 1)),
            qkv.ShapeError,
            "H divisible by KV heads",
        ),
        "allocation not summing to H": (
            lambda: kdgqa(q, k, v, allocation=np.array([2, 2, 1])),
            qkv.ParameterError,
            r"summing to H=6 query heads, got sums \[5\]",
        ),
        "negative allocation": (
            lambda: kdgqa(q, k, v, allocation=np.array([4, 3, -1])),
            qkv.ParameterError,
            "non-negative",
        ),
        "allocation of the wrong length": (
            lambda: kdgqa(q, k, v, allocation=np.array([3, 3])),
            qkv.ShapeError,
            r"allocation: expected shape \(3,\) or \(2, 3\)",
        ),
        "float allocation": (
            lambda: kdgqa(q, k, v, allocation=np.array([2.0, 2.0, 2.0])),
            qkv.ParameterError,
            "integer counts",
        ),
        "negative scores": (
            lambda: allocate_queries(np.array([1.0, -1.0]), 4),
            qkv.ParameterError,
            "non-negative",
        ),
        "H not a multiple of the scores' groups": (
            lambda: allocate_queries(np.array([1.0, 2.0, 3.0]), 4),
            qkv.ShapeError,
            "n_heads: expected a multiple of the G=3 groups, got H=4",
        ),
        "unknown normalisation": (
            lambda: kdgqa(q, k, v, normalisation="softmax"),
            qkv.ParameterError,
            "normalisation",
        ),
        "q of rank 3": (lambda: gqa(q[0], k, v), qkv.ShapeError, "q: expected rank 4"),
        "mismatched head dims": (
            lambda: gqa(q, k[..., :3], v),
            qkv.ShapeError,
            "k: expected head dim D=4",
        ),
        "state of other heads": (
            lambda: dgqa(q, k, v, DGQAState.initial(9, 3)),
            qkv.ShapeError,
            "q: expected H=9 query heads as the state, got 6",
        ),
        "state of other groups": (
            lambda: dgqa_update(state, k[:, :2]),
            qkv.ShapeError,
            "k: expected G=3 KV heads as the state, got 2",
        ),
        "state groups not dividing heads": (
            lambda: DGQAState.initial(6, 4),
            qkv.ShapeError,
            "n_groups: expected a divisor of n_heads=6",
        ),
        "window below 1": (lambda: dgqa_update(state, k, window=0), qkv.ParameterError, "window"),
        "unknown kind": (lambda: dgqa_update(state, k, kind="mean"), qkv.ParameterError, "kind"),
        "beta out of range": (lambda: dgqa_update(state, k, beta=1.5), qkv.ParameterError, "beta"),
        "pgqa rng missing": (lambda: pgqa(q, k, v, rng=None), qkv.ParameterError, "rng"),
        "pgqa unknown noise": (
            lambda: pgqa(q, k, v, rng=0, noise="laplace"),
            qkv.ParameterError,
            "noise",
        ),
        "uptrain groups not dividing": (
            lambda: uptrain(mha_weights(np.random.default_rng(0)), 4),
            qkv.ShapeError,
            "groups: expected a divisor of Hkv=6, got 4",
        ),
        "weights of mismatched dims": (
            lambda: AttentionWeights(
                np.zeros((6, 10, 4)), np.zeros((3, 10, 5)), np.zeros((3, 10, 4))
            ),
            qkv.ShapeError,
            "w_k",
        ),
    }


BAD = bad_cases()


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_input(case):
    fn, error, message = BAD[case]
    with pytest.raises(error, match=message):
        fn()


def test_key_norms_batch_coupled_is_the_batch_sum():
    _, k, _ = arrays(np.random.default_rng(19), B=3)
    per_sample = key_norms(k)
    np.testing.assert_allclose(key_norms(k, batch_coupled=True)[2], per_sample.sum(axis=0))
