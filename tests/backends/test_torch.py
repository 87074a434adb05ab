"""The torch backend against the float64 NumPy reference, torch autograd and its own contract.

Every expected value is independent of the code under test: the reference evaluated in float64
(``qkv.reference.core``), a plain float64 einsum/softmax written out below, finite differences
(``torch.autograd.gradcheck``), or a stated property (types, dtypes, untouched inputs).
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import qkv  # noqa: E402
from qkv import FallbackWarning, _dispatch  # noqa: E402
from qkv.backends import torch as backend  # noqa: E402
from qkv.reference import core  # noqa: E402

# (B, H, Hkv, N, M, D, Dv): one token, odd sizes, N > M, N < M, GQA ratios 1, 2 and 4.
SHAPES = {
    "one-token": (1, 1, 1, 1, 1, 8, 8),
    "odd": (2, 3, 3, 7, 5, 9, 11),
    "n>m": (1, 4, 2, 9, 4, 16, 16),
    "n<m": (2, 4, 1, 3, 10, 16, 8),
    "gqa1": (1, 4, 4, 6, 6, 8, 8),
    "gqa2": (1, 4, 2, 6, 6, 8, 8),
    "gqa4": (2, 4, 1, 6, 6, 8, 8),
}
MASKS = ["none", "bool", "additive"]
RETURNS = {"out": {}, "weights": {"return_weights": True}, "lse": {"return_lse": True}}
RETURNS["both"] = {"return_weights": True, "return_lse": True}


@pytest.fixture(autouse=True)
def _no_fallback(monkeypatch):
    """Every op here must run on the torch backend itself: a fallback is an error."""
    monkeypatch.delenv("QKV_BACKEND", raising=False)
    monkeypatch.setenv("QKV_STRICT", "1")
    _dispatch.reset_warnings()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        yield


def make_inputs(shape, dtype=torch.float64, seed=0, spread=1.0):
    """Random ``q (B, H, N, D)``, ``k (B, Hkv, M, D)``, ``v (B, Hkv, M, Dv)`` tensors."""
    B, H, Hkv, N, M, D, Dv = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, generator=g, dtype=torch.float64) * spread
    k = torch.randn(B, Hkv, M, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, M, Dv, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def make_mask(kind, shape, seed=1):
    """A mask broadcastable to ``(B, H, N, M)`` whose row 0 is fully masked (when ``N > 1``).

    ``bool``: True = attend, shape ``(B, 1, N, M)``; ``additive``: float64 ``(N, M)`` with finite
    biases and ``-inf`` entries.
    """
    if kind == "none":
        return None
    B, H, Hkv, N, M, D, Dv = shape
    rng = np.random.default_rng(seed)
    allowed = rng.random((B, 1, N, M)) < 0.7
    if N > 1:
        allowed[:, :, 0] = False
    if kind == "bool":
        return torch.from_numpy(allowed)
    bias = rng.normal(size=(N, M))
    bias[~allowed[0, 0]] = -np.inf
    return torch.from_numpy(bias)


def numpy_as(t, dtype):
    """A NumPy copy of tensor ``t`` in ``dtype``."""
    return t.detach().cpu().to(dtype).numpy()


def golden(name, q, k, v, mask=None, **kw):
    """The NumPy reference in float64 on the same values (results as NumPy arrays)."""
    if mask is not None and mask.dtype == torch.bool:
        m = mask.numpy()
    else:
        m = None if mask is None else numpy_as(mask, torch.float64)
    args = (numpy_as(t, torch.float64) for t in (q, k, v))
    return getattr(core, name)(*args, mask=m, **kw)


def as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def assert_close(actual, expected, rtol, atol):
    """Elementwise ``|a - e| <= atol + rtol |e|``, with equal infinities (lse) and no NaN."""
    a = actual.detach().cpu().to(torch.float64).numpy()
    assert not np.isnan(a).any(), "NaN in the result"
    np.testing.assert_allclose(a, expected, rtol=rtol, atol=atol)


TOL = {torch.float64: (1e-12, 1e-12), torch.float32: (2e-5, 2e-6)}


# ------------------------------------------------------------------------ sdpa and flash values


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_sdpa_matches_reference(shape, mask_kind, causal, dtype):
    q, k, v = make_inputs(shape, dtype)
    mask = make_mask(mask_kind, shape)
    out = backend.sdpa(q, k, v, mask=mask, causal=causal)
    assert out.dtype == dtype and out.shape == (*q.shape[:3], v.shape[-1])
    assert_close(out, golden("sdpa", q, k, v, mask, causal=causal), *TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("returns", RETURNS.values(), ids=RETURNS.keys())
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("shape", ["odd", "n>m", "gqa4"])
def test_sdpa_returns_match_reference(shape, mask_kind, causal, returns, dtype):
    shape = SHAPES[shape]
    q, k, v = make_inputs(shape, dtype, seed=3)
    mask = make_mask(mask_kind, shape)
    got = as_tuple(backend.sdpa(q, k, v, mask=mask, causal=causal, **returns))
    want = as_tuple(golden("sdpa", q, k, v, mask, causal=causal, **returns))
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, *TOL[dtype])
    if returns.get("return_lse"):
        assert got[-1].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    if returns.get("return_weights"):
        assert got[1].dtype == dtype


@pytest.mark.parametrize("returns", RETURNS.values(), ids=RETURNS.keys())
@pytest.mark.parametrize("mask_kind", MASKS)
def test_flash_torch_path_matches_reference(mask_kind, returns):
    """float64 never reaches the Triton kernel: flash runs the sdpa paths, same results."""
    shape = SHAPES["n>m"]
    q, k, v = make_inputs(shape, torch.float64, seed=4)
    mask = make_mask(mask_kind, shape)
    got = as_tuple(backend.flash(q, k, v, mask=mask, causal=True, block_q=2, block_k=3, **returns))
    want = as_tuple(golden("flash", q, k, v, mask, causal=True, **returns))
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, *TOL[torch.float64])


def test_scale_and_large_logits():
    """An explicit scale and logits of order 1e3 (a softmax close to one-hot) stay exact."""
    q, k, v = make_inputs(SHAPES["odd"], torch.float64, seed=5, spread=300.0)
    for fn in (backend.sdpa, backend.flash):
        got = fn(q, k, v, scale=0.7, return_lse=True)
        want = golden("sdpa", q, k, v, scale=0.7, return_lse=True)
        for g, w in zip(got, want, strict=True):
            assert_close(g, w, 1e-12, 1e-9)


def test_fully_masked_rows_are_zero():
    """Rows that see no key: zero output and weights, lse -inf, on every path (no NaN)."""
    shape = SHAPES["n>m"]
    q, k, v = make_inputs(shape, torch.float32)
    mask = make_mask("bool", shape)
    dead_mask = ~mask.any(-1)  # (B, 1, N): row 0, plus causal rows 0..N-M-1 below
    out = backend.sdpa(q, k, v, mask=mask)
    assert torch.all(out[dead_mask.expand(-1, q.shape[1], -1)] == 0)
    out, weights, lse = backend.sdpa(q, k, v, causal=True, return_weights=True, return_lse=True)
    N, M = q.shape[2], k.shape[2]
    assert torch.all(out[:, :, : N - M] == 0) and torch.all(weights[:, :, : N - M] == 0)
    assert (
        torch.all(torch.isneginf(lse[:, :, : N - M])) and torch.isfinite(lse[:, :, N - M :]).all()
    )


# ------------------------------------------------------------------------------- low precision


def low_precision_errors(got, q, k, v, mask, causal):
    """Max and norm-wise errors of ``got`` and of the reference in the same low precision.

    Both are measured against the float64 reference on the very same (rounded) inputs. The
    reference in low precision computes in float32 and rounds its output to the input dtype.
    """
    want = golden("sdpa", q, k, v, mask, causal=causal)
    m = None
    if mask is not None:
        m = mask.numpy() if mask.dtype == torch.bool else numpy_as(mask, torch.float32)
    args = (numpy_as(t, torch.float32) for t in (q, k, v))
    ref_low = torch.from_numpy(core.sdpa(*args, mask=m, causal=causal))
    ref_low = ref_low.to(q.dtype).to(torch.float64).numpy()  # the reference's own rounding
    err = np.abs(got.to(torch.float64).numpy() - want)
    ref_err = np.abs(ref_low - want)
    return (err.max(), np.linalg.norm(err)), (ref_err.max(), np.linalg.norm(ref_err))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("shape", ["odd", "n<m", "gqa2"])
def test_half_precision_within_reference_error(shape, mask_kind, dtype):
    """sdpa keeps fp16/bf16; its error is within 1.1x (+ eps) of the reference's own.

    (``flash``'s Triton kernel in fp16 has its own test in ``test_triton.py``.)
    """
    shape = SHAPES[shape]
    q, k, v = make_inputs(shape, dtype, seed=6, spread=2.0)
    mask = make_mask(mask_kind, shape)
    got = backend.sdpa(q, k, v, mask=mask, causal=True)
    assert got.dtype == dtype and not torch.isnan(got).any()
    (err_max, err_norm), (ref_max, ref_norm) = low_precision_errors(got, q, k, v, mask, True)
    eps = torch.finfo(dtype).eps
    assert err_max <= 1.1 * ref_max + eps
    assert err_norm <= 1.1 * ref_norm + eps


@pytest.mark.parametrize("kind", ["bool", "additive"])
@pytest.mark.parametrize("mask_shape", [(6,), (1, 6), (5, 1), (4, 5, 6), (2, 1, 1, 6)], ids=str)
def test_mask_broadcasting(mask_shape, kind):
    """Masks of any shape that broadcasts to ``(B, H, N, M)``, NumPy or torch, on both paths."""
    shape = (2, 4, 2, 5, 6, 8, 8)
    q, k, v = make_inputs(shape, torch.float64, seed=16)
    rng = np.random.default_rng(17)
    allowed = rng.random(mask_shape) < 0.6
    mask = allowed if kind == "bool" else np.where(allowed, rng.normal(size=mask_shape), -np.inf)
    for returns in ({}, {"return_lse": True}):
        got = as_tuple(qkv.sdpa(q, k, v, mask=mask, causal=True, backend="torch", **returns))
        want = as_tuple(golden("sdpa", q, k, v, torch.from_numpy(mask), causal=True, **returns))
        for g, w in zip(got, want, strict=True):
            assert_close(g, w, 1e-12, 1e-12)


# -------------------------------------------------------------------------------- gradients


def plain_attention(q, k, v, allowed, scale):
    """Float64 attention written out with einsum and softmax, for gradients.

    ``allowed`` (bool, broadcastable to ``(B, H, N, M)``) must leave every row at least one key.
    Grouped heads are expanded with ``repeat_interleave`` (head ``h`` reads ``h // G``).
    """
    G = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(G, dim=1)  # (B, H, M, D)
    v = v.repeat_interleave(G, dim=1)  # (B, H, M, Dv)
    s = torch.einsum("bhnd,bhmd->bhnm", q, k) * scale
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
    return (
        torch.einsum("bhnm,bhmd->bhnd", p, v),
        p,
        torch.logsumexp(s.masked_fill(~allowed, float("-inf")), -1),
    )


def allowed_pattern(mask, causal, N, M):
    """The bool ``(.., N, M)`` pattern of visible keys of a bool ``mask`` and ``causal``."""
    allowed = torch.ones(N, M, dtype=torch.bool) if mask is None else mask
    if causal:
        allowed = allowed & (torch.arange(M)[None, :] <= torch.arange(N)[:, None] + (M - N))
    return allowed


@pytest.mark.parametrize("returns", RETURNS.values(), ids=RETURNS.keys())
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("mask_kind", ["none", "bool"])
@pytest.mark.parametrize("shape", ["n>m", "gqa4"])
def test_gradients_match_plain_float64(shape, mask_kind, causal, returns):
    """float32 gradients of a random linear loss equal float64 autograd of the plain form.

    Rows that see no key contribute nothing (their outputs are constant zero), so the plain
    form is evaluated with those rows given every key and their outputs left out of the loss.
    """
    shape = SHAPES[shape]
    B, H, Hkv, N, M, D, Dv = shape
    q64, k64, v64 = make_inputs(shape, torch.float64, seed=7)
    mask = make_mask(mask_kind, shape)
    allowed = allowed_pattern(mask, causal, N, M).expand(B, H, N, M)
    live = allowed.any(-1)  # (B, H, N)
    g = torch.Generator().manual_seed(8)
    w_out = torch.randn(B, H, N, Dv, generator=g, dtype=torch.float64)
    w_p = torch.randn(B, H, N, M, generator=g, dtype=torch.float64)
    w_lse = torch.randn(B, H, N, generator=g, dtype=torch.float64)

    def loss(out, weights, lse):
        total = (out * w_out * live[..., None]).sum()
        if returns.get("return_weights"):
            total = total + (weights * w_p * live[..., None]).sum()
        if returns.get("return_lse"):
            total = total + (lse * w_lse * live).sum()
        return total

    q, k, v = (t.float().requires_grad_() for t in (q64, k64, v64))
    got = as_tuple(backend.sdpa(q, k, v, mask=mask, causal=causal, **returns))
    out = got[0]
    weights = got[1] if returns.get("return_weights") else None
    lse = got[-1] if returns.get("return_lse") else None
    loss(out.double(), None if weights is None else weights.double(), lse).backward()

    ref = [t.clone().requires_grad_() for t in (q64, k64, v64)]
    r_out, r_p, r_lse = plain_attention(*ref, allowed | ~live[..., None], D**-0.5)
    loss(r_out, r_p, r_lse).backward()
    for t, r in zip((q, k, v), ref, strict=True):
        assert torch.isfinite(t.grad).all()
        np.testing.assert_allclose(t.grad.double().numpy(), r.grad.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("returns", [{}, {"return_weights": True, "return_lse": True}])
@pytest.mark.parametrize("mask_kind", MASKS)
def test_gradcheck_float64(mask_kind, returns):
    """Analytic gradients agree with finite differences, fully masked rows and GQA included."""
    shape = (1, 4, 2, 5, 3, 4, 3)
    q, k, v = (t.requires_grad_() for t in make_inputs(shape, torch.float64, seed=9))
    mask = make_mask(mask_kind, shape)

    def fn(q, k, v):
        # lse is -inf on fully masked rows, a constant: compare it there as 0
        results = as_tuple(backend.sdpa(q, k, v, mask=mask, causal=True, **returns))
        return tuple(torch.nan_to_num(t, neginf=0.0) for t in results)

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_flash_keeps_autograd():
    """Inputs that require grad take flash's torch path, so gradients flow."""
    shape = (1, 2, 1, 3, 4, 4, 3)
    q, k, v = (t.requires_grad_() for t in make_inputs(shape, torch.float64, seed=10))
    assert torch.autograd.gradcheck(lambda *a: backend.flash(*a, causal=True), (q, k, v))


# ------------------------------------------------------------------------ rope


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("pairing", ["adjacent", "half"])
@pytest.mark.parametrize("positions", ["default", "offset", "1d", "2d"])
def test_rope_matches_reference(positions, pairing, dtype):
    B, H, N, D = 2, 3, 5, 8
    x = torch.randn(B, H, N, D, generator=torch.Generator().manual_seed(11), dtype=dtype)
    kw = {"pairing": pairing}
    if positions == "offset":
        kw["offset"] = 37
    elif positions == "1d":
        kw["positions"] = torch.tensor([4, 0, 9, 9, 1000])
    elif positions == "2d":
        kw["positions"] = torch.arange(B * N).reshape(B, N) * 13
    got = backend.rope(x, **kw)
    ref_kw = {k: (v.numpy() if torch.is_tensor(v) else v) for k, v in kw.items()}
    want = core.rope(x.to(torch.float64).numpy(), **ref_kw)
    assert got.dtype == dtype
    assert_close(got, want, *TOL[dtype])


@pytest.mark.parametrize("pairing", ["adjacent", "half"])
def test_rope_gradcheck(pairing):
    x = torch.randn(1, 2, 3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: backend.rope(x, offset=3, pairing=pairing), (x,))


# -------------------------------------------------------------- dispatch: types, dtypes, inputs


def test_numpy_in_numpy_out():
    q, k, v = (t.numpy() for t in make_inputs(SHAPES["gqa2"], torch.float32, seed=12))
    mask = make_mask("bool", SHAPES["gqa2"]).numpy()
    for op in (qkv.sdpa, qkv.flash):
        out, lse = op(q, k, v, mask=mask, causal=True, return_lse=True, backend="torch")
        assert isinstance(out, np.ndarray) and isinstance(lse, np.ndarray)
        assert out.dtype == np.float32 and lse.dtype == np.float32
        want = core.sdpa(
            *(a.astype(np.float64) for a in (q, k, v)), mask=mask, causal=True, return_lse=True
        )
        np.testing.assert_allclose(out, want[0], rtol=2e-5, atol=2e-6)
        np.testing.assert_allclose(lse, want[1], rtol=2e-5, atol=2e-6)
    x = q.astype(np.float64)
    np.testing.assert_allclose(qkv.rope(x, offset=2, backend="torch"), core.rope(x, offset=2))
    positions = np.array([[3, 1, 4, 1, 5, 9]])  # (B, N)
    got = qkv.rope(x, positions=positions, pairing="half", backend="torch")
    assert isinstance(got, np.ndarray)
    np.testing.assert_allclose(got, core.rope(x, positions=positions, pairing="half"))


def test_torch_in_torch_out_and_inputs_untouched():
    q, k, v = make_inputs(SHAPES["odd"], torch.float32, seed=13)
    mask = make_mask("additive", SHAPES["odd"])
    x = torch.randn(1, 2, 3, 4)  # an even head dim for rope
    saved = [t.clone() for t in (q, k, v, mask, x)]
    for op in (qkv.sdpa, qkv.flash):
        out, weights = op(q, k, v, mask=mask, return_weights=True, backend="torch")
        assert isinstance(out, torch.Tensor) and isinstance(weights, torch.Tensor)
        assert out.dtype == torch.float32 and weights.dtype == torch.float32
    with qkv.use_backend("torch"):
        qkv.sdpa(q, k, v, causal=True)
        assert isinstance(qkv.rope(x, offset=1), torch.Tensor)
    for t, s in zip((q, k, v, mask, x), saved, strict=True):
        assert torch.equal(t, s)


def test_numpy_inputs_untouched_and_read_only_accepted():
    q, k, v = (t.numpy() for t in make_inputs(SHAPES["n<m"], torch.float64, seed=14))
    saved = [a.copy() for a in (q, k, v)]
    for a in (q, k, v):
        a.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns on non-writable NumPy arrays
        out = qkv.sdpa(q, k, v, causal=True, backend="torch")
    np.testing.assert_allclose(out, core.sdpa(q, k, v, causal=True), rtol=1e-12, atol=1e-12)
    for a, s in zip((q, k, v), saved, strict=True):
        assert np.array_equal(a, s)


def test_non_contiguous_inputs():
    """Transposed views (as produced by a ``(B, N, H, D)`` projection) give the same result."""
    q, k, v = make_inputs(SHAPES["gqa4"], torch.float64, seed=15)
    qt, kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert not qt.is_contiguous()
    for fn in (backend.sdpa, backend.flash):
        assert_close(
            fn(qt, kt, vt, causal=True), golden("sdpa", q, k, v, causal=True), 1e-12, 1e-12
        )


def test_import_without_torch():
    """``import qkv.backends.torch`` works when torch is missing, and says how to get it."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import qkv.backends.torch as b\n"
        "ok, reason = b.available()\n"
        "assert not ok and 'pip install' in reason, reason\n"
        "assert 'triton' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("shape", ["n>m", "n<m", "gqa4"])
def test_cuda_sdpa(shape, mask_kind, dtype):
    """On a GPU torch's fused kernels differ from the CPU's: same results, finite gradients."""
    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU (make gpu-check)")
    shape = SHAPES[shape]
    q, k, v = (t.cuda().requires_grad_() for t in make_inputs(shape, dtype, seed=18))
    mask = make_mask(mask_kind, shape)  # a CPU mask: the backend moves it to the GPU
    out, lse = backend.sdpa(q, k, v, mask=mask, causal=True, return_lse=True)
    fused = backend.sdpa(q, k, v, mask=mask, causal=True)
    assert out.dtype == fused.dtype == dtype and out.is_cuda and fused.is_cuda
    (fused.float().sum() + out.float().sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    cpu = tuple(t.detach().cpu() for t in (q, k, v))
    want, want_lse = golden("sdpa", *cpu, mask, causal=True, return_lse=True)
    np.testing.assert_array_equal(np.isneginf(lse.cpu().numpy()), np.isneginf(want_lse))
    if dtype == torch.float32:  # TF32 may be on for the fused kernels' products
        for got in (out, fused):
            assert_close(got, want, 2e-3, 2e-3)
        return
    for got in (out, fused):
        errors, ref_errors = low_precision_errors(got.detach().cpu(), *cpu, mask, True)
        # torch's GPU kernels may round P (or the whole softmax) to the input dtype, unlike
        # the reference; a wrong mask, alignment or head mapping would be off by O(1) anyway
        assert errors[1] <= 4.0 * ref_errors[1] + torch.finfo(dtype).eps
