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
# # Softmax attention, from the equation to FlashAttention
#
# *Papers:* Vaswani et al., [Attention Is All You Need](https://arxiv.org/abs/1706.03762)
# (arXiv 1706.03762, 2017); Dao et al.,
# [FlashAttention: Fast and Memory-Efficient Exact Attention with IO-Awareness](https://arxiv.org/abs/2205.14135)
# (arXiv 2205.14135, 2022) and Dao,
# [FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning](https://arxiv.org/abs/2307.08691)
# (arXiv 2307.08691, 2023); in passing Su et al.,
# [RoFormer](https://arxiv.org/abs/2104.09864) (arXiv 2104.09864) and Press et al.,
# [ALiBi](https://arxiv.org/abs/2108.12409) (arXiv 2108.12409).
# *Official code:* [tensorflow/tensor2tensor](https://github.com/tensorflow/tensor2tensor),
# [Dao-AILab/flash-attention](https://github.com/Dao-AILab/flash-attention).
#
# A sequence model has to let every position read from other positions, and *which* positions
# matter depends on the content: in "the keys of the cabinet are on the table" the verb must
# find "keys", four words back, not "cabinet", one word back. Recurrent networks carry
# everything through one state vector, one step at a time; convolutions see a fixed window.
# Attention instead lets each position emit a **query** ("what am I looking for?"), each
# position a **key** ("what do I contain?") and a **value** ("what do I hand over?"), and
# reads a weighted average of the values, with weights given by how well each key matches the
# query. Every pair of positions is one matrix product apart, whatever their distance.
#
# The price is the $N \times M$ matrix of query-key scores. For long sequences it dominates
# time and, worse, memory: at $N = M = 16384$ one head's score matrix is a gibibyte in float32.
# FlashAttention's observation is that the matrix never has to exist: a softmax can be
# computed *online*, one block of keys at a time, with exactly the same result. This tutorial
# builds both from the equation, checks them against `qkv`'s reference, looks at real
# attention maps from a trained encoder, and times every backend `qkv` has on this machine.

# %%
import os
import time
import tracemalloc
import warnings
from collections import namedtuple

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import PowerNorm

import qkv
from qkv.lab.notebook import best_of, rel_err, runnable_backends, show_table
from qkv.reference import core

SMALL = os.environ.get("QKV_TUTORIAL_SMALL") == "1"  # the test suite runs us at small sizes
rng = np.random.default_rng(0)
np.set_printoptions(precision=4, suppress=True, linewidth=110)

try:
    import torch
except ImportError:  # torch is optional: its checks are skipped without it
    torch = None


# %% [markdown]
# ## 1. The equation
#
# Stack the $N$ queries as rows of $Q \in \mathbb{R}^{N \times d}$, the $M$ keys as rows of
# $K \in \mathbb{R}^{M \times d}$ and the values as rows of $V \in \mathbb{R}^{M \times d_v}$.
# Scaled dot-product attention is
#
# $$
# \operatorname{Attention}(Q, K, V) = \operatorname{softmax}\!\left(\frac{QK^\top}{\sqrt{d}}\right) V,
# \qquad
# \operatorname{softmax}(s)_j = \frac{e^{s_j}}{\sum_{t} e^{s_t}} \text{ along each row.}
# $$
#
# Row $i$ of the output is $o_i = \sum_j P_{ij} v_j$ with $P_{ij} \ge 0$ and
# $\sum_j P_{ij} = 1$: a convex combination of the values, weighted by the match between query
# $i$ and key $j$.
#
# **Why $\sqrt d$.** If the components of $q$ and $k$ are independent with mean 0 and variance
# 1, then $q \cdot k = \sum_{c=1}^d q_c k_c$ has mean 0 and variance $d$. Unscaled, the logits
# of a 64-dimensional head have a standard deviation of 8, the softmax saturates towards a
# one-hot vector and its gradients vanish (the paper's argument, section 3.2.1). Dividing by
# $\sqrt d$ brings the standard deviation back to 1:

# %%
d = 64
a, b = rng.standard_normal((2, 100_000, d))
dots = np.einsum("nd,nd->n", a, b)  # 100 000 independent q . k
print(f"std of q.k          : {dots.std():.2f}  (sqrt(d) = {np.sqrt(d):.0f})")
print(f"std of q.k / sqrt(d): {(dots / np.sqrt(d)).std():.2f}")
logit_std = (dots / np.sqrt(d)).std()

# %% [markdown]
# ### From scratch, in NumPy
#
# Straight from the equation. The only liberty is the one every implementation takes:
# subtract each row's maximum before `exp`. Softmax is unchanged by a constant shift of its
# row ($e^{s_j - c} / \sum_t e^{s_t - c} = e^{s_j} / \sum_t e^{s_t}$), and with $c = \max_t s_t$
# every exponent is $\le 0$, so nothing overflows.


# %%
def softmax(s):
    e = np.exp(s - s.max(axis=-1, keepdims=True))  # every exponent <= 0: no overflow
    return e / e.sum(axis=-1, keepdims=True)


def attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v for q (..., N, d), k (..., M, d), v (..., M, dv)."""
    scores = q @ k.swapaxes(-1, -2) / np.sqrt(q.shape[-1])  # (..., N, M)
    return softmax(scores) @ v  # (..., N, dv)


# %% [markdown]
# `qkv` follows the layout of `torch.nn.functional.scaled_dot_product_attention`: queries
# `(B, H, N, D)` (batch, heads, tokens, head dim), keys and values `(B, Hkv, M, D)`. With
# float64 inputs the reference computes in float64, so the two must agree to rounding:

# %%
B, H, N, M, D = 2, 4, 96, 128, 32
q = rng.standard_normal((B, H, N, D))  # (B, H, N, D)
k = rng.standard_normal((B, H, M, D))  # (B, H, M, D)
v = rng.standard_normal((B, H, M, D))  # (B, H, M, D)

ours = attention(q, k, v)  # (B, H, N, D)
reference = qkv.sdpa(q, k, v)  # (B, H, N, D)
print("qkv.sdpa vs ours     : relative error", rel_err(ours, reference))
np.testing.assert_allclose(ours, reference, rtol=1e-12, atol=1e-12)

if torch is not None:
    F = torch.nn.functional
    theirs = F.scaled_dot_product_attention(*map(torch.from_numpy, (q, k, v))).numpy()
    print("torch SDPA vs qkv    : relative error", rel_err(theirs, reference))
    np.testing.assert_allclose(theirs, reference, rtol=1e-12, atol=1e-12)

# %% [markdown]
# ## 2. Masks and causality
#
# A mask says which keys a query may read. `qkv` takes it in either of two forms, both
# broadcast to `(B, H, N, M)`: a **boolean** mask, True where the query may attend, or an
# **additive** float mask $B$ that is added to the scores ($-\infty$ masks an entry outright,
# and anything finite is a soft bias, as ALiBi below uses):
#
# $$
# O = \operatorname{softmax}\!\left(\frac{QK^\top}{\sqrt d} + B\right) V .
# $$
#
# A decoder must not read the future: query $i$ may attend key $j$ only if $j$ is not after
# $i$. When there are as many queries as keys ($N = M$) that is the lower triangle. When
# $N \ne M$ the triangle has to be *placed*, and `qkv` aligns it at the **bottom-right**
# corner: query $i$ sits at position $i + (M - N)$ and may attend key $j$ when
# $j \le i + (M - N)$. That is what decoding with a KV cache needs: the $N$ new queries are
# the *last* $N$ tokens of a sequence of $M$. `torch.nn.functional.scaled_dot_product_attention`
# with `is_causal=True` aligns it at the top-left instead (query $i$ sees keys $j \le i$);
# the two agree only when $N = M$.

# %%
fig, axes = plt.subplots(1, 3, figsize=(10, 2.6), gridspec_kw={"width_ratios": [1, 2.5, 2.5]})
panels = [
    ("N = M = 4", core.causal_allowed(4, 4)),
    ("N = 4, M = 10: qkv (bottom-right)", core.causal_allowed(4, 10)),
    ("N = 4, M = 10: top-left (torch is_causal)", np.tril(np.ones((4, 10), dtype=bool))),
]
for ax, (title, allowed) in zip(axes, panels, strict=True):
    ax.imshow(allowed, cmap="Blues", vmin=0, vmax=1.3)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("key j")
    ax.set_xticks(range(allowed.shape[1]))
    ax.set_yticks(range(allowed.shape[0]))
axes[0].set_ylabel("query i")
fig.tight_layout()
plt.show()

# %% [markdown]
# The reason for the bottom-right rule, numerically: run causal attention over a whole
# sequence of $M$ tokens, then over only its last $N$ queries against all $M$ keys (one decode
# step with a cache of $M - N$ tokens). The rows must agree, and they do:

# %%
B, H, N, M, D = 1, 2, 5, 40, 16
q_all = rng.standard_normal((B, H, M, D))  # queries for all M tokens
k = rng.standard_normal((B, H, M, D))
v = rng.standard_normal((B, H, M, D))

full = qkv.sdpa(q_all, k, v, causal=True)  # (B, H, M, D): the whole sequence at once
step = qkv.sdpa(q_all[:, :, -N:], k, v, causal=True)  # (B, H, N, D): the last N queries only
print("last rows of the full pass vs the decode step:", rel_err(step, full[:, :, -N:]))
np.testing.assert_allclose(step, full[:, :, -N:], rtol=1e-12, atol=1e-12)

# The same call as a boolean mask, and as an additive mask: one semantics, three spellings.
allowed = core.causal_allowed(N, M)  # (N, M) bool
additive = np.where(allowed, 0.0, -np.inf)  # (N, M) float
np.testing.assert_allclose(qkv.sdpa(q_all[:, :, -N:], k, v, mask=allowed), step, atol=1e-12)
np.testing.assert_allclose(qkv.sdpa(q_all[:, :, -N:], k, v, mask=additive), step, atol=1e-12)

if torch is not None:
    from torch.nn.attention.bias import causal_lower_right

    qt, kt, vt = (torch.from_numpy(x) for x in (q_all[:, :, -N:], k, v))
    top_left = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True).numpy()
    lower_right = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=causal_lower_right(N, M))
    print("torch is_causal=True (top-left) vs qkv:  ", rel_err(top_left, step))
    print("torch causal_lower_right vs qkv:         ", rel_err(lower_right.numpy(), step))

# %% [markdown]
# When $N > M$ the first $N - M$ queries have no key at all. A softmax over an empty set is
# undefined; `qkv` documents and tests its choice: such a row's output is **zero** (and its
# log-sum-exp is $-\infty$), never NaN.

# %%
q4 = rng.standard_normal((1, 1, 4, D))  # 4 queries
out, lse = qkv.sdpa(q4, k[:, :1, :2], v[:, :1, :2], causal=True, return_lse=True)  # 2 keys
print("N = 4 queries, M = 2 keys, causal. Output rows:\n", out[0, 0, :, :4], "\nlse:", lse[0, 0])

# %% [markdown]
# ## 3. Grouped heads: MQA and GQA
#
# A model with $H$ heads runs $H$ attentions side by side on different projections. During
# decoding, the keys and values of every past token are kept (the KV cache) and *read in
# full at every step*, so their size, not the arithmetic, sets the speed. Multi-query
# attention (Shazeer, [arXiv 1911.02150](https://arxiv.org/abs/1911.02150)) lets all $H$ query
# heads share **one** key/value head; grouped-query attention (Ainslie et al.,
# [arXiv 2305.13245](https://arxiv.org/abs/2305.13245)) is the middle ground: $H_{kv}$ KV
# heads, each shared by a group of $G = H / H_{kv}$ query heads. Query head $h$ reads KV head
# $\lfloor h / G \rfloor$.
#
# The shapes, step by step. Nothing is copied: the query heads are *regrouped* by the KV head
# they read, and the einsum broadcasts each KV head over its group.

# %%
B, H, Hkv, N, M, D = 1, 8, 2, 6, 10, 16
G = H // Hkv  # query heads per KV head
q = rng.standard_normal((B, H, N, D))  # (B, H, N, D)
k = rng.standard_normal((B, Hkv, M, D))  # (B, Hkv, M, D)
v = rng.standard_normal((B, Hkv, M, D))  # (B, Hkv, M, D)

qg = q.reshape(B, Hkv, G, N, D)  # (B, Hkv, G, N, D): heads 0..3 read KV head 0, 4..7 head 1
s = np.einsum("bhgnd,bhmd->bhgnm", qg, k) / np.sqrt(D)  # (B, Hkv, G, N, M)
o = np.einsum("bhgnm,bhmd->bhgnd", softmax(s), v)  # (B, Hkv, G, N, D)
out = o.reshape(B, H, N, D)  # (B, H, N, D): back to one row per query head
for name, x in [("q", q), ("k", k), ("q grouped", qg), ("scores", s), ("out", out)]:
    print(f"{name:10s} {x.shape}")

# Equal to the reference, and to plain multi-head attention on KV heads repeated G times.
np.testing.assert_allclose(out, qkv.sdpa(q, k, v), rtol=1e-12, atol=1e-12)
repeated = attention(q, np.repeat(k, G, axis=1), np.repeat(v, G, axis=1))  # (B, H, N, D)
np.testing.assert_allclose(out, repeated, rtol=1e-12, atol=1e-12)
print("grouped == qkv.sdpa == MHA on repeated KV heads")

# %% [markdown]
# What it buys, for a model shaped like a 7B decoder (32 layers, 32 query heads of dimension
# 128, 16-bit cache): the cache per token is $2 \cdot L \cdot H_{kv} \cdot d \cdot 2$ bytes.

# %%
layers, heads, head_dim = 32, 32, 128
rows = []
for name, hkv in [("MHA", 32), ("GQA, 8 KV heads", 8), ("MQA", 1)]:
    per_token = 2 * layers * hkv * head_dim * 2  # keys and values, 2 bytes each
    rows.append((name, hkv, f"{per_token / 2**10:.0f} KiB", f"{per_token * 32768 / 2**30:.2f} GiB"))
show_table(("layout", "KV heads", "cache per token", "cache at 32k tokens"), rows)

# %% [markdown]
# ## 4. The online softmax, and FlashAttention
#
# Take one query row with scores $s_1, \dots, s_M$ and values $v_1, \dots, v_M$. Its output
# is
#
# $$
# o = \frac{\sum_j e^{s_j - m} v_j}{\sum_j e^{s_j - m}}, \qquad m = \max_j s_j .
# $$
#
# The maximum $m$ seems to need every score before the first `exp`. It does not (Milakov and
# Gimelshein, [arXiv 1805.02867](https://arxiv.org/abs/1805.02867); Rabe and Staats,
# [arXiv 2112.05682](https://arxiv.org/abs/2112.05682)). After the first $j$ keys keep the
# running maximum $m_j$, the running normaliser $\ell_j$ and the unnormalised output
# $\tilde o_j$:
#
# $$
# m_j = \max_{t \le j} s_t, \qquad
# \ell_j = \sum_{t \le j} e^{s_t - m_j}, \qquad
# \tilde o_j = \sum_{t \le j} e^{s_t - m_j} v_t .
# $$
#
# When key $j$ arrives the maximum may grow, and every earlier term, computed relative to
# $m_{j-1}$, must be re-expressed relative to $m_j$. That is one multiplication, since
# $e^{s_t - m_j} = e^{m_{j-1} - m_j}\, e^{s_t - m_{j-1}}$:
#
# $$
# m_j = \max(m_{j-1}, s_j), \qquad
# \alpha_j = e^{m_{j-1} - m_j} \le 1, \qquad
# \ell_j = \alpha_j \ell_{j-1} + e^{s_j - m_j}, \qquad
# \tilde o_j = \alpha_j \tilde o_{j-1} + e^{s_j - m_j} v_j ,
# $$
#
# starting from $m_0 = -\infty$, $\ell_0 = 0$, $\tilde o_0 = 0$; at the end
# $o = \tilde o_M / \ell_M$ **exactly**, not approximately. Every exponent stays $\le 0$, so
# it is as stable as the two-pass softmax. One key at a time:


# %%
def online_attention_row(scores, values):
    """o = softmax(scores) @ values for one query, reading one key at a time."""
    m, l, acc = -np.inf, 0.0, np.zeros(values.shape[1])
    for s_j, v_j in zip(scores, values, strict=True):
        m_new = max(m, s_j)
        alpha = np.exp(m - m_new)  # rescales everything summed so far; exp(-inf) = 0 at first
        p = np.exp(s_j - m_new)
        l = alpha * l + p
        acc = alpha * acc + p * v_j
        m = m_new
    return acc / l


scores = 1000 + rng.standard_normal(50)  # logits that would overflow a naive exp
values = rng.standard_normal((50, 4))
with np.errstate(over="ignore", invalid="ignore"):
    naive = np.exp(scores) @ values / np.exp(scores).sum()
print("naive exp:     ", naive)
print("online softmax:", online_attention_row(scores, values))
print("two-pass       ", softmax(scores) @ values)

# %% [markdown]
# ### Tiled: FlashAttention
#
# Now do the same with **blocks**: a block of $b_q$ queries against a block of $b_k$ keys at a
# time, the row maximum taken over the block. Only a $b_q \times b_k$ tile of scores ever
# exists; the state per query is $m$, $\ell$ and a $d_v$-vector. This is FlashAttention's
# forward pass. In the loop order below (queries outside, keys inside) each query block is
# independent of the others, and the division by $\ell$ happens once at the end, both of
# which are FlashAttention-2's changes to the original algorithm (which looped over key
# blocks outside and rescaled its output in memory at every step). On a GPU each query block
# is one thread block, and the tile lives in on-chip SRAM instead of the GPU's main memory.


# %%
def flash_attention(q, k, v, block=32):
    """softmax(q k^T / sqrt(d)) v for one head, q (N, d), k (M, d), v (M, dv), tile by tile."""
    out = np.empty((q.shape[0], v.shape[1]))
    for i in range(0, len(q), block):  # one block of queries at a time, independently
        qi = q[i : i + block] / np.sqrt(q.shape[1])  # (bq, d)
        m = np.full(len(qi), -np.inf)  # running row maximum
        l = np.zeros(len(qi))  # running normaliser
        acc = np.zeros((len(qi), v.shape[1]))  # unnormalised output
        for j in range(0, len(k), block):  # stream the keys and values
            s = qi @ k[j : j + block].T  # (bq, bk): the only scores that exist
            m_new = np.maximum(m, s.max(axis=1))
            p = np.exp(s - m_new[:, None])  # (bq, bk)
            alpha = np.exp(m - m_new)  # rescale what was summed so far
            l = alpha * l + p.sum(axis=1)
            acc = alpha[:, None] * acc + p @ v[j : j + block]
            m = m_new
        out[i : i + block] = acc / l[:, None]  # normalise once, at the end
    return out


N, M, D = 100, 230, 32  # sizes that are not multiples of the block
q, k, v = rng.standard_normal((N, D)), rng.standard_normal((M, D)), rng.standard_normal((M, D))
tiled = flash_attention(q, k, v)  # (N, D)
exact = qkv.sdpa(q[None, None], k[None, None], v[None, None])[0, 0]  # (N, D)
print("tiled vs qkv.sdpa:", rel_err(tiled, exact))
np.testing.assert_allclose(tiled, exact, rtol=1e-12, atol=1e-12)

# %% [markdown]
# `qkv.flash` is the full version of the same loop: grouped heads, masks, causal (key blocks
# entirely above the diagonal are skipped), the log-sum-exp $m + \log \ell$ that the
# backward pass needs, and the block sizes as parameters. It equals `qkv.sdpa` whatever the
# blocks:

# %%
B, H, Hkv, N, M, D = 2, 8, 2, 77, 200, 64
q = rng.standard_normal((B, H, N, D)).astype(np.float32)
k = rng.standard_normal((B, Hkv, M, D)).astype(np.float32)
v = rng.standard_normal((B, Hkv, M, D)).astype(np.float32)
o_ref, lse_ref = qkv.sdpa(q, k, v, causal=True, return_lse=True)
for block_q, block_k in [(16, 16), (64, 32), (128, 128)]:
    o, lse = qkv.flash(q, k, v, causal=True, return_lse=True, block_q=block_q, block_k=block_k)
    print(
        f"blocks {block_q:3d} x {block_k:3d}: output rel. error {rel_err(o, o_ref):.1e}, "
        f"lse rel. error {rel_err(lse, lse_ref):.1e}"
    )
flash_err = rel_err(qkv.flash(q, k, v, causal=True), o_ref)

# %% [markdown]
# ### What the N × M matrix costs
#
# At $N = M = 16384$ in float32, the score matrix of *one* head is $16384^2 \times 4$ bytes
# $= 1$ GiB, and a plain implementation keeps at least two of them (scores and weights) per
# head in flight. The tiled loop holds one tile, plus $m$, $\ell$ and the output:

# %%
N = M = 16384
D, block = 64, 128
rows = [
    ("scores, one head (sdpa)", N * M * 4),
    ("scores, 8 heads (sdpa)", 8 * N * M * 4),
    ("one tile (flash)", block * block * 4),
    ("output + m + l, one head (flash)", (N * D + 2 * N) * 4),
]
show_table(
    ("array at N = M = 16384, fp32", "bytes"), [(n, f"{b / 2**20:,.2f} MiB") for n, b in rows]
)

# %% [markdown]
# Measured, on `qkv`'s NumPy reference (NumPy reports its allocations to `tracemalloc`):
# peak memory of `sdpa` grows as $N \cdot M$, that of `flash` as $N \cdot D$.

# %%
B, H, D = 1, 4, 64
peaks = []
for n in [256, 512, 1024] if SMALL else [512, 1024, 2048, 4096]:
    q = rng.standard_normal((B, H, n, D)).astype(np.float32)
    k = rng.standard_normal((B, H, n, D)).astype(np.float32)
    v = rng.standard_normal((B, H, n, D)).astype(np.float32)
    row = [n]
    for op in (qkv.sdpa, qkv.flash):
        tracemalloc.start()
        op(q, k, v, causal=True, backend="reference")
        row.append(tracemalloc.get_traced_memory()[1] / 2**20)  # peak, MiB
        tracemalloc.stop()
    peaks.append(row)
show_table(
    ("N = M", "sdpa peak (MiB)", "flash peak (MiB)", "ratio"),
    [(n, f"{s:.1f}", f"{f:.1f}", f"{s / f:.0f}x") for n, s, f in peaks],
)
memory_ratio = peaks[-1][1] / peaks[-1][2]

# %% [markdown]
# ## 5. Real attention: MiniLM
#
# Random inputs give featureless attention. `qkv` ships real queries, keys and values: every
# layer and head of the `all-MiniLM-L6-v2` sentence encoder (6 layers, 12 heads, head
# dimension 32; Wang et al., [arXiv 2002.10957](https://arxiv.org/abs/2002.10957)) on a few
# paragraphs of Python's own documentation. The capture is the input of each layer's
# attention, so `qkv.sdpa` recomputes the model's attention maps exactly (the layer axis
# doubles as the batch axis).

# %%
from qkv.lab import minilm

cap = minilm.load()
print(cap.q.shape, "(layers, heads, tokens, head dim)")
print(" ".join(cap.tokens[:24]), "...", " ".join(cap.tokens[-6:]))
_, weights = qkv.sdpa(cap.q, cap.k, cap.v, return_weights=True)  # (6, 12, N, N)
to_cls = weights[..., 0].mean(axis=-1)  # (6, 12): mean attention each head pays to [CLS]
to_sep = weights[..., -1].mean(axis=-1)  # (6, 12): ... and to [SEP]

# %% [markdown]
# Four heads, on the first 32 tokens: a head of the first layer, and the heads that put the
# most weight on `[CLS]` in the later layers. Most of the mass of many heads goes to the
# first token, `[CLS]`, whatever the query: an **attention sink**. A head that has nothing
# useful to read still has to spend its weights somewhere, since they sum to one, and a fixed
# token with a near-constant key is a cheap place to park them (see Clark et al.,
# [What Does BERT Look At?](https://arxiv.org/abs/1906.04341), and Xiao et al.,
# [Efficient Streaming Language Models with Attention Sinks](https://arxiv.org/abs/2309.17453)).

# %%
T = 32  # the first 32 tokens
near = np.abs(np.subtract.outer(range(cap.n_tokens), range(cap.n_tokens))) <= 1  # (N, N)
local = (weights[0] * near).sum(axis=-1).mean(axis=-1)  # (12,): layer-0 mass within one token
ranked = np.argsort(to_cls[1:], axis=None)[::-1][:3]  # the three heaviest sinks after layer 0
chosen = [(0, int(np.argmax(local)))]
chosen += [(1 + int(i) // cap.n_heads, int(i) % cap.n_heads) for i in ranked]
fig, axes = plt.subplots(2, 2, figsize=(10, 10))
for ax, (layer, head) in zip(axes.flat, chosen, strict=True):
    # A square-root colour scale, so that the small weights stay visible next to the sink.
    ax.imshow(weights[layer, head, :T, :T], cmap="magma", norm=PowerNorm(0.5, vmin=0, vmax=1))
    ax.set_title(f"layer {layer}, head {head}: {to_cls[layer, head]:.0%} on [CLS]", fontsize=10)
    ax.set_xticks(range(T), cap.tokens[:T], rotation=90, fontsize=7)
    ax.set_yticks(range(T), cap.tokens[:T], fontsize=7)
fig.suptitle("MiniLM attention weights (rows: queries, columns: keys)")
fig.tight_layout()
plt.show()

# %% [markdown]
# Averaged over all queries, the share of each head's attention that lands on `[CLS]` and on
# `[SEP]` (a uniform head would give $1/N$ to each):

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 3.4))
for ax, share, token in [(axes[0], to_cls, "[CLS]"), (axes[1], to_sep, "[SEP]")]:
    image = ax.imshow(share, cmap="viridis", vmin=0, vmax=to_cls.max())
    for (layer, head), x in np.ndenumerate(share):
        shade = "white" if x < 0.3 else "black"
        ax.text(head, layer, f"{x:.2f}", ha="center", va="center", fontsize=6.5, color=shade)
    ax.set_title(f"mean attention on {token}", fontsize=10)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(share.shape[1]))
    ax.set_yticks(range(share.shape[0]))
fig.colorbar(image, ax=axes, shrink=0.9)
plt.show()
uniform = 1 / cap.n_tokens
print(f"uniform share: {uniform:.4f}")
print("mean share on [CLS] per layer:", to_cls.mean(axis=1))
print("mean share on [SEP] per layer:", to_sep.mean(axis=1))
sink_layer = int(np.argmax(to_cls.mean(axis=1)))
sink_peak = float(to_cls.max())

# %% [markdown]
# ## 6. Positions, briefly: RoPE and ALiBi
#
# Attention itself is blind to order: permute the keys and values together and the output
# does not change. Two schemes that many later mechanisms reuse put position into the scores.
#
# **RoPE** (Su et al., [arXiv 2104.09864](https://arxiv.org/abs/2104.09864)) rotates each
# pair of features of a query or key at position $p$ by the angle $p\,\theta_i$,
# $\theta_i = 10000^{-2i/d}$. Rotations compose, $R_m^\top R_n = R_{n-m}$, so
#
# $$
# \langle R_m q,\; R_n k \rangle = \langle q,\; R_{n-m}\, k \rangle :
# $$
#
# the score depends on the positions only through their **difference**. Numerically, with
# `qkv.rope`:

# %%
D = 64
x = rng.standard_normal((1, 1, 1, D))  # one query vector
y = rng.standard_normal((1, 1, 1, D))  # one key vector


def rope_score(m, n):
    """<rope(x) at position m, rope(y) at position n>."""
    qm = qkv.rope(x, positions=np.array([m]))
    kn = qkv.rope(y, positions=np.array([n]))
    return float(np.sum(qm * kn))


pairs = [(5, 2), (105, 102), (10_005, 10_002), (2, 5), (9, 2)]
show_table(
    ("m", "n", "m - n", "score"), [(m, n, m - n, f"{rope_score(m, n):+.10f}") for m, n in pairs]
)
rope_dev = max(abs(rope_score(m + 3, m) - rope_score(3, 0)) for m in (100, 1000, 10_000))

# %% [markdown]
# **ALiBi** (Press et al., [arXiv 2108.12409](https://arxiv.org/abs/2108.12409)) adds no
# embedding at all: it biases each score by $-m_h \cdot (i - j)$, a penalty linear in the
# distance with a fixed slope per head ($m_h = 2^{-8h/H}$), passed to `sdpa` as an additive
# mask. Steep heads look locally, shallow heads far away.

# %%
H, N = 8, 12
print("slopes:", qkv.alibi_slopes(H))
bias = qkv.alibi(H, N, N)  # (H, N, N), broadcastable to (B, H, N, M)
fig, axes = plt.subplots(1, 2, figsize=(7.5, 2.9))
visible = np.where(core.causal_allowed(N, N), bias, np.nan)  # (H, N, N): the causal part only
for ax, h in zip(axes, (0, H - 1), strict=True):  # one colour scale for both heads
    image = ax.imshow(visible[h], cmap="viridis", vmin=np.nanmin(visible), vmax=0)
    ax.set_title(f"head {h}: slope {qkv.alibi_slopes(H)[h]:.4f}", fontsize=9)
    ax.set_xlabel("key j")
axes[0].set_ylabel("query i")
fig.colorbar(image, ax=axes, label="bias added to the score")
plt.show()
q = rng.standard_normal((1, H, N, 16))
kv = rng.standard_normal((1, H, N, 16))
out = qkv.sdpa(q, kv, kv, mask=bias, causal=True)  # the paper's setting: causal + biases
print("ALiBi attention output:", out.shape)

# %% [markdown]
# ## 7. Every backend, timed
#
# The same two calls, `qkv.sdpa` and `qkv.flash`, through every backend `qkv` knows, at
# $B = 1$, $H = 8$, $D = 64$, causal, float32. Backends that cannot run here are listed with
# their reason. "first call" includes compiling (Numba compiles on first use and caches on
# disk); "best" is the fastest of a few further calls; "vs reference" is the speed-up over the
# NumPy reference `sdpa`; the error is against the float64 reference. An op a backend does not
# implement runs on the reference with a `FallbackWarning`, and the table says so.
# `torch.nn.functional.scaled_dot_product_attention` is timed alongside: the peer to beat on
# the CPU.

# %%
B, H, D = 1, 8, 64
N = M = 512 if SMALL else 2048
repeats = 3 if SMALL else 5
q = rng.standard_normal((B, H, N, D)).astype(np.float32)
k = rng.standard_normal((B, H, M, D)).astype(np.float32)
v = rng.standard_normal((B, H, M, D)).astype(np.float32)
golden = qkv.sdpa(*(x.astype(np.float64) for x in (q, k, v)), causal=True)  # float64
flops = 4 * B * H * N * M * D / 2  # two matmuls, 2 flops per multiply-add; causal halves it


Timing = namedtuple("Timing", "backend op runs first best err")


def time_op(op, name):
    """Run ``op`` on backend ``name``: first call, best of the next few, fallback or not."""

    def call():
        return op(q, k, v, causal=True, backend=name)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", qkv.FallbackWarning)
        start = time.perf_counter()
        out = call()
        first = time.perf_counter() - start
    fell_back = any(issubclass(w.category, qkv.FallbackWarning) for w in caught)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", qkv.FallbackWarning)
        best = best_of(call, repeats)
    runs = "reference (fallback)" if fell_back else "native"
    return Timing(name, op.__name__, runs, first, best, rel_err(out, golden))


timings = []  # a Timing per (backend, op) that ran; (name, reason) for the rest
runnable, skipped = runnable_backends()
for name in runnable:
    timings += [time_op(qkv.sdpa, name), time_op(qkv.flash, name)]

if torch is not None:
    qt, kt, vt = (torch.from_numpy(x) for x in (q, k, v))
    out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)  # N == M: same triangle
    best = best_of(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True), repeats)
    timings.append(Timing("torch SDPA", "(peer)", "torch", None, best, rel_err(out, golden)))

base = next(t.best for t in timings if (t.backend, t.op) == ("reference", "sdpa"))


def row(t):
    first = "-" if t.first is None else f"{t.first * 1e3:.1f} ms"
    best, speedup = f"{t.best * 1e3:.1f} ms", f"{base / t.best:.1f}x"
    gflops = f"{flops / t.best / 1e9:.1f}"
    return t.backend, t.op, t.runs, first, best, gflops, speedup, f"{t.err:.1e}"


print(f"B={B} H={H} N=M={N} D={D}, causal, float32; {os.cpu_count()} CPU cores\n")
header = ("backend", "op", "runs", "first call", "best", "GFLOP/s", "vs reference", "rel. error")
show_table(header, [row(t) for t in timings])
for name, why in skipped:
    print(f"\n{name}: {why}")

# %% [markdown]
# ## 8. What the papers report, and what we see here
#
# | paper | reports | here |
# |---|---|---|
# | Attention Is All You Need | scaling by $1/\sqrt{d_k}$ keeps dot products from growing with $d_k$ and saturating the softmax | logits of std $\approx 8$ at $d = 64$ come back to std $\approx 1$ (section 1) |
# | FlashAttention | exact attention, not an approximation; memory linear in sequence length (in its benchmarks up to 20x less than exact baselines); 3x faster GPT-2 training (seq. 1K), 15% faster BERT-large end to end | equal to `sdpa` to float32 rounding; peak memory of the NumPy reference: `flash` is a fraction of `sdpa`, and the gap grows with $N$ (section 4). Speed-ups are GPU results: here, CPU timings only (section 7, and `make gpu-check`) |
# | FlashAttention-2 | about 2x over FlashAttention, 50-73% of the A100's peak FLOP/s, from fewer non-matmul FLOPs and parallelism over the sequence | its loop order (queries outside, one normalisation at the end) is the one implemented above; GPU kernels are measured by `make gpu-check` |
# | RoFormer | the rotated scores depend on relative position only | equal scores for equal $m - n$ to rounding (section 6) |
# | ALiBi | a model trained at length 1024 extrapolates to 2048 with the perplexity of a sinusoidal model trained at 2048, 11% faster | the biases and slopes only; extrapolation needs training, out of scope here |
# | Clark et al. (BERT) | heads park attention on special tokens: over half of BERT's attention in layers 6-10 goes to `[SEP]` | in MiniLM the sink is `[CLS]`, not `[SEP]`: see the numbers below (section 5) |
#
# The numbers of this run:

# %%
peer = next((t.best for t in timings if t.op == "(peer)"), None)
summary = [
    ("std of scaled logits, d = 64", f"{logit_std:.3f}"),
    ("qkv.flash vs qkv.sdpa, float32, rel. error", f"{flash_err:.1e}"),
    (f"peak memory sdpa / flash at N = {peaks[-1][0]} (reference)", f"{memory_ratio:.0f}x"),
    ("RoPE: score change when both positions shift", f"{rope_dev:.1e}"),
    ("MiniLM: largest share of one head on [CLS]", f"{sink_peak:.0%}"),
    ("MiniLM: layer with the most [CLS] attention", f"{sink_layer} (of 0-5)"),
    ("MiniLM: largest share of one head on [SEP]", f"{to_sep.max():.0%}"),
]
for t in timings:
    if t.op == "flash" and t.runs == "native" and t.backend != "reference":
        line = f"{base / t.best:.1f}x the reference sdpa"
        if peer is not None:
            line += f", {peer / t.best:.2f}x torch SDPA"
        summary.append((f"{t.backend} flash speed at N = M = {N}", line))
show_table(("quantity", "value"), summary)

# %% [markdown]
# ## References
#
# * A. Vaswani et al. *Attention Is All You Need.* NeurIPS 2017.
#   [arXiv 1706.03762](https://arxiv.org/abs/1706.03762).
# * T. Dao, D. Y. Fu, S. Ermon, A. Rudra, C. Ré. *FlashAttention: Fast and Memory-Efficient
#   Exact Attention with IO-Awareness.* NeurIPS 2022.
#   [arXiv 2205.14135](https://arxiv.org/abs/2205.14135).
# * T. Dao. *FlashAttention-2: Faster Attention with Better Parallelism and Work
#   Partitioning.* 2023. [arXiv 2307.08691](https://arxiv.org/abs/2307.08691).
#   Code for both: [Dao-AILab/flash-attention](https://github.com/Dao-AILab/flash-attention).
# * M. Milakov, N. Gimelshein. *Online normalizer calculation for softmax.* 2018.
#   [arXiv 1805.02867](https://arxiv.org/abs/1805.02867).
# * M. N. Rabe, C. Staats. *Self-attention Does Not Need $O(n^2)$ Memory.* 2021.
#   [arXiv 2112.05682](https://arxiv.org/abs/2112.05682).
# * N. Shazeer. *Fast Transformer Decoding: One Write-Head is All You Need.* 2019.
#   [arXiv 1911.02150](https://arxiv.org/abs/1911.02150).
# * J. Ainslie et al. *GQA: Training Generalized Multi-Query Transformer Models from
#   Multi-Head Checkpoints.* 2023. [arXiv 2305.13245](https://arxiv.org/abs/2305.13245).
# * J. Su et al. *RoFormer: Enhanced Transformer with Rotary Position Embedding.* 2021.
#   [arXiv 2104.09864](https://arxiv.org/abs/2104.09864).
# * O. Press, N. A. Smith, M. Lewis. *Train Short, Test Long: Attention with Linear Biases
#   Enables Input Length Extrapolation.* ICLR 2022.
#   [arXiv 2108.12409](https://arxiv.org/abs/2108.12409).
# * K. Clark, U. Khandelwal, O. Levy, C. D. Manning. *What Does BERT Look At? An Analysis of
#   BERT's Attention.* 2019. [arXiv 1906.04341](https://arxiv.org/abs/1906.04341).
# * G. Xiao et al. *Efficient Streaming Language Models with Attention Sinks.* 2023.
#   [arXiv 2309.17453](https://arxiv.org/abs/2309.17453).
# * W. Wang et al. *MiniLM: Deep Self-Attention Distillation for Task-Agnostic Compression of
#   Pre-Trained Transformers.* 2020. [arXiv 2002.10957](https://arxiv.org/abs/2002.10957).
