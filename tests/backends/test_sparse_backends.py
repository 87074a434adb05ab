"""``sparse_attention`` on every backend against an explicit float64 loop.

* numba: the fused gather-and-attend kernel, both dtypes, per-head and per-query index lists,
  empty slots and empty rows, duplicated indices, grouped heads, log-sum-exp;
* torch: the Triton kernel under the interpreter (its gathers run there), with the slot list
  split over several programs and merged, float32 and float16 (``cuda`` variants marked
  ``gpu``), and the torch-ops path where autograd is needed;
* cupy: ``sparse_fwd.cu`` compiled with ``nvcc -arch=sm_90``, its arguments checked against
  the PTX signature, the split merge checked in NumPy; ``gpu`` tests compare it with the
  loop where a GPU is lent (compiled, not yet run on a GPU);
* the conformance kit's drawn cases (``qkv.testing.ops_sparse``) on numba and torch, and the
  64k-key benchmark's ``--quick`` mode (it runs; no timing is asserted).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _helpers import needs_nvcc, nvcc, ptx_arg_type, ptx_params, triton_device_or_skip

from qkv import _outputs
from qkv.backends import cupy as cupy_backend
from qkv.backends import numba as numba_backend
from qkv.backends._split import split_slots
from qkv.backends.cupy import _sparse as cupy_sparse
from qkv.backends.cupy._launch import KERNEL_DIR
from qkv.errors import Unsupported
from qkv.reference.sparse.selected_keys import check_sparse_attention

ROOT = Path(__file__).resolve().parents[2]
TOL = {np.float32: 2e-5, np.float64: 1e-12}


def loop_attention(q, k, v, idx, scale=None, bias=None):
    """Row by row in float64: softmax over the listed keys (each listed entry one term), each
    slot's score plus its bias (a ``-inf`` slot left out)."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    B, H, N, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[3]
    G = H // Hkv
    scale = D**-0.5 if scale is None else scale
    idx = np.asarray(idx)
    out, lse = np.zeros((B, H, N, Dv)), np.full((B, H, N), -np.inf)
    for b in range(B):
        for h in range(H):
            g = h // G
            for i in range(N):
                row = idx[b, h, i] if idx.ndim == 4 else idx[b, h]
                if bias is None:
                    brow = np.zeros(len(row))
                elif bias.ndim == 4:
                    brow = bias[b, h, i]
                else:
                    brow = bias[b, h if bias.shape[1] == H else g]
                pairs = [
                    (int(j), float(c))
                    for j, c in zip(row, brow, strict=True)
                    if j >= 0 and c > -np.inf
                ]
                if not pairs:
                    continue
                s = np.array([scale * q[b, h, i] @ k[b, g, j] + c for j, c in pairs])
                js = [j for j, _ in pairs]
                w = np.exp(s - s.max())
                out[b, h, i] = w @ v[b, g, js] / w.sum()
                lse[b, h, i] = s.max() + np.log(w.sum())
    return out, lse


def make_case(seed, *, B=2, H=4, Hkv=2, N=3, M=40, D=16, Dv=8, S=11, per_query=True):
    rng = np.random.default_rng(seed)
    q = 2.0 * rng.standard_normal((B, H, N, D))
    k = rng.standard_normal((B, Hkv, M, D))
    v = rng.standard_normal((B, Hkv, M, Dv))
    idx = rng.integers(0, M, size=(B, H, N, S) if per_query else (B, H, S))
    idx = np.where(rng.uniform(size=idx.shape) < 0.25, -1, idx)
    idx[0, 1] = -1  # a head (every query of it) with no key at all
    return q, k, v, idx


def assert_close(got, want, tol, name="out"):
    got = np.asarray(got, dtype=np.float64)
    assert not np.isnan(got).any(), f"{name}: NaN (an unwritten element?)"
    finite = np.isfinite(want)
    assert (np.isinf(got) == ~finite).all(), f"{name}: -inf in the wrong places"
    np.testing.assert_allclose(got[finite], want[finite], rtol=tol, atol=tol, err_msg=name)


def assert_numba_matches_loop(q, k, v, idx, bias, *, tol=1.0, parallel=None):
    """The numba kernel, both dtypes, poisoned outputs, against the float64 loop (``scale=0.3``,
    ``tol`` times the dtype's tolerance)."""
    from qkv.backends.numba import _sparse

    for dtype in (np.float32, np.float64):
        args = [x.astype(dtype) for x in (q, k, v)]
        check_sparse_attention(*args, idx, bias=bias)
        with _outputs.poisoned():
            out, lse = _sparse.sparse_attention(
                *args, idx, scale=0.3, bias=bias, return_lse=True, parallel=parallel
            )
        want, want_lse = loop_attention(q, k, v, idx, scale=0.3, bias=bias)
        assert_close(out, want, tol * TOL[dtype])
        assert_close(lse, want_lse, tol * TOL[dtype], "lse")


def call_checked(module, q, k, v, idx, **kw):
    """A backend's ``sparse_attention`` after the public boundary's checks, poisoned outputs."""
    check_sparse_attention(q, k, v, idx, **kw)
    with _outputs.poisoned():
        return module.sparse_attention(q, k, v, idx, **kw)


# --------------------------------------------------------------------------- numba

needs_numba = pytest.mark.skipif(
    not numba_backend.available()[0], reason=f"numba: {numba_backend.available()[1]}"
)


@needs_numba
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("per_query", [True, False], ids=["per-query", "per-head"])
def test_numba_matches_loop(dtype, per_query):
    q, k, v, idx = make_case(1, per_query=per_query)
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    out, lse = call_checked(numba_backend, q, k, v, idx, scale=0.3, return_lse=True)
    want, want_lse = loop_attention(q, k, v, idx, scale=0.3)
    assert out.dtype == lse.dtype == np.dtype(dtype)
    assert_close(out, want, TOL[dtype])
    assert_close(lse, want_lse, TOL[dtype], "lse")
    assert (out[0, 1] == 0).all()  # the empty head: zeros, not NaN


@needs_numba
@pytest.mark.parametrize(
    ("H", "Hkv", "N", "per_query"),
    [(4, 4, 1, False), (4, 1, 1, False), (2, 2, 5, False), (2, 1, 3, True)],
    ids=["one-row-direct", "group-of-4-gathered", "5-queries-gathered", "per-query-direct"],
)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_numba_direct_and_gathered_paths_over_several_tiles(H, Hkv, N, per_query, with_bias):
    """Tasks of fewer than ``GATHER_ROWS`` rows score each slot in place, larger ones gather the
    tile's rows for BLAS; both walk lists longer than two tiles, with empty slots in the first
    and last tiles but none in the middle one (whose scores the gathered path, without a bias,
    takes as they are), and leave an empty slot out even where the row it would point at holds
    ``inf`` values."""
    from qkv.backends.numba import _sparse

    T = _sparse.TILE
    S = 2 * T + 5
    q, k, v, idx = make_case(11, B=1, H=H, Hkv=Hkv, N=N, M=3 * S, S=S, per_query=per_query)
    if not per_query:
        idx = np.repeat(idx[:, :: H // Hkv], H // Hkv, axis=1)  # a KV group's heads share a list
    idx = np.where(idx == 0, 1, idx)  # row 0 is never listed ...
    idx[..., [3, 2 * T + 1]] = -1  # ... but an empty slot in the first and in the last tile
    v[:, :, 0] = np.inf  # ... so row 0's infinite values must not reach any output
    bias = np.random.default_rng(12).standard_normal(idx.shape) if with_bias else None
    assert_numba_matches_loop(q, k, v, idx, bias, tol=5.0)


@needs_numba
@pytest.mark.parametrize(("H", "Hkv"), [(1, 1), (4, 1)], ids=["direct", "gathered"])
@pytest.mark.parametrize("empty", ["first-part", "whole-row"])
def test_numba_splits_a_list_over_idle_threads_and_merges(H, Hkv, empty):
    """With fewer tasks than threads (one list here) each list is cut into parts of whole
    tiles, one per thread, and the parts are joined by their log-sum-exp; a part with no key
    (or a row with none at all) merges to what the whole list gives."""
    import numba

    from qkv.backends.numba import _sparse

    S = 3 * _sparse.TILE + 7
    rng = np.random.default_rng(21)
    q = 2.0 * rng.standard_normal((1, H, 1, 16))
    k = rng.standard_normal((1, Hkv, 2 * S, 16))
    v = rng.standard_normal((1, Hkv, 2 * S, 8))
    idx = np.repeat(rng.integers(0, 2 * S, size=(1, 1, S)), H, axis=1)  # (1, H, S): one list
    idx[..., : _sparse.TILE + 3] = -1  # the first part holds no key
    if empty == "whole-row":
        idx[:] = -1
    bias = np.random.default_rng(22).standard_normal(idx.shape)
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one thread: no list is split")
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(2)  # two threads, one task: its list is cut in two parts
        assert_numba_matches_loop(q, k, v, idx, bias, tol=5.0, parallel=True)
    finally:
        numba.set_num_threads(threads)


@needs_numba
def test_numba_duplicates_count_twice_and_large_logits_are_stable():
    """A key listed twice weighs as if its score were ``+ log 2``; logits of 1e3 stay finite."""
    rng = np.random.default_rng(2)
    q = 1e3 * rng.standard_normal((1, 1, 1, 4))
    k, v = rng.standard_normal((2, 1, 1, 6, 4))
    twice = np.array([[[0, 3, 3, 5]]])
    out, lse = call_checked(numba_backend, q, k, v, twice, return_lse=True)
    want, want_lse = loop_attention(q, k, v, twice)
    assert_close(out, want, 1e-12)
    assert_close(lse, want_lse, 1e-12, "lse")
    q = q * 1e-3  # moderate logits: compare with the score shift written out
    out = numba_backend.sparse_attention(q, k, v, twice)
    s = 0.5 * q[0, 0, 0] @ k[0, 0, [0, 3, 5]].T + np.log([1.0, 2.0, 1.0])
    w = np.exp(s - s.max())
    np.testing.assert_allclose(out[0, 0, 0], w @ v[0, 0, [0, 3, 5]] / w.sum(), rtol=1e-12)


@needs_numba
def test_numba_declines_half_precision():
    q, k, v, idx = make_case(0)
    with pytest.raises(Unsupported, match="float32 and float64"):
        numba_backend.sparse_attention(*(x.astype(np.float16) for x in (q, k, v)), idx)


# --------------------------------------------------------------------------- torch / Triton

torch = pytest.importorskip("torch")

from qkv.backends import torch as torch_backend  # noqa: E402

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk", [None, 5, 16], ids=["one-split", "chunk5", "chunk16"])
@pytest.mark.parametrize("per_query", [True, False], ids=["per-query", "per-head"])
def test_triton_kernel_matches_loop(device, chunk, per_query):
    """The fused kernel, its slot list cut into splits (merged by lse) where ``chunk`` says."""
    device = triton_device_or_skip(device, "sparse")
    from qkv.backends.torch.triton.sparse import sparse_forward

    q, k, v, idx = make_case(3, per_query=per_query, S=37)
    want, want_lse = loop_attention(q, k, v, idx, scale=0.25)
    for dtype, tol in ((torch.float32, 2e-5), (torch.float16, 4e-3)):
        args = [torch.from_numpy(x).to(device=device, dtype=dtype) for x in (q, k, v)]
        index = torch.from_numpy(idx).to(device)
        out, lse = sparse_forward(*args, index, scale=0.25, chunk=chunk, block_s=16)
        assert out.dtype == dtype and lse.dtype == torch.float32
        got = out.cpu().double().numpy()
        ref16 = loop_attention(*(a.cpu().double().numpy() for a in args), idx, scale=0.25)[0]
        assert_close(got, want if dtype == torch.float32 else ref16, tol)
        assert_close(lse.cpu().numpy(), want_lse, tol, "lse")


def test_torch_dispatch_runs_the_kernel_or_torch_ops():
    """Through the backend: the kernel where it applies, torch ops (with autograd) otherwise."""
    q, k, v, idx = make_case(4)
    want, want_lse = loop_attention(q, k, v, idx)
    t = [torch.from_numpy(x.astype(np.float32)) for x in (q, k, v)]
    out, lse = call_checked(torch_backend, *t, torch.from_numpy(idx), return_lse=True)
    assert_close(out.numpy(), want, 2e-5)
    assert_close(lse.numpy(), want_lse, 2e-5, "lse")
    t64 = [torch.from_numpy(x).requires_grad_() for x in (q, k, v)]
    out = torch_backend.sparse_attention(*t64, torch.from_numpy(idx))
    assert_close(out.detach().numpy(), want, 1e-12)
    out.sum().backward()
    assert t64[0].grad is not None and torch.isfinite(t64[0].grad).all()


def test_split_plan_covers_every_slot_once():
    for rows, slots in [(8, 6553), (8, 655), (1, 65536), (4096, 100), (3, 10)]:
        chunk, n = split_slots(rows, slots, programs=1024, min_chunk=64, multiple=16)
        assert (n - 1) * chunk < slots <= n * chunk
        assert n == 1 or (chunk % 16 == 0 and chunk >= 64)
        assert rows * n <= max(1024, rows) + rows  # about the programs asked for


# --------------------------------------------------------------------------- cupy

SOURCE = KERNEL_DIR / "sparse_fwd.cu"
CUPY_OK, CUPY_WHY = cupy_backend.available()
requires_gpu = pytest.mark.skipif(not CUPY_OK, reason=f"cupy backend: {CUPY_WHY}")


@needs_nvcc
def test_cupy_arguments_match_the_kernel_signature(tmp_path):
    ptx = tmp_path / "k.ptx"
    nvcc(SOURCE, ptx, "--ptx")
    params = ptx_params(ptx)

    q = np.zeros((1, 8, 1, 64), np.float16)
    k = v = np.zeros((1, 2, 4096, 64), np.float16)
    idx = np.broadcast_to(np.zeros((1, 8, 1, 400), np.int64), (1, 8, 1, 400))
    chunk, n_splits, grid = cupy_sparse.launch_plan(8, 400, 64, 64)
    part_o, part_lse = np.zeros((8, n_splits, 64), np.float32), np.zeros((8, n_splits), np.float32)
    args = cupy_sparse.sparse_arguments(
        q, k, v, idx, part_o, part_lse, chunk=chunk, n_splits=n_splits, scale=0.125
    )
    for dtype in ("float16", "float32"):
        assert [ptx_arg_type(a) for a in args] == params[cupy_sparse.kernel_name(dtype)]
    assert grid[0] * cupy_sparse.WARPS >= 8 * n_splits and (n_splits - 1) * chunk < 400


def test_cupy_split_merge_equals_the_union():
    """The host merge (NumPy here) of per-chunk results equals attention over all slots."""
    q, k, v, idx = make_case(5, B=1, H=2, Hkv=1, N=1, S=30)
    chunks = [idx[..., a : a + 8] for a in range(0, 30, 8)]
    parts = [loop_attention(q, k, v, c) for c in chunks]
    part_o = np.stack([o.reshape(2, -1) for o, _ in parts], axis=1).astype(np.float32)
    part_lse = np.stack([s.reshape(2) for _, s in parts], axis=1).astype(np.float32)
    out, lse = cupy_sparse.merge_splits(part_o, part_lse, np)
    want, want_lse = loop_attention(q, k, v, idx)
    assert_close(out.reshape(want.shape), want, 2e-6)
    assert_close(lse.reshape(want_lse.shape), want_lse, 2e-6, "lse")


def test_cupy_declines_what_the_kernel_cannot_do():
    with pytest.raises(Unsupported, match="float16 and float32"):
        cupy_sparse.kernel_name("float64")
    with pytest.raises(Unsupported, match="head dims up to 256"):
        cupy_sparse.launch_plan(8, 100, 300, 64)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("per_query", [True, False], ids=["per-query", "per-head"])
def test_cupy_matches_loop(per_query):
    import cupy

    q, k, v, idx = make_case(6, per_query=per_query, S=300, M=500)
    want, want_lse = loop_attention(q, k, v, idx)
    for dtype, tol in ((np.float32, 2e-5), (np.float16, 4e-3)):
        args = [cupy.asarray(x.astype(dtype)) for x in (q, k, v)]
        out, lse = call_checked(cupy_backend, *args, cupy.asarray(idx), return_lse=True)
        assert out.dtype == dtype
        assert_close(cupy.asnumpy(out), want, tol)
        assert_close(cupy.asnumpy(lse), want_lse, 2e-5, "lse")


# --------------------------------------------------------------------------- conformance kit


@pytest.mark.parametrize(
    ("backend", "examples", "dtypes"),
    [("numba", 25, ("float32",)), ("torch", 10, ("float32", "float16"))],
)
def test_conformance_kit(backend, examples, dtypes):
    """The kit's drawn cases (under ``TRITON_INTERPRET=1`` torch runs the Triton kernel)."""
    from qkv.testing import check_backend

    report = check_backend(backend, ops=["sparse_attention"], max_examples=examples, dtypes=dtypes)
    assert report.ok, report


# --------------------------------------------------------------------------- benchmark


@needs_numba
def test_benchmark_quick_mode_runs(tmp_path):
    """``benchmarks/sparse.py --quick`` writes its JSON and PNG (sizes, not speed)."""
    out = tmp_path / "sparse.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "sparse.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert {row["backend"] for row in data["timings"]} >= {"numba", "torch"}
    assert all(row["ms"] > 0 and row["max_abs_err"] < 1e-4 for row in data["timings"])
    assert out.with_suffix(".png").stat().st_size > 0
    picked = {row["method"]: row for row in data["selection"]}
    assert set(picked) == {
        "tokenselect",
        "tidaldecode",
        "hip",
        "actqkv",
        "a2ats",
        "a2ats, keys coded once",
    }
    for row in picked.values():  # each method reads at most its budget, and was timed
        assert 0 < row["keys_read"] <= row["budget"] + 1e-9
        assert row["select_ms"] > 0 and row["sparse_attention_ms"] > 0
    from qkv.bench import render_markdown

    page = render_markdown(out)
    assert "timings" in page and "selection" in page


# --------------------------------------------------------------------------- per-slot bias

BIAS_LAYOUTS = ["head", "kv-head", "query"]


def make_bias(seed, layout, *, B=2, H=4, Hkv=2, N=3, S=11):
    """Log counts (1..9), 10% ``-inf`` (dropped) slots, in one of the three layouts."""
    rng = np.random.default_rng(seed)
    shape = {"head": (B, H, S), "kv-head": (B, Hkv, S), "query": (B, H, N, S)}[layout]
    bias = np.log(rng.integers(1, 10, size=shape)).astype(np.float64)
    return np.where(rng.uniform(size=shape) < 0.1, -np.inf, bias)


@needs_numba
@pytest.mark.parametrize("layout", BIAS_LAYOUTS)
@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "threads"])
@pytest.mark.parametrize("shared", [False, True], ids=["own-lists", "group-lists"])
def test_numba_bias_matches_loop(layout, parallel, shared):
    """Both drivers, with a KV group's heads reading their own lists or one shared list (each key
    row then read once for the whole group)."""

    q, k, v, idx = make_case(7, per_query=False)
    if shared:
        idx = np.repeat(idx[:, ::2], 2, axis=1)  # (B, H, S): heads 2g and 2g+1 share a list
    bias = make_bias(8, layout)
    assert_numba_matches_loop(q, k, v, idx, bias, parallel=parallel)


@needs_numba
def test_numba_group_sharing_is_detected_only_when_lists_agree():
    from qkv.backends.numba import _sparse

    q, k, v, idx = make_case(9, per_query=True)
    shared = _sparse.kernels()["shared"]
    same = np.repeat(idx[:, ::2], 2, axis=1)  # (B, H, N, S)
    assert shared(np.ascontiguousarray(same), 2)
    differ = same.copy()
    differ[1, 3, 2, 5] = (differ[1, 2, 2, 5] + 1) % 40
    assert not shared(differ, 2)
    assert not shared(same, 1)  # no group: nothing to share


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", BIAS_LAYOUTS)
def test_triton_kernel_bias_matches_loop(device, layout):
    device = triton_device_or_skip(device, "sparse")
    from qkv.backends.torch.triton.sparse import sparse_forward

    q, k, v, idx = make_case(10, per_query=layout == "query", S=37)
    bias = make_bias(11, layout, S=37)
    want, want_lse = loop_attention(q, k, v, idx, scale=0.25, bias=bias)
    args = [torch.from_numpy(x).to(device=device, dtype=torch.float32) for x in (q, k, v)]
    index, b = torch.from_numpy(idx).to(device), torch.from_numpy(bias).to(device)
    for chunk in (None, 16):
        out, lse = sparse_forward(*args, index, scale=0.25, bias=b, chunk=chunk, block_s=16)
        assert_close(out.cpu().double().numpy(), want, 2e-5)
        assert_close(lse.cpu().numpy(), want_lse, 2e-5, "lse")


@pytest.mark.parametrize("layout", BIAS_LAYOUTS)
def test_torch_ops_bias_matches_loop_with_gradients(layout):
    """float64 (never the kernel): the bias gets gradients too (razor's log counts could be
    learned)."""
    q, k, v, idx = make_case(12, per_query=layout != "head")
    bias = make_bias(13, layout)
    t = [torch.from_numpy(x).requires_grad_() for x in (q, k, v)]
    tb = torch.from_numpy(np.where(np.isinf(bias), -1e4, bias)).requires_grad_()
    out, lse = torch_backend.sparse_attention(*t, torch.from_numpy(idx), bias=tb, return_lse=True)
    finite = np.where(np.isinf(bias), -1e4, bias)
    want, want_lse = loop_attention(q, k, v, idx, bias=finite)
    assert_close(out.detach().numpy(), want, 1e-12)
    assert_close(lse.detach().numpy(), want_lse, 1e-12, "lse")
    out.sum().backward()
    assert tb.grad is not None and torch.isfinite(tb.grad).all() and tb.grad.abs().sum() > 0
    with torch.no_grad():  # -inf itself (no gradient needed)
        out = torch_backend.sparse_attention(
            *(x.detach() for x in t), torch.from_numpy(idx), bias=torch.from_numpy(bias)
        )
    assert_close(out.numpy(), loop_attention(q, k, v, idx, bias=bias)[0], 1e-12)


@pytest.mark.parametrize("layout", ["head", "kv-head", "query"])
def test_torch_ops_group_lists_gathered_once_match_loop(layout):
    """The torch ops with a KV group's heads on one list (one gather for the group, its heads
    scored as rows of one product), every bias layout, several queries, empty slots, and an
    infinite value row that only empty slots point at."""
    q, k, v, idx = make_case(14, N=2, per_query=False)
    idx = np.repeat(idx[:, ::2], 2, axis=1)  # (B, H, S): heads 2g and 2g+1 share a list
    idx = np.where(idx == 0, -1, idx)
    v[:, :, 0] = np.inf
    bias = make_bias(15, layout, N=2)
    args = [torch.from_numpy(x) for x in (q, k, v, idx)]
    out, lse = torch_backend.sparse_attention(*args, bias=torch.from_numpy(bias), return_lse=True)
    want, want_lse = loop_attention(q, k, v, idx, bias=bias)
    assert_close(out.numpy(), want, 1e-12)
    assert_close(lse.numpy(), want_lse, 1e-12, "lse")


@needs_nvcc
def test_cupy_bias_arguments_match_the_kernel_signature(tmp_path):
    ptx = tmp_path / "k.ptx"
    nvcc(SOURCE, ptx, "--ptx")
    params = ptx_params(ptx)
    q = np.zeros((1, 8, 1, 64), np.float32)
    k = v = np.zeros((1, 2, 4096, 64), np.float32)
    idx = np.broadcast_to(np.zeros((1, 8, 1, 400), np.int64), (1, 8, 1, 400))
    part_o, part_lse = np.zeros((8, 2, 64), np.float32), np.zeros((8, 2), np.float32)
    for bias in (np.zeros((1, 2, 400), np.float32), np.zeros((1, 8, 1, 400), np.float32)):
        args = cupy_sparse.sparse_arguments(
            q, k, v, idx, part_o, part_lse, chunk=200, n_splits=2, scale=0.125, bias=bias
        )
        assert [ptx_arg_type(a) for a in args] == params[cupy_sparse.kernel_name("float32")]
        assert args[4] is bias
        group = int(args[-2])
        assert group == (4 if bias.ndim == 3 else 1)  # H / Hkv for a bias per KV head


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("layout", BIAS_LAYOUTS)
def test_cupy_bias_matches_loop(layout):
    import cupy

    q, k, v, idx = make_case(14, per_query=layout == "query", S=300, M=500)
    bias = make_bias(15, layout, S=300)
    want, want_lse = loop_attention(q, k, v, idx, bias=bias)
    args = [cupy.asarray(x.astype(np.float32)) for x in (q, k, v)]
    out, lse = call_checked(
        cupy_backend, *args, cupy.asarray(idx), bias=cupy.asarray(bias), return_lse=True
    )
    assert_close(cupy.asnumpy(out), want, 2e-5)
    assert_close(cupy.asnumpy(lse), want_lse, 2e-5, "lse")
