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
# # VAR: redistributing sink attention to a segment
#
# *Paper:* S. Kang et al., *See What You Are Told: Visual Attention Sink in Large Multimodal
# Models* (ICLR 2025, [arXiv 2503.03321](https://arxiv.org/abs/2503.03321)).
# *Official code:* [MICV-yonsei/VisAttnSink](https://github.com/MICV-yonsei/VisAttnSink)
# (`src/logic/logic.py`).
#
# Multimodal decoders give high attention to a few image tokens that say nothing about the
# text. The paper ties them to massive activations in fixed hidden dimensions, detects them
# from the hidden state, and in *image-centric* heads moves part of all sink weight onto the
# image's other tokens, with no training.
#
# There is no vision model here. We use the MiniLM encoder and designate a segment of each
# sentence (its second half) to play the image: the detection, head selection and
# redistribution are the paper's; the "image" is text, and we say so in every result.

# %%
import os

import matplotlib.pyplot as plt
import numpy as np

import qkv
from qkv.lab import encoder as E
from qkv.lab.notebook import rel_err, show_table
from qkv.reference.analysis import var
from qkv.reference.analysis.var_redistribution import (
    massive_dims,
    sink_tokens,
    var_encoder_swaps,
)

SMALL = os.environ.get("QKV_TUTORIAL_SMALL") == "1"

# %% [markdown]
# ## 1. The rules
#
# $$
# j\in\mathcal S \iff \max_{d\in\mathcal D_{\text{sink}}}|\operatorname{RMSNorm}(h_j)_d| > \tau,
# \qquad \text{row } i \text{ selected} \iff \textstyle\sum_{j\in\mathcal I}A_{ij}\ge 0.2
# \ \wedge\ \sum_{j\in\mathcal I\cap\mathcal S}A_{ij} \le \rho\sum_{j\in\mathcal I}A_{ij},
# $$
# $$
# A'_{ij} = pA_{ij}\ (j\in\mathcal S),\qquad
# A'_{ij} = A_{ij} + (1-p)\Big(\textstyle\sum_{s\in\mathcal S}A_{is}\Big)
# \frac{A_{ij}}{\sum_{j'\in\mathcal I\setminus\mathcal S}A_{ij'}}\ (j\in\mathcal I\setminus\mathcal S).
# $$
#
# $|\operatorname{RMSNorm}(h)_d| \le \sqrt{384} \approx 19.6$ in MiniLM, so the paper's
# $\tau = 20$ (for LLaMA's 4096 dims) can never fire; we take $\mathcal D_{\text{sink}}$ as the
# two dims with the largest normalised activation and $\tau = 8$, our choice.

# %%
enc = E.Encoder.load()
texts = [
    "Exceptions are a means of breaking out of the normal flow of control of a code block.",
    "The while statement is used for repeated execution as long as an expression is true.",
    "The with statement wraps the execution of a block with methods defined by a manager.",
    "An assert statement is a convenient way to insert debugging assertions into a program.",
    "Any object can be tested for truth value, for use in an if or while condition.",
    "Lambda expressions are used to create anonymous functions in a single expression.",
]
if not SMALL:
    texts += [t.replace("statement", "clause") for t in texts]
ids, keep = enc.tokenize(texts)
hidden = E.encode(enc.weights, ids, keep)
dims = massive_dims(np.stack(hidden[1:-1]))
tau = 8.0
sinks = sink_tokens(hidden[2], dims, tau=tau)  # (B, T) sinks entering layer 2
tokens = enc.tokenizer.convert_ids_to_tokens(ids[0])
print(
    "D_sink:",
    dims,
    " sinks of sentence 0:",
    [t for t, s in zip(tokens, sinks[0], strict=True) if s],
)
lengths = keep.sum(1)
segment = (np.arange(ids.shape[1])[None] >= lengths[:, None] // 2) & keep  # second half

# %% [markdown]
# From scratch on one layer of one sentence, against the reference:

# %%
n = lengths[0]
q, k, v = (
    E._split_heads(E.linear(hidden[2][:1, :n], w, b), 12)
    for w, b in [
        (enc.weights.layers[2].w_q, enc.weights.layers[2].b_q),
        (enc.weights.layers[2].w_k, enc.weights.layers[2].b_k),
        (enc.weights.layers[2].w_v, enc.weights.layers[2].b_v),
    ]
)
_, A = qkv.sdpa(q, k, v, return_weights=True)
A = A[0].astype(np.float64)  # (H, n, n)
seg, snk = segment[0, :n], sinks[0, :n]
on_seg, on_seg_snk = A[..., seg].sum(-1), A[..., seg & snk].sum(-1)  # (H, n)
chosen = ((on_seg >= 0.2) & (on_seg_snk <= 0.5 * on_seg))[..., None]
freed = 0.4 * A[..., snk].sum(-1, keepdims=True)
recv = seg & ~snk
gain = 1 + freed / A[..., recv].sum(-1, keepdims=True)
scratch = np.where(chosen, np.where(snk, 0.6 * A, np.where(recv, gain * A, A)), A)
print(f"rel. error against qkv.reference: {rel_err(scratch, var(A, seg, snk)):.1e}")
print(f"segment-centric rows: {chosen.mean():.2f} of (head, query) pairs")

# %% [markdown]
# ## 2. What it does: attention on the segment, and the embeddings

# %%
after = var(A, seg, snk)
fig, ax = plt.subplots(figsize=(6, 2.5))
ax.bar(np.arange(12) - 0.2, A[..., seg].sum(-1).mean(-1), 0.4, label="softmax")
ax.bar(np.arange(12) + 0.2, after[..., seg].sum(-1).mean(-1), 0.4, label="after VAR")
ax.set(xlabel="head (layer 2)", ylabel="mean weight on segment", title="MiniLM, sentence 0")
ax.legend()
plt.show()

swaps = var_encoder_swaps(hidden, segment, dims, tau=tau)
base = enc.embed(texts)
moved = enc.embed(texts, swaps=swaps)
cos = np.sum(base * moved, axis=1)
k_nn = 2
show_table(
    ["measure", "value"],
    [
        ["cosine(embedding, VAR embedding), mean", f"{cos.mean():.4f}"],
        [
            f"{k_nn}-NN agreement with the unmodified encoder",
            f"{E.neighbour_agreement(base, moved, k_nn):.2f}",
        ],
    ],
)

# %% [markdown]
# ## 3. Backends and what we see
#
# VAR edits weights produced by `qkv.sdpa` on the selected backend; it has no kernel of its
# own, so nothing is timed here.
#
# The paper reports gains on vision-language, hallucination and vision-centric benchmarks with
# LLaVA-style models. Here the "image" is half a sentence of a text encoder, so there is no
# task for VAR to help with: we can only show that the rule does what it says (more weight
# on the segment in the selected rows, rows still summing to one) and how far it moves the
# sentence embeddings (the table). That is a check of the mechanism, not of the paper's claim.
