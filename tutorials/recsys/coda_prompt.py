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
# # CODA-Prompt: attention-weighted prompt components
#
# *Paper:* J. S. Smith et al., *CODA-Prompt: COntinual Decomposed Attention-based Prompting for
# Rehearsal-Free Continual Learning* ([arXiv 2211.13218](https://arxiv.org/abs/2211.13218)).
# *Official code:* [GT-RIPL/CODA-Prompt](https://github.com/GT-RIPL/CODA-Prompt).
#
# Prompt-based continual learning keeps a frozen ViT and learns prompts. Instead of picking one
# prompt from a pool by a non-differentiable key match, CODA-Prompt assembles the prompt as a
# weighted sum of components, weighted by the cosine between the **attention-masked** query
# feature and each component's key, end to end:
#
# $$
# \alpha_m = \cos(x \odot A_m, K_m),\qquad p = \sum_m \alpha_m P_m,\qquad
# \operatorname{Attn}(xW_Q, [p_k; xW_K], [p_v; xW_V]).
# $$

# %%
import matplotlib.pyplot as plt
import numpy as np

from qkv.lab.notebook import rel_err
from qkv.reference.recsys import coda_prompt
from qkv.reference.recsys.coda_prompting import PromptPool, orthogonality_penalty, prefix_attention

rng = np.random.default_rng(0)
M, Lp, D = 10, 8, 32
pool = PromptPool(rng.standard_normal((M, Lp, D)), rng.standard_normal((M, D)),
                  rng.standard_normal((M, D)))  # fmt: skip
x = rng.standard_normal((4, D))
masked = x[:, None] * pool.attention[None]
cos = np.einsum("bmd,md->bm", masked, pool.keys)
alpha = cos / np.linalg.norm(masked, axis=-1) / np.linalg.norm(pool.keys, axis=-1)
mine = np.einsum("bm,mld->bld", alpha, pool.components)
print("from scratch vs qkv, rel. error:", rel_err(mine, coda_prompt(x, pool)))

# %% [markdown]
# ## Orthogonal components and the penalty

# %%
q, _ = np.linalg.qr(rng.standard_normal((Lp * D, M)))
ortho = q.T.reshape(M, Lp, D)
print("penalty, random components:", orthogonality_penalty(pool.components))
print("penalty, orthonormal components:", orthogonality_penalty(ortho))

# %% [markdown]
# ## Prefix-tuning a small attention layer

# %%
tokens = rng.standard_normal((4, 16, D))
w = [rng.standard_normal((D, D)) / np.sqrt(D) for _ in range(3)]
plain = prefix_attention(tokens, None, *w, heads=4)
prompted = prefix_attention(tokens, coda_prompt(x, pool), *w, heads=4)
print("relative change of the layer output by the prompt:", rel_err(prompted, plain))
_, a = coda_prompt(x, pool, return_weights=True)
fig, ax = plt.subplots(figsize=(5, 2.5))
ax.imshow(a, cmap="coolwarm", vmin=-1, vmax=1)
ax.set_xlabel("component m")
ax.set_ylabel("input")
ax.set_title("cosine weights alpha")
plt.show()

# %% [markdown]
# ## What the paper reports, and what we see here
#
# | the paper reports | here |
# |---|---|
# | input-conditioned prompts assembled from components, trained end to end; beats DualPrompt by up to 4.5% | the assembly, the orthogonality penalty and prefix-tuning, checked against torch in the tests; training a ViT is out of scope |
# | defaults $M = 100$, $L_p = 8$, $\mu = 0.1$ | module constants |
#
# ## References
#
# * J. S. Smith et al. *CODA-Prompt: COntinual Decomposed Attention-based Prompting for
#   Rehearsal-Free Continual Learning.* CVPR 2023. [arXiv 2211.13218](https://arxiv.org/abs/2211.13218).
