# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # FFNified attention: query, key and value without attention (MetaMixer)
#
# *Paper:* S. Yun, D. Lee and Y. Ro, *MetaMixer Is All You Need*
# ([arXiv 2406.02021](https://arxiv.org/abs/2406.02021)).
# *Official code:* [ysj9909/FFNet](https://github.com/ysj9909/FFNet) (`models/ffnet.py`).
#
# A feed-forward network $W_2\, \sigma(W_1 x)$ can be read as attention over a fixed memory: the
# input is a query, the rows of $W_1$ are keys, the activation turns the matches into
# coefficients and the columns of $W_2$ are the values that those coefficients mix. The paper's
# hypothesis is that the *query-key-value framework* is what makes transformers work, not
# self-attention in particular, and it tests it by turning self-attention into something much
# more FFN-like: **FFNification**. The query-key and coefficient-value products become large
# depth-wise convolutions, and the softmax becomes a GELU. The resulting token mixer has no
# $N \times N$ matrix at all, costs a few convolutions, and the FFNet models built from it do
# well on classification, detection, segmentation, super-resolution, 3-D segmentation and
# time-series forecasting.
#
# This tutorial writes the mixer from its equations, checks it against `qkv`, looks at it *as*
# attention (what does one output pixel read, compared with softmax attention on the same
# feature map?), fuses the RepVGG branches of its 7x7 convolutions and checks the fusion, and
# shows the translation equivariance that convolutions buy.

# %%
import math
import os
import time

import matplotlib.pyplot as plt
import numpy as np

import qkv
from qkv.lab.notebook import rel_err
from qkv.reference.forms import ffnified_mixer as ff

SMALL = os.environ.get("QKV_TUTORIAL_SMALL") == "1"  # the test suite runs us at small sizes
rng = np.random.default_rng(0)
np.set_printoptions(precision=4, suppress=True, linewidth=110)


# %% [markdown]
# ## 1. The equations
#
# Self-attention on a feature map $x \in \mathbb R^{C \times H \times W}$ with its pixels as
# tokens is $\operatorname{softmax}(Q K^\top) V$ with $Q = W_q x$, $K = W_k x$, $V = W_v x$.
# FFNified attention keeps the three roles and replaces each operation:
#
# $$
# q = \mathrm{BN}(W_q x) \quad (\text{1x1 convolution: the query}), \qquad
# a = \operatorname{GELU}(K_1 \circledast q) \quad (\text{key match, GELU for softmax}), \qquad
# \text{out} = K_2 \circledast a \quad (\text{values}),
# $$
#
# where $\circledast$ is a **depth-wise** convolution: channel $c$ has its own $k \times k$
# kernel, and
# $(K \circledast q)[c, i, j] = \sum_{u,v} K[c, u, v]\, q[c, i + u - p, j + v - p]$ with zero
# padding $p = k/2$. The *keys* and *values* are no longer computed from the input: they are the
# convolution kernels, a learned memory of local spatial patterns, matched against the query at
# every position. The official default uses $k = 3$ in the first two stages and $k = 7$ in the
# last two. A block is $x \leftarrow x + \text{mixer}(x)$ followed by a channel mixer,
# $x \leftarrow x + W_2\, \operatorname{GELU}(W_1\, \mathrm{DW}_{7\times7}(x))$, as in ConvNeXt
# but, the paper notes, with the query-key-value sub-operations in the opposite dimensions.
#
# ### From scratch
#
# A depth-wise convolution is a sum of shifted copies of the padded map, one per kernel tap:


# %%
def dwconv(x, kernel):
    """Depth-wise cross-correlation, zero padding k // 2: x (C, H, W), kernel (C, k, k)."""
    C, H, W = x.shape
    k = kernel.shape[-1]
    p = k // 2
    padded = np.pad(x, ((0, 0), (p, p), (p, p)))
    return sum(
        kernel[:, u, v, None, None] * padded[:, u : u + H, v : v + W]
        for u in range(k)
        for v in range(k)
    )


def gelu(t):
    return 0.5 * t * (1 + np.vectorize(math.erf)(t / math.sqrt(2)))


def mixer_from_scratch(x, w_q, b_q, k1, b1, k2, b2):
    """FFNified token mixer on x (C, H, W), BN already folded into (w_q, b_q)."""
    q = np.einsum("oc,chw->ohw", w_q, x) + b_q[:, None, None]  # 1x1 conv: the query
    a = gelu(dwconv(q, k1) + b1[:, None, None])  # key match, GELU in place of softmax
    return dwconv(a, k2) + b2[:, None, None]  # coefficients times values


C, side = 8, 24
mixer = ff.init_mixer(C, ks1=3, ks2=7, rng=rng)  # a stage-2-like mixer: 3x3 key, 7x7 value
inference = ff.fuse(mixer)  # BN folded into the 1x1 weights, RepVGG branches fused
x = rng.standard_normal((1, C, side, side))
ours = mixer_from_scratch(
    x[0],
    inference.query,
    inference.query_bias,
    inference.key.kernel,
    inference.key.bias,
    inference.value.kernel,
    inference.value.bias,
)
theirs = ff.ffnified(x, mixer)[0]
print("qkv ffnified vs from scratch: relative error", rel_err(theirs, ours))
np.testing.assert_allclose(theirs, ours, rtol=1e-12, atol=1e-12)

# %% [markdown]
# ## 2. The mixer as attention
#
# Softmax attention gives every output pixel a row of weights over all pixels: what it reads.
# The mixer has no such matrix, but it has an equivalent for a given input: how much output
# pixel $i$ moves when the query at pixel $l$ moves, $\partial\,\text{out}[c, i] / \partial
# q[c, l]$. By the chain rule through the two convolutions and the GELU,
#
# $$
# \frac{\partial\,\text{out}[c, i]}{\partial q[c, l]}
# = \sum_j K_2[c, j - i + p_2]\; \operatorname{GELU}'(k[c, j])\; K_1[c, l - j + p_1],
# $$
#
# a $(k_1 + k_2 - 1)^2$ window around $i$, shaped by the kernels and **gated by the input**
# through $\operatorname{GELU}'$, where $\operatorname{GELU}'(t) = \Phi(t) + t\,\varphi(t)$:
# close to 1 where the key match is strongly positive, close to 0 where it is strongly
# negative. That gate is the mixer's content dependence, the role the softmax plays in
# attention. Below, a feature map made of a disk, a square and stripes (random projections of
# three base images into 8 channels, with the mixer's weights drawn at random: an untrained
# network), and for two output pixels the mixer's map (summed over channels, absolute values)
# next to softmax attention's row on the same features.

# %%
side = 32 if SMALL else 48
grid = np.mgrid[0:side, 0:side] / side  # (2, side, side) in [0, 1)
disk = ((grid[0] - 0.3) ** 2 + (grid[1] - 0.3) ** 2 < 0.04).astype(float)
square = ((abs(grid[0] - 0.7) < 0.15) & (abs(grid[1] - 0.7) < 0.15)).astype(float)
stripes = np.sin(2 * np.pi * 6 * grid[1]) * (grid[0] > 0.5) * (grid[1] < 0.5)
base = np.stack([disk, square, stripes])  # (3, side, side)
image = np.einsum("cb,bhw->chw", rng.standard_normal((C, 3)), base)[None]  # (1, C, side, side)
image += 0.05 * rng.standard_normal(image.shape)

mixer = ff.init_mixer(C, ks1=7, ks2=7, rng=rng)
fused = ff.fuse(mixer)
q = ff.pointwise(image, fused.query, fused.query_bias)  # (1, C, side, side)
k = ff.depthwise_conv2d(q, fused.key.kernel) + fused.key.bias[:, None, None]
phi = np.exp(-(k**2) / 2) / math.sqrt(2 * math.pi)
gate = 0.5 * (1 + np.vectorize(math.erf)(k / math.sqrt(2))) + k * phi  # GELU'(k)


def mixer_map(i, j):
    """|d out[c, i, j] / d q[c, :, :]| summed over channels, (side, side)."""
    p = fused.value.kernel.shape[-1] // 2
    reads = np.zeros((1, C, side, side))  # d out[c, i, j] / d a[c, :, :]
    for u in range(2 * p + 1):
        for v in range(2 * p + 1):
            r, s = i + u - p, j + v - p
            if 0 <= r < side and 0 <= s < side:
                reads[0, :, r, s] = fused.value.kernel[:, u, v]
    through = reads * gate  # through the GELU
    back = ff.depthwise_conv2d(through, fused.key.kernel[:, ::-1, ::-1].copy())  # through K1
    return np.abs(back[0]).sum(axis=0)


w_q, w_k = rng.standard_normal((2, C, C)) / math.sqrt(C)
tokens = image[0].reshape(C, -1).T  # (side * side, C): pixels as tokens
queries, keys = (tokens @ w.T for w in (w_q, w_k))  # (N, C) each
_, softmax = qkv.sdpa(queries[None, None], keys[None, None], keys[None, None], return_weights=True)
softmax = softmax[0, 0]  # (N, N): softmax(q k^T / sqrt(C)), one row per pixel

pixels = [(int(0.3 * side), int(0.3 * side)), (int(0.75 * side), int(0.25 * side))]
fig, axes = plt.subplots(1, 5, figsize=(17, 3.6))
axes[0].imshow(np.abs(base).transpose(1, 2, 0), interpolation="nearest")
axes[0].set_title("input (|3 base images| as RGB)")
for n, (i, j) in enumerate(pixels):
    axes[0].plot(j, i, "w+", ms=12, mew=2)
    axes[1 + 2 * n].imshow(mixer_map(i, j), cmap="magma")
    axes[1 + 2 * n].set_title(f"FFNified mixer, pixel ({i}, {j})")
    axes[2 + 2 * n].imshow(softmax[i * side + j].reshape(side, side), cmap="magma")
    axes[2 + 2 * n].set_title(f"softmax attention, pixel ({i}, {j})")
    for ax in axes[1 + 2 * n : 3 + 2 * n]:
        ax.plot(j, i, "c+", ms=10, mew=1.5)
for ax in axes:
    ax.set_xticks([])
    ax.set_yticks([])
fig.tight_layout()
plt.show()
inside = mixer_map(*pixels[0])
print(
    f"mixer map of pixel {pixels[0]}: nonzero in a {np.ptp(np.nonzero(inside)[0]) + 1} x "
    f"{np.ptp(np.nonzero(inside)[1]) + 1} window (two 7x7 convolutions: 13 x 13)"
)

# %% [markdown]
# Softmax attention spreads each pixel's reading over the whole map, concentrated on the pixels
# whose features match (the same shape elsewhere); the FFNified mixer reads a fixed 13x13
# window whose weights follow the kernels and are switched on and off by the GELU gate, which
# depends on the local content. The paper's argument is that this local, content-gated
# query-key-value read, repeated over many layers and paired with the channel mixer, is enough,
# and far cheaper: the mixer costs $O(HW\,C\,(C + k_1^2 + k_2^2))$ against attention's
# $O((HW)^2 C)$.
#
# ## 3. RepVGG branches and their fusion
#
# During training each 7x7 depth-wise convolution of FFNet is two branches, a 7x7 convolution
# with its BatchNorm and a 3x3 one with its own, summed. In eval mode a BN is a per-channel
# affine map $s\,t + h$, so each branch folds into one kernel and bias, and the 3x3 kernel,
# zero-padded to 7x7, adds to the 7x7 one: one convolution at inference, the same function.

# %%
rep = mixer.key  # a RepDW: 7x7 + BN and 3x3 + BN
one = ff.fuse_rep(rep)
x = rng.standard_normal((2, C, side, side))
print("fused 7x7 vs the two branches: relative error", rel_err(one(x), rep(x)))
np.testing.assert_allclose(one(x), rep(x), rtol=1e-12, atol=1e-12)

block = ff.init_block(C, rng=rng)
fast = ff.fuse_block(block)
timings = {}
for name, b in (("unfused (training form)", block), ("fused (inference form)", fast)):
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        out = ff.ffnet_block(x, b)
        best = min(best, time.perf_counter() - start)
    timings[name] = (best, out)
reference_out = timings["unfused (training form)"][1]
for name, (seconds, out) in timings.items():
    print(f"{name:24s} {seconds * 1e3:7.1f} ms   rel. error {rel_err(out, reference_out):.1e}")
print("depth-wise taps per channel and 7x7 layer: 49 + 9 = 58 unfused, 49 fused")

fig, axes = plt.subplots(1, 3, figsize=(8, 2.8))
panels = [
    ("7x7 branch (BN folded)", ff.fuse_bn(rep.large, rep.large_bn).kernel[0]),
    ("3x3 branch, padded", np.pad(ff.fuse_bn(rep.small, rep.small_bn).kernel[0], 2)),
    ("fused 7x7 kernel", one.kernel[0]),
]
limit = max(np.abs(p).max() for _, p in panels)
for ax, (title, kernel) in zip(axes, panels, strict=True):
    ax.imshow(kernel, cmap="RdBu_r", vmin=-limit, vmax=limit)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
fig.suptitle("channel 0 of a RepVGG depth-wise convolution", fontsize=10)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 4. Translation equivariance
#
# Everything in the block is a convolution or acts pixel by pixel, so shifting the input shifts
# the output, except within the receptive radius of the borders (zero padding): 6 pixels for
# the mixer, 9 for the whole block.

# %%
shifted = np.roll(x, (3, -2), axis=(2, 3))
out, out_shifted = ff.ffnet_block(x, fast), ff.ffnet_block(shifted, fast)
margin = 9 + 3
inner = (slice(None), slice(None), slice(margin, -margin), slice(margin, -margin))
moved = np.roll(out, (3, -2), axis=(2, 3))
print("interior, shift then block vs block then shift:", rel_err(out_shifted[inner], moved[inner]))
print("whole map (borders included)                  :", rel_err(out_shifted, moved))

# %% [markdown]
# ## 5. Backends, and what the paper reports
#
# `qkv` has no compiled kernel for this mixer, on purpose: its whole cost is in the 1x1 and
# depth-wise convolutions, which convolution libraries (cuDNN, oneDNN through
# `torch.nn.functional.conv2d`) already run at memory bandwidth. The `qkv` functions are the
# readable reference, checked against explicit loops and against `torch` in the tests.
#
# The paper reports FFNet models competitive with or better than transformer and ConvNet
# baselines of similar cost (for example on ImageNet-1K classification, COCO detection and
# ADE20K segmentation), and lower latency thanks to the convolution-only mixer. Those numbers
# need trained models; this tutorial reproduces none of them. What it shows, measured here:
# the mixer and block as the official code computes them (equal to the from-scratch form to
# rounding), the fused RepVGG form equal to the two-branch form, a local and content-gated
# "attention map" next to softmax attention's global one, and translation equivariance away
# from borders.
