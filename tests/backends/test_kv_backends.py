"""The KV-cache ops (``quantize``, ``dequantize``, ``window_scores``, ``mixed_attention``) on
every backend against independent computations.

* numba: codes equal to a float64 loop's wherever rounding cannot move them (and bit-equal to
  the reference in both dtypes), dequantisation, window votes and mixed attention against
  loops, half precision declined;
* torch: the Triton kernels under the interpreter called directly (packing, unpacking, window
  votes, mixed attention), the torch-ops path with autograd, the dispatch;
* cupy: ``kv.cu`` compiled with ``nvcc -arch=sm_90``, each launcher's arguments checked against
  the PTX signature; ``gpu`` tests compare it with the loops where a GPU is lent (compiled, not
  yet run on a GPU);
* the conformance kit's drawn cases (``qkv.testing.ops_kv``) on numba and torch.
"""

from __future__ import annotations

import numpy as np
import pytest
from _helpers import needs_nvcc, nvcc, ptx_arg_type, ptx_params, triton_device_or_skip

import qkv
from qkv import _outputs
from qkv.backends import cupy as cupy_backend
from qkv.backends import numba as numba_backend
from qkv.backends.cupy import _kv as cupy_kv
from qkv.backends.cupy._launch import KERNEL_DIR
from qkv.errors import Unsupported

CONFIGS = [(b, a, g) for b in (2, 4, 8) for a, g in (("token", None), ("token", 3), ("channel", 2))]


def loop_quantize(x, bits, axis, group):
    """Float64 loops over groups: codes (int), scales, zeros, and where a code sits within 1e-6
    of a rounding boundary (there a float32 kernel may round either way)."""
    B, H, N, D = x.shape
    L = 2**bits - 1
    gn, gd = (1, group or D) if axis == "token" else (group or N, 1)
    codes = np.zeros(x.shape, dtype=np.int64)
    near = np.zeros(x.shape, dtype=bool)
    scale = np.zeros((B, H, N // gn, D // gd))
    zero = np.zeros_like(scale)
    for b, h, i, j in np.ndindex(*scale.shape):
        block = x[b, h, i * gn : (i + 1) * gn, j * gd : (j + 1) * gd].astype(np.float64)
        lo, hi = block.min(), block.max()
        s = (hi - lo) / L
        scale[b, h, i, j], zero[b, h, i, j] = s, lo
        for (r, c), val in np.ndenumerate(block):
            t = 0.0 if s == 0 else (val - lo) / s
            codes[b, h, i * gn + r, j * gd + c] = min(L, int(np.floor(t + 0.5)))
            near[b, h, i * gn + r, j * gd + c] = abs(t + 0.5 - round(t + 0.5)) < 1e-4
    return codes, scale, zero, near


def unpack_loop(packed, bits, D):
    per = 8 // bits
    out = np.zeros((*packed.shape[:-1], D), dtype=np.int64)
    for idx in np.ndindex(*packed.shape[:-1]):
        for d in range(D):
            out[(*idx, d)] = (int(packed[(*idx, d // per)]) >> (d % per * bits)) & (2**bits - 1)
    return out


def window_loop(q, k, idx, n, kernel, pooling, scale=None):
    """Per query head in float64: causal softmax, column sums over the window, pooling."""
    B, H, W, D = q.shape
    Hkv, C = k.shape[1:3]
    scale = D**-0.5 if scale is None else scale
    out = np.full((B, H, C), -np.inf)
    for b, h in np.ndindex(B, H):
        g = h // (H // Hkv)
        votes = np.zeros(C)
        for i in range(W):
            seen = (idx[b, g] >= 0) & (idx[b, g] <= n - W + i)
            if not seen.any():
                continue
            s = scale * (k[b, g].astype(np.float64) @ q[b, h, i].astype(np.float64))
            p = np.where(seen, np.exp(np.where(seen, s, -np.inf) - s[seen].max()), 0.0)
            votes += p / p.sum()
        prefix = (idx[b, g] >= 0) & (idx[b, g] < n - W)
        for j in np.flatnonzero(prefix):
            near = [t for t in range(j - kernel // 2, j + kernel // 2 + 1) if 0 <= t < C]
            vals = [votes[t] for t in near if prefix[t]]
            out[b, h, j] = sum(vals) / kernel if pooling == "avgpool" else max(vals)
    return out


def mixed_loop(q, k, v, kc, ks, kz, vc, vs, vz, bits, scale=None):
    """Dequantise by unpacking bit by bit, then softmax attention per row, in float64."""
    D, Dv = q.shape[3], v.shape[3]

    def deq(codes, s, z, dim):
        c = unpack_loop(codes, bits, dim)
        gn, gd = codes.shape[2] // s.shape[2], dim // s.shape[3]
        s = np.repeat(np.repeat(s.astype(np.float64), gn, 2), gd, 3)
        return c * s + np.repeat(np.repeat(z.astype(np.float64), gn, 2), gd, 3)

    keys = np.concatenate([deq(kc, ks, kz, D), k.astype(np.float64)], axis=2)
    vals = np.concatenate([deq(vc, vs, vz, Dv), v.astype(np.float64)], axis=2)
    B, H, N, _ = q.shape
    group = H // k.shape[1]
    scale = D**-0.5 if scale is None else scale
    out, lse = np.zeros((B, H, N, Dv)), np.zeros((B, H, N))
    for b, h, i in np.ndindex(B, H, N):
        s = scale * keys[b, h // group] @ q[b, h, i].astype(np.float64)
        w = np.exp(s - s.max())
        out[b, h, i] = w @ vals[b, h // group] / w.sum()
        lse[b, h, i] = s.max() + np.log(w.sum())
    return out, lse


def window_case(seed, dtype=np.float64, *, B=2, H=4, Hkv=2, W=4, C=23, D=8):
    rng = np.random.default_rng(seed)
    q = (2 * rng.standard_normal((B, H, W, D))).astype(dtype)
    k = rng.standard_normal((B, Hkv, C, D)).astype(dtype)
    idx = np.broadcast_to(np.arange(C), (B, Hkv, C)).copy()
    idx[rng.random(idx.shape) < 0.2] = -1
    idx[0, 1] = -1  # a KV head with an empty cache
    return q, k, idx


def mixed_case(seed, dtype=np.float64, *, bits=4, kax="channel", vax="token", Mq=13, Mf=7):
    rng = np.random.default_rng(seed)
    B, H, Hkv, N, D, Dv = 2, 4, 2, 3, 10, 6
    q = (2 * rng.standard_normal((B, H, N, D))).astype(dtype)
    k = rng.standard_normal((B, Hkv, Mf, D)).astype(dtype)
    v = rng.standard_normal((B, Hkv, Mf, Dv)).astype(dtype)
    group_k = 1 if kax == "channel" else 5  # channel groups of 5 for token-wise keys
    kq = qkv.quantize(rng.standard_normal((B, Hkv, Mq, D)).astype(dtype), bits=bits, axis=kax,
                      group_size=None if kax == "channel" else group_k)  # fmt: skip
    vq = qkv.quantize(rng.standard_normal((B, Hkv, Mq, Dv)).astype(dtype), bits=bits, axis=vax)
    return (q, k, v, *kq, *vq), {"bits": bits, "key_axis": kax, "value_axis": vax}


def assert_scores(got, want, tol):
    got = np.asarray(got, dtype=np.float64)
    assert not np.isnan(got).any()
    assert (np.isneginf(got) == np.isneginf(want)).all(), "-inf in the wrong places"
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=tol, atol=tol)


# --------------------------------------------------------------------------- numba

needs_numba = pytest.mark.skipif(
    not numba_backend.available()[0], reason=f"numba: {numba_backend.available()[1]}"
)


@needs_numba
@pytest.mark.parametrize(("bits", "axis", "group"), CONFIGS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["fp32", "fp64"])
def test_numba_quantize_codes_and_dequantize(bits, axis, group, dtype):
    x = np.random.default_rng(bits).standard_normal((2, 3, 6, 9)).astype(dtype)
    x[0, 0, 2] = 0.5  # a constant token: scale 0 where groups are per token
    with _outputs.poisoned():
        packed, scale, zero = numba_backend.quantize(x, bits=bits, axis=axis, group_size=group)
    codes, s, z, near = loop_quantize(x, bits, axis, group)
    got = unpack_loop(packed, bits, 9)
    assert (got == codes)[~near].all() and scale.dtype == zero.dtype == dtype
    np.testing.assert_allclose(scale, s, rtol=1e-6)
    np.testing.assert_array_equal(zero, z)
    for a, b in zip(
        (packed, scale, zero), qkv.quantize(x, bits=bits, axis=axis, group_size=group), strict=True
    ):
        np.testing.assert_array_equal(a, b)  # the reference's arithmetic, step for step
    with _outputs.poisoned():
        x_hat = numba_backend.dequantize(packed, scale, zero, bits=bits, axis=axis, dim=9)
    gn, gd = x.shape[2] // s.shape[2], 9 // s.shape[3]
    want = got * np.repeat(np.repeat(scale, gn, 2), gd, 3) + np.repeat(
        np.repeat(zero, gn, 2), gd, 3
    )
    np.testing.assert_allclose(x_hat, want, rtol=1e-6, atol=1e-6)  # c s + z may cancel
    assert x_hat.dtype == dtype


@needs_numba
@pytest.mark.parametrize("pooling", ["avgpool", "maxpool"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["fp32", "fp64"])
def test_numba_window_scores_match_loop(pooling, dtype):
    q, k, idx = window_case(1, dtype)
    with _outputs.poisoned():
        got = numba_backend.window_scores(q, k, idx, n_tokens=25, kernel=5, pooling=pooling)
    assert got.dtype == dtype
    assert_scores(
        got, window_loop(q, k, idx, 25, 5, pooling), 2e-6 if dtype == np.float32 else 1e-12
    )


@needs_numba
@pytest.mark.parametrize(
    ("bits", "kax", "vax"),
    [(2, "channel", "token"), (4, "token", "channel"), (8, "channel", "token")],
)
def test_numba_mixed_attention_matches_loop(bits, kax, vax):
    for dtype, tol in ((np.float64, 1e-12), (np.float32, 2e-5)):
        args, kw = mixed_case(bits, dtype, bits=bits, kax=kax, vax=vax)
        out, lse = numba_backend.mixed_attention(*args, **kw, scale=0.3, return_lse=True)
        want, want_lse = mixed_loop(*args, bits, scale=0.3)
        assert out.dtype == lse.dtype == dtype
        np.testing.assert_allclose(out, want, rtol=tol, atol=tol)
        np.testing.assert_allclose(lse, want_lse, rtol=tol, atol=tol)


@needs_numba
def test_numba_declines_half_precision():
    q, k, idx = window_case(0, np.float16)
    with pytest.raises(Unsupported, match="float32 and float64"):
        numba_backend.window_scores(q, k, idx)
    with pytest.raises(Unsupported, match="float32 and float64"):
        numba_backend.quantize(q)


@needs_numba
def test_snapkv_through_the_numba_backend_keeps_the_same_tokens():
    """The policy calls the dispatched op: under numba it keeps what the reference keeps."""
    from qkv.reference.kv import CacheView, SnapKV

    rng = np.random.default_rng(3)
    n, idx = 40, np.broadcast_to(np.arange(40), (1, 2, 40)).copy()
    view = CacheView(
        keys=rng.standard_normal((1, 2, n, 8)), values=rng.standard_normal((1, 2, n, 8)),
        indices=idx, positions=idx.copy(), next_position=np.full((1, 2), n), n_tokens=n,
        queries=2 * rng.standard_normal((1, 4, n, 8)),
    )  # fmt: skip
    policy = SnapKV(budget=16, window=4, kernel=5)
    want = policy.compress(0, view).indices
    with qkv.use_backend("numba"):
        np.testing.assert_array_equal(policy.compress(0, view).indices, want)


# --------------------------------------------------------------------------- torch / Triton

torch = pytest.importorskip("torch")

from qkv.backends import torch as torch_backend  # noqa: E402

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def on(device, *arrays):
    return [torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in arrays]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("bits", "axis", "group"), CONFIGS[::2])
def test_triton_pack_and_unpack(device, bits, axis, group):
    device = triton_device_or_skip(device, "kv")
    from qkv.backends.torch.triton.kv import dequantize_forward, pack_forward

    x = np.random.default_rng(bits).standard_normal((2, 2, 6, 9)).astype(np.float32)
    packed, scale, zero = qkv.quantize(x, bits=bits, axis=axis, group_size=group)
    got = pack_forward(*on(device, x, scale, zero), bits=bits).cpu().numpy()
    np.testing.assert_array_equal(got, packed)  # IEEE division: the reference's codes
    x_hat = dequantize_forward(*on(device, packed, scale, zero), bits=bits, dim=9)
    np.testing.assert_allclose(x_hat.cpu().numpy(), qkv.dequantize(packed, scale, zero,
                               bits=bits, axis=axis, dim=9), rtol=1e-6, atol=1e-6)  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
def test_triton_window_votes_and_pooling(device):
    device = triton_device_or_skip(device, "kv")
    q, k, idx = window_case(2, np.float32, C=70)  # more slots than one tile
    for pooling in ("avgpool", "maxpool"):
        got = torch_backend.window_scores(*on(device, q, k, idx), n_tokens=72, pooling=pooling)
        assert got.dtype == torch.float32
        assert_scores(got.cpu().numpy(), window_loop(q, k, idx, 72, 5, pooling), 2e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("bits", "kax"), [(2, "channel"), (4, "token"), (8, "channel")])
def test_triton_mixed_attention(device, bits, kax):
    device = triton_device_or_skip(device, "kv")
    from qkv.backends.torch.triton.kv import mixed_forward

    args, kw = mixed_case(4, np.float32, bits=bits, kax=kax, Mq=37)  # three slot tiles
    want, want_lse = mixed_loop(*args, bits, scale=0.5)
    out, lse = mixed_forward(*on(device, *args), bits=bits, scale=0.5)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    np.testing.assert_allclose(out.cpu().numpy(), want, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(lse.cpu().numpy(), want_lse, rtol=2e-5, atol=2e-5)


def test_torch_ops_path_with_autograd_and_float64():
    """float64 tensors take the torch operations (no kernel), gradients flow to q, k, v."""
    args, kw = mixed_case(5, np.float64, Mf=4)
    want, _ = mixed_loop(*args, 4)
    t = [torch.from_numpy(a) for a in args]
    for x in t[:3]:
        x.requires_grad_()
    out = torch_backend.mixed_attention(*t, **kw)
    np.testing.assert_allclose(out.detach().numpy(), want, rtol=1e-12, atol=1e-12)
    out.sum().backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in t[:3])
    q, k, idx = window_case(6)
    got = torch_backend.window_scores(*(torch.from_numpy(a) for a in (q, k, idx)), kernel=3)
    assert_scores(got.numpy(), window_loop(q, k, idx, int(idx.max()) + 1, 3, "avgpool"), 1e-12)


def test_dispatch_returns_tensors():
    x = torch.randn(1, 2, 5, 8)
    packed, scale, zero = qkv.quantize(x, bits=4, backend="torch")
    assert packed.dtype == torch.uint8 and isinstance(scale, torch.Tensor)
    back = qkv.dequantize(packed, scale, zero, bits=4, backend="torch")
    assert back.shape == x.shape and (back - x).abs().max() <= scale.max() / 2 + 1e-6


# --------------------------------------------------------------------------- cupy

CUPY_OK, CUPY_WHY = cupy_backend.available()
requires_gpu = pytest.mark.skipif(not CUPY_OK, reason=f"cupy backend: {CUPY_WHY}")


@needs_nvcc
def test_cupy_arguments_match_the_kernel_signatures(tmp_path):
    """Each launcher packs exactly the parameter types of its entry point in ``kv.cu``."""
    ptx = tmp_path / "kv.ptx"
    nvcc(KERNEL_DIR / "kv.cu", ptx, "--ptx")
    params = ptx_params(ptx)
    x = np.zeros((1, 2, 6, 9), np.float32)
    s = z = np.zeros((1, 2, 3, 9), np.float32)
    packed = np.zeros((1, 2, 6, 5), np.uint8)
    groups = {"group_n": 2, "group_d": 1, "bits": 4}
    calls = {
        "qkv_kv_minmax_f32": cupy_kv.minmax_arguments(x, s, z, **groups),
        "qkv_kv_pack_f32": cupy_kv.pack_arguments(x, s, z, packed, **groups),
    }
    for element in ("f32", "f16"):
        calls[f"qkv_kv_unpack_{element}"] = cupy_kv.unpack_arguments(packed, s, z, x, bits=4)
        q, k, idx = window_case(0, np.float32)
        votes = np.zeros((2, 4, 23), np.float32)
        calls[f"qkv_kv_window_{element}"] = cupy_kv.window_arguments(
            q, k, idx, votes, n_tokens=25, scale=0.3
        )
        args, _ = mixed_case(0, np.float32)
        out, lse = np.zeros((2, 4, 3, 6), np.float32), np.zeros((2, 4, 3), np.float32)
        calls[f"qkv_kv_mixed_{element}"] = cupy_kv.mixed_arguments(
            *args, out, lse, bits=4, scale=1.0
        )
    assert set(calls) == set(params)
    for name, args in calls.items():
        assert [ptx_arg_type(a) for a in args] == params[name], name


@pytest.mark.parametrize("pooling", ["avgpool", "maxpool"])
@pytest.mark.parametrize("kernel", [1, 3, 7])
def test_cupy_pooling_equals_the_reference_in_numpy(pooling, kernel):
    from qkv.reference.kv.window_scoring import pool1d

    rng = np.random.default_rng(kernel)
    votes = rng.random((2, 3, 20)).astype(np.float32)
    prefix = rng.random((2, 3, 20)) < 0.7
    got = cupy_kv.pool_votes(votes, prefix, kernel, pooling, np)
    want = np.where(prefix, pool1d(np.where(prefix, votes, -np.inf), kernel, pooling), -np.inf)
    assert got.dtype == np.float32
    assert_scores(got, want, 1e-6)


def test_cupy_declines_what_the_kernels_cannot_do():
    with pytest.raises(Unsupported, match="takes float32"):
        cupy_kv.kernel_name("pack", "float16")
    with pytest.raises(Unsupported, match="float16 and float32"):
        cupy_kv.kernel_name("mixed", "float64")
    assert cupy_kv.blocks(129) == (2, 1, 1) and cupy_kv.blocks(5, cupy_kv.WARPS) == (2, 1, 1)


@pytest.mark.gpu
@requires_gpu
def test_cupy_matches_the_loops():
    import cupy

    x = np.random.default_rng(0).standard_normal((2, 2, 6, 9)).astype(np.float32)
    for bits, axis, group in CONFIGS:
        want = qkv.quantize(x, bits=bits, axis=axis, group_size=group)
        got = cupy_backend.quantize(cupy.asarray(x), bits=bits, axis=axis, group_size=group)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(cupy.asnumpy(a), b)
        back = cupy_backend.dequantize(*got, bits=bits, axis=axis, dim=9)
        np.testing.assert_allclose(cupy.asnumpy(back), qkv.dequantize(*want, bits=bits,
                                   axis=axis, dim=9), rtol=1e-6, atol=1e-6)  # fmt: skip
    q, k, idx = window_case(1, np.float32, C=300)
    for pooling in ("avgpool", "maxpool"):
        got = cupy_backend.window_scores(*map(cupy.asarray, (q, k, idx)), pooling=pooling)
        want = window_loop(q, k, idx, int(idx.max()) + 1, 5, pooling)
        assert_scores(cupy.asnumpy(got), want, 2e-5)
    for bits, kax in ((2, "channel"), (4, "token"), (8, "channel")):
        args, kw = mixed_case(2, np.float32, bits=bits, kax=kax, Mq=70)
        out, lse = cupy_backend.mixed_attention(*map(cupy.asarray, args), **kw, return_lse=True)
        want, want_lse = mixed_loop(*args, bits)
        np.testing.assert_allclose(cupy.asnumpy(out), want, rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(cupy.asnumpy(lse), want_lse, rtol=2e-5, atol=2e-5)


# --------------------------------------------------------------------------- conformance kit


@pytest.mark.parametrize(
    ("backend", "examples", "dtypes"),
    [("numba", 25, ("float32",)), ("torch", 4, ("float32",))],
)
def test_conformance_kit(backend, examples, dtypes):
    """The kit's drawn cases (under ``TRITON_INTERPRET=1`` torch runs the Triton kernels)."""
    from qkv.testing import check_backend

    ops = ["quantize", "dequantize", "window_scores", "mixed_attention"]
    report = check_backend(backend, ops=ops, max_examples=examples, dtypes=dtypes)
    assert report.ok, report
