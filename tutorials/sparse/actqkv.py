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
# # ActQKV: an activation-aware probe query and an entropy cut-off
#
# *Paper:* Q. Xiao et al., *Activation-aware Probe-Query: Effective Key-Value Retrieval for
# Long-Context LLMs Inference* ([arXiv 2502.13542](https://arxiv.org/abs/2502.13542)).
# *Official code:* [MrXiaoaa/ActQKV](https://github.com/MrXiaoaa/ActQKV) (built on InfLLM).
#
# Block-retrieval methods such as InfLLM keep the whole cache in blocks and let each window
# of queries fetch the few blocks that matter. They summarise the window with one probe query,
# its plain mean, so a few decisive tokens drown among many ordinary ones. ActQKV weights each
# query by its *activation bias*, how far it deviates from the running statistics of the
# queries seen, so that the anchor tokens dominate the probe.
#
# The second idea is a **dynamic cut-off**: how many blocks a layer reads follows how
# concentrated the block scores are. A peaked score distribution (low entropy) needs few
# blocks; a flat one needs many. This tutorial writes both from the equations, checks them
# against `qkv.reference.sparse.ActQKV` run by the lab engine on the lab decoder, and measures
# passkey retrieval and the fraction of keys read, against full attention and TokenSelect.

# %%
import os

import matplotlib.pyplot as plt
import numpy as np

import qkv
from qkv.lab import decoder as dec
from qkv.lab import engine, tasks
from qkv.lab.notebook import passkey_accuracy, show_table
from qkv.reference.sparse import ActQKV, TokenSelect
from qkv.reference.sparse.decode_scores import CountReads

SMALL = os.environ.get("QKV_TUTORIAL_SMALL") == "1"  # the test suite runs us at small sizes
weights = dec.load()

# %% [markdown]
# ## 1. The equations
#
# With window queries $h_i \in \mathbb R^{F}$ (all heads concatenated) and running statistics
# $\mu, \sigma^2$ of the queries seen,
#
# $$
# \mathrm{dev}_i = \frac1F \sum_f \frac{(h_{i,f} - \mu_f)^2}{\sigma_f^2 + \overline{\sigma^2}/100},
# \qquad w_i = \frac{\mathrm{dev}_i}{\sum_{i'} \mathrm{dev}_{i'}}, \qquad
# \hat q = \sum_i w_i h_i .
# $$
#
# Block $b$ (of ``block_size`` tokens between the sinks and the local window) is represented by
# the mean $r_b$ of its ``repr_topk`` keys that receive the most attention, and scored by
# $s_b = \cos(r_b, \hat q)$. With $p = \operatorname{softmax}(s / \tau)$ and the normalised
# entropy $\eta = H(p) / \log n_b$, the layer reads
# $k = k_{\min} + \operatorname{round}(\eta\,(k_{\max} - k_{\min}))$ blocks. (The paper says the
# entropy sets the budget between a minimum and top-k; the official code passes $\eta$ to a
# predictor that shares a budget across layers. The linear map is `qkv`'s per-layer reading.)
#
# From scratch, for one row of the cache the engine hands the selector at a decode step
# (window = the current query, the official decoding behaviour; its weight is 1):


# %%
def actqkv_scratch(q, keys, n_init, n_local, bs, r, k_min, k_max, tau=1.0):
    """q (H, D), keys (Hkv, L, D) -> the sorted token set read."""
    H, D = q.shape
    L = keys.shape[1]
    K = np.repeat(keys, H // keys.shape[0], axis=0)  # (H, L, D)
    s = np.einsum("hd,hld->hl", q, K) / np.sqrt(D)
    a = np.exp(s - s.max(-1, keepdims=True))
    importance = (a / a.sum(-1, keepdims=True)).sum(0)  # attention each key receives
    probe = q.reshape(-1)
    scores, blocks = [], []
    for start in range(n_init, L - n_local, bs):
        members = np.arange(start, min(start + bs, L - n_local))
        best = members[np.argsort(-importance[members], kind="stable")[:r]]
        rep = K[:, best].transpose(1, 0, 2).reshape(len(best), -1).mean(0)
        scores.append(rep @ probe / (np.linalg.norm(rep) * np.linalg.norm(probe)))
        blocks.append(members)
    p = np.exp(np.array(scores) / tau)
    p /= p.sum()
    eta = -(p * np.log(p)).sum() / np.log(len(p))
    k = k_min + int(np.round(eta * (min(k_max, len(p)) - k_min)))
    chosen = np.argsort(-np.array(scores), kind="stable")[:k]
    picked = {int(j) for b in chosen for j in blocks[b]}
    return sorted({*range(n_init), *picked, *range(L - n_local, L)})


seen = []  # the cache views the engine showed the selector


class Spy(ActQKV):
    def select(self, layer, cache):
        seen.append(cache)
        return super().select(layer, cache)


settings = dict(n_init=4, n_local=8, block_size=4, top_k=6, min_k=1, repr_topk=2)
ex = tasks.passkey(96, 0.5, np.random.default_rng(0))
engine.generate(weights, ex.prompt, 2, selector=Spy(**settings))
view = seen[-1]
L = int(view.lengths[0, 0])
mine = actqkv_scratch(view.queries[0, :, 0], view.keys[0, :, :L], 4, 8, 4, 2, 1, 6)
theirs = [int(s) for s in ActQKV(**settings).select(0, view)[0, 0] if s >= 0]
print("scratch :", mine)
print("qkv     :", theirs, " equal:", mine == theirs)

# %% [markdown]
# The activation weights themselves: a window of eight queries, one of them an outlier. The
# plain mean gives it 1/8; the activation bias gives it most of the probe.

# %%
from qkv.reference.sparse.actqkv_probe import activation_bias, activation_weights, query_stats

rng = np.random.default_rng(1)
window = rng.standard_normal((1, 8, 64)) * 0.2
window[0, 5] += 1.5  # the anchor token
w = activation_weights(activation_bias(window, query_stats(window)))
fig, ax = plt.subplots(figsize=(5.5, 2.6))
ax.bar(np.arange(8) - 0.2, np.full(8, 1 / 8), width=0.4, label="mean probe (InfLLM)")
ax.bar(np.arange(8) + 0.2, w[0], width=0.4, label="activation bias (ActQKV)")
ax.set(xlabel="token in the window", ylabel="weight in the probe")
ax.legend()
plt.show()

# %% [markdown]
# ## 2. Passkey retrieval against the budget, and the keys read
#
# The prompt is prefilled with full attention; decoding reads 4 sinks, 8 local tokens and at
# most ``top_k`` blocks of 4 tokens, so the budget (the most keys read per step) is
# $12 + 4\,k_{\max}$, with $k_{\min} = 1$. TokenSelect reads the same budget token by token.
# With the official temperature $\tau = 1$ the cosine scores lie in $[-1, 1]$, the softmax is
# nearly flat and the cut-off stays near $k_{\max}$; a smaller $\tau$ lets it act.

# %%
length = 128 if SMALL else 384
depths = np.linspace(0.1, 0.9, 2 if SMALL else 3)
budgets = (16, 32) if SMALL else (16, 32, 64)
per = 2 if SMALL else 4


def accuracy(selector):
    return passkey_accuracy(weights, length, depths, per, seed=5, selector=selector)


full = accuracy(None)
curves = {"ActQKV, tau=1": [], "ActQKV, tau=0.05": [], "TokenSelect": []}
rows, etas = [], []
for budget in budgets:
    for name, tau in (("ActQKV, tau=1", 1.0), ("ActQKV, tau=0.05", 0.05)):
        sel = CountReads(ActQKV(**{**settings, "top_k": (budget - 12) // 4, "temperature": tau}))
        acc = accuracy(sel)
        curves[name].append((acc, sel.fraction_read))
        ks = [k for _, k, _ in sel.inner.chosen_k]
        etas += [(tau, e, k) for _, k, e in sel.inner.chosen_k]
        rows.append([budget, name, f"{acc:.2f}", f"{sel.fraction_read:.3f}", f"{np.mean(ks):.1f}"])
    sel = CountReads(TokenSelect(n_init=4, n_local=8, top_k=budget - 12, cache_selection=False))
    acc = accuracy(sel)
    curves["TokenSelect"].append((acc, sel.fraction_read))
    rows.append([budget, "TokenSelect", f"{acc:.2f}", f"{sel.fraction_read:.3f}", "-"])
rows.append(["all", "full attention", f"{full:.2f}", "1.000", "-"])
show_table(
    ["budget (keys)", "method", "passkey accuracy", "fraction of keys read", "mean blocks k"], rows
)

fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
for name, pts in curves.items():
    axes[0].plot([p[1] for p in pts], [p[0] for p in pts], "o-", label=name)
axes[0].axhline(full, color="k", ls="--", label="full attention")
axes[0].set(xlabel="fraction of keys read", ylabel="passkey accuracy", ylim=(-0.02, 1.02))
axes[0].set_title(f"{length}-token prompts")
axes[0].legend(fontsize=8)
for tau in (1.0, 0.05):
    e = np.array([x[1] for x in etas if x[0] == tau])
    axes[1].hist(e, bins=20, range=(0, 1), alpha=0.6, label=f"tau={tau}")
axes[1].set(xlabel="normalised entropy of the block scores", ylabel="selections")
axes[1].legend()
plt.show()

# %% [markdown]
# ## 3. The probe at prefill: does it find the needle's block?
#
# The paper builds the probe from a window of the prompt during chunked prefill. Here the last
# $W = 16$ prompt queries of each layer (the question and the filler before it) form the
# window, the running statistics pool every prompt query, and the blocks of 4 tokens between
# the 4 sinks and the window are scored by both probes. The table gives, per layer, how often
# the block holding the passkey is among the 4 best-scored blocks, and its mean rank (0 = best).

# %%
from qkv.reference.sparse.actqkv_probe import (
    block_representatives,
    block_scores,
    probe_query,
    window_importance,
)

W, bs, n_init = 16, 4, 4
n_prompts = 4 if SMALL else 24
ranks = {}  # (layer, probe) -> ranks of the needle's block
for r in range(n_prompts):
    ex = tasks.passkey(length, (r % 6 + 0.5) / 6, np.random.default_rng((9, r)))
    x = weights.embed[ex.prompt[None]]  # (1, N, d)
    for layer, lw in enumerate(weights.layers):
        q, k, v = dec.project_qkv(weights.config, lw, x, 0)  # (1, H, N, D), (1, Hkv, N, D) x2
        x = dec.finish_block(weights.config, lw, x, qkv.sdpa(q, k, v, causal=True))
        q, k = q.astype(np.float64), k.astype(np.float64)
        H, N = q.shape[1], q.shape[2]
        K = np.repeat(k, H // k.shape[1], axis=1)  # (1, H, N, D)
        h = q.transpose(0, 2, 1, 3).reshape(1, N, -1)  # (1, N, H * D)
        imp = window_importance(q[:, :, -W:], K, np.ones((1, N), bool))  # (1, N)
        middle = K[:, :, n_init : N - W].transpose(0, 2, 1, 3).reshape(1, N - W - n_init, -1)
        reps = block_representatives(middle, imp[:, n_init : N - W], block_size=bs, repr_topk=2)
        needle_block = (ex.needle - n_init) // bs
        act = activation_weights(activation_bias(h[:, -W:], query_stats(h)))
        for name, wts in (("activation bias", act), ("mean (InfLLM)", np.full((1, W), 1 / W))):
            s = block_scores(reps, probe_query(h[:, -W:], wts))[0]
            ranks.setdefault((layer, name), []).append(int((s > s[needle_block]).sum()))
rows = [
    [layer, name, f"{np.mean(np.array(rk) < 4):.2f}", f"{np.mean(rk):.1f}"]
    for (layer, name), rk in sorted(ranks.items())
]
show_table(["layer", "probe", "needle block in top 4", "mean rank of the needle block"], rows)

# %% [markdown]
# ## 4. What the paper reports, and what we see here
#
# The paper reports state-of-the-art LongBench and $\infty$-Bench scores under a 2K-token KV
# budget with Llama-3-8B and Mistral-7B, the activation-aware probe recalling more relevant
# blocks than InfLLM's mean probe, and the dynamic cut-off reading fewer blocks at equal quality.
#
# At prefill on the lab decoder (section 3), one full-size run (24 prompts of 384 tokens) put
# the passkey's block among the 4 best in layer 2 for 25% of the prompts with the
# activation-weighted probe against 4% with the mean probe (mean rank 13 against 23); in layer 1
# both probes did about as well (75% and 71%), and the first and last layers do not look for
# the needle at all. The small setting of the test suite has too few prompts to tell them apart.
#
# At decoding, a run at 384 tokens (5 depths x 4 prompts) gave ActQKV a passkey accuracy of 0.35 to
# 0.60 for budgets of 16 to 64 keys, where TokenSelect reached 1.00 at every budget. The needle is a
# few tokens; a 4-token block judged by one representative, by a cosine over all heads concatenated
# (as the official code does, so the few retrieval heads are diluted by the others), is coarser than
# TokenSelect's per-head softmax vote. With the official $\tau = 1$ the normalised entropy of
# softmaxed cosines stays close to 1 (right panel) and the cut-off reads nearly $k_{\max}$ blocks; a
# small temperature makes it bite, reading fewer keys. The activation-aware probe acts on a window
# of queries: at decoding the official window is the current token alone (weight 1), and the lab
# engine prefills with full attention, so on this engine the probe matters only with `window > 1`
# (the last decode queries). Differences from the official code: its question term and its
# cross-layer budget predictor are not reproduced, the running statistics are exactly pooled (the
# code caps the count at 1000), and key importance is the attention the current window pays (InfLLM
# records it when the block is formed). There is no kernel: this is the reference, run by the
# engine.
