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
# # SnapKV: the prompt's last queries vote for the keys to keep
#
# *Paper:* Y. Li et al., *SnapKV: LLM Knows What You are Looking for Before Generation*
# ([arXiv 2404.14469](https://arxiv.org/abs/2404.14469)).
# *Official code:* [FasterDecoding/SnapKV](https://github.com/FasterDecoding/SnapKV).
#
# A long prompt fills the KV cache with tokens most of which generation never reads again.
# SnapKV observes that the attention of the *last few prompt queries* (the observation window,
# which usually holds the question) already picks out the tokens the answer will need, so it
# keeps, per head, the prefix tokens those queries attend to most, plus the window itself.
#
# Unlike StreamingLLM, the choice depends on content: a needle in the middle of a passkey
# prompt survives if the window's queries look at it. This tutorial writes the vote from its
# equation, checks it against `qkv.reference.kv.SnapKV`, and compares SnapKV with StreamingLLM
# at a few budgets on the lab decoder through the engine.

# %%
import os

import matplotlib.pyplot as plt
import numpy as np

from qkv.lab import decoder as dec
from qkv.lab import tasks
from qkv.lab.notebook import passkey_accuracy, rel_err, show_table
from qkv.reference.kv import CacheView, SnapKV, StreamingLLM

SMALL = os.environ.get("QKV_TUTORIAL_SMALL") == "1"  # the test suite runs us at small sizes
weights = dec.load()

# %% [markdown]
# ## 1. The vote
#
# With $A_h = \operatorname{softmax}(Q_{h,\text{win}} K_h^\top / \sqrt d)$ (causal rows),
#
# $$
# C_{h,j} = \sum_{i \in \text{win}} A_{h,i,j}, \qquad
# \tilde C_h = \operatorname{pool}_k(C_h), \qquad
# \mathcal K_h = \operatorname{top}_{B-w}(\tilde C_h) \cup \text{win}.
# $$
#
# From scratch, for one query head of layer 0 of a passkey prompt:

# %%
ex = tasks.passkey(96, 0.4, np.random.default_rng(0))
n, w, k = len(ex.prompt), 8, 7
x = weights.embed[ex.prompt[None]]  # (1, N, d)
q, key, val = dec.project_qkv(weights.config, weights.layers[0], x, 0)
h, g = 0, 0  # query head 0 reads KV head 0
s = q[0, h, n - w :] @ key[0, g].T / np.sqrt(q.shape[-1])  # (w, N)
s = np.where(np.arange(n) <= np.arange(n - w, n)[:, None], s, -np.inf)
a = np.exp(s - s.max(-1, keepdims=True))
votes = (a / a.sum(-1, keepdims=True)).sum(0)[: n - w]  # (N - w,)
pad = np.pad(votes, k // 2, constant_values=-np.inf)
pooled = np.lib.stride_tricks.sliding_window_view(pad, k).max(-1)  # maxpool

where = np.broadcast_to(np.arange(n), (1, key.shape[1], n))
view = CacheView(key, val, where, where, np.full((1, key.shape[1]), n), n, q)
ours = SnapKV(budget=24, window=w, kernel=k, pooling="maxpool").votes(0, view)[0, h, : n - w]
print(f"scratch vs qkv votes: relative error {rel_err(pooled, ours):.1e}")

# %% [markdown]
# ## 2. What the window looks at
#
# The pooled votes of layer 0's heads over the passkey prompt; the needle's position is marked.

# %%
all_votes = SnapKV(budget=24, window=w, kernel=k, pooling="maxpool").votes(0, view)[0]
fig, ax = plt.subplots(figsize=(7, 2.6))
for hh in range(all_votes.shape[0]):
    ax.plot(np.where(np.isfinite(all_votes[hh]), all_votes[hh], np.nan), lw=1, label=f"head {hh}")
ax.axvline(ex.needle, color="k", ls="--", label="needle")
ax.set(xlabel="token", ylabel="pooled vote", yscale="log", title="SnapKV votes, layer 0")
ax.legend(ncol=5, fontsize=7)
plt.show()

# %% [markdown]
# ## 3. SnapKV against StreamingLLM through the engine
#
# Passkey prompts, the needle at several depths, the cache compressed after the prefill; the
# SnapKV setting is the one `qkv lab kv-eval` uses (window 8, maxpool kernel 7, votes averaged
# over each KV group so every KV head keeps exactly the budget).

# %%
length = 128 if SMALL else 384
budgets = (16, 48) if SMALL else (16, 32, 64, 128)
depths = (0.2, 0.5, 0.8) if SMALL else (0.1, 0.3, 0.5, 0.7, 0.9)
per = 2 if SMALL else 4


def accuracy(policy):
    return passkey_accuracy(weights, length, depths, per, seed=7, policy=policy)


rows = []
for b in budgets:
    snap = SnapKV(budget=b, window=min(8, b - 1), kernel=7, pooling="maxpool", gqa="mean")
    rows.append([b, f"{accuracy(snap):.2f}", f"{accuracy(StreamingLLM(4, b - 4)):.2f}"])
show_table(["budget", "snapkv", "streaming"], rows)
print("full cache:", accuracy(None))

# %% [markdown]
# ## 4. What the paper reports, and what we see here
#
# The paper reports that SnapKV keeps LongBench and needle-in-a-haystack accuracy close to the
# full cache at budgets of 1024-4096 tokens on 16k-380k prompts. On the lab decoder the passkey
# question sits at the end of the prompt, so the window's queries find the needle and SnapKV
# keeps it at budgets where StreamingLLM (whose window only reaches the last tokens) loses it;
# the table above is the measurement. The ranking agrees with the paper; the margins on a
# 4-layer model with a 128-token vocabulary need not: a small model's retrieval heads are
# few and sharp, which makes the vote unusually decisive. Where this code differs from the
# official: the official code selects per *query* head and stores the repeated cache
# (`gqa="query"` here keeps the union per KV head); the evaluation uses kvpress' group mean.
