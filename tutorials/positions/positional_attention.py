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
# # Positional attention
#
# *Paper:* A. Back de Luca, G. Giapitzakis, S. Yang, P. Veličković, K. Fountoulakis,
# *Positional Attention: Expressivity and Learnability of Algorithmic Computation* (ICML 2025,
# [arXiv 2410.01686](https://arxiv.org/abs/2410.01686)).
# *Official code:* [opallab/positional_attention](https://github.com/opallab/positional_attention)
# (`model.py`).
#
# Parallel algorithms often communicate by address alone: to add up an array, processor $i$
# reads processor $i - 2^\ell$ at round $\ell$, whatever numbers the array holds. In a standard
# Transformer the attention weights are computed from the data, so a model that should route
# by position has to learn to ignore the values while doing it, and values it has never seen
# (larger numbers, say) can derail the routing. The paper studies **positional attention**:
# the queries and keys come from the positional encodings only, the values from the input.
#
# It proves that positional Transformers can simulate parallel computation models (at a
# logarithmic depth cost) and finds that they generalise better out of distribution on tasks
# whose algorithm routes by position. This tutorial builds the layer from its equations,
# checks it against `qkv.positional_attention`, then trains a positional and a standard layer
# on the CPU on a prefix-sum task and looks at the attention each one learns.

# %%
import math
import os
import time
import warnings

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn

import qkv
from qkv.lab.notebook import rel_err, runnable_backends, show_table
from qkv.reference.positions.positional import PositionalAttentionWeights

SMALL = os.environ.get("QKV_TUTORIAL_SMALL") == "1"  # the test suite runs us at small sizes
rng = np.random.default_rng(0)
torch.manual_seed(0)
torch.set_num_threads(1)  # tiny models: one thread is fastest (and deterministic)

# %% [markdown]
# ## 1. The equations
#
# With positional encodings $P \in \mathbb{R}^{N \times d_p}$ and input
# $X \in \mathbb{R}^{N \times d}$, head $h$ computes
#
# $$
# A_h = \operatorname{softmax}\!\Big(\tfrac{1}{\sqrt{d_k}}(P W^Q_h + b^Q_h)(P W^K_h + b^K_h)^\top\Big),
# \qquad
# O = \sum_h A_h\,(X W^V_h + b^V_h)\,W^O_h + b^O .
# $$
#
# $A_h$ does not involve $X$: it is the same matrix for every input, and $O$ is an affine
# function of $X$. In the official code $d_k = d_p$, the positions are one-hot ($P = I_N$, so
# each head's scores can be any rank-$d_p$ matrix), and a layer is
# $\operatorname{MLP}([X, O])$ with no residual connection.
#
# ### From scratch, in NumPy


# %%
def softmax(s):
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def positional_layer(x, p, w):
    """sum_h softmax(P Wq_h (P Wk_h)^T / sqrt(dk)) (X Wv_h) Wo_h for x (B, N, d)."""
    out = 0.0
    for h in range(w.n_heads):
        a = softmax((p @ w.w_q[h]) @ (p @ w.w_k[h]).T / np.sqrt(w.w_q.shape[2]))  # (N, N)
        out = out + a @ (x @ w.w_v[h]) @ w.w_o[h]  # the same a for every sample
    return out


N, d = 8, 12
weights = PositionalAttentionWeights.random(rng, n_heads=3, pos_dim=N, d_model=d)
x, p = rng.standard_normal((4, N, d)), np.eye(N)
scratch_err = rel_err(positional_layer(x, p, weights), qkv.positional_attention(x, p, weights))
print("from scratch vs qkv.positional_attention, rel. error:", scratch_err)

# %% [markdown]
# The two properties, on this random layer: the weights are identical for two unrelated
# inputs, and the layer is linear in the input (its biases are zero here).

# %%
from qkv.reference.positions import positional_attention  # the reference, with return_weights

x2 = 100 * rng.standard_normal((4, N, d))
_, a1 = positional_attention(x, p, weights, return_weights=True)
_, a2 = positional_attention(x2, p, weights, return_weights=True)
linear_err = rel_err(
    qkv.positional_attention(2 * x - 3 * x2, p, weights),
    2 * qkv.positional_attention(x, p, weights) - 3 * qkv.positional_attention(x2, p, weights),
)
print("max |A(x) - A(x')|:", np.abs(a1 - a2).max(), "  linearity rel. error:", linear_err)

# %% [markdown]
# ## 2. Learning a prefix sum
#
# The task: given $x_1, \dots, x_n$, output every prefix sum $y_i = \sum_{j \le i} x_j$. As in
# the official experiments, the sequence gets an extra node holding zero (the code's
# `num_additional_node`): a softmax row must spend all its weight somewhere, and the extra node
# is where a row can park the weight it does not want. One layer suffices in principle: if
# row $i$ puts weight $1/(n+1)$ on each of $x_1..x_i$ and the rest on the zero node, the
# attention output is $y_i/(n+1)$ and the MLP only has to scale it.
#
# Two one-layer models, trained the same way (Adam, MSE, inputs uniform in $[-1, 1]$): the
# **positional** one takes the values alone and the one-hot positions as $P$; the **standard**
# one computes queries and keys from its input, which is the values concatenated with the
# one-hot positions (as the official baseline does). Both are written in torch in a few lines,
# following the official layout.

# %%
n = 8
N = n + 1  # the extra zero node sits at the end
hidden, steps, batch = 32, (300 if SMALL else 3000), 128


class Layer(nn.Module):
    """encoding -> one-head attention -> MLP([h, attention(h)]) -> decoding (official layout)."""

    def __init__(self, in_dim, positional):
        super().__init__()
        self.positional = positional
        self.d_k = N if positional else hidden
        self.encoding = nn.Linear(in_dim, hidden)
        self.qk_proj = nn.Linear(self.d_k, 2 * self.d_k)
        self.v_proj, self.o_proj = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
        self.mlp = nn.Sequential(nn.Linear(2 * hidden, 64), nn.ReLU(), nn.Linear(64, hidden))
        self.decoding = nn.Linear(hidden, 1)

    def forward(self, inputs, pos):
        h = self.encoding(inputs)  # (B, N, hidden)
        q, k = self.qk_proj(pos if self.positional else h).chunk(2, dim=-1)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.d_k), dim=-1)  # (B?, N, N)
        attended = self.o_proj(a @ self.v_proj(h))  # (B, N, hidden)
        out = self.decoding(self.mlp(torch.cat([h, attended], dim=-1)))[..., 0]  # (B, N)
        return out, a, h, attended


def batch_of(size, scale=1.0, generator=None):
    values = (torch.rand(size, n, generator=generator) * 2 - 1) * scale
    xs = torch.cat([values, torch.zeros(size, 1)], dim=1)  # (B, N): the zero node last
    ys = torch.cat([values.cumsum(dim=1), torch.zeros(size, 1)], dim=1)  # target 0 there too
    return xs, ys


pos = torch.eye(N)
onehot = pos.expand(batch, N, N)
models = {"positional": Layer(1, positional=True), "standard": Layer(1 + N, positional=False)}


def inputs_for(name, xs):
    if name == "positional":
        return xs[..., None]
    return torch.cat([xs[..., None], pos.expand(len(xs), N, N)], dim=-1)


generator = torch.Generator().manual_seed(1)
start = time.perf_counter()
for name, model in models.items():
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        xs, ys = batch_of(batch, generator=generator)
        loss = ((model(inputs_for(name, xs), pos)[0] - ys) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
train_seconds = time.perf_counter() - start
print(f"trained both models for {steps} steps each in {train_seconds:.1f} s")

test = {}
with torch.no_grad():
    for scale in (1.0, 2.0, 4.0):
        xs, ys = batch_of(2000, scale, torch.Generator().manual_seed(2))
        for name, model in models.items():
            err = ((model(inputs_for(name, xs), pos)[0] - ys) ** 2)[:, :n].mean().item()
            test[(name, scale)] = err / (ys[:, :n] ** 2).mean().item()  # relative MSE
show_table(
    ("model", "test [-1, 1] (train range)", "test [-2, 2]", "test [-4, 4]"),
    [(name, *(f"{test[(name, s)]:.2e}" for s in (1.0, 2.0, 4.0))) for name in models],
)

# %% [markdown]
# The relative mean squared error of the prefix sums (the extra node excluded), in the
# training range and on inputs two and four times larger than any seen in training.
#
# ## 3. The attention each model learned
#
# The positional model has one attention matrix, whatever the input. The standard model has
# one per input; we show it for two random inputs of the training range and one of the
# $[-4, 4]$ range.

# %%
with torch.no_grad():
    xs, _ = batch_of(3, 1.0, torch.Generator().manual_seed(3))
    xs[2] *= 4
    _, a_pos, _, _ = models["positional"](inputs_for("positional", xs), pos)
    _, a_std, _, _ = models["standard"](inputs_for("standard", xs), pos)

fig, axes = plt.subplots(1, 4, figsize=(14, 3.6))
panels = [(a_pos.numpy(), "positional (any input)")] + [
    (a_std[i].numpy(), f"standard, input {i + 1}" + (" (x4)" if i == 2 else "")) for i in range(3)
]
labels = [f"x{i + 1}" for i in range(n)] + ["0"]
for ax, (a, title) in zip(axes, panels, strict=True):
    ax.imshow(a, cmap="magma", vmin=0, vmax=max(0.3, float(a.max())))
    ax.set_title(title, fontsize=10)
    ax.set_xticks(range(N), labels, fontsize=7)
    ax.set_yticks(range(N), [f"y{i + 1}" for i in range(n)] + ["0"], fontsize=7)
axes[0].set_ylabel("output row (query)")
fig.suptitle("attention weights after training (columns: keys)")
fig.tight_layout()
plt.show()
lower = np.tril(np.ones((n, n)), 0)
a = a_pos.numpy()[:n, :n]
inside, outside = (a * lower).sum(1) / lower.sum(1), (a * (1 - lower)).sum(1)
print("positional model, mean weight per visible key, rows 1..n:", np.round(inside, 3))
print("positional model, weight on later keys, rows 1..n:       ", np.round(outside, 3))

# %% [markdown]
# ## 4. The trained layer through `qkv`
#
# The trained positional layer's attention (its `qk_proj`, `v_proj` and `o_proj`) as a
# `PositionalAttentionWeights`, run by `qkv.positional_attention` on the layer's encoded
# input: the same output as the torch module's (up to the module's float32 rounding), on every backend that runs `qkv.sdpa` (the
# attention of the whole batch is one `sdpa` call, the batch folded into the value features).

# %%
model = models["positional"]
to_np = lambda t: t.detach().double().numpy()  # noqa: E731
qk_w, qk_b = to_np(model.qk_proj.weight), to_np(model.qk_proj.bias)
trained = PositionalAttentionWeights(
    w_q=qk_w[:N].T[None], w_k=qk_w[N:].T[None],  # (1, N, N): one head, d_k = d_p = N
    w_v=to_np(model.v_proj.weight).T[None], w_o=to_np(model.o_proj.weight).T[None],
    b_q=qk_b[:N][None], b_k=qk_b[N:][None],
    b_v=to_np(model.v_proj.bias)[None], b_o=to_np(model.o_proj.bias),
)  # fmt: skip
B = 64 if SMALL else 1024
xs, _ = batch_of(B, 1.0, torch.Generator().manual_seed(4))
with torch.no_grad():
    _, _, encoded, attended = model(inputs_for("positional", xs), pos)
encoded, p_np = to_np(encoded), np.eye(N)
rows = []
runnable, skipped = runnable_backends()
for name in runnable:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", qkv.FallbackWarning)
        out = qkv.positional_attention(encoded, p_np, trained, backend=name)
        best = math.inf
        for _ in range(3):
            start = time.perf_counter()
            qkv.positional_attention(encoded, p_np, trained, backend=name)
            best = min(best, time.perf_counter() - start)
    rows.append((name, f"{best * 1e3:.2f} ms", f"{rel_err(out, to_np(attended)):.1e}"))
print(f"B={B} sequences of N={N}, one head, width {hidden}, float64\n")
show_table(("backend", "best of 3", "rel. error vs the torch module"), rows)
for name, why in skipped:
    print(f"\n{name}: {why}")

# %% [markdown]
# ## 5. What the paper reports, and what we see here
#
# | the paper reports | here |
# |---|---|
# | attention weights depend on positional encodings only | identical weights for unrelated inputs, output linear in the input (section 1), and one attention matrix serves the whole batch |
# | positional Transformers perform well out of distribution on tasks whose algorithm routes by position | see the $[-2, 2]$ and $[-4, 4]$ columns of section 2 for this run (one seed, one layer, a few thousand steps: an illustration, not the paper's experiment) |
# | the positional model learns position-based communication | its single attention matrix (section 3): compare the weight on keys $j \le i$ and on later keys |
#
# The numbers of this run:

# %%
show_table(
    ("quantity", "value"),
    [("from scratch vs qkv, rel. error", f"{scratch_err:.1e}"),
     ("linearity rel. error", f"{linear_err:.1e}"),
     ("training time, both models", f"{train_seconds:.1f} s")]
    + [(f"{m} relative MSE, inputs x{s:g}", f"{test[(m, s)]:.2e}")
       for m in models for s in (1.0, 2.0, 4.0)],
)  # fmt: skip

# %% [markdown]
# ## References
#
# * A. Back de Luca, G. Giapitzakis, S. Yang, P. Veličković, K. Fountoulakis. *Positional
#   Attention: Expressivity and Learnability of Algorithmic Computation.* ICML 2025.
#   [arXiv 2410.01686](https://arxiv.org/abs/2410.01686). Code:
#   [opallab/positional_attention](https://github.com/opallab/positional_attention).
