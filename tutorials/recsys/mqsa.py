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
# # MQSA-TED: long and short queries, and distilled item transitions
#
# *Paper:* T. Zhu et al., *Collaboration and Transition: Distilling Item Transitions into
# Multi-Query Self-Attention for Sequential Recommendation* (WSDM 2024). *Official code:*
# [zhuty16/MQSA-TED](https://github.com/zhuty16/MQSA-TED).
#
# SASRec-style recommenders attend from each position with a query made of **one** item, which
# is noisy; MQSA adds a stack whose query is the mean of the last $L$ items (lower variance,
# more bias) and mixes the two predictions with $\alpha$. TED distils global item-to-item
# transition counts into the item embeddings:
#
# $$
# \text{score}_t = \alpha\, h^{\mathrm{short}}_t E^\top + (1-\alpha)\, h^{\mathrm{long}}_t E^\top,
# \qquad
# \mathcal L_{\mathrm{TED}} = \mathrm{CE}\big(\operatorname{softmax}(c_{i:}/(\max_j c_{ij}\,\tau)),
# \operatorname{softmax}(E_iE^\top/\tau)\big).
# $$

# %%
import numpy as np

from qkv.lab.notebook import show_table
from qkv.reference.recsys import mqsa
from qkv.reference.recsys.mqsa_ted import (
    MQSABlock,
    MQSAWeights,
    ted_loss,
    transition_counts,
    window_mean,
)

rng = np.random.default_rng(0)
V, D, N = 50, 16, 10


def block():
    w = lambda *s: rng.standard_normal(s) / np.sqrt(D)  # noqa: E731
    ln = np.stack([np.ones(D), np.zeros(D)])
    return MQSABlock(w(D, D), w(D, D), w(D, D), ln, ln, w(D, D), w(D), w(D, D), w(D))


ln = np.stack([np.ones(D), np.zeros(D)])
short = (block(), block())
weights = MQSAWeights(rng.standard_normal((V, D)) / 4, rng.standard_normal((N, D)) / 10,
                      short, (block(), block()), ln, ln)  # fmt: skip
seq = rng.integers(0, V, (2, N))

# %% [markdown]
# ## The window query, from scratch

# %%
x = rng.standard_normal((1, N, D))
valid = np.ones((1, N), bool)
mine = np.stack([x[0, max(0, t - 2) : t + 1].mean(0) for t in range(N)])
print("window mean from scratch vs qkv:", np.abs(mine - window_mean(x, valid, 3)[0]).max())

# %% [markdown]
# ## Window 1 and alpha = 1 give the short-query model

# %%
shared = MQSAWeights(weights.items, weights.positions, short, short, ln, ln)
rows = [
    ("alpha = 1", np.abs(mqsa(seq, weights, alpha=1.0) - mqsa(seq, shared, alpha=1.0)).max()),
    ("window 1, shared stacks, alpha = 0.3",
     np.abs(mqsa(seq, shared, window=1, alpha=0.3) - mqsa(seq, shared, alpha=1.0)).max()),
    ("window 3, shared stacks, alpha = 0.3",
     np.abs(mqsa(seq, shared, window=3, alpha=0.3) - mqsa(seq, shared, alpha=1.0)).max()),
]  # fmt: skip
show_table(("setting", "max |difference| to the short model"), [(a, f"{b:.1e}") for a, b in rows])

# %% [markdown]
# ## TED: distilling transitions into embeddings
#
# Synthetic sequences follow a fixed successor rule with noise; TED's loss on random
# embeddings, and on embeddings after a few steps of finite-difference-free gradient descent
# written with the softmax identity $\nabla = (p - t)E/\tau$ (rows and columns).

# %%
succ = rng.permutation(V)
seqs = []
for _ in range(300):
    s = [int(rng.integers(V))]
    for _ in range(15):
        s.append(int(succ[s[-1]]) if rng.random() < 0.8 else int(rng.integers(V)))
    seqs.append(s)
counts = transition_counts(seqs, V)
E = weights.items.copy()
heads = np.arange(V)
start = ted_loss(E, heads, counts)
for _ in range(300):
    t = np.exp(counts / counts.max(1, keepdims=True) / 0.1)
    t /= t.sum(1, keepdims=True)
    logits = E @ E.T / 0.1
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    g = (p - t) / 0.1 / V
    E -= 0.5 * (g @ E + g.T @ E)
print(f"TED loss: {start:.3f} -> {ted_loss(E, heads, counts):.3f}")
hit = np.mean(np.argmax(np.where(np.eye(V, dtype=bool), -np.inf, E @ E.T), 1) == succ)
print(f"nearest other item is the usual successor for {hit:.0%} of items")

# %% [markdown]
# ## What the paper reports, and what we see here
#
# | the paper reports | here |
# |---|---|
# | the L-query and short-query stacks balance bias and variance; $\alpha = 0.5$, $L = 3$ | both stacks and their mix, causal and padding masks; $L = 1$ (shared) or $\alpha = 1$ is SASRec |
# | TED distils transitions into item embeddings | the TED loss falls and embeddings come to point at successors |
#
# Attention runs through `qkv.reference.core.sdpa`; no dedicated backend kernel.
#
# ## References
#
# * T. Zhu, L. Sun, G. Chen. *Collaboration and Transition: Distilling Item Transitions into
#   Multi-Query Self-Attention for Sequential Recommendation.* WSDM 2024.
