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
# # RetrievalAttention: a graph index over the keys, built from the queries
#
# *Paper:* D. Liu et al., *RetrievalAttention: Accelerating Long-Context LLM Inference via
# Vector Retrieval* ([arXiv 2409.10516](https://arxiv.org/abs/2409.10516)).
# *Official code:* [microsoft/RetrievalAttention](https://github.com/microsoft/RetrievalAttention)
# (the public snapshot now holds the follow-up RetroInfer; the index of this paper is not in it,
# so the graph rules below are ours where the paper's text does not fix them).
#
# A decoding query puts nearly all its attention on a few of the cached keys, so attention over
# its top-$k$ keys by $q \cdot k$ is almost full attention, if those keys can be found without
# scoring them all. That is a vector search, and off-the-shelf indexes build a graph over the
# keys alone, linking each key to its nearest keys. The paper's point is that queries and keys
# come from different distributions: a search that starts from a query walks a key-key graph
# through keys that are close to each other but not to the query, and must scan a large part of
# the cache to reach the right keys.
#
# RetrievalAttention builds the graph from the prefill queries instead: every prefill query is
# linked to its exact top keys, and keys that share a query become neighbours. A decoding query
# then follows edges that queries like it would follow. Attention is exact over a static set
# (the first tokens and a recent window) and over the retrieved keys, the two parts merged by
# their log-sum-exps. This tutorial builds both graphs over the real queries and keys of the
# lab decoder and measures what the paper measures: keys scanned against recall.

# %%
import os
import time

import matplotlib.pyplot as plt
import numpy as np

import qkv
from qkv.backends import numba as numba_backend
from qkv.lab import decoder as dec
from qkv.lab import tasks
from qkv.lab.notebook import rel_err, show_table
from qkv.reference.core import sdpa
from qkv.reference.retrieval import build_index, build_knn_index, retrieval_attention
from qkv.reference.retrieval.attention_index import (
    exact_top_k,
    recall,
    search,
    static_positions,
)
from qkv.reference.sparse import sparse_attention

SMALL = os.environ.get("QKV_TUTORIAL_SMALL") == "1"  # the test suite runs us at small sizes
rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. The equations
#
# Index construction, per KV head, over the middle keys (neither sinks nor recent):
#
# $$
# T_i = \operatorname{TopK}_j(q_i \cdot k_j) \ \text{for every prefill query } q_i, \qquad
# p_i = T_i[0] \ \text{gets candidate edges } p_i \to T_i \setminus \{p_i\},
# $$
#
# pruned to at most $R$ edges per key, nearest first, skipping a candidate $c$ nearer to an
# already kept neighbour $s$ than to the key ($\lVert c - s \rVert < \lVert c - p \rVert$), and
# reversed where there is room. Decoding: greedy best-first search with a result list of size
# $\mathrm{ef}$ returns $\mathcal R$, the top-$k$ keys it found, and
#
# $$
# o = e^{\ell_{\mathcal S} - \ell}\, o_{\mathcal S} + e^{\ell_{\mathcal R} - \ell}\,
# o_{\mathcal R}, \qquad \ell = \log\big(e^{\ell_{\mathcal S}} + e^{\ell_{\mathcal R}}\big),
# $$
#
# with $o_{\mathcal X}$, $\ell_{\mathcal X}$ the softmax attention over the set $\mathcal X$
# and its log-sum-exp; $\mathcal S$ is the static set.
#
# ## 2. From scratch
#
# With an exact top-$k$ in place of the graph search the attention is a few lines: softmax over
# the static set and the $k$ best middle keys together.


# %%
def retrieval_attention_scratch(q, K, V, n_sink, stop, k):
    """q (D,), K (M, D), V (M, Dv): attention over sinks, recent and the exact top-k middle."""
    middle = np.arange(n_sink, stop)
    top = middle[np.argsort(-(K[middle] @ q))[:k]]
    keep = np.concatenate([np.arange(n_sink), top, np.arange(stop, len(K))])
    s = K[keep] @ q / np.sqrt(len(q))
    p = np.exp(s - s.max())
    return (p / p.sum()) @ V[keep]


B, H, Hkv, M, D = 1, 4, 2, 300, 16
q = rng.standard_normal((B, H, 2, D))
K = rng.standard_normal((B, Hkv, M, D))
V = rng.standard_normal((B, Hkv, M, D))
prefill = rng.standard_normal((B, H, 64, D)) + 0.5
index = build_index(prefill, K, n_sink=4, n_recent=16, links=16, max_degree=16)
ours = retrieval_attention(q, K, V, index, top_k=20, ef=index.size)  # ef = all: exact search
scratch = retrieval_attention_scratch(q[0, 0, 0], K[0, 0], V[0, 0], 4, index.stop, 20)
print("scratch vs qkv.reference, rel err:", f"{rel_err(ours[0, 0, 0], scratch):.1e}")

# %% [markdown]
# ## 3. The lab decoder's queries and keys
#
# The lab decoder (4 layers, 8 query heads over 2 KV heads of 16 features, trained on passkey
# retrieval) reads passkey prompts of 512 tokens. The first 448 positions are the prefill: their
# queries build the index over their keys, with 4 sinks and a recent window of 32 kept static.
# The queries of the last 64 positions stand in for decoding queries (they attend a cache of
# 448 to 511 keys, the first 448 of them indexed). For each decoding query the search returns
# $k = 10$ keys; recall@10 is the share of the exact top-10 middle keys it found, and "scanned"
# the share of the indexed keys it scored. The result-list size $\mathrm{ef}$ trades one for
# the other.

# %%
weights = dec.load()
n_prompts = 1 if SMALL else 3
layers = (1, 3) if SMALL else (0, 1, 2, 3)
n_decode = 16 if SMALL else 64
P, top_k = 448, 10
efs = (10, 20, 40) if SMALL else (10, 15, 20, 30, 40, 60, 80)

captured = {}


def capture(layer, q, k, v):
    captured.setdefault(layer, []).append((q, k, v))
    return dec.causal_attention(layer, q, k, v)


for r in range(n_prompts):
    ex = tasks.passkey(512, 0.3 + 0.2 * r, np.random.default_rng((7, r)))
    dec.forward(weights, ex.prompt[None], attention=capture)


def curves(layer):
    """Recall@10 and fraction scanned against ef, both graphs, over the prompts of one layer."""
    out = {"query-aware": [], "key-key kNN": []}
    for q_all, k_all, _ in captured[layer]:
        q_pre, k_pre = q_all[:, :, :P], k_all[:, :, :P]
        q_dec = q_all[:, :, -n_decode:]  # (1, H, n_decode, Dh)
        graphs = {
            "query-aware": build_index(
                q_pre, k_pre, n_sink=4, n_recent=32, links=32, max_degree=16
            ),
            "key-key kNN": build_knn_index(k_pre, n_sink=4, n_recent=32, max_degree=16),
        }
        exact = exact_top_k(q_dec, k_all, graphs["query-aware"], top_k)
        for name, g in graphs.items():
            row = []
            for ef in efs:
                found, scanned = search(q_dec, k_all, g, top_k=top_k, ef=ef)
                row.append((recall(found, exact), scanned.mean() / g.size))
            out[name].append(row)
    return {name: np.mean(rows, axis=0) for name, rows in out.items()}  # (len(efs), 2)


# the searches give the same keys on every backend (section 5): use the fastest one here
fast = "numba" if numba_backend.available()[0] else "reference"
t0 = time.perf_counter()
with qkv.use_backend(fast):
    results = {layer: curves(layer) for layer in layers}
print(f"built and searched in {time.perf_counter() - t0:.1f} s (searches on {fast})")

# %%
fig, axes = plt.subplots(1, len(layers), figsize=(3.2 * len(layers), 3), sharey=True)
for ax, layer in zip(np.atleast_1d(axes), layers, strict=True):
    for name, style in (("query-aware", "o-"), ("key-key kNN", "s--")):
        rec, scan = results[layer][name].T
        ax.plot(scan, rec, style, label=name)
    ax.set_title(f"layer {layer}")
    ax.set_xlabel("fraction of indexed keys scanned")
np.atleast_1d(axes)[0].set_ylabel("recall@10")
np.atleast_1d(axes)[0].legend()
plt.tight_layout()
plt.show()

# %%
rows = []
for layer in layers:
    for i, ef in enumerate(efs):
        a, b = results[layer]["query-aware"][i], results[layer]["key-key kNN"][i]
        rows.append([layer, ef, f"{a[0]:.2f}", f"{a[1]:.2f}", f"{b[0]:.2f}", f"{b[1]:.2f}"])
show_table(["layer", "ef", "aware recall", "aware scanned", "kNN recall", "kNN scanned"], rows)

# %% [markdown]
# ## 4. What the retrieval does to the attention output
#
# The decoding queries' attention (with the model's own values) through `retrieval_attention`:
# the static part (4 sinks and the last 32 + decoded tokens) merged with the 10 keys each graph
# retrieves at $\mathrm{ef} = 20$, against full attention over the same cache; the static
# part alone and the exact top-10 bound it from both sides.

# %%
layer = layers[-1]
q_all, k_all, v_all = captured[layer][0]
q_dec = q_all[:, :, -n_decode:]
full = sdpa(q_dec, k_all, v_all)
aware = build_index(
    q_all[:, :, :P], k_all[:, :, :P], n_sink=4, n_recent=32, links=32, max_degree=16
)
knn = build_knn_index(k_all[:, :, :P], n_sink=4, n_recent=32, max_degree=16)
fixed = static_positions(aware, k_all.shape[2])  # (S,)
static = np.broadcast_to(fixed, (1, q_dec.shape[1], len(fixed)))  # (1, H, S)
rows = [
    ["static only", "0.00", f"{rel_err(sparse_attention(q_dec, k_all, v_all, static), full):.3f}"]
]
for name, g, ef in (
    ("+ key-key kNN", knn, 20),
    ("+ query-aware", aware, 20),
    ("+ exact top-10", aware, aware.size),
):
    out, scanned = retrieval_attention(
        q_dec, k_all, v_all, g, top_k=top_k, ef=ef, return_scanned=True
    )
    rows.append([name, f"{scanned.mean() / g.size:.2f}", f"{rel_err(out, full):.3f}"])
show_table(["attention over", "scanned", "rel err vs full attention"], rows)

# %% [markdown]
# ## 5. Backends and cost
#
# The search is the op `qkv.graph_search_batch`; the numba backend runs each greedy walk in
# compiled code, one query per thread, and returns the same keys and counts as the reference
# (tested exactly by the conformance kit). The searches of 8 heads x all decoding queries at
# $\mathrm{ef} = 20$ on each backend, against the brute-force top-10 they replace (one matrix
# product and a partial sort):

# %%
backends = ["reference"] + (["numba"] if numba_backend.available()[0] else [])
rows = []
for name in backends:
    with qkv.use_backend(name):
        search(q_dec, k_all, aware, top_k=top_k, ef=20)  # warm-up (numba compiles once)
        t0 = time.perf_counter()
        found, _ = search(q_dec, k_all, aware, top_k=top_k, ef=20)
        rows.append([f"graph search ({name})", time.perf_counter() - t0])
t0 = time.perf_counter()
exact_top_k(q_dec, k_all, aware, top_k)
rows.append(["brute-force scan (NumPy)", time.perf_counter() - t0])
show_table(
    ["method", "ms", "x reference"],
    [[m, f"{t * 1e3:.2f}", f"{rows[0][1] / t:.1f}"] for m, t in rows],
)
print(
    f"{q_dec.shape[1] * q_dec.shape[2]} searches over {aware.size} keys of {k_all.shape[-1]} features"
)

# %% [markdown]
# ## 6. What the paper reports, and what we see
#
# The paper reports that on 128K-token contexts of Llama-3-8B an index over keys alone needs to
# scan about 30% of the keys for accurate retrieval, while the query-aware index reaches it
# scanning 1-3%, and that decoding stays accurate with a few hundred static tokens and about 100 retrieved keys
# (640 and 100 in its setup as we read it).
#
# Here the cache is 448 keys of 16 features in a 4-layer model, so every fraction is larger:
# the graph's entry neighbourhood alone is several percent of such a cache, and the sublinear
# cost of a graph only shows at lengths in the tens of thousands. The direction holds on the
# layers where attention is selective: at the same fraction of keys scanned, the query-aware
# graph finds more of the true top-10 than the key-key graph (the table and curves above; the
# figures differ per layer and the printout is the measurement of this run), and the attention
# output with the query-aware retrieval is close to the one with the exact top-10, where the
# key-key graph's is barely better than the static tokens alone. At this size a brute-force
# scan of a few hundred keys is one small matrix product and beats any walk in wall time; the
# point of the index is the count of keys read, which is what a KV cache held in CPU memory
# pays for at long context.
