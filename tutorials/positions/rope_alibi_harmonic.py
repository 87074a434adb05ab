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
# # RoPE x ALiBi with a harmonic series
#
# *Paper:* F. Li, *The Nature of Mathematical Modeling and Probabilistic Optimization
# Engineering in Generative AI* ([arXiv 2410.18441](https://arxiv.org/abs/2410.18441)). No
# official code is known.
#
# Two positional schemes dominate decoder language models. RoPE rotates each query and key by
# an angle proportional to its position, so a query-key score depends on their *relative*
# offset, but nothing forces a far key to score lower than a near one. ALiBi leaves queries and
# keys alone and subtracts a penalty proportional to the distance, $m_h\,|i - j|$, with one
# slope per head in a geometric series ($2^{-8/H}, 2^{-16/H}, \dots$): a built-in recency bias
# that extrapolates to longer inputs. The paper proposes "a factored combination of RoPE and
# ALiBi with a harmonic series".
#
# Only that sentence of the paper was available to us, so this tutorial writes down the
# formulation `qkv` derives from it, checks its two limits (each factor switched off), and
# draws what the combination does to the score as the distance grows. Read the module
# docstring of `qkv.reference.positions.rope_alibi` for the choices made.

# %%
import math
import os
import time
import warnings

import matplotlib.pyplot as plt
import numpy as np

import qkv
from qkv.lab.notebook import rel_err, runnable_backends, show_table
from qkv.reference import core
from qkv.reference.positions.rope_alibi import harmonic_slopes

SMALL = os.environ.get("QKV_TUTORIAL_SMALL") == "1"  # the test suite runs us at small sizes
rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. The equations
#
# Head $h$ of $H$ scores query $i$ (at position $p_i$) against key $j$ (at $p_j$) as
#
# $$
# S_{hij} = \frac{1}{\sqrt d}\big\langle R_{p_i} q_{hi},\, R_{p_j} k_{hj}\big\rangle
# - m_h\,\lvert p_i - p_j\rvert,
# \qquad m_h = \frac1h, \qquad O = \operatorname{softmax}_j(S)\,V,
# $$
#
# where $R_p$ rotates feature pair $t$ by the angle $p\,\theta_t$, $\theta_t = 10000^{-2t/d}$.
# The slopes are the harmonic series $1, \tfrac12, \tfrac13, \dots$ instead of ALiBi's
# geometric one. **Factored:** the two terms add in the exponent, so the unnormalised weight is
# a product,
#
# $$
# e^{S_{hij}} = \underbrace{e^{\langle R_{p_i} q, R_{p_j} k\rangle/\sqrt d}}_{\text{RoPE}}
# \cdot \underbrace{r_h^{\,\lvert p_i - p_j\rvert}}_{\text{ALiBi}},
# \qquad r_h = e^{-1/h},
# $$
#
# a content match that depends on the relative offset, times a geometric decay per head.
# Switching off the second factor leaves RoPE attention; switching off the first leaves ALiBi
# attention with harmonic slopes.
#
# ### From scratch, in NumPy
#
# One head, causal, with the rotation written as $2 \times 2$ blocks:


# %%
def rotate(x, positions):
    """Rotate feature pairs (x_2t, x_2t+1) of each row by positions * 10000^(-2t/d)."""
    d = x.shape[-1]
    angle = positions[:, None] * 10000.0 ** (-np.arange(0, d, 2) / d)  # (n, d/2)
    a, b = x[:, 0::2], x[:, 1::2]
    out = np.empty_like(x)
    out[:, 0::2] = a * np.cos(angle) - b * np.sin(angle)
    out[:, 1::2] = a * np.sin(angle) + b * np.cos(angle)
    return out


def rope_alibi_head(q, k, v, slope):
    """softmax(<R q_i, R k_j> / sqrt(d) - slope |i - j|) v, causal, for one head."""
    n, d = q.shape
    pos = np.arange(n)
    s = rotate(q, pos) @ rotate(k, pos).T / np.sqrt(d) - slope * np.abs(pos[:, None] - pos)
    s = np.where(pos[None, :] <= pos[:, None], s, -np.inf)  # causal
    w = np.exp(s - s.max(axis=1, keepdims=True))
    return (w / w.sum(axis=1, keepdims=True)) @ v


H, n, d = 4, 12, 16
q, k, v = (rng.standard_normal((1, H, n, d)) for _ in range(3))
mine = np.stack([rope_alibi_head(q[0, h], k[0, h], v[0, h], 1.0 / (h + 1)) for h in range(H)])
theirs = qkv.rope_alibi_harmonic(q, k, v)
scratch_err = float(np.abs(mine - theirs[0]).max())
print("from scratch vs qkv.rope_alibi_harmonic, max |difference|:", scratch_err)

# %% [markdown]
# ## 2. The two limits
#
# With the ALiBi factor off the result must be `sdpa` on `rope`-rotated queries and keys; with
# the RoPE factor off and ALiBi's own slopes it must be `sdpa` with `alibi` biases; with the
# harmonic slopes it is the same ALiBi distance matrix, each head's row rescaled to $1/h$.

# %%
rope_only = core.sdpa(core.rope(q), core.rope(k), v, causal=True)
alibi_only = core.sdpa(q, k, v, mask=core.alibi(H, n, n), causal=True)
harmonic_bias = core.alibi(H, n, n) * (harmonic_slopes(H) / core.alibi_slopes(H))[:, None, None]
harmonic_only = core.sdpa(q, k, v, mask=harmonic_bias, causal=True)
limits = [
    ("use_alibi=False  vs  sdpa(rope(q), rope(k), v)",
     rel_err(qkv.rope_alibi_harmonic(q, k, v, use_alibi=False), rope_only)),
    ("use_rope=False, ALiBi slopes  vs  sdpa(mask=alibi)",
     rel_err(qkv.rope_alibi_harmonic(q, k, v, use_rope=False, slopes=core.alibi_slopes(H)),
             alibi_only)),
    ("use_rope=False  vs  sdpa(mask=alibi rescaled to 1/h)",
     rel_err(qkv.rope_alibi_harmonic(q, k, v, use_rope=False), harmonic_only)),
]  # fmt: skip
show_table(("limit", "rel. error"), [(name, f"{e:.1e}") for name, e in limits])

# %% [markdown]
# ## 3. What the combination does with distance
#
# Left: the ALiBi factor $r_h^{\Delta} = e^{-m_h \Delta}$ against the distance $\Delta$ for the
# harmonic slopes and for ALiBi's geometric ones, $H = 8$. The harmonic series keeps every head
# local: its *gentlest* head still decays by $e^{-1/8}$ per token, where ALiBi's gentlest
# ($m_8 = 2^{-8}$) barely decays over hundreds of tokens.
#
# Right: the combined score for a key that carries the *same* content as the query
# ($k = q$), averaged over random vectors. The RoPE term alone is largest at $\Delta = 0$ and
# falls off, with oscillations, as the rotations drift apart; it never keeps falling. Adding
# the ALiBi term tilts it into a steady decline whose steepness is set by the head.

# %%
H8, d = 8, 64
distance = np.arange(0, 65 if SMALL else 257)
harmonic, geometric = harmonic_slopes(H8), core.alibi_slopes(H8)
samples = rng.standard_normal((256 if SMALL else 2048, d))
angles = distance[:, None] * core.rope_frequencies(d)  # (T, d/2)
pair_energy = samples[:, 0::2] ** 2 + samples[:, 1::2] ** 2  # (S, d/2)
rope_term = (pair_energy @ np.cos(angles).T).mean(axis=0) / np.sqrt(d)  # E<R_0 q, R_D q>/sqrt d

fig, (ax_decay, ax_score) = plt.subplots(1, 2, figsize=(11, 4))
for h in (0, 1, 3, 7):
    (line,) = ax_decay.semilogy(
        distance, np.exp(-harmonic[h] * distance), label=f"harmonic, h={h + 1}"
    )
    ax_decay.semilogy(distance, np.exp(-geometric[h] * distance), "--", color=line.get_color(),
                      label=f"ALiBi, h={h + 1}")  # fmt: skip
ax_decay.set_ylim(1e-6, 1.5)
ax_decay.set_xlabel("distance |i - j|")
ax_decay.set_ylabel("ALiBi factor  exp(-m_h |i - j|)")
ax_decay.set_title("harmonic (solid) vs geometric (dashed) slopes")
ax_decay.legend(fontsize=7, ncol=2)
ax_score.plot(distance, rope_term, color="black", label="RoPE term only")
for h in (0, 3, 7):
    ax_score.plot(distance, rope_term - harmonic[h] * distance, label=f"RoPE x ALiBi, h={h + 1}")
ax_score.set_ylim(-10, rope_term.max() + 1)
ax_score.set_xlabel("distance |i - j|")
ax_score.set_ylabel("mean score of a key equal to the query")
ax_score.set_title("combined score against distance (d = 64)")
ax_score.legend(fontsize=8)
fig.tight_layout()
plt.show()
half_life = np.log(2) * np.arange(1, H8 + 1)  # distance at which r_h^D = 1/2: D = h log 2
print("distance where the harmonic factor halves, per head:", np.round(half_life, 1))
print("the same for ALiBi's slopes:                         ", np.round(np.log(2) / geometric, 1))

# %% [markdown]
# ## 4. Every backend
#
# The rotation and the bias are linear-time NumPy; the attention is one `qkv.sdpa` call with
# the bias as an additive mask, so it runs on whichever backend `sdpa` runs on. $B = 1$,
# $H = 8$, $D = 64$, causal, float32; the error is against the float64 reference. (The torch
# row times the Triton interpreter when `TRITON_INTERPRET=1` is set, as in the test suite: a
# correctness tool, not a kernel.)

# %%
B, H, D = 1, 8, 64
N = 128 if SMALL else 1024
repeats = 2 if SMALL else 5
q, k, v = (rng.standard_normal((B, H, N, D)).astype(np.float32) for _ in range(3))
golden = qkv.rope_alibi_harmonic(*(x.astype(np.float64) for x in (q, k, v)))
rows = []
runnable, skipped = runnable_backends()
for name in runnable:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", qkv.FallbackWarning)
        start = time.perf_counter()
        out = qkv.rope_alibi_harmonic(q, k, v, backend=name)
        first = time.perf_counter() - start
    fell_back = any(issubclass(w.category, qkv.FallbackWarning) for w in caught)
    best = math.inf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", qkv.FallbackWarning)
        for _ in range(repeats):
            start = time.perf_counter()
            qkv.rope_alibi_harmonic(q, k, v, backend=name)
            best = min(best, time.perf_counter() - start)
    runs = "reference (fallback)" if fell_back else "native sdpa"
    rows.append((name, runs, f"{first * 1e3:.1f} ms", f"{best * 1e3:.1f} ms",
                 f"{rel_err(out, golden):.1e}"))  # fmt: skip
print(f"B={B} H={H} N={N} D={D}, causal, float32; {os.cpu_count()} CPU cores\n")
show_table(("backend", "runs", "first call", "best", "rel. error"), rows)
for name, why in skipped:
    print(f"\n{name}: {why}")

# %% [markdown]
# ## 5. What the paper reports, and what we see here
#
# | the paper (abstract) | here |
# |---|---|
# | a factored combination of RoPE and ALiBi | the score is the sum of the RoPE dot product and the ALiBi penalty, so the weight is the product of the two factors; each factor off gives exactly RoPE attention or ALiBi attention (section 2) |
# | with a harmonic series | slopes $m_h = 1/h$; every head decays by at least $e^{-1/H}$ per token, far more local than ALiBi's geometric slopes (section 3) |
# | results of the combination in a trained model | not reported in what we could read, and not reproduced: training is out of scope here |
#
# The numbers of this run:

# %%
show_table(
    ("quantity", "value"),
    [("from scratch vs qkv, max |difference|", f"{scratch_err:.1e}")]
    + [(name, f"{e:.1e}") for name, e in limits]
    + [("harmonic half-life of head 8 (tokens)", f"{half_life[-1]:.1f}"),
       ("ALiBi half-life of head 8 (tokens)", f"{np.log(2) / geometric[-1]:.1f}")],
)  # fmt: skip

# %% [markdown]
# ## References
#
# * F. Li. *The Nature of Mathematical Modeling and Probabilistic Optimization Engineering in
#   Generative AI.* 2024. [arXiv 2410.18441](https://arxiv.org/abs/2410.18441).
# * J. Su et al. *RoFormer: Enhanced Transformer with Rotary Position Embedding.* 2021.
#   [arXiv 2104.09864](https://arxiv.org/abs/2104.09864).
# * O. Press, N. A. Smith, M. Lewis. *Train Short, Test Long: Attention with Linear Biases
#   Enables Input Length Extrapolation.* ICLR 2022.
#   [arXiv 2108.12409](https://arxiv.org/abs/2108.12409).
