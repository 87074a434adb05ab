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
# # DaViT: channel attention and window attention on one feature map
#
# *Paper:* Ding, Xiao, Codella, Luo, Wang, Yuan,
# [DaViT: Dual Attention Vision Transformers](https://arxiv.org/abs/2204.03645)
# (arXiv 2204.03645, ECCV 2022).
# *Official code:* [dingmyu/davit](https://github.com/dingmyu/davit) (`timm/models/davit.py`).
#
# Window attention (as in Swin) makes vision transformers affordable by letting each token
# attend only inside its $7 \times 7$ window: linear cost in the number of tokens, but no
# global view in a single layer. Global attention has the view and a quadratic cost.
#
# DaViT adds a second, transposed attention. In **channel attention** each *channel* is a
# token and its feature vector is its whole spatial map; the attention map is
# $C_g \times C_g$ per group of channels, so its cost is linear in the number of spatial tokens,
# and every output mixes information from the whole image. DaViT alternates the two blocks:
# spatial windows refine local detail, channels carry global context. This tutorial writes both
# from the equations, checks them against `qkv`, shows on the same feature map how far each one
# reaches, and times them on each backend.

# %%
import os
import warnings

import matplotlib.pyplot as plt
import numpy as np

import qkv
from qkv.lab.notebook import best_of, rel_err, runnable_backends, show_table
from qkv.reference import core
from qkv.reference.local.davit import (
    channel_attention,
    channel_map,
    merge_groups,
    split_groups,
    window_attention,
)

SMALL = os.environ.get("QKV_TUTORIAL_SMALL") == "1"  # the test suite runs us at small sizes
rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. The equations
#
# A feature map of $P$ spatial tokens and $C$ channels is split into $N_g$ groups of
# $C_g = C / N_g$ channels (the heads). For group $i$, with $Q_i, K_i, V_i \in \mathbb{R}^{P \times C_g}$:
#
# $$
# \text{channel:}\quad
# A_i = \operatorname{softmax}\!\Big(\frac{Q_i^\top K_i}{\sqrt{C_g}}\Big) \in \mathbb{R}^{C_g \times C_g},
# \qquad O_i = \big(A_i V_i^\top\big)^\top \in \mathbb{R}^{P \times C_g};
# $$
#
# $$
# \text{window:}\quad
# O_{i,w} = \operatorname{softmax}\!\Big(\frac{Q_{i,w} K_{i,w}^\top}{\sqrt{C_g}}\Big)\, V_{i,w}
# \quad \text{for every } 7 \times 7 \text{ window } w.
# $$
#
# The channel scale is set by the channels per group, $C_g$, not by the number of tokens $P$.
# The official code computes `softmax((k * s)^T v)` and applies it to `q`: its `(q, k, v)` are
# the paper's $(V, Q, K)$, the same layer with the projection weights renamed; `qkv` follows the
# paper. For window attention the code zero-pads the map at the right and bottom to a multiple
# of 7 and lets the padded tokens (whose keys are the projection's bias) take part; `qkv`
# masks them out by default, so padding never changes a real token, and offers
# `mask_padding=False` for the code's unmasked zero padding.
#
# ### From scratch, in NumPy


# %%
def softmax(s):
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def channel_from_scratch(q, k, v):
    """One group: q, k, v (P, Cg) -> (P, Cg)."""
    A = softmax(q.T @ k / np.sqrt(q.shape[1]))  # (Cg, Cg): channels attend to channels
    return (A @ v.T).T


def window_from_scratch(q, k, v, w):
    """One head: q, k, v (Hs, Ws, D) -> (Hs, Ws, D); windows clipped at the map's edge."""
    out = np.empty_like(v)
    for y in range(0, q.shape[0], w):
        for x in range(0, q.shape[1], w):
            win = (slice(y, y + w), slice(x, x + w))
            shape = q[win].shape
            qs, ks, vs = (a[win].reshape(-1, shape[-1]) for a in (q, k, v))
            out[win] = (softmax(qs @ ks.T / np.sqrt(shape[-1])) @ vs).reshape(shape)
    return out


# %% [markdown]
# `qkv` takes heads (groups) before the spatial axes, `(B, G, Hs, Ws, Cg)`;
# `split_groups` makes that layout from channels-last features. A $30 \times 30$ map is not a
# multiple of 7, so window attention pads it to $35 \times 35$ and masks the padding, which is
# exactly the clipped windows above.

# %%
B, Hs, Ws, C, G = 2, 30, 30, 32, 4
x = rng.standard_normal((B, Hs, Ws, C))  # channels-last features
W_q, W_k, W_v = (rng.standard_normal((C, C)) / np.sqrt(C) for _ in range(3))
q, k, v = (split_groups(x @ W, G) for W in (W_q, W_k, W_v))  # (B, G, Hs, Ws, Cg)

ours_c = np.stack(
    [
        np.stack(
            [
                channel_from_scratch(*(a[b, g].reshape(-1, C // G) for a in (q, k, v))).reshape(
                    Hs, Ws, -1
                )
                for g in range(G)
            ]
        )
        for b in range(B)
    ]
)
ours_w = np.stack(
    [
        np.stack([window_from_scratch(q[b, g], k[b, g], v[b, g], 7) for g in range(G)])
        for b in range(B)
    ]
)
print("channel attention vs from scratch:", rel_err(channel_attention(q, k, v), ours_c))
print("window attention vs from scratch: ", rel_err(window_attention(q, k, v, window=7), ours_w))
np.testing.assert_allclose(channel_attention(q, k, v), ours_c, rtol=1e-12, atol=1e-12)
np.testing.assert_allclose(window_attention(q, k, v, window=7), ours_w, rtol=1e-12, atol=1e-12)

# %% [markdown]
# Two properties, checked numerically. Shuffling the spatial tokens shuffles the channel
# attention's output the same way and leaves its $C_g \times C_g$ map unchanged (channels do not
# know where the pixels are). A window covering the whole map is full attention.

# %%
perm = rng.permutation(Hs * Ws)
shuffle = lambda a: a.reshape(B, G, Hs * Ws, -1)[:, :, perm]  # noqa: E731
out_flat = channel_attention(q, k, v).reshape(B, G, Hs * Ws, -1)
print(
    "equivariant to shuffling tokens:",
    np.allclose(channel_attention(*map(shuffle, (q, k, v))), out_flat[:, :, perm]),
)
print(
    "channel map unchanged:          ",
    np.allclose(channel_map(shuffle(q), shuffle(k)), channel_map(q, k)),
)
full = core.sdpa(*(a.reshape(B, G, Hs * Ws, -1) for a in (q, k, v))).reshape(q.shape)
print(
    "window = map is full attention: ",
    np.allclose(window_attention(q, k, v, window=(Hs, Ws)), full),
)

# %% [markdown]
# ## 2. How far each one reaches, on the same feature map
#
# Change the features of **one** pixel (top-left region) and see which outputs move. Window
# attention only changes the outputs in that pixel's window; channel attention changes the
# outputs everywhere, because every channel token's feature vector is the whole map. Right:
# the $8 \times 8$ channel map of one group.

# %%
yx = (3, 4)
x2 = x.copy()
x2[:, yx[0], yx[1]] += 3.0 * rng.standard_normal(C)
q2, k2, v2 = (split_groups(x2 @ W, G) for W in (W_q, W_k, W_v))


def change(fn):
    delta = merge_groups(fn(q2, k2, v2) - fn(q, k, v))  # (B, Hs, Ws, C)
    return np.linalg.norm(delta[0], axis=-1)  # (Hs, Ws)


reach = {
    "window attention (7 x 7)": change(lambda a, b, c: window_attention(a, b, c, window=7)),
    "channel attention": change(channel_attention),
}
fig, axes = plt.subplots(1, 3, figsize=(13, 4))
for ax, (title, m) in zip(axes[:2], reach.items(), strict=True):
    im = ax.imshow(np.log10(m + 1e-12), cmap="viridis", vmin=-8)
    ax.plot(yx[1], yx[0], "r+", ms=12)
    ax.set_title(f"{title}\nlog10 |output change|", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
im = axes[2].imshow(channel_map(q, k)[0, 0], cmap="magma")
axes[2].set_title("channel map A of group 0 (Cg x Cg)", fontsize=9)
fig.colorbar(im, ax=axes[2], fraction=0.046)
fig.tight_layout()
plt.show()
moved = {name: float((m > 1e-9).mean()) for name, m in reach.items()}
print({name: f"{share:.0%} of the pixels moved" for name, share in moved.items()})

# %% [markdown]
# ## 3. Both attentions on every backend
#
# Both are plain softmax attention after a reshape: channel attention is `sdpa` over $C_g$
# channel tokens with $P$-dimensional features; window attention is `sdpa` batched over all
# windows. `qkv.channel_attention` and `qkv.window_attention` run that call on the chosen
# backend. Below: a $56 \times 56$ map, $C = 128$ in 4 groups, float32, against full spatial
# attention on the same backend; the error is against the float64 reference.


# %%

side = 28 if SMALL else 56
x32 = [rng.standard_normal((1, 4, side, side, 32)).astype(np.float32) for _ in range(3)]
gold_c = channel_attention(*(a.astype(np.float64) for a in x32))
gold_w = window_attention(*(a.astype(np.float64) for a in x32), window=7)
flat32 = [a.reshape(1, 4, side * side, 32) for a in x32]
rows = []
runnable, skipped = runnable_backends()
for name in runnable:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", qkv.FallbackWarning)
        runs = {
            "channel": lambda name=name: qkv.channel_attention(*x32, backend=name),
            "window": lambda name=name: qkv.window_attention(*x32, window=7, backend=name),
            "full": lambda name=name: qkv.sdpa(*flat32, backend=name),
        }
        errors = (rel_err(runs["channel"](), gold_c), rel_err(runs["window"](), gold_w))
        runs["full"]()  # warm-up (Numba compiles on first use)
        times = {op: best_of(fn, 3) for op, fn in runs.items()}
    rows.append((name, *(f"{times[op] * 1e3:.1f} ms" for op in runs), f"{max(errors):.1e}"))
print(f"B=1, 4 groups of 32 channels, map {side}x{side}, float32; {os.cpu_count()} CPU cores\n")
show_table(("backend", "channel", "window 7x7", "full spatial", "rel. error"), rows)
for name, why in skipped:
    print(f"\n{name}: {why}")

# %% [markdown]
# ## 4. What the paper reports, and what we see here
#
# | paper | reports | here |
# |---|---|---|
# | channel attention is global | each channel token holds the whole image, so one layer captures global interactions | one changed pixel moves channel-attention outputs at every pixel, window-attention outputs only in its window (section 2) |
# | linear cost | both attentions are linear in the number of tokens | channel: $C_g^2$ scores per group whatever $P$; window: $49$ per token; timed against full attention (section 3) |
# | channel scale | $1/\sqrt{C_g}$ | the default; the code's $(q, k, v)$ are the paper's $(V, Q, K)$, checked in the tests against a torch port |
# | token order | — | channel attention is equivariant to shuffling the tokens, its map invariant (section 1) |
# | accuracy | DaViT-Tiny/Small/Base 82.8 / 84.2 / 84.6% ImageNet top-1 | no training here; out of scope |
#
# The numbers of this run:

# %%
show_table(
    ("quantity", "value"),
    [
        (f"pixels moved by one changed pixel, {name}", f"{share:.0%}")
        for name, share in moved.items()
    ]
    + [(f"{r[0]}: channel / window / full", f"{r[1]} / {r[2]} / {r[3]}") for r in rows],
)

# %% [markdown]
# ## References
#
# * M. Ding, B. Xiao, N. Codella, P. Luo, J. Wang, L. Yuan. *DaViT: Dual Attention Vision
#   Transformers.* ECCV 2022. [arXiv 2204.03645](https://arxiv.org/abs/2204.03645).
#   Code: [dingmyu/davit](https://github.com/dingmyu/davit).
# * Z. Liu et al. *Swin Transformer: Hierarchical Vision Transformer using Shifted Windows.*
#   ICCV 2021. [arXiv 2103.14030](https://arxiv.org/abs/2103.14030).
