"""Properties of the shared ``sparse_attention`` op (attention over per-head selected keys).

References: an explicit float64 loop over heads, queries and selected keys; full softmax
attention (``qkv.reference.core.sdpa``) when every key is selected; the union property of
log-sum-exp merging.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qkv
from qkv.errors import DTypeError, ParameterError, ShapeError
from qkv.reference import core
from qkv.reference.sparse import merge_partials, sparse_attention


def arrays(rng, B=2, H=4, Hkv=2, N=3, M=11, D=8, Dv=5, dtype=np.float64):
    q = rng.standard_normal((B, H, N, D)).astype(dtype)
    k = rng.standard_normal((B, Hkv, M, D)).astype(dtype)
    v = rng.standard_normal((B, Hkv, M, Dv)).astype(dtype)
    return q, k, v


def loop(q, k, v, idx, scale):
    """Softmax over the listed keys, one (b, h, i) at a time, with math.exp."""
    B, H, N, _ = q.shape
    G = H // k.shape[1]
    out = np.zeros((B, H, N, v.shape[-1]))
    lse = np.full((B, H, N), -np.inf)
    for b in range(B):
        for h in range(H):
            for i in range(N):
                sel = idx[b, h, i] if idx.ndim == 4 else idx[b, h]
                sel = [int(j) for j in sel if j >= 0]
                if not sel:
                    continue
                s = [scale * float(q[b, h, i] @ k[b, h // G, j]) for j in sel]
                m = max(s)
                w = [math.exp(x - m) for x in s]
                z = sum(w)
                for wj, j in zip(w, sel, strict=True):
                    out[b, h, i] += wj / z * v[b, h // G, j]
                lse[b, h, i] = m + math.log(z)
    return out, lse


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    group=st.sampled_from([1, 2, 4]),
    per_query=st.booleans(),
    S=st.integers(1, 9),
    N=st.integers(1, 4),
)
def test_matches_explicit_loop(seed, group, per_query, S, N):
    rng = np.random.default_rng(seed)
    Hkv, M = 2, 9
    q, k, v = arrays(rng, H=Hkv * group, Hkv=Hkv, N=N, M=M)
    shape = (2, Hkv * group, N, S) if per_query else (2, Hkv * group, S)
    idx = rng.integers(-1, M, size=shape)  # -1 = empty slot, some rows fully empty
    out, lse = sparse_attention(q, k, v, idx, return_lse=True)
    want, want_lse = loop(q, k, v, idx, 1 / math.sqrt(8))
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-12)
    assert np.isfinite(out).all()


def test_all_keys_selected_is_full_attention():
    rng = np.random.default_rng(0)
    q, k, v = arrays(rng)
    idx = np.broadcast_to(np.arange(11), (2, 4, 11)).astype(np.int32)
    out, lse = sparse_attention(q, k, v, idx, return_lse=True)
    want, want_lse = core.sdpa(q, k, v, return_lse=True)
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-12)


def test_causal_selection_per_query_is_causal_sdpa():
    rng = np.random.default_rng(1)
    q, k, v = arrays(rng, N=6, M=6)
    j = np.arange(6)
    idx = np.where(j[None, :] <= j[:, None], j[None, :], -1)  # (N, S): keys 0..i
    idx = np.broadcast_to(idx, (2, 4, 6, 6))
    np.testing.assert_allclose(
        sparse_attention(q, k, v, idx), core.sdpa(q, k, v, causal=True), rtol=1e-12, atol=1e-13
    )


def test_empty_selection_gives_zeros_not_nan():
    rng = np.random.default_rng(2)
    q, k, v = arrays(rng)
    idx = np.full((2, 4, 3), -1)
    out, lse = sparse_attention(q, k, v, idx, return_lse=True)
    assert np.all(out == 0) and np.all(np.isneginf(lse))


def test_extreme_logits_are_stable():
    rng = np.random.default_rng(3)
    q, k, v = arrays(rng)
    out = sparse_attention(1e4 * q, k, v, np.broadcast_to(np.arange(11), (2, 4, 11)))
    assert np.isfinite(out).all()


def test_split_selection_merges_to_union():
    rng = np.random.default_rng(4)
    q, k, v = arrays(rng)
    perm = rng.permutation(11)
    a, b = np.broadcast_to(perm[:4], (2, 4, 4)), np.broadcast_to(perm[4:], (2, 4, 7))
    parts = [sparse_attention(q, k, v, i, return_lse=True) for i in (a, b)]
    out, lse = merge_partials([p[0] for p in parts], [p[1] for p in parts])
    want, want_lse = core.sdpa(q, k, v, return_lse=True)
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-12)
    empty = sparse_attention(q, k, v, np.full((2, 4, 1), -1), return_lse=True)
    out2, lse2 = merge_partials([out, empty[0]], [lse, empty[1]])  # an empty part changes nothing
    np.testing.assert_allclose(out2, want, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_keeps_dtype(dtype):
    rng = np.random.default_rng(5)
    q, k, v = arrays(rng, dtype=dtype)
    idx = np.broadcast_to(np.arange(0, 11, 2), (2, 4, 6))
    out, lse = sparse_attention(q, k, v, idx, return_lse=True)
    assert out.dtype == dtype and lse.dtype == np.float32
    want = loop(*(x.astype(np.float64) for x in (q, k, v)), idx, 1 / math.sqrt(8))[0]
    np.testing.assert_allclose(out, want, rtol=3e-3 if dtype == np.float16 else 1e-5, atol=3e-3)


def test_dispatched_op_and_torch_backend_inputs():
    rng = np.random.default_rng(6)
    q, k, v = arrays(rng, dtype=np.float32)
    idx = rng.integers(-1, 11, size=(2, 4, 5))
    np.testing.assert_array_equal(
        qkv.sparse_attention(q, k, v, idx), sparse_attention(q, k, v, idx)
    )


def test_bad_input():
    rng = np.random.default_rng(7)
    q, k, v = arrays(rng)
    with pytest.raises(ParameterError, match=r"indices: expected key indices in \[0, M=11\)"):
        sparse_attention(q, k, v, np.full((2, 4, 3), 11))
    with pytest.raises(ParameterError, match="indices"):
        qkv.sparse_attention(q, k, v, np.full((2, 4, 3), -2))
    with pytest.raises(ShapeError, match="indices: expected shape"):
        sparse_attention(q, k, v, np.zeros((2, 3, 3), dtype=int))
    with pytest.raises(ShapeError, match="indices: expected shape"):
        sparse_attention(q, k, v, np.zeros((2, 4, 2, 3), dtype=int))  # N is 3
    with pytest.raises(DTypeError, match="indices: expected an integer dtype"):
        sparse_attention(q, k, v, np.zeros((2, 4, 3)))
    with pytest.raises(ShapeError, match="H divisible"):
        sparse_attention(q[:, :3], k, v, np.zeros((2, 3, 3), dtype=int))


def _toy_backend(fn):
    import types

    module = types.ModuleType("toy_sparse")
    module.NAME = "toy_sparse"
    module.available = lambda: (True, "")
    module.asarray = np.asarray
    module.to_numpy = np.asarray
    module.sparse_attention = fn
    return module


def test_conformance_kit_passes_a_faithful_backend_and_catches_a_wrong_one():
    from qkv.testing import check_backend

    def faithful(q, k, v, indices, *, scale=None, bias=None, return_lse=False):
        return sparse_attention(q, k, v, indices, scale=scale, bias=bias, return_lse=return_lse)

    def reads_empty_slots(q, k, v, indices, *, scale=None, bias=None, return_lse=False):
        idx = np.where(indices >= 0, indices, 0)  # treats -1 as key 0
        return sparse_attention(q, k, v, idx, scale=scale, bias=bias, return_lse=return_lse)

    def ignores_bias(q, k, v, indices, *, scale=None, bias=None, return_lse=False):
        return sparse_attention(q, k, v, indices, scale=scale, return_lse=return_lse)

    good = check_backend(_toy_backend(faithful), ops=["sparse_attention"], max_examples=15, seed=0)
    assert good.ok
    for wrong in (reads_empty_slots, ignores_bias):
        bad = check_backend(_toy_backend(wrong), ops=["sparse_attention"], max_examples=15, seed=0)
        assert not bad.ok, wrong.__name__


def test_torch_backend_passes_the_conformance_kit_and_keeps_tensors():
    torch = pytest.importorskip("torch")
    from qkv.testing import check_backend

    report = check_backend("torch", ops=["sparse_attention"], max_examples=15, seed=0)
    assert report.ok
    rng = np.random.default_rng(8)
    q, k, v = (torch.from_numpy(x) for x in arrays(rng))
    q.requires_grad_(True)
    idx = torch.from_numpy(rng.integers(-1, 11, size=(2, 4, 5)))
    out = qkv.sparse_attention(q, k, v, idx, backend="torch")
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
    np.testing.assert_allclose(
        out.detach().numpy(), sparse_attention(*(x.detach().numpy() for x in (q, k, v)),
                                               idx.numpy()), rtol=1e-12, atol=1e-13
    )  # fmt: skip
    out.sum().backward()  # autograd through the gather
    assert q.grad is not None and torch.isfinite(q.grad).all()


# --------------------------------------------------------------------------- per-slot bias


def bias_of(rng, layout, B=2, H=4, Hkv=2, N=3, S=5):
    shape = {"head": (B, H, S), "kv-head": (B, Hkv, S), "query": (B, H, N, S)}[layout]
    return rng.standard_normal(shape)


LAYOUTS = ["head", "kv-head", "query"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_zero_bias_is_no_bias(layout):
    rng = np.random.default_rng(20)
    q, k, v = arrays(rng)
    idx = rng.integers(-1, 11, size=(2, 4, 3, 5))
    zero = np.zeros_like(bias_of(rng, layout))
    got = sparse_attention(q, k, v, idx, bias=zero, return_lse=True)
    want = sparse_attention(q, k, v, idx, return_lse=True)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), copies=st.lists(st.integers(1, 5), min_size=5, max_size=5))
def test_log_count_bias_equals_listing_the_key_that_many_times(seed, copies):
    """``bias = log c`` on a slot weighs its key as ``c`` copies of it (RazorAttention's
    compensation token, standing for the tokens it merged)."""
    rng = np.random.default_rng(seed)
    q, k, v = arrays(rng)
    idx = rng.integers(0, 11, size=(2, 4, 5))
    bias = np.broadcast_to(np.log(np.array(copies, dtype=float)), (2, 4, 5))
    out, lse = sparse_attention(q, k, v, idx, bias=bias, return_lse=True)
    repeated = np.repeat(idx, copies, axis=-1)  # (B, H, sum(copies)): slot t listed c_t times
    want, want_lse = sparse_attention(q, k, v, repeated, return_lse=True)
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-12)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), layout=st.sampled_from(LAYOUTS))
def test_minus_inf_bias_equals_dropping_the_slot(seed, layout):
    rng = np.random.default_rng(seed)
    q, k, v = arrays(rng)
    idx = rng.integers(-1, 11, size=(2, 4, 3, 5))
    bias = bias_of(rng, layout)
    bias = np.where(rng.uniform(size=bias.shape) < 0.4, -np.inf, bias)
    full_bias = np.broadcast_to(
        bias[:, :, None] if bias.ndim == 3 else bias, (2, bias.shape[1], 3, 5)
    )
    if layout == "kv-head":
        full_bias = np.repeat(full_bias, 2, axis=1)  # (B, H, N, S)
    dropped = np.where(np.isneginf(full_bias), -1, idx)  # the -inf slots emptied instead
    out, lse = sparse_attention(q, k, v, idx, bias=bias, return_lse=True)
    want, want_lse = sparse_attention(
        q, k, v, dropped, bias=np.where(np.isneginf(full_bias), 0.0, full_bias), return_lse=True
    )
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-12)
    assert np.isfinite(out).all()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), layout=st.sampled_from(LAYOUTS), per_query=st.booleans())
def test_bias_matches_explicit_loop(seed, layout, per_query):
    """Each layout against the loop over keys with the bias written into the scores by hand."""
    rng = np.random.default_rng(seed)
    q, k, v = arrays(rng)
    idx = rng.integers(-1, 11, size=(2, 4, 3, 5) if per_query else (2, 4, 5))
    bias = bias_of(rng, layout)
    out, lse = sparse_attention(q, k, v, idx, bias=bias, return_lse=True)
    scale = 1 / math.sqrt(8)
    want = np.zeros((2, 4, 3, 5))
    want_lse = np.full((2, 4, 3), -np.inf)
    for b in range(2):
        for h in range(4):
            for i in range(3):
                sel = idx[b, h, i] if per_query else idx[b, h]
                if layout == "query":
                    row = bias[b, h, i]
                else:
                    row = bias[b, h // 2] if layout == "kv-head" else bias[b, h]
                terms = [(int(j), scale * float(q[b, h, i] @ k[b, h // 2, j]) + float(c))
                         for j, c in zip(sel, row, strict=True) if j >= 0]  # fmt: skip
                if not terms:
                    continue
                z = sum(math.exp(s) for _, s in terms)
                for j, s in terms:
                    want[b, h, i] += math.exp(s) / z * v[b, h // 2, j]
                want_lse[b, h, i] = math.log(z)
    np.testing.assert_allclose(out, want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-10)


def test_bias_bad_input():
    rng = np.random.default_rng(21)
    q, k, v = arrays(rng)
    idx = rng.integers(-1, 11, size=(2, 4, 5))
    with pytest.raises(ShapeError, match=r"bias: expected shape \(B, H, S\)=\(2, 4, 5\)"):
        sparse_attention(q, k, v, idx, bias=np.zeros((2, 4, 6)))  # S differs from indices'
    with pytest.raises(ShapeError, match="bias: expected shape"):
        qkv.sparse_attention(q, k, v, idx, bias=np.zeros((2, 3, 5)))
    with pytest.raises(ShapeError, match="bias: expected shape"):
        sparse_attention(q, k, v, idx, bias=np.zeros((2, 2, 3, 5)))  # per query needs H heads
    with pytest.raises(DTypeError, match="bias: expected a float dtype, got int64"):
        sparse_attention(q, k, v, idx, bias=np.zeros((2, 4, 5), dtype=np.int64))
    for bad in (np.nan, np.inf):
        bias = np.zeros((2, 4, 5))
        bias[1, 2, 3] = bad
        with pytest.raises(ParameterError, match="bias: expected finite values or -inf"):
            qkv.sparse_attention(q, k, v, idx, bias=bias)
    with pytest.raises(TypeError, match="bias: expected a float array"):
        sparse_attention(q, k, v, idx, bias=[0.0] * 5)
