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
# # Key-driven grouped-query attention: GQA, KDGQA, DGQA and PGQA
#
# *Paper:* Khan, Khaquan, Tafveez, Samiwala, Raza,
# [Beyond Uniform Query Distribution: Key-Driven Grouped Query Attention](https://arxiv.org/abs/2408.08454)
# (arXiv 2408.08454). *Code:* the paper's repository was not found; the facts below come from the
# fork [yjzhang0505/key-driven-gqa](https://github.com/yjzhang0505/key-driven-gqa)
# (`modules/attention/`).
#
# At decoding time a transformer keeps every past key and value of every head: the KV cache.
# With $H$ heads it grows as $2 H d$ numbers per token and layer, and reading it dominates the
# cost of generating long sequences. Grouped-query attention (GQA) lets groups of query heads
# share one key/value head: $G$ KV heads instead of $H$, a cache $H/G$ times smaller; $G = H$ is
# ordinary multi-head attention (MHA) and $G = 1$ multi-query attention (MQA). A trained MHA
# model is converted by **mean-pooling** the key and value projections of each group of heads,
# then trained a little more ("uptraining").
#
# GQA's groups are fixed and uniform: query heads $0..r-1$ read KV head 0, and so on. The paper
# asks whether the keys should decide. **KDGQA** gives each KV head a number of query heads
# proportional to the norm of its keys, recomputed on every forward pass; **DGQA** does the
# same with norms tracked over training; **PGQA** perturbs the static groups with noise. The
# paper uptrains ViTs on image classification and reports DGQA ahead of GQA, by up to 8 points
# on ViT-L. This tutorial builds the four from the equations, checks them against `qkv`, and
# then converts a real encoder, MiniLM, to GQA without any training, to see how far each
# allocation moves the attention outputs on real text, and what that buys in cache.

# %%
import contextlib
import os
import warnings

import matplotlib.pyplot as plt
import numpy as np

try:  # one BLAS thread while timing: a fair comparison, and steady on a busy machine
    from threadpoolctl import threadpool_limits
except ImportError:  # threadpoolctl comes with qkv's cli and numba extras

    def threadpool_limits(limits):
        return contextlib.nullcontext()


import qkv
from qkv.lab import minilm
from qkv.lab.notebook import best_of, rel_err, runnable_backends, show_table
from qkv.reference.heads import grouped_query as gq

SMALL = os.environ.get("QKV_TUTORIAL_SMALL") == "1"  # the test suite runs us at small sizes
rng = np.random.default_rng(0)
np.set_printoptions(precision=4, suppress=True, linewidth=110)

# %% [markdown]
# ## 1. The equations
#
# Queries $Q_h \in \mathbb{R}^{N \times d}$ for $h = 0..H-1$, keys and values $K_g, V_g$ for
# $g = 0..G-1$, and an **allocation** $a \in \mathbb{N}^G$ with $\sum_g a_g = H$: the first
# $a_0$ query heads read KV head 0, the next $a_1$ read KV head 1, and so on. Every head is
# ordinary softmax attention,
#
# $$
# O_h = \operatorname{softmax}\!\Big(\frac{Q_h K_{g(h)}^\top}{\sqrt d}\Big) V_{g(h)}, \qquad
# g(h) = \min\Big\{g : h < \textstyle\sum_{g' \le g} a_{g'}\Big\}.
# $$
#
# * **GQA**: $a_g = H/G$ for all $g$. Converting MHA: $W^K_g = \frac{G}{H}\sum_{h \in
#   \mathcal{G}_g} W^K_h$ over the contiguous group $\mathcal{G}_g$ (same for $W^V$ and the
#   biases). Projection is linear, so pooling the weights equals pooling the projected heads,
#   $X W^K_g + b^K_g = \frac{G}{H}\sum_{h \in \mathcal{G}_g} (X W^K_h + b^K_h)$: we use the
#   latter on MiniLM below, whose capture holds the projected heads, not the weights.
# * **KDGQA**: $n_g = \lVert K_g \rVert_F$ and
#   $a_g = \operatorname{round}\big(H\,n_g / \sum_{g'} n_{g'}\big)$, then repaired one head at a
#   time (take from the largest count, give to the smallest) until $\sum_g a_g = H$. A group
#   may receive zero query heads.
# * **DGQA**: the same rounding applied to a statistic tracked over training steps, either an
#   exponential moving average $r = \beta n + (1-\beta) c$ or the change $r = |c - n|$ of the
#   norms over a window.
# * **PGQA**: GQA, then $O_h \leftarrow O_h - E_h$ with noise $E_h$ drawn per group and rescaled
#   to the mean and standard deviation of $O_h$.
#
# ### From scratch, in NumPy


# %%
def softmax(s):
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def allocate(norms, H):
    """Query heads per KV head in proportion to the key norms, repaired to sum to H."""
    a = np.round(H * norms / norms.sum()).astype(int)
    while a.sum() > H:
        a[np.argmax(a)] -= 1
    while a.sum() < H:
        a[np.argmin(a)] += 1
    return a


def grouped_attention(q, k, v, a):
    """q (H, N, d), k and v (G, M, d), allocation a (G,) -> (H, N, d)."""
    kv_head = np.repeat(np.arange(len(a)), a)  # g(h) for h = 0..H-1
    return np.stack(
        [
            softmax(qh @ k[g].T / np.sqrt(q.shape[-1])) @ v[g]
            for qh, g in zip(q, kv_head, strict=True)
        ]
    )


# %% [markdown]
# One sample with $H = 8$ query heads and $G = 4$ KV heads whose keys have different scales.
# `qkv`'s functions take the batched `(B, H, N, d)` layout; in float64 they agree with the
# lines above to rounding:

# %%
H, G, N, d = 8, 4, 16, 32
q = rng.standard_normal((1, H, N, d))
k = rng.standard_normal((1, G, N, d)) * np.array([0.3, 1.0, 2.0, 0.7])[None, :, None, None]
v = rng.standard_normal((1, G, N, d))

norms = np.linalg.norm(k[0], axis=(1, 2))
a = allocate(norms, H)
print("key norms:", norms, "-> allocation", a)
uniform = np.full(G, H // G)
show_table(
    ("form", "relative error vs from-scratch"),
    [
        (
            "qkv.gqa",
            f"{rel_err(qkv.gqa(q, k, v)[0], grouped_attention(q[0], k[0], v[0], uniform)):.1e}",
        ),
        (
            "qkv.kdgqa",
            f"{rel_err(qkv.kdgqa(q, k, v)[0], grouped_attention(q[0], k[0], v[0], a)):.1e}",
        ),
    ],
)
np.testing.assert_allclose(
    qkv.kdgqa(q, k, v)[0], grouped_attention(q[0], k[0], v[0], a), atol=1e-12
)

# %% [markdown]
# Two identities the paper relies on: with $G = H$ the uptrained weights are the MHA weights
# (the output is bit-identical), and pooling the projection weights equals pooling the
# projected heads.

# %%
C = 48
weights = gq.AttentionWeights(
    w_q=rng.standard_normal((H, C, d)),
    w_k=rng.standard_normal((H, C, d)),
    w_v=rng.standard_normal((H, C, d)),
    b_q=rng.standard_normal((H, d)),
    b_k=rng.standard_normal((H, d)),
    b_v=rng.standard_normal((H, d)),
)
x = rng.standard_normal((2, N, C))
mha = qkv.sdpa(*gq.project(x, weights))
print(
    "G = H, uptrained == MHA exactly:",
    np.array_equal(qkv.gqa(*gq.project(x, gq.uptrain(weights, H))), mha),
)
q_x, k_x, v_x = gq.project(x, weights)
for groups in (1, 2, 4):
    pooled_weights = qkv.gqa(*gq.project(x, gq.uptrain(weights, groups)))
    pooled_heads = qkv.gqa(q_x, k_x, v_x, groups=groups)
    print(
        f"G = {groups}: pool weights vs pool heads, relative difference {rel_err(pooled_weights, pooled_heads):.1e}"
    )

# %% [markdown]
# **Paper versus code.** The paper allocates by the *ratios* of the key norms. The official
# code differs in two ways that matter: it sums the norms over the **batch** (so one image's
# output depends on the other images in its batch) and it **min-max normalises** them first,
# which sends the smallest-norm group to zero heads and divides 0 by 0 (NaN counts) when all
# norms are equal. `qkv.kdgqa` follows the paper per sample by default, falls back to uniform
# GQA when the norms are equal, and offers the code's behaviour as
# `batch_coupled=True, normalisation="minmax"`:

# %%
_, a_paper = qkv.kdgqa(q, k, v, return_allocation=True)
_, a_code = qkv.kdgqa(q, k, v, batch_coupled=True, normalisation="minmax", return_allocation=True)
k_equal = k / np.linalg.norm(k, axis=(2, 3), keepdims=True)
_, a_equal = qkv.kdgqa(q, k_equal, v, normalisation="minmax", return_allocation=True)
show_table(
    ("rule", "allocation"),
    [
        ("paper: norm ratios", a_paper[0]),
        ("code: min-max", a_code[0]),
        ("code rule, equal norms", a_equal[0]),
    ],
)

# %% [markdown]
# ## 2. MiniLM converted to GQA, without training
#
# `qkv.lab.minilm.load()` holds the queries, keys and values MiniLM (6 layers, 12 heads,
# $d = 32$, bidirectional) computed on a few paragraphs of Python's documentation. We convert
# each layer to $G \in \{1, 2, 3, 4, 6\}$ KV heads by mean-pooling contiguous heads, and
# compare the layer's attention outputs (all heads, concatenated: what the output projection
# reads) with the original MHA outputs. Two allocations of the 12 query heads to the $G$ pooled
# KV heads: uniform GQA, and KDGQA from the pooled keys' norms. No uptraining happens here, so
# these are the errors uptraining would start from.

# %%
cap = minilm.load()
layers = [0, 2, 5] if SMALL else list(range(cap.n_layers))
T = 128 if SMALL else cap.n_tokens
q_m, k_m, v_m = (
    x[layers, :, :T].astype(np.float64) for x in (cap.q, cap.k, cap.v)
)  # (L, 12, T, 32)
print(f"{len(layers)} layers as the batch, {T} tokens: q {q_m.shape}")
reference_out = qkv.gqa(q_m, k_m, v_m)  # MHA: G = H = 12

group_counts = [1, 2, 3, 4, 6]
errors = {"GQA (uniform)": [], "KDGQA (paper)": [], "KDGQA (code rule)": []}
allocations = {}
for groups in group_counts:
    k_g, v_g = gq.pool_heads(k_m, groups), gq.pool_heads(v_m, groups)  # (L, G, T, 32)
    errors["GQA (uniform)"].append(rel_err(qkv.gqa(q_m, k_g, v_g), reference_out))
    out, allocations[groups] = qkv.kdgqa(q_m, k_g, v_g, return_allocation=True)
    errors["KDGQA (paper)"].append(rel_err(out, reference_out))
    code_out = qkv.kdgqa(q_m, k_g, v_g, batch_coupled=True, normalisation="minmax")
    errors["KDGQA (code rule)"].append(rel_err(code_out, reference_out))

show_table(
    ("G", *errors),
    [(g, *(f"{errors[name][i]:.3f}" for name in errors)) for i, g in enumerate(group_counts)],
)
print("\nKDGQA allocation per layer, G = 4:")
for layer, row in zip(layers, allocations[4], strict=True):
    print(f"  layer {layer}: {row}")

# %% [markdown]
# The KV cache of this sequence for the converted model (all six layers, keys and values,
# 2 bytes per number), against the error each choice of $G$ costs:

# %%
L_all, n_tok, head_dim = cap.n_layers, cap.n_tokens, cap.head_dim


def cache_kib(groups):
    return 2 * L_all * groups * n_tok * head_dim * 2 / 1024  # K and V, fp16


fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
for name, errs in errors.items():
    axes[0].plot(group_counts, errs, "o-", label=name)
    axes[1].plot([cache_kib(g) for g in group_counts], errs, "o-", label=name)
axes[0].set_xlabel("KV heads G (of 12 query heads)")
axes[0].set_ylabel("relative error of the attention outputs")
axes[0].set_xticks(group_counts)
axes[1].axvline(cache_kib(12), color="grey", ls=":", label="MHA cache (error 0)")
axes[1].set_xlabel(f"KV cache, {n_tok} tokens, 6 layers, fp16 (KiB)")
axes[1].legend(fontsize=8)
fig.suptitle("MiniLM converted to GQA by mean pooling, no uptraining")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 3. DGQA: the allocation as training goes
#
# DGQA keeps its statistic in an explicit state, `DGQAState` (cache of norms, allocation, step
# count); `qkv.dgqa` returns the output and the new state. Here a stand-in for training: 12
# steps whose keys drift (head 0 grows, head 3 shrinks). The `ema` allocation follows the
# drifting norms; `diff` follows how much each head's norm *changed* since the last update.
# The official code repairs the rounded counts at random indices; `qkv` repairs
# deterministically unless given an `rng` (then the code's random rule, reproducibly).

# %%
B, H, G, N, d = 2, 8, 4, 16, 32
q_t = rng.standard_normal((B, H, N, d))
v_t = rng.standard_normal((B, G, N, d))
states = {"ema": gq.DGQAState.initial(H, G), "diff": gq.DGQAState.initial(H, G)}
trace = []
for step in range(12):
    drift = np.array([1.0 + 0.15 * step, 1.0, 1.0, max(1.0 - 0.07 * step, 0.1)])
    k_t = rng.standard_normal((B, G, N, d)) * drift[None, :, None, None]
    row = [step]
    for kind in states:
        _, states[kind] = qkv.dgqa(q_t, k_t, v_t, states[kind], kind=kind, window=2)
        row.append(states[kind].allocation)
    trace.append(row)
show_table(("step", "ema allocation", "diff allocation"), trace)

# %% [markdown]
# ## 4. PGQA: what the noise does
#
# The official code subtracts, from each group's head outputs, uniform noise whose diagonal is
# zeroed and which is rescaled to the outputs' own mean and standard deviation, and it does so
# at inference too. One consequence worth knowing: every perturbed head output has mean zero,
# and the perturbation is as large as the signal's spread. On MiniLM (uniform GQA, $G = 4$):

# %%
k4, v4 = gq.pool_heads(k_m, 4), gq.pool_heads(v_m, 4)  # (L, 4, T, 32)
clean = qkv.gqa(q_m, k4, v4)
perturbed = qkv.pgqa(q_m, k4, v4, rng=np.random.default_rng(0))
print(f"relative change from the noise: {rel_err(perturbed, clean):.2f}")
print(
    f"largest |row mean| after perturbation: {np.abs(perturbed.reshape(*perturbed.shape[:2], -1).mean(-1)).max():.1e}"
)

# %% [markdown]
# ## 5. Every backend
#
# None of these variants needs a kernel of its own: after the allocation is known, each is one
# softmax attention, and every forward calls the dispatched `qkv.sdpa` on the backend chosen by
# `QKV_BACKEND`, `qkv.use_backend` or `backend=`. KDGQA gathers the KV head of each query head
# first (an `(B, H, M, d)` copy), so it pays a memory copy that GQA's grouped call avoids.
# Below: $B = 1$, $H = 12$, $G = 4$, $d = 64$, float32, each backend that runs here; the error
# is against the float64 reference.

# %%
N = 512 if SMALL else 2048
q32 = rng.standard_normal((1, 12, N, 64)).astype(np.float32)
k32 = rng.standard_normal((1, 4, N, 64)).astype(np.float32)
v32 = rng.standard_normal((1, 4, N, 64)).astype(np.float32)
golden = gq.kdgqa(*(x.astype(np.float64) for x in (q32, k32, v32)))


timings = {}  # backend -> (gqa seconds, kdgqa seconds, kdgqa error)
runnable, skipped = runnable_backends()
with threadpool_limits(1), warnings.catch_warnings():
    warnings.simplefilter("ignore", qkv.FallbackWarning)
    for name in runnable:
        err = rel_err(qkv.kdgqa(q32, k32, v32, backend=name), golden)  # also the warm-up
        qkv.gqa(q32, k32, v32, backend=name)
        t_gqa = best_of(lambda name=name: qkv.gqa(q32, k32, v32, backend=name), 3)
        t_kd = best_of(lambda name=name: qkv.kdgqa(q32, k32, v32, backend=name), 3)
        timings[name] = (t_gqa, t_kd, err)
print(f"B=1 H=12 G=4 N={N} d=64, float32, one BLAS thread\n")
base = timings["reference"][0]
show_table(
    ("backend", "gqa", "kdgqa", "kdgqa / gqa", "gqa speed vs reference", "kdgqa rel. error"),
    [
        (
            name,
            f"{tg * 1e3:.1f} ms",
            f"{tk * 1e3:.1f} ms",
            f"{tk / tg:.2f}",
            f"{base / tg:.1f}x",
            f"{e:.1e}",
        )
        for name, (tg, tk, e) in timings.items()
    ],
)
for name, why in skipped:
    print(f"\n{name}: {why}")

# %% [markdown]
# ## 6. What the paper reports, and what we see here
#
# | paper | reports | here |
# |---|---|---|
# | GQA conversion | mean-pool K/V heads of an MHA checkpoint, then uptrain | `uptrain` pools weights and biases; $G = H$ reproduces MHA exactly; pooling weights = pooling heads (section 1) |
# | KDGQA | query heads allocated by key-norm ratios on every pass | per sample by default; the code's batch-summed, min-max rule behind flags, without its NaN on equal norms (section 1) |
# | accuracy | DGQA up to 8 points above GQA on ViT-L after uptraining (CIFAR, Food101, Tiny ImageNet) | no uptraining here: converting MiniLM by pooling moves the outputs a lot at every $G < 12$ (section 2); the key-norm allocation does not reduce that training-free error |
# | DGQA | EMA / windowed-difference statistics updated during training | explicit `DGQAState`, deterministic repair by default (section 3) |
# | PGQA | noise varies the static groups | the code's noise is subtracted from outputs, also at inference; it zeroes each head's mean (section 4) |
# | memory | KV cache shrinks by $H/G$ | the cache axis of the figure in section 2 |
#
# The numbers of this run:

# %%
g4 = group_counts.index(4)
show_table(
    ("quantity", "value"),
    [
        ("layers x tokens used", f"{len(layers)} x {T}"),
        (
            "G = 4: error uniform GQA / KDGQA",
            f"{errors['GQA (uniform)'][g4]:.3f} / {errors['KDGQA (paper)'][g4]:.3f}",
        ),
        ("G = 1 (MQA) error", f"{errors['GQA (uniform)'][0]:.3f}"),
        ("cache G = 4 vs MHA", f"{cache_kib(4):.0f} KiB vs {cache_kib(12):.0f} KiB"),
        ("PGQA relative change (G = 4)", f"{rel_err(perturbed, clean):.2f}"),
    ],
)

# %% [markdown]
# ## References
#
# * Z. Khan, M. Khaquan, O. Tafveez, B. Samiwala, A. A. Raza. *Beyond Uniform Query
#   Distribution: Key-Driven Grouped Query Attention.* 2024.
#   [arXiv 2408.08454](https://arxiv.org/abs/2408.08454). Code facts from the fork
#   [yjzhang0505/key-driven-gqa](https://github.com/yjzhang0505/key-driven-gqa).
# * J. Ainslie et al. *GQA: Training Generalized Multi-Query Transformer Models from Multi-Head
#   Checkpoints.* EMNLP 2023. [arXiv 2305.13245](https://arxiv.org/abs/2305.13245).
# * N. Shazeer. *Fast Transformer Decoding: One Write-Head is All You Need.* 2019.
#   [arXiv 1911.02150](https://arxiv.org/abs/1911.02150).
# * W. Wang et al. *MiniLM: Deep Self-Attention Distillation for Task-Agnostic Compression of
#   Pre-Trained Transformers.* 2020. [arXiv 2002.10957](https://arxiv.org/abs/2002.10957).
