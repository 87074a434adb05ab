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
# # Sparse attention over selected keys: the op every selection method feeds
#
# *A shared op of qkv, not a paper.* Decode-time KV methods (TokenSelect, TidalDecode, HiP,
# RetrievalAttention, A²ATS) all end the same way: each query head has picked some of the
# cached keys, and attention is the softmax over those keys alone. Caches whose heads keep
# different tokens (DuoAttention's streaming and retrieval heads, RazorAttention) need the same
# thing. `qkv.sparse_attention(q, k, v, indices)` is that op: per query head (and optionally per
# query) a row of key indices, padded with `-1`, read from the head's KV group.
#
# Methods that split the selection (RetrievalAttention's static window on one device and
# retrieved keys on another, block-wise kernels) compute partial softmaxes and merge them by
# their log-sum-exps; `qkv.reference.sparse.merge_partials` does that merge exactly. This
# tutorial writes the op from its equation, checks it, shows the merge, and uses it on the lab
# decoder to read only the top-scoring keys of each head.

# %%
import os
import time
import warnings
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np

import qkv
from qkv.lab import decoder as dec
from qkv.lab import engine, tasks
from qkv.lab.notebook import rel_err, show_table
from qkv.reference.kv import KVSelector
from qkv.reference.sparse import merge_partials

SMALL = os.environ.get("QKV_TUTORIAL_SMALL") == "1"  # the test suite runs us at small sizes
rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. The equation, from scratch
#
# With $\mathcal I_{h,i}$ the selected indices of query $i$ in head $h$ and $g(h)$ its KV head,
#
# $$
# o_{h,i} = \sum_{j \in \mathcal I_{h,i}}
# \frac{e^{s_{h,i,j}}}{\sum_{j' \in \mathcal I_{h,i}} e^{s_{h,i,j'}}}\, v_{g(h),j},
# \qquad s_{h,i,j} = \frac{q_{h,i}\cdot k_{g(h),j}}{\sqrt d}.
# $$

# %%
B, H, Hkv, N, M, D = 1, 8, 2, 3, 64, 16
q = rng.standard_normal((B, H, N, D))
k = rng.standard_normal((B, Hkv, M, D))
v = rng.standard_normal((B, Hkv, M, D))
idx = np.stack([rng.choice(M, size=12, replace=False) for _ in range(H)])[None]  # (B, H, S)
idx[0, 3, 6:] = -1  # head 3 reads only 6 keys


def scratch(q, k, v, idx):
    out = np.zeros_like(q)
    for h in range(H):
        sel = idx[0, h][idx[0, h] >= 0]
        s = q[0, h] @ k[0, h // (H // Hkv), sel].T / np.sqrt(D)  # (N, S)
        p = np.exp(s - s.max(-1, keepdims=True))
        out[0, h] = (p / p.sum(-1, keepdims=True)) @ v[0, h // (H // Hkv), sel]
    return out


print(
    f"relative error vs qkv.sparse_attention: "
    f"{rel_err(qkv.sparse_attention(q, k, v, idx), scratch(q, k, v, idx)):.1e}"
)

# %% [markdown]
# ## 2. Split selections merge by log-sum-exp
#
# $$
# \mathrm{lse} = \log\big(e^{\mathrm{lse}_a} + e^{\mathrm{lse}_b}\big), \qquad
# o = e^{\mathrm{lse}_a - \mathrm{lse}}\, o_a + e^{\mathrm{lse}_b - \mathrm{lse}}\, o_b .
# $$

# %%
part_a, part_b = idx[..., :5], idx[..., 5:]
oa, la = qkv.sparse_attention(q, k, v, part_a, return_lse=True)
ob, lb = qkv.sparse_attention(q, k, v, part_b, return_lse=True)
merged, _ = merge_partials([oa, ob], [la, lb])
print(
    f"merged halves vs whole selection: relative error "
    f"{rel_err(merged, qkv.sparse_attention(q, k, v, idx)):.1e}"
)

# %% [markdown]
# ## 3. Reading only the top keys on the lab decoder
#
# A `KVSelector` returns, per decode step, the cache slots each query head reads. The simplest
# one scores every cached key by its exact logit and keeps the top $k$ (an oracle that the
# approximate methods of the catalog try to match cheaply). On passkey prompts the decoder
# keeps its accuracy with a few dozen keys per head.


# %%
@dataclass(frozen=True)
class TopK(KVSelector):
    k: int

    def select(self, layer, cache):
        G = cache.queries.shape[1] // cache.keys.shape[1]
        keys = np.repeat(cache.keys, G, axis=1)  # (B, H, C, D)
        s = np.einsum("bhd,bhcd->bhc", cache.queries[:, :, -1], keys)
        s = np.where(np.repeat(cache.valid, G, axis=1), s, -np.inf)
        top = np.argsort(-s, axis=-1)[..., : self.k]  # (B, H, k)
        return np.where(np.take_along_axis(np.isfinite(s), top, -1), top, -1)


weights = dec.load()
length = 128 if SMALL else 384
exs = [
    tasks.passkey(length, d, np.random.default_rng(i))
    for i, d in enumerate(np.linspace(0, 1, 4 if SMALL else 8))
]
prompts, answers = np.stack([e.prompt for e in exs]), np.stack([e.answer for e in exs])
rows = []
for sel in (None, TopK(64), TopK(16), TopK(4)):
    g = engine.generate(weights, prompts, 5, selector=sel)
    rows.append(
        [repr(sel) if sel else "full cache", f"{np.mean(np.all(g.tokens == answers, 1)):.2f}"]
    )
show_table(["keys read per head", "passkey accuracy"], rows)

# %% [markdown]
# ## 4. Backends
#
# The op is dispatched; a backend that lacks it falls back to the reference with a warning.

# %%
rows = []
big = (
    rng.standard_normal((1, 8, 1, 16)),
    rng.standard_normal((1, 2, 4096, 16)),
    rng.standard_normal((1, 2, 4096, 16)),
)
sel = rng.integers(0, 4096, size=(1, 8, 256))
for name in ("reference", "numba", "torch"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            qkv.sparse_attention(*big, sel, backend=name)
            t0 = time.perf_counter()
            out = qkv.sparse_attention(*big, sel, backend=name)
            rows.append(
                [
                    name,
                    f"{1e3 * (time.perf_counter() - t0):.2f} ms",
                    f"{rel_err(out, qkv.sparse_attention(*big, sel)):.1e}",
                ]
            )
        except qkv.BackendUnavailable as exc:
            rows.append([name, "unavailable", str(exc)[:40]])
show_table(["backend", "256 of 4096 keys, 8 heads", "rel. error"], rows)

# %% [markdown]
# The numba kernel walks each list's slots once (online softmax: every selected key and value
# row is read once), runs serially below a small work threshold and on threads above it, and
# reads each row once for all the query heads of a KV group when their lists are equal. A list
# read by one or two query rows is scored slot by slot in place; one read by four rows or more
# (a group's heads, or several queries) has each tile of 128 slots copied into contiguous
# buffers and both products done by BLAS, as the dense flash kernel does. The torch backend
# gathers the selected rows with `index_select` (once per KV group when the group shares a
# list) and takes a masked softmax (autograd-friendly; the Triton gather kernel on a GPU). At this tiny size fixed per-call costs
# (the argument check, array conversion) are a large share of every row. Reading $S$ of $M$
# keys costs $O(S)$ per query rather than $O(M)$; `benchmarks/sparse.py` measures it at
# $M = 65536$ against full decode attention. The catalog's selection methods differ in how
# cheaply they find the indices.
#
# ## 5. A per-slot bias
#
# `bias` adds $b_{h,i,t}$ to the scaled score of slot $t$. A bias of $\log c$ weighs a key as
# $c$ copies of it (RazorAttention's compensation token, the mean of $|\mathcal D|$ dropped
# keys, counts $|\mathcal D|$ times this way; the lab engine passes the policy's
# `log_weight` through it); $-\infty$ drops the slot.

# %%
copies = rng.integers(1, 4, size=5)  # (S,)
few = rng.integers(0, M, size=(B, H, 5))  # (B, H, S)
weighted = qkv.sparse_attention(q, k, v, few, bias=np.broadcast_to(np.log(copies), few.shape))
listed = qkv.sparse_attention(q, k, v, np.repeat(few, copies, axis=-1))  # each key c times
drop = np.where(np.arange(5) == 2, -np.inf, 0.0) * np.ones(few.shape)  # (B, H, S): slot 2 off
dropped = qkv.sparse_attention(q, k, v, few, bias=drop)
emptied = qkv.sparse_attention(q, k, v, np.where(np.arange(5) == 2, -1, few))
print(f"bias log c vs listing c times: {rel_err(weighted, listed):.1e}")
print(f"bias -inf vs an empty slot:    {rel_err(dropped, emptied):.1e}")

# %%
fig, ax = plt.subplots(figsize=(5, 2.2))
ax.imshow((idx[0] >= 0)[:, :], cmap="Greys", aspect="auto")
ax.set(xlabel="slot", ylabel="query head", title="selection slots in section 1 (black = used)")
plt.show()
