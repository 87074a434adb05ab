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
# # Neighborhood attention
#
# *Paper:* A. Hassani, W.-M. Hwu, H. Shi, *Faster Neighborhood Attention: Reducing the
# O(n^2) Cost of Self Attention at the Threadblock Level*
# ([arXiv 2403.04690](https://arxiv.org/abs/2403.04690)).
# *Official code:* [SHI-Labs/NATTEN](https://github.com/SHI-Labs/NATTEN).
#
# Self attention lets every token of an image or a sequence look at every other one, so its
# cost grows with the square of the number of tokens: a 256 x 256 feature map has 65,536
# tokens and 4.3 billion query-key pairs per head. Neighborhood attention restricts each query to
# the `kernel_size` keys nearest to it along every axis, like a convolution whose weights are
# computed by attention. The cost becomes linear in the number of tokens, and two knobs span
# the space between a local window and full attention: the window size and a *dilation* that
# spreads the window out to see farther with the same number of keys (DiNAT).
#
# The idea is old; what the paper is about is making it fast. A masked full attention wastes
# almost all its work, and hand-written "naive" kernels for 2-D and 3-D neighborhoods were
# slow. The paper writes neighborhood attention as batched GEMMs and then as a *fused* kernel
# in the style of FlashAttention, where each query tile only visits the key tiles its
# neighborhoods touch, with constant memory. This tutorial builds the pattern from the mask up,
# checks `qkv.neighborhood` against it, and then measures a fused kernel against masked full
# attention on the same image sizes.

# %%
import os
import time

import matplotlib.pyplot as plt
import numpy as np

import qkv
from qkv.lab.notebook import rel_err, show_table

SMALL = os.environ.get("QKV_TUTORIAL_SMALL") == "1"  # the test suite runs us at small sizes
rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. The window along one axis
#
# Take one axis of length $L$, kernel size $k$ and dilation $d$. NATTEN's rule, which `qkv`
# follows exactly:
#
# * a position $i$ belongs to the **dilation group** $g = i \bmod d$ at place
#   $i' = \lfloor i/d \rfloor$; the group holds $L_g = \lceil (L - g)/d \rceil$ places and
#   attention never leaves it;
# * the window has $w_l = \lfloor k/2 \rfloor$ places on the left of its centre and
#   $w_r = k - 1 - w_l$ on the right, and the centre is the query's place **clamped** so the
#   window stays inside the group:
#
# $$
# c = \operatorname{clamp}(i',\ w_l,\ L_g - 1 - w_r), \qquad
# \mathcal{N}(i) = \{\, (c + t)\,d + g \;:\; t = -w_l, \dots, w_r \,\}.
# $$
#
# Near a border the window is shifted inward rather than cut, so every query sees exactly $k$
# keys (this needs $k\,d \le L$). In the **causal** form a query sees the $k$ places ending at
# its own, $j' \in [\max(0, i' - k + 1), i']$. A **stride** $s$ makes runs of $s$ queries share
# the window of the run's middle query (or last, when causal); $s = k$ tiles the axis into
# blocks. In 2-D and 3-D the neighborhood is the product of the per-axis windows:
#
# $$
# O_i = \sum_{j \in \mathcal{N}(i)} \frac{e^{\langle q_i, k_j\rangle/\sqrt{D}}}
# {\sum_{j' \in \mathcal{N}(i)} e^{\langle q_i, k_{j'}\rangle/\sqrt{D}}}\, v_j,
# \qquad \mathcal{N}(i) = \mathcal{N}_1(i_1) \times \mathcal{N}_2(i_2) \times \dots
# $$
#
# ### From scratch, in NumPy


# %%
def window(i, L, k, d=1):
    """Key positions of query i along an axis (non-causal, stride 1)."""
    g, place = i % d, i // d
    group_length = len(range(g, L, d))
    centre = min(max(place, k // 2), group_length - 1 - (k - 1 - k // 2))
    return [(centre + t) * d + g for t in range(-(k // 2), k - k // 2)]


def mask_1d(L, k, d=1):
    mask = np.zeros((L, L), dtype=bool)
    for i in range(L):
        mask[i, window(i, L, k, d)] = True
    return mask


print("query 0 of 16, k=5, d=1:", window(0, 16, 5))
print("query 7 of 16, k=5, d=2:", window(7, 16, 5, 2))
print("query 7 of 16, k=4, d=2:", window(7, 16, 4, 2), "(even kernel: 2 left, 1 right)")
same = all(
    (mask_1d(16, k, d) == qkv.neighbor_mask((16,), kernel_size=k, dilation=d)).all()
    for k, d in [(5, 1), (5, 2), (4, 2), (3, 5), (16, 1)]
)
print("from-scratch masks equal qkv.neighbor_mask:", same)

# %% [markdown]
# The masks below are rows = queries, columns = keys. Without dilation the band is shifted at
# both ends (the first and last rows are not centred on the diagonal); with $d = 2$ the band
# splits into two interleaved groups; the causal form keeps the part at or left of the
# diagonal.

# %%
L = 24
panels = {
    "k = 5": qkv.neighbor_mask((L,), kernel_size=5),
    "k = 5, dilation 2": qkv.neighbor_mask((L,), kernel_size=5, dilation=2),
    "k = 5, causal": qkv.neighbor_mask((L,), kernel_size=5, causal=True),
    "k = 4, stride 4 (blocks)": qkv.neighbor_mask((L,), kernel_size=4, stride=4),
}
fig, axes = plt.subplots(1, 4, figsize=(14, 3.8))
for ax, (title, mask) in zip(axes, panels.items(), strict=True):
    ax.imshow(mask, cmap="Greys", interpolation="nearest")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("key")
axes[0].set_ylabel("query")
fig.suptitle(f"1-D neighborhood masks, L = {L}")
fig.tight_layout()
plt.show()

# %% [markdown]
# In 2-D each query's neighborhood is a $k \times k$ patch of the image (with dilation, a
# spread-out lattice). Below: the keys that three queries see on a 12 x 12 grid, one at a
# corner, one at the border, one inside, for a 5 x 5 kernel without and with dilation 2. The
# corner query's window is not centred on it: it is pushed inward so that it still holds
# 25 keys.

# %%
side = 12
queries = {"corner": (0, 0), "border": (5, 11), "inside": (6, 5)}
fig, axes = plt.subplots(1, 2, figsize=(9, 4.5))
for ax, dilation in zip(axes, (1, 2), strict=True):
    mask = qkv.neighbor_mask((side, side), kernel_size=5, dilation=dilation)  # (144, 144)
    picture = np.zeros((side, side))
    for value, (r, c) in enumerate(queries.values(), start=1):
        picture[mask[r * side + c].reshape(side, side)] = value
    ax.imshow(picture, cmap="Pastel1_r", vmin=0, vmax=8)
    for name, (r, c) in queries.items():
        ax.plot(c, r, "kx", markersize=10)
        ax.annotate(name, (c, r), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_title(f"5 x 5 kernel, dilation {dilation} (x: the query)", fontsize=10)
fig.tight_layout()
plt.show()
counts = qkv.neighbor_mask((side, side), kernel_size=5, dilation=2).sum(axis=1)
print("keys per query (dilation 2): min", counts.min(), "max", counts.max())

# %% [markdown]
# ## 2. Attention through the mask, and without it
#
# With the mask, neighborhood attention is ordinary softmax attention with most scores set to
# $-\infty$. `qkv.neighborhood` instead *gathers* each query's $K = \prod k$ neighbours by
# index (`qkv.reference.local.neighborhood_attention.neighbor_indices`) and never forms the $N \times N$
# matrix. From scratch, one query at a time on a 1-D sequence:

# %%
N, D, k, d = 40, 16, 7, 3
q, kk, v = (rng.standard_normal((1, 1, N, D)) for _ in range(3))  # (B, H, N, D)


def neighborhood_1d(q, k, v, kernel_size, dilation):
    """softmax over each query's window, for one head: q, k, v (N, D)."""
    out = np.zeros_like(v)
    for i in range(len(q)):
        keys = window(i, len(q), kernel_size, dilation)
        s = k[keys] @ q[i] / np.sqrt(q.shape[-1])  # (kernel_size,)
        p = np.exp(s - s.max())
        out[i] = p @ v[keys] / p.sum()
    return out


mine = neighborhood_1d(q[0, 0], kk[0, 0], v[0, 0], k, d)
ours = qkv.neighborhood(q, kk, v, kernel_size=k, dilation=d)[0, 0]
masked = qkv.sdpa(q, kk, v, mask=qkv.neighbor_mask((N,), kernel_size=k, dilation=d))[0, 0]
scratch_err, masked_err = rel_err(mine, ours), rel_err(masked, ours)
print(f"from scratch vs qkv.neighborhood: {scratch_err:.1e}")
print(f"sdpa under the mask vs qkv.neighborhood: {masked_err:.1e}")
full = qkv.neighborhood(q, kk, v, kernel_size=N)[0, 0]
print(f"kernel_size = N equals full attention: {rel_err(full, qkv.sdpa(q, kk, v)[0, 0]):.1e}")

# %% [markdown]
# ## 3. The fused kernels
#
# The paper's fused kernel is FlashAttention restricted to the key tiles a query tile's
# neighbourhoods touch. `qkv`'s backends follow the same principle at their own scale: each
# query computes the first key and the key count of its window on every axis *arithmetically*
# (the rule of section 1, no index table, no mask) and folds its $K$ neighbours into a softmax:
#
# * **numba**: one pass per query (scores into a $K$-entry scratch row, maximum, exponentials,
#   weighted sum), parallel over (batch, head, chunk of queries), float32 and float64;
# * **torch**: a Triton forward kernel (a tile of queries per program, online softmax over the
#   $K$ slots) on CUDA tensors and under the Triton interpreter, and an autograd-friendly gather
#   form otherwise;
# * **cupy**: a CUDA kernel with one warp per query (compiled with `nvcc`, not yet run on a
#   GPU).
#
# The same call through each backend that runs here, on a 2-D map with a 7 x 7 window, fp32
# ("best" of a few calls after a warm-up; the torch row times the Triton *interpreter* when
# `TRITON_INTERPRET=1` is set, as in the test suite, which is a correctness tool, not a kernel):


# %%
def best_ms(call, repeats):
    """Best wall time of ``call()`` in ms over ``repeats`` calls after one warm-up call."""
    call()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


side = 24 if SMALL else 64
q, kk, v = (rng.standard_normal((1, 4, side, side, 32)).astype(np.float32) for _ in range(3))
golden = qkv.neighborhood(*(x.astype(np.float64) for x in (q, kk, v)), kernel_size=7)
rows = []
for backend in ("reference", "numba", "torch", "cupy"):
    try:
        out = qkv.neighborhood(q, kk, v, kernel_size=7, backend=backend)
    except qkv.BackendUnavailable as why:
        rows.append((backend, "-", f"unavailable: {str(why)[:60]}"))
        continue
    ms = best_ms(lambda: qkv.neighborhood(q, kk, v, kernel_size=7, backend=backend), 2)  # noqa: B023
    rows.append((backend, f"{ms:.1f}", f"{rel_err(out, golden):.1e}"))
show_table(("backend", "best ms", "rel. error vs float64"), rows)

# %% [markdown]
# ## 4. Linear against quadratic: a measured curve
#
# Same square images, same 7 x 7 window, growing side: the numba fused kernel against full
# attention under the neighbour mask on the same backend (`qkv.sdpa(..., mask=neighbor_mask,
# backend="numba")`, a tiled flash kernel that still computes every score), float32,
# $B = 1$, $H = 4$, $D = 32$. A fixed window makes the fused kernel's work proportional to the
# number of tokens; the masked form's is proportional to its square.

# %%
sides = [8, 16, 24] if SMALL else [16, 32, 48, 64]
curves = {"fused neighborhood (numba)": [], "sdpa + mask (numba)": []}
tokens = [s * s for s in sides]
for s in sides:
    q, kk, v = (rng.standard_normal((1, 4, s, s, 32)).astype(np.float32) for _ in range(3))
    mask = qkv.neighbor_mask((s, s), kernel_size=7)  # (N, N)
    flat = [x.reshape(1, 4, s * s, 32) for x in (q, kk, v)]  # (B, H, N, D)
    fused = lambda: qkv.neighborhood(q, kk, v, kernel_size=7, backend="numba")  # noqa: B023, E731
    masked = lambda: qkv.sdpa(*flat, mask=mask, backend="numba")  # noqa: B023, E731
    curves["fused neighborhood (numba)"].append(best_ms(fused, 3))
    curves["sdpa + mask (numba)"].append(best_ms(masked, 3))
fig, ax = plt.subplots(figsize=(6, 4))
for name, ms in curves.items():
    ax.loglog(tokens, ms, "o-", label=name)
ax.loglog(tokens, curves["sdpa + mask (numba)"][0] * (np.array(tokens) / tokens[0]) ** 2, "k:",
          label="slope 2 (quadratic)")  # fmt: skip
ax.set_xlabel("tokens (side x side)")
ax.set_ylabel("best time per call (ms)")
ax.set_title("7 x 7 neighborhood on square maps, numba, fp32")
ax.legend(fontsize=8)
plt.show()
show_table(
    ("side", "tokens", *curves, "masked / fused"),
    [(s, n, *(f"{curves[c][i]:.2f}" for c in curves),
      f"{curves['sdpa + mask (numba)'][i] / curves['fused neighborhood (numba)'][i]:.1f}")
     for i, (s, n) in enumerate(zip(sides, tokens, strict=True))],
)  # fmt: skip

# %% [markdown]
# On small maps the masked form is competitive (at $N \le K$ there is little to skip, and a
# fixed per-call overhead dominates both). As the map grows the masked form's time grows with
# $N^2$ and the fused kernel's with $N$; the gap at 4096 tokens is one of the figures of
# `benchmarks/neighborhood.py`, which also runs 1-D sequences and 2-D maps up to 64k tokens and
# compares with torch's SDPA under the same mask.
#
# ## 5. What the paper reports, and what we see here
#
# The paper measures GPU kernels (A100, H100) against NATTEN's earlier "naive" kernels: fused
# neighborhood attention improves on them by about 1607% (1-D) and 581% (2-D) on average in
# half precision, the GEMM-based unfused kernels by 496% and 113%, and full precision by 895%
# and 272% for the GEMM form. It also argues that neighborhood attention is linear in the
# number of tokens with a constant memory footprint once fused.
#
# Here, on a CPU, we cannot reproduce GPU latency numbers. What we can check is the premise:
# the fused kernel's time grows linearly in the tokens at a fixed window while masked full
# attention grows quadratically, and the fused kernel never forms an $N \times N$ array. The
# Triton and CuPy kernels are checked for correctness here (interpreter, nvcc) and benchmarked
# against masked attention on a GPU by `benchmarks/gpu_bench.py` when one is lent.
