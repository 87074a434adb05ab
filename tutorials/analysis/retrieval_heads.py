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
# # Retrieval heads: who copies the needle
#
# *Paper:* W. Wu, Y. Wang, G. Xiao, H. Peng, Y. Fu, *Retrieval Head Mechanistically Explains
# Long-Context Factuality* ([arXiv 2404.15574](https://arxiv.org/abs/2404.15574)).
# *Official code:* [nightdessert/Retrieval_Head](https://github.com/nightdessert/Retrieval_Head).
#
# When a long-context model answers a needle-in-a-haystack question, who fetches the needle? The
# paper finds that a few attention heads (under 5% in every model it studied) do: while the
# answer is decoded, their strongest attention lands on the needle token being copied. It scores
# each head by how much of the needle it copies this way, and shows the heads are causal:
# masking them makes the model miss the needle, masking as many random heads does not.
#
# Here we score every head of the 4-layer lab decoder (`qkv.lab.decoder`) on passkey prompts and
# repeat the causal test. The lab's digit tokens carry their place in the key, so even a first
# layer head can find "the third digit" by content alone; expect more retrieval heads than in a
# large model.

# %%
import os
import time

import matplotlib.pyplot as plt
import numpy as np

from qkv.lab import decoder as dec
from qkv.lab import tasks
from qkv.lab.notebook import show_table
from qkv.reference.analysis import retrieval_heads
from qkv.reference.analysis.retrieval_score import causal_test, needle_span, retrieval_score

SMALL = os.environ.get("QKV_TUTORIAL_SMALL") == "1"  # the test suite runs us at small sizes

# %% [markdown]
# ## The score
#
# At decoding step $t$ a head copies when its argmax key is inside the needle $\mathcal N$ and
# holds the token $w_t$ being generated:
# $\operatorname{argmax}_j a_{tj} \in \mathcal N$ and $x_{\operatorname{argmax}_j a_{tj}} = w_t$.
# With $g_h$ the needle positions so copied, the score of a test is $|g_h| / |\mathcal N|$,
# averaged over tests; a head above $0.1$ is a retrieval head. From scratch, for one head:


# %%
def score_from_scratch(rows, context, generated, start, stop):
    """rows (T, N): the head's attention at the decoding queries."""
    copied = set()
    for t, row in enumerate(rows):
        j = int(np.argmax(row))
        if start <= j < stop and context[j] == generated[t]:
            copied.add(j)
    return len(copied) / (stop - start)


weights = dec.load()
ex = tasks.passkey(128, 0.4, np.random.default_rng(0))
P, T = len(ex.prompt), len(ex.answer)
seq = ex.tokens[None, :-1]  # prompt + answer but the last token, (1, P + T - 1)
_, maps = dec.forward(weights, seq, return_attention=True)  # (L, 1, H, N, N)
rows = maps[:, 0, :, P - 1 :]  # (L, H, T, N)
start, stop = needle_span(ex)
ours = retrieval_score(rows, seq[0], ex.answer, (start, stop))
mine = np.array(
    [
        [score_from_scratch(rows[i, j], seq[0], ex.answer, start, stop) for j in range(8)]
        for i in range(4)
    ]
)
print("max |difference| from scratch vs qkv:", np.abs(ours - mine).max())

# %% [markdown]
# ## Every head of the lab decoder
#
# Passkeys at evenly spaced depths, decoded greedily; tests whose answer recalls at most half of
# the needle are skipped, as in the official code.

# %%
length, n = (128, 4) if SMALL else (256, 12)
rng = np.random.default_rng(0)
examples = [tasks.passkey(length, d, rng) for d in np.linspace(0, 1, n)]
t0 = time.perf_counter()
found = retrieval_heads(weights, examples)
print(f"{found.accumulated} tests scored in {time.perf_counter() - t0:.1f} s")
print("retrieval heads (score > 0.1):", found.heads)

fig, ax = plt.subplots(figsize=(6, 3))
im = ax.imshow(found.scores, cmap="viridis", vmin=0, vmax=1)
ax.set_xlabel("head")
ax.set_ylabel("layer")
ax.set_title(f"retrieval score, passkey length {length}")
fig.colorbar(im)
plt.show()

# %% [markdown]
# ## The causal test
#
# Zero the output of the $k$ best-scoring heads, or of $k$ random other heads, and decode the
# passkey again.

# %%
ks = (2, 4) if SMALL else (2, 4, 8)
rows_out = []
for k in ks:
    r = causal_test(weights, examples, found, k=k, draws=1 if SMALL else 3)
    rows_out.append((k, r["clean"], r["top"], r["random"]))
show_table(["k masked", "clean", "top-k masked", "random-k masked"], rows_out)

# %% [markdown]
# ## Paper versus here
#
# The paper reports a sparse, universal set of retrieval heads (score > 0.1 for under 5% of
# heads) and a sharp fall of needle accuracy when the top heads are masked, with little change
# for random heads. On the lab decoder (32 heads) many more heads pass 0.1, most of them in the
# first layer: place-marked digit tokens let a single attention step find each digit. The causal
# test goes the paper's way: masking the best heads costs accuracy faster than masking random
# heads (at length 256 with 12 depths, one run here gave 0.48 with the top 8 masked against
# 0.96 for random 8, clean 1.0), though no single head is necessary: the model is redundant.
# Masking is head ablation (the head's output set to zero); the official code masks attention
# inside the model's own implementation.
