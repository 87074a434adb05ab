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
# # TokenSelect: heads vote for the tokens a decoding query reads
#
# *Paper:* W. Wu et al., *TokenSelect: Efficient Long-Context Inference and Length
# Extrapolation for LLMs via Dynamic Token-Level KV Cache Selection*
# ([arXiv 2411.02886](https://arxiv.org/abs/2411.02886)).
# *Official code:* [pzs19/TokenSelect](https://github.com/pzs19/TokenSelect).
#
# At each decoding step a query attends to the whole cache, yet most of its attention lands on
# a handful of tokens. TokenSelect keeps the whole cache but reads only a few keys: the first
# tokens (sinks), the latest ones, and the $k$ middle tokens the heads vote for. Each head
# scores every candidate by $q_h \cdot k_j$ and normalises with a softmax, so a head with large
# logits cannot outvote the others; the votes are summed over heads and one set serves them all.
#
# Consecutive queries are often nearly the same, so the paper also caches the selection: when
# the cosine similarity of this query with the last one passes a threshold (0.9), the last
# top-k is reused. This tutorial writes the vote from its equation, checks it against
# `qkv.reference.sparse.TokenSelect` run by the lab engine on the lab decoder, and measures
# passkey retrieval, the fraction of keys read and the selection-cache hit rate.

# %%
import os

import matplotlib.pyplot as plt
import numpy as np

from qkv.lab import decoder as dec
from qkv.lab import engine, tasks
from qkv.lab.notebook import passkey_accuracy, show_table
from qkv.reference.sparse import TokenSelect
from qkv.reference.sparse.decode_scores import CountReads

SMALL = os.environ.get("QKV_TUTORIAL_SMALL") == "1"  # the test suite runs us at small sizes
weights = dec.load()

# %% [markdown]
# ## 1. The vote
#
# With candidates $\mathcal C = \{n_{init}, \dots, L - n_{local} - 1\}$,
#
# $$
# v_j = \sum_h \operatorname{softmax}_{j \in \mathcal C}(q_h \cdot k_{g(h), j}), \qquad
# \mathcal I = [0, n_{init}) \cup \operatorname{TopK}(v) \cup [L - n_{local}, L).
# $$
#
# From scratch in NumPy, for one row of the cache the engine hands a selector:


# %%
def vote_scratch(q, keys, n_init, n_local, k):
    """q (H, D), keys (Hkv, L, D) -> the sorted token set."""
    H, L = q.shape[0], keys.shape[1]
    s = np.einsum("hd,hld->hl", q, np.repeat(keys, H // keys.shape[0], axis=0))[
        :, n_init : L - n_local
    ]
    p = np.exp(s - s.max(-1, keepdims=True))
    votes = (p / p.sum(-1, keepdims=True)).sum(0)
    top = n_init + np.argsort(-votes)[:k]
    return sorted({*range(n_init), *top.tolist(), *range(L - n_local, L)})


seen = []  # the cache views the engine showed the selector


class Spy(TokenSelect):
    def select(self, layer, cache):
        seen.append(cache)
        return super().select(layer, cache)


ex = tasks.passkey(96, 0.5, np.random.default_rng(0))
spy = Spy(n_init=4, n_local=8, top_k=8, cache_selection=False)
engine.generate(weights, ex.prompt, 2, selector=spy)
view = seen[-1]
L = int(view.lengths[0, 0])
mine = vote_scratch(view.queries[0, :, 0], view.keys[0, :, :L], 4, 8, 8)
theirs = [int(s) for s in spy.select(0, view)[0, 0] if s >= 0]
print("scratch :", mine)
print("qkv     :", theirs, " equal:", mine == theirs)

# %% [markdown]
# ## 2. Passkey retrieval against the budget, and the keys read
#
# The budget is $n_{init} + k + n_{local}$ keys read per step (4 sinks, 8 local tokens); the
# prompt is prefilled with full attention and only decoding is sparse, as in the paper.

# %%
length = 128 if SMALL else 384
depths = np.linspace(0.1, 0.9, 3 if SMALL else 5)
budgets = (16, 32) if SMALL else (16, 24, 32, 64)
per = 2 if SMALL else 4


def accuracy(selector):
    return passkey_accuracy(weights, length, depths, per, seed=5, selector=selector)


full = accuracy(None)
rows, acc, read = [], [], []
for budget in budgets:
    sel = CountReads(TokenSelect(n_init=4, n_local=8, top_k=budget - 12))
    acc.append(accuracy(sel))
    read.append(sel.fraction_read)
    rows.append([budget, f"{acc[-1]:.2f}", f"{read[-1]:.3f}", f"{sel.inner.hit_rate:.2f}"])
rows.append(["full", f"{full:.2f}", "1.000", "-"])
show_table(["budget (keys)", "passkey accuracy", "fraction of keys read", "cache hit rate"], rows)

fig, ax = plt.subplots(figsize=(5.5, 3.2))
ax.plot(budgets, acc, "o-", label="TokenSelect")
ax.axhline(full, color="k", ls="--", label="full attention")
ax.set(xlabel="keys read per step", ylabel="passkey accuracy", ylim=(-0.02, 1.02))
ax.set_title(f"{length}-token prompts")
ax.legend()
plt.show()

# %% [markdown]
# The lab decoder's consecutive decoding queries are rarely 0.9-similar (the hit rate above).
# Lowering the threshold trades fresh selections for reuse, at the smallest budget:

# %%
rows = []
for threshold in (0.9, 0.5, 0.0):
    sel = TokenSelect(n_init=4, n_local=8, top_k=budgets[0] - 12, threshold=threshold)
    rows.append([threshold, f"{accuracy(sel):.2f}", f"{sel.hit_rate:.2f}"])
show_table(["threshold", "passkey accuracy", "cache hit rate"], rows)

# %% [markdown]
# ## 3. What the paper reports, and what we see here
#
# The paper reports long-context accuracy close to full attention with a few thousand selected
# tokens out of hundreds of thousands, speed-ups of attention up to 23.8x, and a selection
# cache that skips most selections at a small accuracy cost. On the 4-layer lab decoder the
# needle is a handful of tokens and the vote finds it with a budget of a few dozen keys (the
# table above; compare the fraction of keys read). Its consecutive queries are less alike than
# the paper's, so the 0.9 threshold rarely hits here. The selection cache is on (the paper);
# the released code turns it off, and `cache_selection=False` gives that variant. The
# official code maps query head $h$ to KV head $h \bmod H_{kv}$; `qkv` uses the grouping the
# model was trained with. There is no kernel here: this is the reference, run by the engine.
