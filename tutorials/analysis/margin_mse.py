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
# # Margin-MSE: distilling rankers across architectures
#
# *Paper:* S. Hofstätter et al., *Improving Efficient Neural Ranking Models with
# Cross-Architecture Knowledge Distillation* ([arXiv 2010.02666](https://arxiv.org/abs/2010.02666)).
#
# A concatenated-BERT teacher and a dot-product student score passages on different scales, so
# matching raw scores is the wrong target. A ranking only needs score *differences* per query,
# so Margin-MSE matches the student's margin between a relevant and a non-relevant passage to
# the teacher's:
#
# $$
# \mathcal L = \operatorname{MSE}\big(M_s(q,p^+) - M_s(q,p^-),\; M_t(q,p^+) - M_t(q,p^-)\big).
# $$

# %%
import matplotlib.pyplot as plt
import numpy as np

from qkv.lab.notebook import show_table
from qkv.reference.analysis import margin_mse
from qkv.reference.analysis.margin_mse_loss import margin_mse_grad

rng = np.random.default_rng(0)
tp, tn = rng.normal(8, 2, 64), rng.normal(4, 2, 64)  # teacher scores, a large scale
mine = np.mean(((tp / 10 + 1) - (tn / 10 + 1) - (tp - tn)) ** 2)
print("from scratch vs qkv:", mine, margin_mse(tp / 10 + 1, tn / 10 + 1, tp, tn))

# %% [markdown]
# ## The two properties, and training a student on margins
#
# A per-query shift of either model's scores leaves the loss unchanged; the loss is zero when
# the margins agree, whatever the scale of the scores. A "student" whose scores are an affine
# map of its own (here, simply free scores) is trained by gradient descent on Margin-MSE: its
# margins converge to the teacher's while its scores stay on their own scale.

# %%
shift = rng.standard_normal(64)
sp, sn = rng.standard_normal((2, 64))
print("shift invariance:", margin_mse(sp + shift, sn + shift, tp, tn) - margin_mse(sp, sn, tp, tn))
print("agreeing margins, offset scores:", margin_mse(tp - 100, tn - 100, tp, tn))
losses = []
for _ in range(200):
    losses.append(margin_mse(sp, sn, tp, tn))
    dp, dn = margin_mse_grad(sp, sn, tp, tn)
    sp, sn = sp - 10 * dp, sn - 10 * dn
fig, ax = plt.subplots(figsize=(5, 3))
ax.semilogy(losses)
ax.set_xlabel("step")
ax.set_ylabel("Margin-MSE")
plt.show()
show_table(
    ("", "mean positive score", "mean margin"),
    [("teacher", f"{tp.mean():.2f}", f"{(tp - tn).mean():.2f}"),
     ("student", f"{sp.mean():.2f}", f"{(sp - sn).mean():.2f}")],
)  # fmt: skip

# %% [markdown]
# ## What the paper reports, and what we see here
#
# | the paper reports | here |
# |---|---|
# | architectures output scores in different magnitudes; matching margins works across them | the loss ignores per-query offsets and trains margins, not scores |
# | Margin-MSE improves TK, ColBERT, PreTT and BERT-dot re-ranking on MSMARCO | ranking models are out of scope |
#
# ## References
#
# * S. Hofstätter, S. Althammer, M. Schröder, M. Sertkan, A. Hanbury. *Improving Efficient
#   Neural Ranking Models with Cross-Architecture Knowledge Distillation.* 2020.
#   [arXiv 2010.02666](https://arxiv.org/abs/2010.02666).
