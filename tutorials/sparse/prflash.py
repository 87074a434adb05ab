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
# # PrFlashAttention: random causal tiles, kept by their distance to the diagonal
#
# *Paper:* F. Li, *The Nature of Mathematical Modeling and Probabilistic Optimization
# Engineering in Generative AI* ([arXiv 2410.18441](https://arxiv.org/abs/2410.18441)), the
# PrFlashAttention section. There is no official code.
#
# FlashAttention computes causal attention tile by tile, $b \times b$ scores at a time, and for
# an autoregressive model only the lower triangle of tiles exists. Most of a query's attention
# lands near the diagonal (recent tokens) and on the first tokens (sinks), so the far tiles in
# between often contribute little. PrFlashAttention keeps the lower-triangular shape but lets a
# probability distribution over the *block distance* $d = i - j$ decide, each round, which tiles
# take part.
#
# The abstract gives the idea, and we found no formula. `qkv` keeps each causal tile independently
# with probability $p_d$, either $\text{keep}^d$ (geometric decay) or a given per-distance list; the
# diagonal tile (each query's own block) and the first column are always kept, so no row is empty.
# The tile mask, expanded to tokens, feeds the flash kernel. This tutorial draws masks, checks the
# result against attention computed from scratch, and measures the error against the fraction of
# tiles computed on the lab decoder's own queries, keys and values.

# %%
import os
import time
import warnings

import matplotlib.pyplot as plt
import numpy as np

import qkv
from qkv.lab import decoder as dec
from qkv.lab import tasks
from qkv.lab.notebook import rel_err, runnable_backends, show_table
from qkv.reference.sparse import prflash
from qkv.reference.sparse.prflash_mask import (
    expected_tile_fraction,
    prflash_block_mask,
    tile_fraction,
)

SMALL = os.environ.get("QKV_TUTORIAL_SMALL") == "1"  # the test suite runs us at small sizes

# %% [markdown]
# ## 1. The equations
#
# $$
# P(\text{tile } (i, j) \text{ kept}) = \begin{cases} 1 & j = i \text{ or } j = 0 \\
# p_{i-j} & 0 < j < i \\ 0 & j > i \end{cases}, \qquad
# O_r = \operatorname{softmax}_{j \in \mathcal A_r}\!\Big(\frac{q_r \cdot k_j}{\sqrt D}\Big) V,
# $$
#
# where $\mathcal A_r$ are the keys $j \le r$ whose tile $(\lfloor r/b \rfloor, \lfloor j/b
# \rfloor)$ was kept. From scratch, with one Generator draw per round:


# %%
def prflash_scratch(q, k, v, b, keep, seed):
    """q, k, v (N, D) -> O (N, D), tiles (nb, nb): geometric keep-probabilities."""
    N, D = q.shape
    nb = -(-N // b)
    i, j = np.indices((nb, nb))
    p = np.where(j <= i, keep ** np.clip(i - j, 0, None), 0.0)
    p[:, 0] = 1.0
    tiles = np.random.default_rng(seed).random((nb, nb)) < p
    allowed = np.repeat(np.repeat(tiles, b, 0), b, 1)[:N, :N] & np.tri(N, dtype=bool)
    s = np.where(allowed, q @ k.T / np.sqrt(D), -np.inf)
    e = np.exp(s - s.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)) @ v, tiles


rng = np.random.default_rng(0)
q, k, v = rng.standard_normal((3, 1, 1, 100, 16))
mine, tiles_mine = prflash_scratch(q[0, 0], k[0, 0], v[0, 0], 16, 0.5, seed=3)
out, tiles = prflash(q, k, v, block=16, keep=0.5, seed=3, return_mask=True)
print("same tiles:", np.array_equal(tiles, tiles_mine), " rel. error:", rel_err(out[0, 0], mine))

# %% [markdown]
# ## 2. The masks
#
# Three rounds at each decay: a round draws a new mask; the triangle shape, the diagonal and
# the first column never change.

# %%
nb = 16 if SMALL else 32
fig, axes = plt.subplots(2, 3, figsize=(9, 6))
for row, keep in enumerate((0.8, 0.5)):
    for c, ax in enumerate(axes[row]):
        m = prflash_block_mask(nb, keep=keep, seed=c)
        ax.imshow(m, cmap="Greys", vmin=0, vmax=1)
        ax.set_title(f"keep={keep}, round {c}: {tile_fraction(m):.0%} tiles", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 3. Error against the tiles computed, on the lab decoder
#
# The queries, keys and values of every layer of the lab decoder on a passkey prompt (the
# layers' inputs come from the full model). Geometric decay is compared with *distance-blind*
# sampling, the same keep-probability $p$ for every off-diagonal tile, at each expected
# fraction of tiles.

# %%
weights = dec.load()
cfg = weights.config
length = 256 if SMALL else 512
block = 16
prompt = tasks.passkey(length, 0.5, np.random.default_rng(1)).prompt[None]  # (1, N)
x = weights.embed[prompt]  # (1, N, d)
layers = []  # (q, k, v) of each layer
for lw in weights.layers:
    q, k, v = dec.project_qkv(cfg, lw, x, 0)
    layers.append((q.astype(np.float64), k.astype(np.float64), v.astype(np.float64)))
    x = dec.finish_block(cfg, lw, x, qkv.sdpa(q, k, v, causal=True))
exact = [qkv.sdpa(q, k, v, causal=True) for q, k, v in layers]
nb = -(-length // block)
seeds = range(2 if SMALL else 5)


def errors(keep):
    """Mean relative error over layers and rounds, and the mean fraction of tiles kept."""
    errs, fracs = [], []
    for s in seeds:
        for (q, k, v), want in zip(layers, exact, strict=True):
            out, m = prflash(q, k, v, block=block, keep=keep, seed=s, return_mask=True)
            errs.append(rel_err(out, want))
            fracs.append(tile_fraction(m))
    return float(np.mean(errs)), float(np.mean(fracs))


decays = (0.5, 0.8, 0.9, 0.95) if SMALL else (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
geo, flat, rows = [], [], []
for keep in decays:
    target = expected_tile_fraction(nb, keep)
    # the constant off-diagonal probability giving the same expected fraction of tiles
    forced = 2 * nb - 1  # diagonal and first column
    p = (target * nb * (nb + 1) / 2 - forced) / (nb * (nb + 1) / 2 - forced)
    geo.append(errors(keep))
    flat.append(errors([1.0] + [p] * (nb - 1)))
    rows.append([keep, f"{target:.2f}", f"{geo[-1][0]:.3f}", f"{p:.2f}", f"{flat[-1][0]:.3f}"])
show_table(
    ["keep (decay)", "expected tiles", "error, decay", "flat p", "error, distance-blind"], rows
)

fig, ax = plt.subplots(figsize=(5.5, 3.4))
ax.plot([f for _, f in geo], [e for e, _ in geo], "o-", label="decay with distance (keep^d)")
ax.plot([f for _, f in flat], [e for e, _ in flat], "s--", label="distance-blind")
ax.set(xlabel="fraction of causal tiles computed", ylabel="relative error vs causal attention")
ax.set_title(f"lab decoder, {length} tokens, {block}x{block} tiles, 4 layers")
ax.legend()
plt.show()

# %% [markdown]
# ## 4. The same call through each backend
#
# `prflash` calls the dispatched `qkv.flash` with the expanded mask, so the chosen backend runs
# the tiles. The kernels skip the tiles above the diagonal but still compute the masked tiles
# inside the triangle: the tiles saved are counted above, not timed here.

# %%
q, k, v = (a.astype(np.float32) for a in layers[-1])


def time_call(name, repeats=3):
    with qkv.use_backend(name), warnings.catch_warnings():
        warnings.simplefilter("ignore", qkv.FallbackWarning)
        out = prflash(q, k, v, block=block, keep=0.8, seed=0)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            prflash(q, k, v, block=block, keep=0.8, seed=0)
            best = min(best, time.perf_counter() - start)
    return best, out


timings = []
runnable, skipped = runnable_backends()
_, golden = time_call("reference", 1)
for name in runnable:
    best, out = time_call(name)
    timings.append((name, f"{best * 1e3:.1f} ms", f"{rel_err(out, golden):.1e}"))
show_table(["backend", "best of 3", "rel. error vs reference"], timings)
for name, why in skipped:
    print(f"{name}: {why}")

# %% [markdown]
# ## 5. What the paper reports, and what we see here
#
# The paper proposes PrFlashAttention (no code; beyond its abstract we found no formula or reported
# measurement): tiles take part in a round with a probability set by their distance to the diagonal,
# the causal lower-triangular shape being kept. `qkv`'s reading (documented in
# `qkv.reference.sparse.prflash_mask`): independent Bernoulli tiles with $p_d = \text{keep}^d$ or
# given per-distance probabilities, diagonal and first column always kept, one seeded draw per call,
# one mask shared by all heads.
#
# On the lab decoder, keeping tiles by distance gave a slightly lower error than distance-blind
# sampling at the same fraction of tiles in a full-size run (512 tokens, 16x16 tiles, 5 rounds x 4
# layers): 0.215 against 0.270 at 84% of the tiles, 0.393 against 0.436 at 66%, and about the same
# below a third of the tiles. The errors stay large: a dropped tile removes its keys from the
# softmax entirely, it is not approximated. The FLOP saving is the fraction of tiles computed; it is
# not a measured speed-up, since no backend here skips masked tiles inside the triangle.
