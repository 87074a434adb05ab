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
# # Agent Attention: softmax attention through a few agent tokens
#
# *Paper:* Han et al.,
# [Agent Attention: On the Integration of Softmax and Linear Attention](https://arxiv.org/abs/2312.08874)
# (arXiv 2312.08874, ECCV 2024).
# *Official code:* [LeapLabTHU/Agent-Attention](https://github.com/LeapLabTHU/Agent-Attention).
#
# Softmax attention compares every query with every key: $N^2$ scores for $N$ tokens. In vision
# that is what hurts, since a high-resolution image is tens of thousands of patches. Linear
# attention avoids the $N \times N$ matrix by replacing the softmax with a kernel feature map
# $\phi$ and reassociating, $\phi(Q)\,(\phi(K)^\top V)$, at cost $O(N d^2)$; but simple feature
# maps are far less expressive than the softmax, and accuracy drops.
#
# Agent attention keeps the softmax and still avoids $N^2$. It adds a small set of $n \ll N$
# **agent tokens** $A$, pooled from the queries. The agents first attend to the keys and collect
# the values (each agent is a query standing for a region), then every real query attends to
# the $n$ agents and reads what they collected. Two softmax attentions of size $n \times N$ and
# $N \times n$: cost $O(N n d)$, linear in $N$. The paper shows the result is a *generalised
# linear attention* whose feature maps are softmax attentions, and wins accuracy on DeiT, PVT,
# Swin and CSwin at equal or lower cost. This tutorial builds it from the equations, checks it
# against `qkv`, measures the linear cost against full attention, and looks at what the agents
# do to real attention maps from a trained encoder.

# %%
import contextlib
import os
import tracemalloc
import warnings
from functools import partial

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
from qkv.reference import core
from qkv.reference.forms import agent_attention

SMALL = os.environ.get("QKV_TUTORIAL_SMALL") == "1"  # the test suite runs us at small sizes
rng = np.random.default_rng(0)
np.set_printoptions(precision=4, suppress=True, linewidth=110)


# %% [markdown]
# ## 1. The equations
#
# Write $\sigma$ for the row softmax and $s = d^{-1/2}$. With queries $Q \in \mathbb{R}^{N\times d}$,
# keys $K$ and values $V$ ($M$ rows), and agents $A \in \mathbb{R}^{n \times d}$, agent attention
# is the quadruple $(Q, A, K, V)$:
#
# $$
# \underbrace{V_A = \sigma\!\big(s\,A K^\top + B_1\big)\, V}_{\text{agent aggregation}}
# \qquad
# \underbrace{O = \sigma\!\big(s\,Q A^\top + B_2\big)\, V_A}_{\text{agent broadcast}}
# \;+\; \operatorname{DWC}(V).
# $$
#
# * The agents are the queries **pooled**: $A = P\,Q$ with $P \in \mathbb{R}^{n \times N}$ the
#   adaptive average pooling matrix (the official code pools $Q$ over the $14 \times 14$ patch
#   grid of DeiT down to $7 \times 7 = 49$ agents).
# * $B_1 \in \mathbb{R}^{n \times M}$ and $B_2 \in \mathbb{R}^{N \times n}$ are the **agent
#   biases**, learned position biases (in the code, interpolated tables plus separable row and
#   column terms; `qkv` takes them as arrays).
# * $\operatorname{DWC}$ is a $3 \times 3$ depth-wise convolution of the values over the grid,
#   which the paper adds to restore the feature diversity a rank-$n$ map lacks.
#
# **Why it is linear attention.** Without biases and DWC,
#
# $$
# O = \sigma(s\,QA^\top)\,\big(\sigma(s\,AK^\top)\, V\big) = \phi_q(Q)\,\big(\phi_k(K)^\top V\big),
# \qquad \phi_q(Q) = \sigma(s\,QA^\top),\ \ \phi_k(K) = \sigma(s\,AK^\top)^\top \in \mathbb{R}^{M \times n},
# $$
#
# the form of linear attention, with $n$-dimensional feature maps that are themselves softmax
# attentions to the agents. The implied $N \times M$ attention map
# $\phi_q(Q)\,\phi_k(K)^\top$ is never formed, and it is still row-stochastic: a product of two
# matrices whose rows are probability vectors.
#
# ### From scratch, in NumPy
#
# One head, the equations line by line:


# %%
def softmax(s):
    e = np.exp(s - s.max(axis=-1, keepdims=True))  # every exponent <= 0: no overflow
    return e / e.sum(axis=-1, keepdims=True)


def pool(length, bins):
    """Adaptive average pooling as a (bins, length) matrix: bin i covers floor(iL/b)..ceil((i+1)L/b)."""
    P = np.zeros((bins, length))
    for i in range(bins):
        start, stop = (i * length) // bins, -((-(i + 1) * length) // bins)
        P[i, start:stop] = 1 / (stop - start)
    return P


def agent_attention_one_head(q, k, v, n, b1=0.0, b2=0.0):
    """O = softmax(s Q A^T + B2) softmax(s A K^T + B1) V for q (N, d), k (M, d), v (M, dv)."""
    s = 1 / np.sqrt(q.shape[1])
    a = pool(len(q), n) @ q  # (n, d): the agent tokens
    v_agents = softmax(s * a @ k.T + b1) @ v  # (n, dv): agents aggregate from keys and values
    return softmax(s * q @ a.T + b2) @ v_agents  # (N, dv): queries read the agents


# %% [markdown]
# `qkv`'s reference takes the usual `(B, H, N, D)` layout with grouped KV heads, pooling over a
# sequence or a grid, both biases and the DWC. With float64 inputs it must agree with the lines
# above to rounding, biases included:

# %%
B, H, N, D, n = 2, 4, 100, 32, 9
q = rng.standard_normal((B, H, N, D))  # (B, H, N, D)
k = rng.standard_normal((B, H, N, D))
v = rng.standard_normal((B, H, N, D))
b1 = 0.5 * rng.standard_normal((H, n, N))  # (H, n, M): broadcast over the batch
b2 = 0.5 * rng.standard_normal((H, N, n))  # (H, N, n)

ours = np.stack(
    [
        np.stack(
            [agent_attention_one_head(q[b, h], k[b, h], v[b, h], n, b1[h], b2[h]) for h in range(H)]
        )
        for b in range(B)
    ]
)  # (B, H, N, D)
reference = agent_attention.agent(q, k, v, n_agents=n, agent_bias=b1, query_bias=b2)
print("qkv agent vs ours: relative error", rel_err(ours, reference))
np.testing.assert_allclose(ours, reference, rtol=1e-12, atol=1e-12)

# %% [markdown]
# The official model pools a **grid**. Given `grid=(h, w)` the pooling matrix is
# $P_h \otimes P_w$ (a rectangle's mean is the mean of its rows' means), and `dwc` weights of
# shape `(Hkv, Dv, kh, kw)` convolve the values over the same grid. The DeiT setting: 196
# patches on a $14 \times 14$ grid, 49 agents, a $3 \times 3$ DWC.

# %%
q14 = rng.standard_normal((1, 2, 196, D))
A = agent_attention.agent_tokens(q14, 49, grid=(14, 14))  # (1, 2, 49, D)
block = q14[0, 0].reshape(14, 14, D)[:2, :2].mean(axis=(0, 1))  # the top-left 2 x 2 patches
print("agent 0 is the mean of the top-left 2 x 2 patches:", np.allclose(A[0, 0, 0], block))
dwc = 0.1 * rng.standard_normal((2, D, 3, 3))  # (Hkv, Dv, 3, 3)
out = agent_attention.agent(q14, q14, q14, n_agents=49, grid=(14, 14), dwc=dwc)
print("DeiT-shaped call:", q14.shape, "->", out.shape)

# %% [markdown]
# Two properties that follow from the equations, checked numerically. With **one** agent,
# every query's softmax over the agents is the single weight 1, so every token receives the same
# aggregate: the mean query's attention over the keys. With **as many agents as tokens**
# ($n = N$, a sequence), every bin holds one token and the agents *are* the queries.

# %%
one = agent_attention.agent(q, k, v, n_agents=1)  # (B, H, N, D)
mean_query = core.sdpa(q.mean(axis=2, keepdims=True), k, v)  # (B, H, 1, D)
print("one agent: all rows equal the mean query's attention:", np.allclose(one, mean_query))
full_n = agent_attention.agent(q, k, v, n_agents=N)
print("n = N: equals agents = Q:", np.allclose(full_n, agent_attention.agent(q, k, v, agents=q)))

# %% [markdown]
# ## 2. Linear cost, measured
#
# Full softmax attention forms $N^2$ scores per head; agent attention $2Nn$. Time (best of
# five, one BLAS thread) and peak memory of the NumPy references, one head, $d = 64$, float32,
# $n = 49$ agents, as $N$ grows (peak memory from `tracemalloc`, which sees NumPy's
# allocations), and the least-squares slopes of the log-log curves from $N = 512$ on:


# %%


def peak_mib(fn):
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak / 2**20


sizes = [256, 512, 1024, 2048] if SMALL else [256, 512, 1024, 2048, 4096]
scaling = []  # (N, full time, agent time, full MiB, agent MiB)
with threadpool_limits(1):
    for size in sizes:
        x = rng.standard_normal((1, 1, size, 64)).astype(np.float32)  # q = k = v
        full = partial(core.sdpa, x, x, x)
        agents = partial(agent_attention.agent, x, x, x, n_agents=49)
        full(), agents()  # warm-up
        times = (best_of(full, 5), best_of(agents, 5))
        scaling.append((size, *times, peak_mib(full), peak_mib(agents)))

show_table(
    ("N", "full time", "agent time", "full peak", "agent peak"),
    [
        (s, f"{tf * 1e3:.1f} ms", f"{ta * 1e3:.1f} ms", f"{mf:.1f} MiB", f"{ma:.2f} MiB")
        for s, tf, ta, mf, ma in scaling
    ],
)
ns = np.array([row[0] for row in scaling], dtype=float)
slope = {  # least-squares log-log slope for N >= 512: 2 for quadratic, 1 for linear
    name: float(np.polyfit(np.log(ns[1:]), np.log([row[i] for row in scaling[1:]]), 1)[0])
    for i, name in [(1, "full time"), (2, "agent time"), (3, "full memory"), (4, "agent memory")]
}
print("log-log slopes for N >= 512:", {k: round(v, 2) for k, v in slope.items()})

fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
for ax, (i_full, i_agent, label) in zip(
    axes, [(1, 2, "time (s)"), (3, 4, "peak memory (MiB)")], strict=True
):
    ax.loglog(ns, [row[i_full] for row in scaling], "o-", label="full softmax attention")
    ax.loglog(ns, [row[i_agent] for row in scaling], "s-", label="agent attention, n = 49")
    ax.loglog(ns, scaling[0][i_agent] * ns / ns[0], ":", color="grey", label="slope 1")
    ax.loglog(
        ns,
        scaling[0][i_full] * (ns / ns[0]) ** 2,
        "--",
        color="grey",
        label="slope 2",
    )
    ax.set_xlabel("tokens N")
    ax.set_ylabel(label)
    ax.legend(fontsize=8)
fig.suptitle("NumPy reference, one head, d = 64, float32")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 3. Real attention: what the agents keep of MiniLM's maps
#
# Agent attention is trained into a model in the paper; MiniLM was trained with full softmax
# attention. Still, its queries, keys and values show what the two hops do to a real attention
# map (the paper's Stable Diffusion experiment is also training-free). The implied map
# $\sigma(sQA^\top)\,\sigma(sAK^\top)$ is a rank-$n$, row-stochastic $N \times N$ matrix; we
# form it here only to look at it, and compare it with the model's own map.

# %%
cap = minilm.load()
print(cap.q.shape, "(layers, heads, tokens, head dim)")
q_all, k_all, v_all = (x.astype(np.float64) for x in (cap.q, cap.k, cap.v))  # (6, 12, 244, 32)
s = 1 / np.sqrt(cap.head_dim)


def implied_map(layer, head, n):
    """phi_q(Q) phi_k(K)^T for one head: the N x N map agent attention applies, (N, N)."""
    qh, kh = q_all[layer, head], k_all[layer, head]
    a = agent_attention.pooling_matrix(cap.n_tokens, n) @ qh  # (n, D)
    return softmax(s * qh @ a.T) @ softmax(s * a @ kh.T)


_, weights = core.sdpa(q_all, k_all, v_all, return_weights=True)  # (6, 12, N, N): the real maps
layer, head, T = 2, 3, 48
fig, axes = plt.subplots(1, 4, figsize=(14, 3.7))
panels = [("MiniLM (full softmax)", weights[layer, head])]
panels += [(f"agent attention, n = {n}", implied_map(layer, head, n)) for n in (8, 32, 122)]
for ax, (title, m) in zip(axes, panels, strict=True):
    ax.imshow(m[:T, :T] ** 0.5, cmap="magma", vmin=0, vmax=1)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("key")
axes[0].set_ylabel("query")
fig.suptitle(f"layer {layer}, head {head}, first {T} tokens (square-root colour scale)")
fig.tight_layout()
plt.show()

# %% [markdown]
# How close the implied map is to the real one, averaged over every layer and head: the mean
# total-variation distance between corresponding rows, $\tfrac12\sum_j |P_{ij} - \hat P_{ij}|$
# (0: identical rows, 1: disjoint), and the relative error of the outputs. More agents, finer
# pooling bins, closer maps; uniform attention is shown for scale.

# %%
counts = [1, 8, 32, 122, 244] if not SMALL else [1, 8, 32, 244]
closeness = []
for n in counts:
    out = agent_attention.agent(q_all, k_all, v_all, n_agents=n)  # (6, 12, N, 32)
    tv = np.mean(
        [
            0.5 * np.abs(implied_map(la, h, n) - weights[la, h]).sum(-1).mean()
            for la in range(6)
            for h in range(12)
        ]
    )
    closeness.append((n, tv, rel_err(out, core.sdpa(q_all, k_all, v_all))))
uniform_tv = float(0.5 * np.abs(weights - 1 / cap.n_tokens).sum(-1).mean())
show_table(
    ("agents n", "mean row TV distance", "output rel. error"),
    [(n, f"{tv:.3f}", f"{e:.3f}") for n, tv, e in closeness]
    + [("uniform map", f"{uniform_tv:.3f}", "-")],
)

# %% [markdown]
# ## 4. Every backend, through the `sdpa` hops
#
# The two hops are ordinary softmax attention, so agent attention needs no kernel of its own:
# `qkv.agent` (the function `agent_attention.dispatched_agent`) runs both hops through the
# dispatched `qkv.sdpa`, on the backend chosen by `QKV_BACKEND`, `qkv.use_backend` or
# `backend=`, while the pooling, biases and DWC (all linear in $N$) stay in NumPy. Below: each
# backend that can run here, agent attention against full attention (`qkv.sdpa`) on the same
# backend, $B = 1$, $H = 8$, $d = 64$, float32, 49 agents; the error is against the float64
# reference.

# %%
H, D = 8, 64
N = 2048 if SMALL else 8192
x32 = rng.standard_normal((1, H, N, D)).astype(np.float32)
golden = agent_attention.agent(*(x32.astype(np.float64),) * 3, n_agents=49)
rows = []
runnable, skipped = runnable_backends()
for name in runnable:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", qkv.FallbackWarning)

        def run_agent(name=name):
            return agent_attention.dispatched_agent(x32, x32, x32, n_agents=49, backend=name)

        def run_full(name=name):
            return qkv.sdpa(x32, x32, x32, backend=name)

        err = rel_err(run_agent(), golden)  # also the warm-up (Numba compiles on first use)
        run_full()
        t_agent, t_full = best_of(run_agent, 3), best_of(run_full, 2)
    rows.append(
        (
            name,
            f"{t_agent * 1e3:.1f} ms",
            f"{t_full * 1e3:.1f} ms",
            f"{t_full / t_agent:.1f}x",
            f"{err:.1e}",
        )
    )
print(f"B=1 H={H} N={N} D={D}, float32; {os.cpu_count()} CPU cores\n")
show_table(("backend", "agent attention", "full sdpa", "agent speed-up", "rel. error"), rows)
for name, why in skipped:
    print(f"\n{name}: {why}")

# %% [markdown]
# ## 5. What the paper reports, and what we see here
#
# | paper | reports | here |
# |---|---|---|
# | complexity | $O(Nnd)$ instead of $O(N^2 d)$: linear in $N$ for fixed $n$ | measured log-log slopes below: full attention near 2 in time and memory, agent attention near 1 (section 2) |
# | generalised linear attention | $O = \phi_q(Q)\,\phi_k(K)^\top V$ with softmax feature maps | the implied map is row-stochastic and rank $\le n$, built and compared with MiniLM's (section 3) |
# | one set of agents per head, pooled from $Q$ | `AdaptiveAvgPool2d` of the queries, 49 agents on DeiT's $14\times14$ grid | equal to torch's adaptive pooling in the tests; grid and sequence pooling (section 1) |
# | accuracy | higher ImageNet top-1 than the DeiT, PVT, Swin and CSwin baselines at similar cost, gains in detection and segmentation, a training-free Stable Diffusion speed-up | no training here: on a model trained with full attention, more agents bring the map closer (section 3); accuracy claims are out of scope |
# | hops reuse softmax attention | — | every backend's `sdpa` runs the hops, no new kernel (section 4) |
#
# The numbers of this run:

# %%
summary = [
    (
        f"time slope, full / agent (N = 512..{sizes[-1]})",
        f"{slope['full time']:.2f} / {slope['agent time']:.2f}",
    ),
    ("memory slope, full / agent", f"{slope['full memory']:.2f} / {slope['agent memory']:.2f}"),
    (
        f"agent speed-up over full (reference, N = {sizes[-1]})",
        f"{scaling[-1][1] / scaling[-1][2]:.1f}x",
    ),
    (f"peak memory full / agent (N = {sizes[-1]})", f"{scaling[-1][3] / scaling[-1][4]:.0f}x"),
    ("MiniLM row TV distance, n = 8 / n = 32", f"{closeness[1][1]:.3f} / {closeness[2][1]:.3f}"),
]
show_table(("quantity", "value"), summary)

# %% [markdown]
# ## References
#
# * D. Han, T. Ye, Y. Han, Z. Xia, S. Pan, P. Wan, S. Song, G. Huang. *Agent Attention: On the
#   Integration of Softmax and Linear Attention.* ECCV 2024.
#   [arXiv 2312.08874](https://arxiv.org/abs/2312.08874). Code:
#   [LeapLabTHU/Agent-Attention](https://github.com/LeapLabTHU/Agent-Attention).
# * A. Katharopoulos, A. Vyas, N. Pappas, F. Fleuret. *Transformers are RNNs: Fast
#   Autoregressive Transformers with Linear Attention.* ICML 2020.
#   [arXiv 2006.16236](https://arxiv.org/abs/2006.16236).
# * H. Touvron et al. *Training data-efficient image transformers & distillation through
#   attention* (DeiT). ICML 2021. [arXiv 2012.12877](https://arxiv.org/abs/2012.12877).
# * W. Wang et al. *MiniLM: Deep Self-Attention Distillation for Task-Agnostic Compression of
#   Pre-Trained Transformers.* 2020. [arXiv 2002.10957](https://arxiv.org/abs/2002.10957).
