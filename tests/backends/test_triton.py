"""The Triton flash kernel against the float64 NumPy reference.

On the CPU the kernel runs under the Triton interpreter (``TRITON_INTERPRET=1``, set by
``conftest.py``); the ``cuda`` variants are marked ``gpu`` and run where ``make gpu-check`` sets
``QKV_GPU=1`` on a machine with an NVIDIA GPU, bfloat16 included. Each test first asserts that
the kernel, not the torch fallback path, is what runs.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from _helpers import triton_device_or_skip  # noqa: E402

from qkv import _outputs  # noqa: E402
from qkv.backends.torch import _attention, flash  # noqa: E402
from qkv.reference import core  # noqa: E402

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]

# (B, H, Hkv, N, M, D, Dv, causal): one query token, odd N/M both ways with causal (including
# rows that see no key when N > M), grouped heads 2 and 4, value dim != key dim.
CASES = {
    "decode": (1, 2, 1, 1, 9, 16, 16, False),
    "decode-causal": (1, 2, 2, 1, 9, 16, 16, True),
    "odd": (2, 3, 3, 7, 19, 16, 16, False),
    "causal-n<m": (1, 4, 2, 13, 37, 16, 16, True),
    "causal-n>m": (1, 2, 1, 21, 6, 16, 16, True),
    "causal-square": (1, 4, 1, 33, 33, 16, 24, True),
}
HEAD_DIMS = [16, 24, 64, 256]


def make_inputs(shape, dtype, device, seed=0):
    B, H, Hkv, N, M, D, Dv = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, generator=g) * 1.5
    k = torch.randn(B, Hkv, M, D, generator=g)
    v = torch.randn(B, Hkv, M, Dv, generator=g)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


def golden(q, k, v, **kw):
    """The reference in float64 on the same (already rounded) values."""
    return core.sdpa(*(t.cpu().to(torch.float64).numpy() for t in (q, k, v)), **kw)


def run_kernel(q, k, v, **kw):
    """``flash`` with poisoned outputs, after checking that it takes the Triton kernel."""
    assert _attention.kernel_applies(q, k, v, mask=None, return_weights=False)
    with _outputs.poisoned():
        return flash(q, k, v, return_lse=True, **kw)


def check(out, lse, q, k, v, causal):
    """float32: close to float64. fp16/bf16: error at most 1.5x (norm) / 2.5x (max) that of the
    reference evaluated in the same precision (it computes in float32 and rounds its output),
    plus one rounding step; lse is float32 either way. Equal -inf where rows see no key."""
    want, want_lse = golden(q, k, v, causal=causal, return_lse=True)
    got = out.cpu().to(torch.float64).numpy()
    got_lse = lse.cpu().numpy()
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert not np.isnan(got).any() and not np.isnan(got_lse).any()
    np.testing.assert_array_equal(np.isneginf(got_lse), np.isneginf(want_lse))
    finite = np.isfinite(want_lse)
    np.testing.assert_allclose(got_lse[finite], want_lse[finite], rtol=1e-5, atol=1e-5)
    if q.dtype == torch.float32:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        return
    as32 = (t.cpu().to(torch.float32).numpy() for t in (q, k, v))
    ref_low = torch.from_numpy(core.sdpa(*as32, causal=causal)).to(q.dtype).double().numpy()
    err, ref_err = np.abs(got - want), np.abs(ref_low - want)
    eps = torch.finfo(q.dtype).eps
    assert np.linalg.norm(err) <= 1.5 * np.linalg.norm(ref_err) + eps
    assert err.max() <= 2.5 * ref_err.max() + eps


def half_dtypes(device):
    return [torch.float16] + ([torch.bfloat16] if device == "cuda" else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_kernel_matches_reference(case, device):
    device = triton_device_or_skip(device, "flash")
    *shape, causal = case
    for dtype in [torch.float32, *half_dtypes(device.type)]:
        q, k, v = make_inputs(shape, dtype, device)
        out, lse = run_kernel(q, k, v, causal=causal, block_q=16, block_k=16)
        check(out, lse, q, k, v, causal)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_head_dims(head_dim, device):
    """Head dims 16-256, padded to a power of two (24 -> 32) with masking."""
    device = triton_device_or_skip(device, "flash")
    shape = (1, 2, 1, 3, 5, head_dim, head_dim)
    for dtype in [torch.float32, *half_dtypes(device.type)]:
        q, k, v = make_inputs(shape, dtype, device, seed=head_dim)
        out, lse = run_kernel(q, k, v, causal=True)
        check(out, lse, q, k, v, causal=True)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_inputs_and_scale(device):
    """Non-contiguous views (a ``(B, N, H, D)`` projection transposed) and an explicit scale."""
    device = triton_device_or_skip(device, "flash")
    shape = (2, 4, 2, 9, 12, 16, 16)
    q, k, v = (
        t.transpose(1, 2).contiguous().transpose(1, 2)
        for t in make_inputs(shape, torch.float32, device, seed=3)
    )
    assert not q.is_contiguous()
    out, lse = run_kernel(q, k, v, scale=0.3, block_q=16, block_k=16)
    want, want_lse = golden(q, k, v, scale=0.3, return_lse=True)
    np.testing.assert_allclose(out.cpu().numpy(), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse.cpu().numpy(), want_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "shape", [(2, 8, 2, 300, 517, 128, 128), (1, 4, 4, 257, 129, 256, 256)], ids=["d128", "d256"]
)
def test_gpu_larger_shapes(shape, dtype):
    """Several full tiles per program with the default block sizes on a real GPU."""
    device = triton_device_or_skip("cuda", "flash")
    q, k, v = make_inputs(shape, dtype, device, seed=5)
    out, lse = run_kernel(q, k, v, causal=True)
    check(out, lse, q, k, v, causal=True)


def test_other_cases_take_the_torch_path():
    """Masks, weights, autograd and bfloat16 on the CPU run torch's path, with the same results."""
    triton_device_or_skip("cpu", "flash")
    shape = (1, 2, 1, 5, 7, 16, 16)
    q, k, v = make_inputs(shape, torch.float32, "cpu", seed=6)
    mask = torch.rand(5, 7, generator=torch.Generator().manual_seed(7)) < 0.6

    def applies(q, k, v, mask=None, return_weights=False):
        return _attention.kernel_applies(q, k, v, mask=mask, return_weights=return_weights)

    assert applies(q, k, v) and not applies(q, k, v, mask=mask)
    assert not applies(q, k, v, return_weights=True)
    qg = q.clone().requires_grad_()
    assert not applies(qg, k, v)
    with torch.no_grad():
        assert applies(qg, k, v)
    qb, kb, vb = (t.to(torch.bfloat16) for t in (q, k, v))
    assert not applies(qb, kb, vb)
    wide = torch.zeros(1, 2, 7, 512)
    assert not applies(q, k, wide)

    out, weights = flash(q, k, v, mask=mask, return_weights=True)
    want, want_weights = golden(q, k, v, mask=mask.numpy(), return_weights=True)
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(weights.numpy(), want_weights, rtol=1e-5, atol=1e-6)
    flash(qg, k, v, causal=True).sum().backward()
    assert qg.grad is not None and torch.isfinite(qg.grad).all()
    out_b = flash(qb, kb, vb, causal=True)
    assert out_b.dtype == torch.bfloat16 and torch.isfinite(out_b).all()


def test_launch_halves_the_larger_tile_until_the_kernel_fits():
    """The shared launcher's OutOfResources retry: the larger tile (BLOCK_K on a tie) halves,
    down to 16 each; grid and constexprs follow the tiles tried."""
    from triton.runtime.errors import OutOfResources

    from qkv.backends.torch.triton.flash import launch

    tried = []

    class Kernel:  # stands in for a @triton.jit function; fails above `limit` tile rows
        def __init__(self, limit):
            self.limit = limit

        def __getitem__(self, grid):
            def run(*args, **kw):
                tried.append((grid, kw["BLOCK_Q"], kw["BLOCK_K"], kw["BLOCK_D"], kw["BLOCK_DV"]))
                assert args == ("a", 1) and kw["CAUSAL"] is True and kw["PRECISION"] == "ieee"
                if kw["BLOCK_Q"] + kw["BLOCK_K"] > self.limit:
                    raise OutOfResources(1, 0, "shared memory")

            return run

    q = torch.zeros(2, 3, 100, 20)
    launch(Kernel(48), q, 70, 40, ("a", 1), block_q=64, block_k=64, CAUSAL=True)
    assert [t[1:3] for t in tried] == [(64, 64), (64, 32), (32, 32), (32, 16)]
    assert [t[0] for t in tried] == [(2 * 6,)] * 2 + [(4 * 6,)] * 2
    assert {t[3:] for t in tried} == {(32, 64)}
    tried.clear()
    with pytest.raises(OutOfResources):
        launch(Kernel(0), q[:, :, :10], 5, 40, ("a", 1), block_q=16, block_k=16, CAUSAL=True)
    assert [t[1:3] for t in tried] == [(16, 16)]
