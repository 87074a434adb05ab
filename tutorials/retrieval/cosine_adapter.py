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
# # Cosine Adapter: where to stop a dense retrieval list
#
# *Paper:* N. Rossi, J. Lin, F. Liu, Z. Yang, T. Lee, A. Magnani, C. Liao, *Relevance Filtering
# for Embedding-based Retrieval*, CIKM 2024 ([arXiv 2408.04887](https://arxiv.org/abs/2408.04887)).
# No official code was found; the reference is `qkv.reference.retrieval.cosine_adapter`.
#
# Nearest-neighbour search over embeddings always returns $K$ results, relevant or not. Lexical
# search stops by itself when no document contains the words; dense search has no such cutoff,
# and the cosine itself is hard to read: a relevant document may score 0.7 for one query and an
# irrelevant one 0.7 for another, because contrastive training only orders documents *within* a
# query. So neither a fixed top-$k$ nor one cosine cutoff separates the relevant from the rest.
#
# The paper's Cosine Adapter maps each query's cosines through a monotone function whose
# parameters a small network reads off the **query embedding**, turning them into relevance
# probabilities that mean the same for every query, and then applies **one global threshold**.
# The map is increasing, so the ranking within a query is untouched: only where the list stops
# changes, query by query. Here we fit it on real text: the help pages of Python embedded by
# MiniLM (`qkv.lab.corpus`).

# %%
import os
import time

import matplotlib.pyplot as plt
import numpy as np

from qkv.lab import corpus
from qkv.lab.notebook import rel_err, show_table
from qkv.reference.retrieval import (
    CosineAdapter,
    cosine_adapter,
    filter_relevant,
    fit_cosine_adapter,
)
from qkv.reference.retrieval.relevance_filter import TRANSFORMS, precision_recall

SMALL = os.environ.get("QKV_TUTORIAL_SMALL") == "1"  # the test suite runs us at small sizes

# %% [markdown]
# ## The equations
#
# A linear layer reads the parameters from the query embedding, $\theta(q) = e_q W + w_0$, with
# $a = \operatorname{softplus}(\theta_0) > 0$, $b = \theta_1$ and, for the power form,
# $p = \operatorname{softplus}(\theta_2) > 0$. With $u = (1 + c)/2$ the cosine moved to
# $[0, 1]$, the transforms the paper names are
#
# $$
# m(c) = a c + b,\qquad m(c) = a \sqrt u + b,\qquad m(c) = a u^2 + b,\qquad m(c) = a u^p + b,
# $$
#
# the relevance is $r = \sigma(m(c))$ and a document is kept when $r \ge \tau$ for one $\tau$
# shared by all queries. Fitting minimises the binary cross-entropy of $r$ against labelled
# pairs. From scratch, the power form in a few lines:


# %%
def adapter_from_scratch(e, c, W, w0, tau=0.5):
    theta = e @ W + w0  # (Q, 3)
    a, b, p = np.logaddexp(0, theta[:, 0]), theta[:, 1], np.logaddexp(0, theta[:, 2])
    u = np.clip((1 + c) / 2, 0, 1)  # (Q, K)
    r = 1 / (1 + np.exp(-(a[:, None] * u ** p[:, None] + b[:, None])))
    return r, r >= tau


data = corpus.load()
E = data.query_embeddings.astype(np.float64)  # (S, 384)
docs = data.doc_embeddings.astype(np.float64)  # (S, 384)
rng = np.random.default_rng(0)
W, w0 = rng.normal(0, 2, (E.shape[1], 3)), np.array([1.0, -1.0, 0.0])
mine, kept_mine = adapter_from_scratch(E[:5], E[:5] @ docs.T, W, w0)
ours = cosine_adapter(E[:5], E[:5] @ docs.T, CosineAdapter(W, w0, "power"))
print("relative error, from scratch vs qkv:", rel_err(ours, mine))

# %% [markdown]
# ## Data and labels
#
# The corpus has $S$ paragraphs of the Python help pages; query $i$ is a paragraph's first
# sentence, document $i$ the rest. As in the paper's pipeline, the nearest-neighbour search
# first returns the top $K = 40$ documents of each query by cosine, and the filter decides how
# many of those to keep. **Labels (our choice):** a document is relevant to a query when it
# comes from the same help page (the query's own paragraph included), so a query has from 1 to
# 58 relevant documents: exactly the situation where one $k$ fits nobody. Queries are split
# two thirds for fitting (and for choosing the baselines' $k$ and cutoff), one third held out.

# %%
S, K = len(data), 40
full = E @ docs.T  # (S, S) cosine
topics = np.array(data.topics)
order = np.argsort(-full, axis=1, kind="stable")[:, :K]  # (S, K) the retrieved lists
C = np.take_along_axis(full, order, axis=1)  # (S, K), descending in each row
Y = np.take_along_axis(topics[:, None] == topics[None, :], order, axis=1)  # (S, K)
perm = np.random.default_rng(0).permutation(S)
train, test = perm[: 2 * S // 3], perm[2 * S // 3 :]
print(f"S = {S} queries, {len(set(topics))} help pages; relevant among the top {K}: {Y.mean():.2f}")

# %% [markdown]
# ## Fitting, and the baselines
#
# The top-$k$ baseline keeps the first $k$ of every list, the cutoff baseline every document
# with cosine $\ge t$; $k$ and $t$ are chosen to maximise F1 on the fitting queries. For the
# adapter we report the paper's fixed $\tau = 0.5$ and $\tau$ chosen the same way.

# %%
steps = 300 if SMALL else 1000
kinds = ("linear", "power") if SMALL else tuple(TRANSFORMS)


def best(values, kept_of):
    return max(values, key=lambda v: precision_recall(kept_of(train, v), Y[train])[2])


def top_k(rows, k):
    return np.broadcast_to(np.arange(K) < k, (len(rows), K))  # the first k of each list


rows = []
k_best = best(range(1, K + 1), top_k)
rows.append((f"top-k, k = {k_best}", *precision_recall(top_k(test, k_best), Y[test])))
t_best = best(np.linspace(0, 1, 201), lambda r, t: C[r] >= t)
rows.append((f"cosine >= {t_best:.3f}", *precision_recall(C[test] >= t_best, Y[test])))
adapters, seconds = {}, {}
for kind in kinds:
    t0 = time.perf_counter()
    adapters[kind] = fit_cosine_adapter(E[train], C[train], Y[train], transform=kind, steps=steps)
    seconds[kind] = time.perf_counter() - t0
    a = adapters[kind]
    rows.append(
        (f"{kind}, tau = 0.5", *precision_recall(filter_relevant(E[test], C[test], a), Y[test]))
    )
    tau = best(
        np.linspace(0.05, 0.95, 91), lambda r, t, a=a: filter_relevant(E[r], C[r], a, threshold=t)
    )
    kept = filter_relevant(E[test], C[test], a, threshold=tau)
    rows.append((f"{kind}, tau = {tau:.2f}", *precision_recall(kept, Y[test])))
show_table(
    ["held-out queries", "precision", "recall", "F1"],
    [(name, f"{p:.3f}", f"{r:.3f}", f"{f:.3f}") for name, p, r, f in rows],
)
print("fit time:", ", ".join(f"{k} {s:.1f} s" for k, s in seconds.items()), f"({steps} Adam steps)")

# %% [markdown]
# The map never reorders a list: on every held-out query the relevance is non-increasing along
# the cosine ranking, so the kept documents are the first $n_q$ of the list, with $n_q$ chosen
# per query.

# %%
r = cosine_adapter(E[test], C[test], adapters["linear"])
assert np.all(np.diff(r, axis=1) <= 0), "the adapter reordered a list"
kept_n = filter_relevant(E[test], C[test], adapters["linear"]).sum(axis=1)
print(
    "kept per query at tau = 0.5: min",
    kept_n.min(),
    "median",
    np.median(kept_n),
    "max",
    kept_n.max(),
)

# %% [markdown]
# ## The picture: precision against recall on held-out queries
#
# Each curve sweeps its one knob: $k$ for top-$k$, $t$ for the cosine cutoff, $\tau$ for the
# adapter. A query-dependent cutoff helps exactly when its curve lies above the others.

# %%
fig, ax = plt.subplots(figsize=(6, 4))
curves = {
    "top-k": [precision_recall(top_k(test, k), Y[test])[:2] for k in range(1, K + 1)],
    "cosine cutoff": [precision_recall(C[test] >= t, Y[test])[:2] for t in np.linspace(0, 1, 101)],
}
for kind, a in adapters.items():
    curves[f"adapter ({kind})"] = [
        precision_recall(filter_relevant(E[test], C[test], a, threshold=t), Y[test])[:2]
        for t in np.linspace(0.02, 0.98, 49)
    ]
for name, pts in curves.items():
    pts = [(p, r) for p, r in pts if p > 0]
    ax.plot([r for _, r in pts], [p for p, _ in pts], label=name)
ax.set_xlabel("recall (same help page)")
ax.set_ylabel("precision")
ax.set_title(f"held-out queries ({len(test)}), top {K} candidates each")
ax.legend()
plt.show()

# %% [markdown]
# ## Backends
#
# The adapter is a $(Q, D) \times (D, P)$ product and an elementwise map of the $(Q, K)$
# scores: no backend kernel is written for it, the NumPy reference is the implementation. Its
# cost next to the search it filters, measured here in one run:

# %%
t0 = time.perf_counter()
for _ in range(20):
    filter_relevant(E, C, adapters["linear"])
t_filter = (time.perf_counter() - t0) / 20
t0 = time.perf_counter()
for _ in range(20):
    np.argsort(-(E @ docs.T), axis=1)[:, :K]
t_search = (time.perf_counter() - t0) / 20
print(f"filter / exact search time for {S} queries: {t_filter / t_search:.3f}")

# %% [markdown]
# ## Paper versus here
#
# The paper (MS MARCO and Walmart product search) reports a large gain in precision at a small
# cost in recall over top-$k$ and cosine cutoffs, and a positive online A/B test. Here, on 318
# help-page paragraphs with page-level labels, the honest result is more modest: with $\tau$
# tuned on the fitting queries the adapter is about on par with the best top-$k$ and a little
# above the best cosine cutoff in F1 (one run of the full-size tutorial: F1 0.403 for the
# linear adapter, 0.400 quadratic, 0.386 power, 0.359 square root, against 0.397 for top-8 and
# 0.367 for the best cutoff, all with precision between 0.29 and 0.39), and at the paper's
# $\tau = 0.5$ it keeps few documents with high precision (0.67 to 0.73 for the linear,
# quadratic and power forms) and low recall (at most 0.11), because on this data few pairs
# reach a relevance probability of one half. The labels are coarse (a page of 58 paragraphs counts as one topic) and there are
# only about 210 fitting queries for a 384-feature input, so the query-dependent part has
# little to learn from; the paper trains on far more labelled queries. The properties the
# paper relies on hold exactly: rankings are never changed and each kept set is a prefix.
# Choices where the paper's text was not available to us (network, loss, parametrisation) are
# listed in the reference's docstring.
