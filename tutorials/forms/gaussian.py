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
# # Gaussian adaptive attention (GAAM)
#
# *Paper:* G. Ioannides et al., *Gaussian Adaptive Attention is All You Need:
# Robust Contextual Representations Across Multiple Modalities*
# ([arXiv 2401.11143](https://arxiv.org/abs/2401.11143)).
# *Official code:*
# [gioannides/Gaussian-Adaptive-Attention](https://github.com/gioannides/Gaussian-Adaptive-Attention).
#
# Dot-product attention decides what matters by comparing a query with keys. GAAM decides it
# from the *distribution* of the features themselves: along one axis (time steps of a speech
# signal, features of a token, channels of an image), each entry is weighed by how likely it is
# under a Gaussian fitted to that slice, with a learnable shift of the mean and a learnable
# width. An entry near the (shifted) mean gets a large weight, an outlier a small one, and the
# weights of a slice sum to one, like a softmax row. There are no queries or keys, and only a
# handful of parameters per head: the paper's selling points are this small cost, robustness to
# non-stationary data (the statistics are recomputed for every input), and the readable
# "importance" of each entry.
#
# This tutorial writes the mechanism from its equations, checks it against `qkv`, looks at what
# the offsets, the scales and the two released variants do to the weights, applies it to real
# token features from a trained encoder, shows the shift invariance and the zero-variance case,
# and times the backends.

# %%
import os
import time
import warnings

import matplotlib.pyplot as plt
import numpy as np

import qkv
from qkv.lab import minilm
from qkv.lab.notebook import rel_err
from qkv.reference.forms.gaussian_attention import GaussianParams, head_bounds

SMALL = os.environ.get("QKV_TUTORIAL_SMALL") == "1"  # the test suite runs us at small sizes
rng = np.random.default_rng(0)
np.set_printoptions(precision=4, suppress=True, linewidth=110)


# %% [markdown]
# ## 1. The equations
#
# Take one slice $x_1, \dots, x_n$ of the normalisation axis. GAAM standardises it with its own
# mean and (unbiased) variance, shifted by a learnable offset $\delta_i$ for each of $G$
# Gaussians:
#
# $$
# \mu = \frac1n \sum_j x_j, \qquad
# \sigma^2 = \frac1{n-1} \sum_j (x_j - \mu)^2 + \varepsilon, \qquad
# y_{ij} = \frac{x_j - \mu - \delta_i}{\sigma}.
# $$
#
# The repository holds two versions of the next step. The exported module
# (`GaussianBlock.py`, `qkv`'s default `mixture="product"`) multiplies normal densities of
# learnable widths $c_i$; `MHGAAM.py` (`mixture="sum"`) mixes them with softmax weights
# $\pi = \operatorname{softmax}(a)$ and drops the normalising constants:
#
# $$
# g_j^{\text{product}} = \prod_{i=1}^G \frac{1}{\sqrt{2\pi c_i^2}}\, e^{-y_{ij}^2 / 2c_i^2},
# \qquad
# g_j^{\text{sum}} = \sum_{i=1}^G \pi_i\, e^{-y_{ij}^2 / 2c_i^2} .
# $$
#
# Both normalise along the slice and scale the input:
# $w_j = g_j / \sum_t g_t$ and $\text{out}_j = x_j w_j$. With $H$ heads the axis is cut into
# $H$ chunks, each with its own $\delta$, $c$ (and $\pi$); the last chunk takes the remainder.
#
# ### From scratch, in NumPy
#
# Straight from the equations, for one head of the product variant along the last axis:


# %%
def gaam_product(x, offsets, scales, eps=1e-8):
    """out = x * w, w = normalised product of Gaussians, along the last axis (one head)."""
    mean = x.mean(axis=-1, keepdims=True)
    var = x.var(axis=-1, ddof=1, keepdims=True) + eps  # unbiased, as torch.var
    g = np.ones_like(x)
    for delta, c in zip(offsets, scales, strict=True):
        y = (x - mean - delta) / np.sqrt(var)
        g = g * np.exp(-(y**2) / (2 * c**2)) / np.sqrt(2 * np.pi * c**2)
    return x * g / g.sum(axis=-1, keepdims=True)


x = rng.standard_normal((4, 64))  # 4 slices of 64 entries
params = GaussianParams.init(1, 3, rng=rng)  # the released initialisation: c = exp(N(0, 1))
offsets = np.array([[0.3, -0.2, 0.1]])  # (H, G) = (1, 3)
ours = gaam_product(x, offsets[0], params.scales[0])
theirs = qkv.gaussian(x, offsets, params.scales)
print("qkv.gaussian vs from scratch: relative error", rel_err(theirs, ours))
np.testing.assert_allclose(theirs, ours, rtol=1e-12, atol=1e-14)

# %% [markdown]
# `qkv` does not evaluate $g$ as written. It forms $\log g_j$ (a sum over the Gaussians, or a
# log-sum-exp for the mixture) and takes a softmax over the slice with the maximum subtracted:
# the constants $1/\sqrt{2\pi c_i^2}$ are the same for every $j$ and cancel. The result is
# identical wherever the linear-domain form works, and it keeps working where that form
# underflows: with a large offset against a small spread, every $g_j$ is below the smallest
# double, the from-scratch form above divides 0 by 0, and the official code's
# `mixture.sum().clamp(min=eps)` returns weights of zero.

# %%
tight = 1e-3 * rng.standard_normal((1, 16))  # a slice with a tiny spread
big = np.array([[40.0]])  # one Gaussian, offset 40 standard deviations away
with np.errstate(under="ignore", invalid="ignore"):
    naive = gaam_product(tight, big[0], np.array([0.5]))
out, w = qkv.gaussian(tight, big, np.array([[0.5]]), return_weights=True)
print("linear domain: weights", naive[0, :4] / tight[0, :4], "...")
print(
    "qkv (log domain): weights sum to",
    w.sum(),
    "; largest weight on the largest entry:",
    np.argmax(w) == np.argmax(tight),
)

# %% [markdown]
# ## 2. What the parameters do
#
# Plot the weights of one slice against the standardised entries $(x_j - \mu)/\sigma$. With one
# Gaussian the weight is a bell centred at $\delta$ of width $c$: the offset chooses *which*
# entries to emphasise (typical ones at $\delta = 0$, large ones for $\delta > 0$), and the
# scale how selective the head is. The product of two Gaussians is again a single bell (a
# product of Gaussians in $y$ is Gaussian), centred between the offsets; the softmax-weighted
# **sum** of the same two Gaussians is a genuine mixture with two bumps. That is the practical
# difference between the two released variants: only `"sum"` can emphasise two separate ranges
# of values at once.

# %%
x = np.sort(rng.standard_normal(400))[None]  # one slice, sorted for plotting
z = (x[0] - x.mean()) / x.std(ddof=1)
fig, axes = plt.subplots(1, 3, figsize=(13, 3.4), sharey=False)
for delta in (-1.0, 0.0, 1.5):
    _, w = qkv.gaussian(x, np.array([[delta]]), np.array([[0.5]]), return_weights=True)
    axes[0].plot(z, w[0], label=f"offset {delta:+g}")
axes[0].set_title("one Gaussian, c = 0.5: the offset moves the bump")
for c in (0.25, 0.5, 1.0, 3.0):
    _, w = qkv.gaussian(x, np.array([[0.0]]), np.array([[c]]), return_weights=True)
    axes[1].plot(z, w[0], label=f"c = {c:g}")
axes[1].set_title("one Gaussian, offset 0: c sets the width")
two_offsets, two_scales = np.array([[-1.5, 1.5]]), np.array([[0.5, 0.5]])
for mixture in ("product", "sum"):
    _, w = qkv.gaussian(x, two_offsets, two_scales, mixture=mixture, return_weights=True)
    axes[2].plot(z, w[0], label=f'mixture="{mixture}"')
axes[2].set_title("two Gaussians at -1.5 and +1.5")
for ax in axes:
    ax.set_xlabel("(x - mean) / std")
    ax.legend(fontsize=8)
axes[0].set_ylabel("weight w")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 3. On real features: MiniLM token representations
#
# `qkv` ships the queries, keys and values of every layer and head of the `all-MiniLM-L6-v2`
# encoder on a few paragraphs of Python's documentation. Concatenating the 12 heads' values of
# one layer gives a 384-dimensional representation per token; apply GAAM along the **feature**
# axis with 4 heads (96 features each) and 3 Gaussians per head of width $c = 1.5$ (a product of
# three, so a bell of width $1.5/\sqrt3 \approx 0.87$), centred at $0$, $+1$, $-1$ and $+2$
# standard deviations. A trained model would learn these (MiniLM was not trained with GAAM);
# here they are set by hand to see what each does. Each token's features are re-weighted by
# how typical they are of that token's own feature distribution. The right panel shows
# $n\,w_j$, the weight relative to a uniform one ($1$ = uniform, $n = 96$ entries per head).

# %%
cap = minilm.load()
layer = 3
tokens = cap.v[layer].transpose(1, 0, 2).reshape(cap.n_tokens, -1)  # (N, 12 * 32) features
n_show = 40
features = tokens[:n_show]  # (40, 384) float32
offsets = np.repeat(np.array([[0.0], [1.0], [-1.0], [2.0]]), 3, axis=1)  # (H, G) = (4, 3)
scales = np.full((4, 3), 1.5)
out, w = qkv.gaussian(
    features, offsets.astype(np.float32), scales.astype(np.float32), return_weights=True
)
size = features.shape[1] // 4
fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
axes[0].imshow(features, aspect="auto", cmap="RdBu_r", vmin=-2, vmax=2)
axes[0].set_title(f"MiniLM layer {layer} values (tokens x 384 features)")
image = axes[1].imshow(size * w, aspect="auto", cmap="magma", vmin=0, vmax=4)
axes[1].set_title("GAAM weight x 96; heads centred at 0, +1, -1, +2 std")
for ax in axes:
    for start, _ in head_bounds(features.shape[1], 4)[1:]:
        ax.axvline(start - 0.5, color="w", lw=0.8)
    ax.set_yticks(range(0, n_show, 4), cap.tokens[:n_show:4], fontsize=7)
    ax.set_xlabel("feature")
fig.colorbar(image, ax=axes[1])
fig.tight_layout()
plt.show()
for h, (start, stop) in enumerate(head_bounds(features.shape[1], 4)):
    share = w[:, start:stop].sum(axis=-1)
    top = np.sort(w[:, start:stop], axis=-1)[:, -10:].sum(axis=-1).mean()
    print(
        f"head {h} (offset {offsets[h, 0]:+g}): weights sum to {share.min():.6f}.."
        f"{share.max():.6f} per token; its top 10 of 96 features carry {top:.0%}"
    )

# %% [markdown]
# Head 0 spreads its weight over the typical features of each token (those near its mean),
# heads 1 and 2 pick the features about one standard deviation above and below it, and head
# 3, two standard deviations up, concentrates on the few large features of each token: the
# further the offset from 0, the fewer entries live there and the more selective the head.
#
# ## 4. Shift invariance, scale invariance and zero variance
#
# $y_{ij}$ does not change when a constant is added to the whole slice (the mean moves with it),
# whatever the offsets: the **weights** are shift invariant. The output $x_j w_j$ is not, of
# course, since $x$ itself moved. With zero offsets the weights are also unchanged by a positive
# rescaling of the slice (up to $\varepsilon$); a nonzero offset is measured in units of $x$, so
# rescaling then matters.

# %%
x = features.astype(np.float64)
zero = np.zeros((4, 3))
_, w = qkv.gaussian(x, offsets, scales, return_weights=True)
_, w_shift = qkv.gaussian(x + 17.0, offsets, scales, return_weights=True)
_, w0 = qkv.gaussian(x, zero, scales, return_weights=True)
_, w0_scaled = qkv.gaussian(5.0 * x, zero, scales, return_weights=True)
_, w_scaled = qkv.gaussian(5.0 * x, offsets, scales, return_weights=True)
print(f"x + 17, any offsets : max |w change| = {np.abs(w_shift - w).max():.1e}")
print(f"5 x, zero offsets   : max |w change| = {np.abs(w0_scaled - w0).max():.1e}")
print(f"5 x, offsets 0/+1/-1/+2: max |w change| = {np.abs(w_scaled - w).max():.1e}")

# %% [markdown]
# A constant slice (zero variance, say a padded frame) has $\sigma^2 = \varepsilon$ and the same
# $y_{ij}$ for every entry, so `qkv` returns uniform weights $1/n$ and $x / n$: no NaN, even with
# offsets that would be $10^5$ standard deviations away (the statistics are computed on
# $x_j - x_1$, which leaves $y$ unchanged and makes a constant slice's centred entries exact
# zeros, in float32 too).

# %%
flat = np.full((2, 8), 3.5, dtype=np.float32)
out, w = qkv.gaussian(
    flat, np.full((2, 2), 10.0, np.float32), np.ones((2, 2), np.float32), return_weights=True
)
print("weights of a constant slice:", w[0], "\noutput:", out[0])

# %% [markdown]
# ## 5. Backends
#
# The reference materialises the standardised entries of every Gaussian, an array $G$ times the
# size of the input. The Numba kernel makes one fused pass per row of the normalisation axis
# (statistics, log mixture, softmax, product) and keeps nothing but a row of logits. Same call,
# three ways:

# %%
shape = (16, 128, 384) if SMALL else (64, 512, 768)
x = rng.standard_normal(shape).astype(np.float32)
gaam = GaussianParams.init(4, 4, rng=rng)
f32 = [(0.5 * rng.standard_normal((4, 4))).astype(np.float32), gaam.scales.astype(np.float32)]
print(f"input {shape} float32, 4 heads x 4 Gaussians along the last axis")
for mixture in ("product", "sum"):
    golden = qkv.gaussian(
        x.astype(np.float64), *(a.astype(np.float64) for a in f32), mixture=mixture
    )
    rows = []
    for backend in ("reference", "numba", "torch"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", qkv.FallbackWarning)
                qkv.gaussian(x, *f32, mixture=mixture, backend=backend)  # warm-up, compiles
                start = time.perf_counter()
                out = qkv.gaussian(x, *f32, mixture=mixture, backend=backend)
                seconds = time.perf_counter() - start
        except qkv.BackendUnavailable as why:
            print(f"{backend}: unavailable ({why})")
            continue
        rows.append((backend, seconds, rel_err(out, golden)))
    base = rows[0][1]
    for name, seconds, err in rows:
        print(
            f"{mixture:8s} {name:10s} {seconds * 1e3:8.1f} ms  {base / seconds:5.1f}x"
            f"  rel. error {err:.1e}"
        )

# %% [markdown]
# (`torch` has no GAAM kernel: the dispatcher runs the reference for it and says so with a
# `FallbackWarning`, silenced above.) For `"product"` the kernel also uses an identity: the
# sum over Gaussians $\sum_i (t - \delta_i)^2 / 2c_i^2$ is a quadratic in $t = x_j - \mu$, so
# one multiply-add per entry replaces $G$ of them; `"sum"` needs $G$ exponentials per entry
# whatever one does, and gains less.
#
# ## 6. What the paper reports, and what we see
#
# The paper reports accuracy gains of GAAM-equipped transformers on speech emotion recognition
# (IEMOCAP), image classification and text classification, up to about +20 points over
# dot-product attention baselines, and introduces an "importance factor" read from the learned
# Gaussians. Those results need the trained models and data sets, which this tutorial does not
# reproduce. What it does show, measured here: the mechanism as both released versions compute
# it (equal to the from-scratch form to rounding), weights that sum to one per head, the shift
# invariance that makes GAAM insensitive to the level of a non-stationary signal, the
# qualitative difference between the product (one bump) and the mixture (several) variants, a
# stable result for constant inputs, and a fused CPU kernel.
