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
# # BiFormer: bi-level routing attention
#
# *Paper:* Zhu, Wang, Ke, Zhang, Lau,
# [BiFormer: Vision Transformer with Bi-Level Routing Attention](https://arxiv.org/abs/2303.08810)
# (arXiv 2303.08810, CVPR 2023).
# *Official code:* [rayleizhu/BiFormer](https://github.com/rayleizhu/BiFormer) (`ops/torch/bra.py`).
#
# Full attention over an image of $N$ patches costs $N^2$ scores per head, and most of them go
# to patches that have nothing to do with the query. Earlier vision transformers cut the cost
# with *hand-made* sparsity: local windows, axial stripes, dilated windows. Those patterns are
# the same for every query, whatever the image shows.
#
# BiFormer makes the sparsity depend on the content, at two levels. The map is cut into
# $S \times S$ regions; a cheap **region-level** attention (one mean query and one mean key per
# region) picks, for every region, the $k$ regions most related to it; then every token does
# ordinary **token-level** attention, but only over the tokens of those $k$ regions. Both steps
# are dense matrix products (plus one gather), so they run well on GPUs. This tutorial writes
# the two levels from the equations, checks them against `qkv`, shows where regions route on a
# synthetic scene, and runs the token attention through each backend.

# %%
import os
import warnings

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Rectangle

import qkv
from qkv.lab.notebook import best_of, rel_err, runnable_backends, show_table
from qkv.reference import core
from qkv.reference.local.biformer import bilevel_routing, routing_indices

SMALL = os.environ.get("QKV_TUTORIAL_SMALL") == "1"  # the test suite runs us at small sizes
rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. The equations
#
# Queries, keys and values $Q, K, V$ live on an $H_s \times W_s$ map with $C$ channels
# ($C = H \cdot D$ over $H$ heads). Cut the map into $S^2$ regions of
# $\tfrac{H_s}{S}\times\tfrac{W_s}{S}$ tokens.
#
# 1. Region-level queries and keys, the means over each region:
#    $Q^r, K^r \in \mathbb{R}^{S^2 \times C}$.
# 2. The region affinity and the routing:
#    $$A^r = Q^r (K^r)^\top \in \mathbb{R}^{S^2 \times S^2}, \qquad I^r = \operatorname{topkIndex}(A^r) \in \mathbb{N}^{S^2 \times k}.$$
# 3. Gather the keys and values of the routed regions and attend, token by token:
#    $$K^g = \operatorname{gather}(K, I^r),\quad V^g = \operatorname{gather}(V, I^r),\qquad
#    O = \operatorname{softmax}\!\big(s\,Q (K^g)^\top\big)\, V^g + \operatorname{LCE}(V).$$
#
# $\operatorname{LCE}$ (called LePE in the code) is a depth-wise $5 \times 5$ convolution of the
# values, a local positional term. The routing is a hard top-$k$: no gradient flows through
# it. One detail the paper leaves to the code: the scale $s$ is $C^{-1/2}$ over the **whole**
# query/key width, not the usual per-head $D^{-1/2}$; `qkv` follows the code and offers
# `per_head_scale=True`.
#
# ### From scratch, in NumPy
#
# One image, all heads, straight from the three steps:


# %%
def softmax(s):
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def biformer_from_scratch(q, k, v, S, topk):
    """q, k (H, Hs, Ws, D), v (H, Hs, Ws, Dv) -> (H, Hs, Ws, Dv); no LCE term."""
    H, Hs, Ws, D = q.shape
    h, w = Hs // S, Ws // S

    def regions(x):  # (H, Hs, Ws, d) -> (S*S, H, h*w, d), regions row-major
        x = x.reshape(H, S, h, S, w, -1).transpose(1, 3, 0, 2, 4, 5)
        return x.reshape(S * S, H, h * w, -1)

    qr, kr, vr = regions(q), regions(k), regions(v)
    A = qr.mean(axis=2).reshape(S * S, -1) @ kr.mean(axis=2).reshape(S * S, -1).T  # (S^2, S^2)
    routes = np.argsort(-A, axis=1, kind="stable")[:, :topk]  # (S^2, topk)
    out = np.empty((S * S, H, h * w, v.shape[-1]))
    for i in range(S * S):
        kg = np.concatenate(kr[routes[i]], axis=1)  # (H, topk*h*w, D): the routed keys
        vg = np.concatenate(vr[routes[i]], axis=1)
        out[i] = softmax(qr[i] @ kg.transpose(0, 2, 1) / np.sqrt(H * D)) @ vg
    out = out.reshape(S, S, H, h, w, -1).transpose(2, 0, 3, 1, 4, 5)  # (H, S, h, S, w, Dv)
    return out.reshape(H, Hs, Ws, -1)


# %% [markdown]
# `qkv.reference.local.biformer` takes the design's spatial layout `(B, H, Hs, Ws, D)`
# and adds the LCE term. On float64 inputs it agrees with the lines above to rounding:

# %%
B, H, Hs, Ws, D = 2, 4, 28, 28, 16
q, k, v = (rng.standard_normal((B, H, Hs, Ws, D)) for _ in range(3))
ours = np.stack([biformer_from_scratch(q[b], k[b], v[b], S=7, topk=4) for b in range(B)])
reference = bilevel_routing(q, k, v, n_win=7, topk=4)
print("qkv bilevel_routing vs from scratch: relative error", rel_err(ours, reference))
np.testing.assert_allclose(ours, reference, rtol=1e-12, atol=1e-12)

# %% [markdown]
# When every region routes to every region ($k = S^2$) and there is no LCE, the token level
# sees all keys: bi-level routing is then full attention at scale $C^{-1/2}$.

# %%
flat = [x.reshape(B, H, Hs * Ws, D) for x in (q, k, v)]
full = core.sdpa(*flat, scale=(H * D) ** -0.5).reshape(B, H, Hs, Ws, D)
print(
    "topk = S^2 equals full attention:",
    np.allclose(bilevel_routing(q, k, v, n_win=7, topk=49), full),
)

# %% [markdown]
# ## 2. Where do regions route? A synthetic scene
#
# A $56 \times 56$ "image" with a disc, a square and a bar on a textured background. Each
# pixel's feature is an embedding of the object it belongs to plus a little noise, so pixels of
# the same object have similar features wherever they are; the queries and keys are two random
# projections of those features (sharing one projection, so that same-object pixels attract).
# With $S = 7$ (regions of $8 \times 8$ pixels) and $k = 4$, we draw, for three query regions,
# the four regions each routes to.

# %%
side, S, topk = 56, 7, 4
yy, xx = np.mgrid[0:side, 0:side]
labels = np.zeros((side, side), dtype=int)  # 0: background
labels[(yy - 14) ** 2 + (xx - 40) ** 2 < 10**2] = 1  # disc, top right
labels[34:52, 6:24] = 2  # square, bottom left
labels[40:46, 30:54] = 3  # bar, bottom right
C = 32
embedding = rng.standard_normal((4, C))  # one feature vector per object
features = embedding[labels] + 0.3 * rng.standard_normal((side, side, C))  # (Hs, Ws, C)
W = rng.standard_normal((C, C)) / np.sqrt(C)
heads = 4


def to_heads(x):  # (Hs, Ws, C) -> (1, heads, Hs, Ws, C / heads)
    return x.reshape(side, side, heads, -1).transpose(2, 0, 1, 3)[None]


qs, ks, vs = to_heads(features @ W), to_heads(features @ W), to_heads(features)
routes = routing_indices(qs, ks, n_win=S, topk=topk)[0]  # (S^2, topk)
queries = {"disc": 1 * S + 5, "square": 5 * S + 1, "background": 0 * S + 0}

fig, axes = plt.subplots(1, 3, figsize=(12, 4))
region_px = side // S
for ax, (name, r) in zip(axes, queries.items(), strict=True):
    ax.imshow(labels, cmap="Pastel1", vmin=0, vmax=8)
    for j in routes[r]:
        y0, x0 = divmod(int(j), S)
        ax.add_patch(
            Rectangle(
                (x0 * region_px - 0.5, y0 * region_px - 0.5),
                region_px,
                region_px,
                fill=True,
                alpha=0.35,
                color="tab:blue",
            )
        )
    y0, x0 = divmod(r, S)
    ax.add_patch(
        Rectangle(
            (x0 * region_px - 0.5, y0 * region_px - 0.5),
            region_px,
            region_px,
            fill=False,
            lw=2.5,
            color="tab:red",
        )
    )
    ax.set_xticks(np.arange(0, side + 1, region_px) - 0.5, [])
    ax.set_yticks(np.arange(0, side + 1, region_px) - 0.5, [])
    ax.grid(color="grey", lw=0.5)
    ax.set_title(f"query region on the {name} (red): its {topk} routes (blue)", fontsize=9)
fig.tight_layout()
plt.show()

# %% [markdown]
# The disc and square regions route to regions of their own object, even far away: the
# routing follows content, not distance. How often, over all regions, does a route land on a
# region whose majority object is the query region's own? Compared with what routing to $k$
# random regions would give:

# %%
blocks = labels.reshape(S, region_px, S, region_px).transpose(0, 2, 1, 3).reshape(S * S, -1)
majority = np.array([np.bincount(block).argmax() for block in blocks])  # (S^2,)
same = (majority[routes] == majority[:, None]).mean()
chance = np.mean([(majority == majority[r]).mean() for r in range(S * S)])
print(f"routes to a region of the same object: {same:.2f}  (random routing: {chance:.2f})")

# %% [markdown]
# ## 3. The token level on every backend
#
# After the gather, the token attention is one `sdpa` call batched over the $B S^2$ query
# regions, each with $k \cdot \tfrac{H_s W_s}{S^2}$ keys. `qkv.bilevel_routing` runs that call
# on the chosen backend (`QKV_BACKEND`, `qkv.use_backend`, `backend=`); routing, gather and LCE
# stay in NumPy. BiFormer-T keeps $S = 7$ in every stage and routes to $k = 1, 4, 16$ and all
# 49 regions in its four stages; below, $k = 4$ on a $56 \times 56$ map (the stage-1 size),
# $H = 4$ heads of $D = 32$, float32, with a $5 \times 5$ LCE, against full attention on the
# same backend. The error is against the float64 reference.


# %%

side = 28 if SMALL else 56
x32 = [rng.standard_normal((1, 4, side, side, 32)).astype(np.float32) for _ in range(3)]
lepe = (0.1 * rng.standard_normal((4, 32, 5, 5))).astype(np.float32)
golden = bilevel_routing(
    *(x.astype(np.float64) for x in x32), n_win=7, topk=4, lepe=lepe.astype(np.float64)
)
flat32 = [x.reshape(1, 4, side * side, 32) for x in x32]
rows = []
runnable, skipped = runnable_backends()
for name in runnable:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", qkv.FallbackWarning)

        def run_bra(name=name):
            return qkv.bilevel_routing(*x32, n_win=7, topk=4, lepe=lepe, backend=name)

        def run_full(name=name):
            return qkv.sdpa(*flat32, scale=128**-0.5, backend=name)

        err = rel_err(run_bra(), golden)  # also the warm-up (Numba compiles on first use)
        run_full()
        t_bra, t_full = best_of(run_bra, 3), best_of(run_full, 3)
    rows.append(
        (
            name,
            f"{t_bra * 1e3:.1f} ms",
            f"{t_full * 1e3:.1f} ms",
            f"{t_full / t_bra:.1f}x",
            f"{err:.1e}",
        )
    )
print(
    f"B=1 H=4 map {side}x{side} D=32, S=7, k=4 of 49 regions, float32; {os.cpu_count()} CPU cores\n"
)
show_table(("backend", "bi-level routing", "full sdpa", "speed-up", "rel. error"), rows)
for name, why in skipped:
    print(f"\n{name}: {why}")

# %% [markdown]
# ## 4. What the paper reports, and what we see here
#
# | paper | reports | here |
# |---|---|---|
# | content-aware sparsity | each region attends to its $k$ most related regions, found by region-level attention | on the synthetic scene, routes land on same-object regions far more often than chance (section 2) |
# | cost | $O\big((HW)^{4/3}\big)$ with a suitable $S$, instead of $O\big((HW)^2\big)$; only dense matmuls and a gather | each query reads $k/S^2$ of the keys (here $4/49$); measured against full attention per backend (section 3) |
# | scale | — (the code uses ``qk_dim ** -0.5``) | default $C^{-1/2}$ over all heads, `per_head_scale=True` for $D^{-1/2}$ |
# | $k = S^2$ | — | equals full attention (section 1, and a test) |
# | accuracy | BiFormer-T 83.8% ImageNet top-1 at 2.2 GFLOPs; gains in detection and segmentation | no training here; out of scope |
#
# The numbers of this run:

# %%
show_table(
    ("quantity", "value"),
    [
        ("same-object routes / chance", f"{same:.2f} / {chance:.2f}"),
        ("keys read per query, k / S^2", f"{4 / 49:.3f}"),
        *[(f"{r[0]}: speed-up over full attention", r[3]) for r in rows],
    ],
)

# %% [markdown]
# ## References
#
# * L. Zhu, X. Wang, Z. Ke, W. Zhang, R. Lau. *BiFormer: Vision Transformer with Bi-Level
#   Routing Attention.* CVPR 2023. [arXiv 2303.08810](https://arxiv.org/abs/2303.08810).
#   Code: [rayleizhu/BiFormer](https://github.com/rayleizhu/BiFormer).
