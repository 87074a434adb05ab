"""FFNified attention (MetaMixer / FFNet): convolutions checked against loops and torch, the
RepVGG fusion against the unfused branches, and translation equivariance away from borders."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qkv.errors import DTypeError, ShapeError
from qkv.reference.forms import ffnified_mixer as ff


def loop_depthwise(x, kernel):
    """Depth-wise cross-correlation with zero padding, one output element at a time."""
    B, C, H, W = x.shape
    k = kernel.shape[-1]
    p = k // 2
    out = np.zeros((B, C, H, W))
    for b, c, i, j in np.ndindex(B, C, H, W):
        total = 0.0
        for u in range(k):
            for v in range(k):
                r, s = i + u - p, j + v - p
                if 0 <= r < H and 0 <= s < W:
                    total += kernel[c, u, v] * x[b, c, r, s]
        out[b, c, i, j] = total
    return out


@pytest.mark.parametrize(("shape", "k"), [((1, 1, 1, 1), 3), ((2, 3, 5, 4), 3), ((1, 2, 6, 9), 7)])
def test_depthwise_equals_a_loop(shape, k):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape)
    kernel = rng.standard_normal((shape[1], k, k))
    np.testing.assert_allclose(
        ff.depthwise_conv2d(x, kernel), loop_depthwise(x, kernel), atol=1e-12
    )


def test_depthwise_equals_torch_conv2d():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    x, kernel = rng.standard_normal((2, 4, 11, 8)), rng.standard_normal((4, 7, 7))
    want = torch.nn.functional.conv2d(
        torch.from_numpy(x), torch.from_numpy(kernel)[:, None], padding=3, groups=4
    ).numpy()
    np.testing.assert_allclose(ff.depthwise_conv2d(x, kernel), want, atol=1e-12)


def test_gelu_is_the_exact_one():
    x = np.linspace(-5, 5, 101)
    want = [v * 0.5 * (1 + math.erf(v / math.sqrt(2))) for v in x]
    np.testing.assert_allclose(ff.gelu(x), want, atol=1e-15)
    assert ff.gelu(x.astype(np.float32)).dtype == np.float32


def test_fused_rep_branches_equal_the_two_branches():
    rng = np.random.default_rng(2)
    rep = ff.init_mixer(5, rng=rng).key
    assert isinstance(rep, ff.RepDW)
    x = rng.standard_normal((2, 5, 9, 10))
    fused = ff.fuse_rep(rep)
    assert fused.kernel.shape == (5, 7, 7)
    np.testing.assert_allclose(fused(x), rep(x), atol=1e-12)


@pytest.mark.parametrize(("ks1", "ks2"), [(7, 7), (3, 3), (3, 7)])
def test_fused_mixer_and_block_equal_unfused(ks1, ks2):
    rng = np.random.default_rng(3)
    block = ff.init_block(6, ks1=ks1, ks2=ks2, rng=rng)
    x = rng.standard_normal((2, 6, 12, 11))
    fused = ff.fuse_block(block)
    assert fused.mixer.query_bn is None
    assert all(isinstance(c, ff.DepthwiseConv) for c in (fused.mixer.key, fused.mixer.value))
    np.testing.assert_allclose(ff.ffnified(x, fused.mixer), ff.ffnified(x, block.mixer), atol=1e-11)
    np.testing.assert_allclose(ff.ffnet_block(x, fused), ff.ffnet_block(x, block), atol=1e-11)


def test_mixer_equals_torch_modules():
    """The mixer as the code composes it, in torch: 1x1 conv, BN, DW conv, GELU, DW conv."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(4)
    mixer = ff.fuse(ff.init_mixer(3, ks1=3, ks2=7, rng=rng))
    x = rng.standard_normal((1, 3, 8, 8))
    t = torch.from_numpy
    q = F.conv2d(t(x), t(mixer.query)[..., None, None], t(mixer.query_bias))
    a = F.gelu(F.conv2d(q, t(mixer.key.kernel)[:, None], t(mixer.key.bias), padding=1, groups=3))
    out = F.conv2d(a, t(mixer.value.kernel)[:, None], t(mixer.value.bias), padding=3, groups=3)
    np.testing.assert_allclose(ff.ffnified(x, mixer), out.numpy(), atol=1e-12)


@pytest.mark.parametrize("shift", [(1, 0), (0, 2), (3, -2)])
def test_translation_equivariance_away_from_borders(shift):
    """Shifting the map shifts the output, except within the receptive radius of a border
    (3 + 3 for the mixer's two 7x7 convolutions, plus 3 for the block's channel mixer)."""
    rng = np.random.default_rng(5)
    block = ff.init_block(4, rng=rng)
    x = rng.standard_normal((1, 4, 30, 30))
    moved = np.roll(x, shift, axis=(2, 3))
    for fn, radius in (
        (lambda a: ff.ffnified(a, block.mixer), 6),
        (lambda a: ff.ffnet_block(a, block), 9),
    ):
        out, out_moved = np.roll(fn(x), shift, axis=(2, 3)), fn(moved)
        margin = radius + max(abs(s) for s in shift)
        inner = (slice(None), slice(None), slice(margin, -margin), slice(margin, -margin))
        np.testing.assert_allclose(out_moved[inner], out[inner], atol=1e-11)
        assert not np.allclose(out_moved, out)  # the borders do differ: zero padding


def test_mixer_is_local():
    """A change at one pixel reaches at most 6 pixels away (two 7x7 depth-wise convolutions)."""
    rng = np.random.default_rng(6)
    mixer = ff.init_mixer(2, rng=rng)
    x = rng.standard_normal((1, 2, 21, 21))
    poked = x.copy()
    poked[0, 0, 10, 10] += 1.0
    changed = np.abs(ff.ffnified(poked, mixer) - ff.ffnified(x, mixer)).max(axis=(0, 1)) > 0
    rows, cols = np.nonzero(changed)
    assert rows.min() == cols.min() == 4 and rows.max() == cols.max() == 16


def test_init_is_seeded():
    a = ff.init_block(3, rng=np.random.default_rng(7))
    b = ff.init_block(3, rng=np.random.default_rng(7))
    np.testing.assert_array_equal(a.up, b.up)
    np.testing.assert_array_equal(a.mixer.key.large, b.mixer.key.large)


# --------------------------------------------------------------------------- bad input


def test_bad_shapes_name_the_argument():
    rng = np.random.default_rng(8)
    mixer = ff.init_mixer(3, rng=rng)
    with pytest.raises(ShapeError, match="x:"):
        ff.ffnified(np.zeros((3, 8, 8)), mixer)
    with pytest.raises(ShapeError, match=r"mixer\.query"):
        ff.ffnified(np.zeros((1, 4, 8, 8)), mixer)
    with pytest.raises(ShapeError, match="kernel"):
        ff.depthwise_conv2d(np.zeros((1, 3, 8, 8)), np.zeros((3, 4, 4)))
    with pytest.raises(ShapeError, match="kernel"):
        ff.depthwise_conv2d(np.zeros((1, 3, 8, 8)), np.zeros((2, 3, 3)))
    with pytest.raises(DTypeError, match="x:"):
        ff.depthwise_conv2d(np.zeros((1, 3, 8, 8), dtype=int), np.zeros((3, 3, 3)))
    with pytest.raises(ValueError, match="kernel size"):
        ff.init_mixer(3, ks1=4, rng=rng)
