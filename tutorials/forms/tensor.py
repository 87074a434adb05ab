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
# # Tensor attention: every query reads every pair of keys
#
# *Paper:* Alman and Song,
# [How to Capture Higher-order Correlations? Generalizing Matrix Softmax Attention to Kronecker Computation](https://arxiv.org/abs/2310.04064)
# (arXiv 2310.04064, ICLR 2024). *Official code:* none released (the paper is theoretical).
# In passing: Sanford, Hsu and Telgarsky,
# [Representational Strengths and Limitations of Transformers](https://arxiv.org/abs/2306.02896)
# (arXiv 2306.02896), for the triple-wise task.
#
# Softmax attention scores **pairs**: query $a$ against key $i$, through $q_a \cdot k_i$. Any
# relation among *three* tokens has to be assembled from pairwise scores, over several layers
# or heads, and some simple three-token questions provably cannot be answered that way by one
# small layer. The standard example (Sanford et al.) is *Match3*: given integers
# $x_1, \dots, x_n$, does token $a$ have two partners $i, j$ with
# $x_a + x_i + x_j \equiv 0 \pmod m$? One attention layer needs a width polynomial in $n$
# for it.
#
# Tensor attention scores **triples**: query $a$ against a *pair* of keys $(i, j)$, one from
# each of two key sets, and mixes the elementwise products of the pair's values. One such
# layer answers Match3 directly. The price is the number of pairs: $n^2$ of them per query,
# so the straightforward computation takes $n^3$ time. Alman and Song show that this is
# avoidable exactly when the entries are small: if every entry of the inputs is bounded by
# $o(\sqrt[3]{\log n})$, a polynomial approximation of $\exp$ turns the $n \times n^2$ matrix
# into a low-rank product and the attention is computed in $n^{1+o(1)}$ time; with entries of
# $\Omega(\sqrt[3]{\log n})$ nothing is much faster than $n^3$ (assuming SETH). This tutorial
# builds the exact form, the streaming form `qkv` computes it with, and the fast
# approximation, then measures both claims: the accuracy threshold and the cubic against
# near-linear time.

# %%
import math
import os
import time
import tracemalloc
import warnings
from collections import namedtuple

import matplotlib.pyplot as plt
import numpy as np

import qkv
from qkv.lab.notebook import best_of, rel_err, runnable_backends, show_table
from qkv.reference.forms import tensor_attention

SMALL = os.environ.get("QKV_TUTORIAL_SMALL") == "1"  # the test suite runs us at small sizes
rng = np.random.default_rng(0)
np.set_printoptions(precision=4, suppress=True, linewidth=110)


# %% [markdown]
# ## 1. The equations
#
# Matrix softmax attention, as the paper writes it (no $1/\sqrt d$), maps
# $Q, K, V \in \mathbb{R}^{n \times d}$ to $D^{-1} \exp(QK^\top) V$ with
# $D = \operatorname{diag}(\exp(QK^\top)\mathbf 1_n)$.
#
# Tensor attention takes two key matrices $K_1, K_2$ and two value matrices $V_1, V_2$. The
# **column-wise Kronecker product** $K_1 \oslash K_2 \in \mathbb{R}^{n^2 \times d}$ has one row
# per pair $(i, j)$, the elementwise product of the two keys:
#
# $$
# (K_1 \oslash K_2)_{(i,j)} = K_1[i] \circ K_2[j], \qquad
# S = Q (K_1 \oslash K_2)^\top \in \mathbb{R}^{n \times n^2}, \qquad
# S_{a,ij} = \sum_{l=1}^d Q_{al} K_{1,il} K_{2,jl},
# $$
#
# a trilinear form: the score of a triple. Then, with $V_1 \oslash V_2$ built the same way,
#
# $$
# \operatorname{Att} = D^{-1} \exp(S)\, (V_1 \oslash V_2), \qquad
# D = \operatorname{diag}\big(\exp(S)\, \mathbf 1_{n^2}\big), \qquad
# o_a = \sum_{i,j} \frac{e^{S_{a,ij}}}{\sum_{i',j'} e^{S_{a,i'j'}}}\, V_1[i] \circ V_2[j].
# $$
#
# ### From scratch, in NumPy
#
# Build both Kronecker products, score, softmax along each row of $n^2$ entries (with the row
# maximum subtracted first, as always), multiply:


# %%
def kron_rows(a, b):
    """Column-wise Kronecker product: row i * len(b) + j is a[i] * b[j]."""
    return (a[:, None, :] * b[None, :, :]).reshape(len(a) * len(b), a.shape[1])


def tensor_attention_numpy(q, k1, k2, v1, v2):
    """D^{-1} exp(Q (K1 ⊘ K2)^T) (V1 ⊘ V2) for one head: q (n, d), k1, k2 (m, d), v1, v2 (m, dv)."""
    s = q @ kron_rows(k1, k2).T  # (n, m^2): one score per query and key pair
    p = np.exp(s - s.max(axis=1, keepdims=True))  # exponents <= 0
    return (p @ kron_rows(v1, v2)) / p.sum(axis=1, keepdims=True)  # (n, dv)


# %% [markdown]
# `qkv` lays the inputs out as everywhere else: queries `(B, H, N, D)`, both key sets
# `(B, Hkv, M, D)`, both value sets `(B, Hkv, M, Dv)` (grouped heads allowed). `qkv.tensor`
# follows the paper: no $1/\sqrt D$ (its `scale` defaults to 1). In float64 it agrees with the
# from-scratch version to rounding:

# %%
B, H, N, M, D = 2, 3, 20, 24, 8
q = rng.uniform(-1, 1, (B, H, N, D))  # (B, H, N, D)
k1, k2 = rng.uniform(-1, 1, (2, B, H, M, D))  # (B, H, M, D) each
v1, v2 = rng.standard_normal((2, B, H, M, D))  # (B, H, M, D) each

ours = np.stack(
    [
        np.stack(
            [tensor_attention_numpy(*(x[b, h] for x in (q, k1, k2, v1, v2))) for h in range(H)]
        )
        for b in range(B)
    ]
)  # (B, H, N, D)
exact = qkv.tensor(q, k1, k2, v1, v2)  # (B, H, N, D)
print("qkv.tensor vs ours:", rel_err(exact, ours))
np.testing.assert_allclose(exact, ours, rtol=1e-12, atol=1e-12)

# %% [markdown]
# Two properties follow from the equation, and both hold numerically:
#
# * with $K_2 = V_2 = \mathbf 1$ every pair $(i, j)$ scores $q_a \cdot K_1[i]$ and carries
#   $V_1[i]$: the $n$ copies over $j$ cancel in the softmax and tensor attention **is**
#   softmax attention $D^{-1}\exp(QK_1^\top)V_1$, `qkv.sdpa` with `scale=1`;
# * swapping $(K_1, V_1)$ with $(K_2, V_2)$ only relabels the pairs $(i, j) \to (j, i)$:
#   the output does not change.

# %%
ones_k, ones_v = np.ones_like(k2), np.ones_like(v2)
reduced = qkv.tensor(q, k1, ones_k, v1, ones_v)
print("K2 = V2 = 1 vs sdpa(scale=1):", rel_err(reduced, qkv.sdpa(q, k1, v1, scale=1.0)))
print("swapped pairs vs original:  ", rel_err(qkv.tensor(q, k2, k1, v2, v1), exact))
np.testing.assert_allclose(reduced, qkv.sdpa(q, k1, v1, scale=1.0), atol=1e-12)
np.testing.assert_allclose(qkv.tensor(q, k2, k1, v2, v1), exact, atol=1e-12)

# %% [markdown]
# ## 2. What a triple score can see: Match3
#
# Encode each integer $x$ as the angle $\theta = 2\pi x / m$ and the unit complex number
# $e^{i\theta}$. The real part of a product of three of them,
# $\operatorname{Re}(e^{i\theta_a} e^{i\theta_i} e^{i\theta_j}) = \cos(\theta_a + \theta_i +
# \theta_j)$, is 1 exactly when $x_a + x_i + x_j \equiv 0 \pmod m$. Expanding the real part of a
# product of three complex numbers gives four terms, each one coordinate of each factor, so it
# *is* a trilinear score $\sum_l Q_{al}K_{1,il}K_{2,jl}$ with $d = 4$:
#
# $$
# \operatorname{Re}(abc) = a_r b_r c_r - a_r b_i c_i - a_i b_r c_i - a_i b_i c_r ,\quad
# Q_a = \beta(a_r, -a_r, -a_i, -a_i),\ K_1[i] = (b_r, b_i, b_r, b_i),\ K_2[j] = (c_r, c_i, c_i, c_r).
# $$
#
# With a large inverse temperature $\beta$ (here chosen so that a near miss, a sum off by one,
# weighs $e^{-6}$ as much as a hit) the weights of query $a$ concentrate on the pairs that
# complete a triple. No pairwise score $q_a \cdot k_i$ can express this (it sees only
# $\theta_a + \theta_i$).

# %%
n, modulus = 16, 53
beta = 6 / (1 - np.cos(2 * np.pi / modulus))  # a near miss (sum off by 1) scores e^-6 lower
x = rng.integers(0, modulus, n)
theta = 2 * np.pi * x / modulus
re, im = np.cos(theta), np.sin(theta)
Qm = beta * np.stack([re, -re, -im, -im], axis=1)  # (n, 4)
K1m = np.stack([re, im, re, im], axis=1)  # (n, 4)
K2m = np.stack([re, im, im, re], axis=1)  # (n, 4)
S = Qm @ kron_rows(K1m, K2m).T / beta  # (n, n^2): cos(theta_a + theta_i + theta_j)
np.testing.assert_allclose(
    S.reshape(n, n, n),
    np.cos(theta[:, None, None] + theta[None, :, None] + theta[None, None, :]),
    atol=1e-12,
)
matches = (x[:, None, None] + x[None, :, None] + x[None, None, :]) % modulus == 0  # (n, n, n)
has_match = matches.any(axis=(1, 2))
print(f"x = {x}\nqueries with a completing pair: {int(has_match.sum())} of {n}")

weights = np.exp(beta * (S - S.max(axis=1, keepdims=True)))
weights /= weights.sum(axis=1, keepdims=True)  # (n, n^2): softmax over pairs
shown = (
    [int(np.flatnonzero(has_match)[0]), int(np.flatnonzero(~has_match)[0])]
    if (~has_match).any()
    else [0, 1]
)
fig, axes = plt.subplots(1, 2, figsize=(9, 4))
for ax, a in zip(axes, shown, strict=True):
    ax.imshow(weights[a].reshape(n, n), cmap="magma")
    ii, jj = np.nonzero(matches[a])
    ax.scatter(
        jj, ii, s=60, facecolors="none", edgecolors="cyan", label="x_a + x_i + x_j = 0 mod m"
    )
    ax.set_title(f"query a = {a} (x_a = {x[a]}): weights over pairs", fontsize=9)
    ax.set_xlabel("j (second key)")
    ax.set_ylabel("i (first key)")
axes[0].legend(loc="lower left", fontsize=7)
fig.tight_layout()
plt.show()
mass_on_matches = float((weights.reshape(n, n, n) * matches).sum(axis=(1, 2))[has_match].mean())
print(f"mean weight on completing pairs, queries that have one: {mass_on_matches:.3f}")

# %% [markdown]
# ## 3. Streaming: the $n \times n^2$ matrix is not needed
#
# The brute force keeps the whole score matrix: $n^3$ numbers, 512 MiB in float32 at
# $n = 512$. As in FlashAttention, the softmax can be computed **online**. `qkv.tensor`
# visits the first key $i$ in turn. For that $i$ the scores of every second key $j$ are one
# matrix product, and their values factor:
#
# $$
# S_{\cdot, i\cdot} = (Q \circ K_1[i])\, K_2^\top \in \mathbb{R}^{n \times n}, \qquad
# \sum_j P_{a,ij}\, V_1[i] \circ V_2[j] = V_1[i] \circ (P_{\cdot,i\cdot} V_2)_a .
# $$
#
# The running maximum $m$, normaliser $\ell$ and unnormalised output $\tilde O$ are updated
# as in FlashAttention ($\alpha = e^{m - m'}$ rescales everything summed so far). Only one
# $n \times n$ tile and $O(n d)$ running state exist; the time is still $O(n^3 d)$.


# %%
def tensor_attention_streaming(q, k1, k2, v1, v2):
    """The same as tensor_attention_numpy, one first key at a time (online softmax)."""
    m = np.full((len(q), 1), -np.inf)  # running row maximum
    l = np.zeros((len(q), 1))  # running normaliser
    acc = np.zeros((len(q), v1.shape[1]))  # unnormalised output
    for i in range(len(k1)):
        s = (q * k1[i]) @ k2.T  # (n, m): scores of the pairs (i, j) for every j
        m_new = np.maximum(m, s.max(axis=1, keepdims=True))
        alpha = np.exp(m - m_new)  # rescales what was summed so far; 0 at first
        p = np.exp(s - m_new)  # (n, m)
        l = alpha * l + p.sum(axis=1, keepdims=True)
        acc = alpha * acc + v1[i] * (p @ v2)  # V1[i] ∘ (P_i V2)
        m = m_new
    return acc / l


one_head = [x[0, 0] for x in (q, k1, k2, v1, v2)]
print(
    "streaming vs brute force:",
    rel_err(tensor_attention_streaming(*one_head), tensor_attention_numpy(*one_head)),
)

# %% [markdown]
# Peak memory of the two reference forms (NumPy reports its allocations to `tracemalloc`):
# the brute force grows as $n^3$, the streaming form as $n^2$ (one tile).

# %%
peaks = []
for n in [32, 64, 128] if SMALL else [64, 128, 256]:
    args = [rng.uniform(-1, 1, (1, 1, n, 32)).astype(np.float32) for _ in range(5)]
    row = [n]
    for fn in (tensor_attention.tensor_brute_force, qkv.tensor):
        tracemalloc.start()
        fn(*args)
        row.append(tracemalloc.get_traced_memory()[1] / 2**20)  # peak, MiB
        tracemalloc.stop()
    peaks.append(row)
show_table(
    ("n (d = 32, fp32)", "brute force peak (MiB)", "streaming peak (MiB)", "ratio"),
    [(n, f"{b:.2f}", f"{s:.3f}", f"{b / s:.0f}x") for n, b, s in peaks],
)

# %% [markdown]
# ## 4. The Kronecker identity
#
# The fast algorithm rests on one identity. For $A, B \in \mathbb{R}^{n \times k}$ and
# $C, D \in \mathbb{R}^{n \times e}$:
#
# $$
# (A \oslash B)^\top (C \oslash D) = (A^\top C) \circ (B^\top D),
# $$
#
# because entry $(f, g)$ of the left side is $\sum_{i,j} A_{if}B_{jf}C_{ig}D_{jg} =
# (\sum_i A_{if}C_{ig})(\sum_j B_{jf}D_{jg})$. The left side sums over $n^2$ pairs; the right
# side over $n$ rows, twice.

# %%
A, Bm = rng.standard_normal((2, 50, 6))
C, Dm = rng.standard_normal((2, 50, 4))
left = kron_rows(A, Bm).T @ kron_rows(C, Dm)  # (6, 4), through 2500 pairs
right = (A.T @ C) * (Bm.T @ Dm)  # (6, 4), through 50 rows twice
print("identity, max |left - right|:", np.abs(left - right).max())

# %% [markdown]
# ## 5. The fast approximation, step by step
#
# ### 5a. A polynomial in place of exp
#
# Replace $e^s$ by its Taylor polynomial $T_g(s) = \sum_{t \le g} s^t / t!$. If every score
# lies in $[-R, R]$, Taylor's remainder bounds the *relative* error of every entry:
# $|T_g(s)/e^s - 1| \le \varepsilon(R) = e^R R^{g+1}/(g+1)!$ (`tensor_attention.taylor_relative_error`).
# A relative error of $\varepsilon$ on every weight moves each output element by at most
# $\tfrac{\varepsilon}{1-\varepsilon}$ times the spread of the values. Small $R$: tiny error at
# low degree. Large $R$: the degree must grow like $R$.
#
# **Even degrees only.** An odd Taylor polynomial is negative somewhere ($T_3(-3) = -2$), and a
# normaliser $\sum T_g(s)$ could vanish or turn negative. An even one is positive on the whole
# line (at its minimum $x_0$, $T_g(x_0) = x_0^g/g! > 0$), so the approximate weights are always
# positive and each output row stays a convex combination of the $V_1[i] \circ V_2[j]$: wrong
# far outside the range, but bounded. `qkv.tensor_approx` accepts $g \in \{2, 4, \dots, 12\}$.

# %%
s = np.linspace(-6, 6, 601)
fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
for g in (2, 3, 4, 6, 8):
    taylor = sum(s**t / math.factorial(t) for t in range(g + 1))
    axes[0].plot(s, taylor, label=f"T_{g}", lw=1.2, ls="--" if g % 2 else "-")
    if g % 2 == 0:
        axes[1].semilogy(s, np.abs(taylor * np.exp(-s) - 1) + 1e-17, label=f"g = {g}")
axes[0].plot(s, np.exp(s), "k", lw=2, label="exp")
axes[0].set_ylim(-5, 40)
axes[0].axhline(0, color="grey", lw=0.5)
axes[0].set_title("Taylor polynomials of exp (odd: dashed)", fontsize=9)
axes[0].legend(fontsize=7)
axes[1].set_title("relative error |T_g(s) / e^s - 1|", fontsize=9)
axes[1].set_xlabel("score s")
axes[1].set_ylim(1e-12, 1e3)
axes[1].legend(fontsize=7)
fig.tight_layout()
plt.show()
print("T_3(-3) =", sum((-3.0) ** t / math.factorial(t) for t in range(4)))

# %% [markdown]
# ### 5b. Monomial features
#
# By the multinomial theorem, $s^t/t! = (x\cdot y)^t/t! = \sum_{|\alpha| = t} x^\alpha
# y^\alpha/\alpha!$ over multi-indices $\alpha \in \mathbb{N}^d$, with $x^\alpha = \prod_l
# x_l^{\alpha_l}$ and $\alpha! = \prod_l \alpha_l!$. So
#
# $$
# T_g(x \cdot y) = \phi(x) \cdot \psi(y), \qquad \phi(x)_\alpha = x^\alpha / \alpha!, \qquad
# \psi(y)_\alpha = y^\alpha, \qquad |\alpha| \le g,
# $$
#
# with $F = \binom{d + g}{g}$ features: the exact, symmetric polynomial expansion (no random
# sketch). `tensor_attention.monomials` builds them, degree by degree, each monomial as a
# monomial of one degree less times one coordinate. The crucial property for tensor attention:
# **monomials multiply coordinate-wise**, $\psi(k_1 \circ k_2) = \psi(k_1) \circ \psi(k_2)$.

# %%
d, g = 4, 4
x_, k1_, k2_ = rng.uniform(-1, 1, (3, d))
inv_factorial = tensor_attention.monomial_table(d, g)[1]  # (F,): 1 / alpha!
phi = tensor_attention.monomials(x_, g) * inv_factorial  # (F,)
psi = tensor_attention.monomials(k1_ * k2_, g)  # (F,)
score = x_ @ (k1_ * k2_)
print(f"F = C({d} + {g}, {g}) = {math.comb(d + g, g)} features; got {phi.shape[0]}")
print(
    "phi(x) . psi(k1 ∘ k2) =",
    phi @ psi,
    "   T_g(x . (k1 ∘ k2)) =",
    sum(score**t / math.factorial(t) for t in range(g + 1)),
)
print(
    "psi(k1 ∘ k2) == psi(k1) ∘ psi(k2):",
    np.allclose(psi, tensor_attention.monomials(k1_, g) * tensor_attention.monomials(k2_, g)),
)

# %% [markdown]
# ### 5c. A low-rank factorisation of the $n \times n^2$ matrix
#
# Stack the features: $\Phi(Q) \in \mathbb{R}^{n \times F}$, $\Psi(K_1), \Psi(K_2) \in
# \mathbb{R}^{n \times F}$. Then $T_g(S) = \Phi(Q)\,\big(\Psi(K_1) \oslash \Psi(K_2)\big)^\top$:
# rank at most $F$, whatever $n$.

# %%
n = 30
Qs, K1s, K2s = rng.uniform(-0.5, 0.5, (3, n, d))
S = Qs @ kron_rows(K1s, K2s).T  # (n, n^2)
T_S = sum(S**t / math.factorial(t) for t in range(g + 1))  # T_g applied entrywise
Phi = tensor_attention.monomials(Qs, g) * inv_factorial  # (n, F)
Psi1, Psi2 = tensor_attention.monomials(K1s, g), tensor_attention.monomials(K2s, g)  # (n, F)
low_rank = Phi @ kron_rows(Psi1, Psi2).T  # (n, n^2)
print(f"T_g(S) is {T_S.shape[0]} x {T_S.shape[1]}; rank <= F = {Phi.shape[1]}")
print("factorisation error:", rel_err(low_rank, T_S))

# %% [markdown]
# ### 5d. Numerator and denominator without $n^2$
#
# Apply the identity of section 4 with $A = \Psi(K_1)$, $B = \Psi(K_2)$, $C = V_1$, $D = V_2$
# (and a column of ones for the normaliser):
#
# $$
# \tilde A (V_1 \oslash V_2) = \Phi(Q)\,\big[(\Psi(K_1)^\top V_1) \circ (\Psi(K_2)^\top V_2)\big],
# \qquad \tilde A \mathbf 1 = \Phi(Q)\,\big[(\Psi(K_1)^\top \mathbf 1) \circ (\Psi(K_2)^\top \mathbf 1)\big].
# $$
#
# Two $F \times (d_v + 1)$ matrices, then one product per query: $O(n F d_v)$ time, nothing of
# size $n^2$. From scratch:


# %%
def tensor_attention_approx_numpy(q, k1, k2, v1, v2, degree):
    """D~^{-1} T_g(Q (K1 ⊘ K2)^T) (V1 ⊘ V2) through features: q (n, d), k (m, d), v (m, dv)."""
    weights = tensor_attention.monomial_table(q.shape[1], degree)[1]  # (F,): 1 / alpha!
    phi = tensor_attention.monomials(q, degree) * weights  # (n, F)
    psi1, psi2 = tensor_attention.monomials(k1, degree), tensor_attention.monomials(k2, degree)
    one = np.ones((len(v1), 1))
    w = (psi1.T @ np.hstack([v1, one])) * (psi2.T @ np.hstack([v2, one]))  # (F, dv + 1)
    num_den = phi @ w  # (n, dv + 1)
    return num_den[:, :-1] / num_den[:, -1:]


V1s, V2s = rng.standard_normal((2, n, 3))
approx_ours = tensor_attention_approx_numpy(Qs, K1s, K2s, V1s, V2s, g)
approx_qkv = qkv.tensor_approx(*(x[None, None] for x in (Qs, K1s, K2s, V1s, V2s)), degree=g)[0, 0]
exact_small = tensor_attention_numpy(Qs, K1s, K2s, V1s, V2s)
print("ours vs qkv.tensor_approx:", rel_err(approx_ours, approx_qkv))
print(
    "T_g brute force vs ours:  ",
    rel_err((T_S @ kron_rows(V1s, V2s)) / T_S.sum(axis=1, keepdims=True), approx_ours),
)
print(
    f"approximation vs exact (entries in [-0.5, 0.5], d = {d}, g = {g}): {rel_err(approx_qkv, exact_small):.1e}"
)
np.testing.assert_allclose(approx_ours, approx_qkv, rtol=1e-10, atol=1e-12)

# %% [markdown]
# ## 6. Measured: the entry bound decides
#
# The bounded-entry theorems are about the size of the scores. In the matrix case (Alman and
# Song 2023) the attention matrix is $\exp(QK^\top/d)$; with the same normalisation here,
# `scale = 1/d`, entries of $Q, K_1, K_2$ in $[-b, b]$ give scores of at most $R = b^3$, and the
# paper's threshold $b \approx \sqrt[3]{\log n}$ is where $R$ reaches $\log n$. The error of
# `qkv.tensor_approx` against `qkv.tensor` (max over the output, relative to the largest value
# product), for $n = 64$, $d = 8$, as $b$ grows, for several degrees. Dashed: the guarantee
# $\tfrac{2\varepsilon}{1 - \varepsilon}$ for $g = 4$, with $\varepsilon = \varepsilon(R)$ and
# $R$ the cheap per-query bound `score_radius`.

# %%
n, d = 64, 8
bounds = np.geomspace(0.3, 6.0, 10 if SMALL else 16)
degrees = (2, 4, 6, 8)
errors = {g: [] for g in degrees}
guarantee = []
for b in bounds:
    q1, k1_b, k2_b = rng.uniform(-b, b, (3, 1, 1, n, d))
    v1_b, v2_b = rng.standard_normal((2, 1, 1, n, 4))
    spread = np.abs(v1_b).max() * np.abs(v2_b).max()
    exact_b = qkv.tensor(q1, k1_b, k2_b, v1_b, v2_b, scale=1 / d, backend="numba")
    for g in degrees:
        approx_b = qkv.tensor_approx(q1, k1_b, k2_b, v1_b, v2_b, degree=g, scale=1 / d)
        errors[g].append(np.abs(approx_b - exact_b).max() / spread)
    radius = tensor_attention.score_radius(q1, k1_b, k2_b, scale=1 / d).max()
    eps = tensor_attention.taylor_relative_error(4, radius)
    guarantee.append(2 * eps / (1 - eps) if eps < 1 else np.nan)

fig, ax = plt.subplots(figsize=(6.5, 4))
for g in degrees:
    ax.loglog(bounds, errors[g], "o-", ms=3, label=f"degree {g} (F = {math.comb(d + g, g)})")
ax.loglog(bounds, guarantee, "k--", lw=1, label="guarantee, degree 4")
ax.axvline(np.log(n) ** (1 / 3), color="grey", lw=0.8)
ax.text(np.log(n) ** (1 / 3) * 1.03, 1e-12, "(ln n)^(1/3)", fontsize=8, color="grey")
ax.set_xlabel("entry bound b")
ax.set_ylabel("max error / max |v1 v2|")
ax.set_ylim(1e-15, 10)
ax.set_title(f"tensor_approx vs tensor, n = {n}, d = {d}", fontsize=10)
ax.legend(fontsize=7)
plt.show()

# %% [markdown]
# While the scores stay within about $\pm 1$ ($b \lesssim 1$) every degree is accurate and
# each extra two degrees buy orders of magnitude; as $b$ grows past the $\sqrt[3]{\log n}$ line
# (grey, for orientation: the theorem is asymptotic) every fixed degree fails, the error
# saturating at the spread of the values (the output is still a convex combination). The
# degree needed for a fixed accuracy grows with $R$, and with it the feature count
# $\binom{d+g}{g}$: past the threshold the features, and so the time, are no longer
# $n^{o(1)}$. The smallest degree of $2, \dots, 12$ that reaches an error of $10^{-3}$ here:

# %%
rows = []
for b in bounds[:: 2 if SMALL else 3]:
    q1, k1_b, k2_b = rng.uniform(-b, b, (3, 1, 1, n, d))
    v1_b, v2_b = rng.standard_normal((2, 1, 1, n, 4))
    spread = np.abs(v1_b).max() * np.abs(v2_b).max()
    exact_b = qkv.tensor(q1, k1_b, k2_b, v1_b, v2_b, scale=1 / d, backend="numba")
    needed = next(
        (
            g
            for g in (2, 4, 6, 8, 10, 12)
            if math.comb(d + g, g) <= 2**18
            and np.abs(
                qkv.tensor_approx(q1, k1_b, k2_b, v1_b, v2_b, degree=g, scale=1 / d) - exact_b
            ).max()
            / spread
            < 1e-3
        ),
        None,
    )
    radius = tensor_attention.score_radius(q1, k1_b, k2_b, scale=1 / d).max()
    rows.append(
        (
            f"{b:.2f}",
            f"{radius:.2f}",
            needed or "> 12",
            math.comb(d + needed, needed) if needed else "-",
        )
    )
show_table(("b", "R (bound on |score|)", "degree for 1e-3", "features F"), rows)

# ## 7. Measured: cubic against near-linear time
#
# Time against $n$ (queries and keys alike, $d = 8$, float32, entries in $[-0.5, 0.5]$ where
# degree 4 is accurate): the exact form through the NumPy brute force (small $n$ only: it
# needs $n^3$ memory), the NumPy streaming reference and the Numba kernel, and the
# approximation (NumPy reference, degree 4). Straight lines on a log-log plot; their slopes are
# the exponents.

# %%
d, g = 8, 4
sizes = [16, 32, 64, 128, 256] if SMALL else [16, 32, 64, 128, 256, 512, 1024]
approx_sizes = sizes + ([512, 1024, 2048, 4096] if SMALL else [2048, 4096, 8192, 16384])
curves = {
    "brute force (NumPy)": {},
    "tensor (NumPy reference)": {},
    "tensor (numba)": {},
    "tensor_approx (NumPy, g = 4)": {},
}
for n in approx_sizes:
    args = [rng.uniform(-0.5, 0.5, (1, 1, n, d)).astype(np.float32) for _ in range(5)]
    reps = 5 if n <= 256 else 1
    curves["tensor_approx (NumPy, g = 4)"][n] = best_of(qkv.tensor_approx, reps, *args, degree=g)
    if n not in sizes:
        continue
    qkv.tensor(*args, backend="numba")  # compiles on first use
    curves["tensor (numba)"][n] = best_of(qkv.tensor, reps, *args, backend="numba")
    if n <= (256 if SMALL else 512):
        curves["tensor (NumPy reference)"][n] = best_of(qkv.tensor, 1, *args)
    if n <= (128 if SMALL else 256):
        curves["brute force (NumPy)"][n] = best_of(tensor_attention.tensor_brute_force, 1, *args)

fig, ax = plt.subplots(figsize=(6.5, 4.2))
slopes = {}
for (name, curve), style in zip(curves.items(), ["s:", "^--", "o-", "D-"], strict=True):
    ns, ts = np.array(list(curve)), np.array(list(curve.values()))
    big = ns >= 64  # fit the exponent where the constant overheads no longer dominate
    slopes[name] = np.polyfit(np.log(ns[big]), np.log(ts[big]), 1)[0]
    ax.loglog(ns, ts, style, ms=4, label=f"{name}: slope {slopes[name]:.2f}")


def crossover(fast, slow):
    """The first measured n from which `fast` is faster than `slow` at every larger n."""
    common = sorted(set(fast) & set(slow))
    return next(
        (n for i, n in enumerate(common) if all(fast[m] < slow[m] for m in common[i:])), None
    )


cross_numba = crossover(curves["tensor_approx (NumPy, g = 4)"], curves["tensor (numba)"])
cross_ref = crossover(curves["tensor_approx (NumPy, g = 4)"], curves["tensor (NumPy reference)"])
if cross_numba:
    ax.axvline(cross_numba, color="grey", lw=0.8)
ax.set_xlabel("n (queries = keys per set)")
ax.set_ylabel("seconds")
ax.set_title(f"tensor attention, d = {d}, float32, {os.cpu_count()} CPU cores", fontsize=10)
ax.legend(fontsize=7)
plt.show()
print(f"tensor_approx (NumPy) faster than the numba kernel from n = {cross_numba} on")
print(f"tensor_approx (NumPy) faster than the NumPy streaming reference from n = {cross_ref} on")

# %% [markdown]
# ## 8. Every backend, timed
#
# `qkv.tensor` and `qkv.tensor_approx` (degree 2: $F = \binom{34}{2} = 561$ features) through
# every backend `qkv` knows, at the size of the benchmark, $n = 256$, $d = 32$,
# $B = H = 1$ ($n = 128$ in the test suite's small run), float32, entries in $[-0.3, 0.3]$
# (scores within about $\pm 1$, where the approximation is accurate). A backend that lacks an op
# runs the reference with a `FallbackWarning`, and the table says so; backends that cannot run
# here are listed with their reason. Errors are against the float64 exact result; "vs brute
# force" is the speed-up over the NumPy brute force in float32.

# %%
n, d = (128 if SMALL else 256), 32
repeats = 2 if SMALL else 5
inputs = [rng.uniform(-0.3, 0.3, (1, 1, n, d)).astype(np.float32) for _ in range(5)]
golden = qkv.tensor(*(x.astype(np.float64) for x in inputs), backend="numba")
brute = best_of(tensor_attention.tensor_brute_force, repeats, *inputs)

Timing = namedtuple("Timing", "backend op runs first best err")


def time_op(op, name, **kwargs):
    """Run ``op`` on backend ``name``: first call, best of the next few, fallback or not."""

    def call():
        return op(*inputs, backend=name, **kwargs)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", qkv.FallbackWarning)
        start = time.perf_counter()
        out = call()
        first = time.perf_counter() - start
    fell_back = any(issubclass(w.category, qkv.FallbackWarning) for w in caught)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", qkv.FallbackWarning)
        best = best_of(call, repeats)
    runs = "reference (fallback)" if fell_back else "native"
    return Timing(name, op.__name__, runs, first, best, rel_err(out, golden))


timings = []
runnable, skipped = runnable_backends()
for name in runnable:
    timings += [time_op(qkv.tensor, name), time_op(qkv.tensor_approx, name, degree=2)]

flops = 2 * n * n * n * (d + d)  # scores and P V2: 2 flops per multiply-add
show_table(
    (
        "backend",
        "op",
        "runs",
        "first call",
        "best",
        "GFLOP/s (exact)",
        "vs brute force",
        "rel. error",
    ),
    [
        (
            t.backend,
            t.op,
            t.runs,
            f"{t.first * 1e3:.1f} ms",
            f"{t.best * 1e3:.2f} ms",
            f"{flops / t.best / 1e9:.1f}" if t.op == "tensor" else "-",
            f"{brute / t.best:.1f}x",
            f"{t.err:.1e}",
        )
        for t in timings
    ]
    + [
        (
            "(NumPy)",
            "brute force",
            "reference",
            "-",
            f"{brute * 1e3:.1f} ms",
            f"{flops / brute / 1e9:.1f}",
            "1.0x",
            "-",
        )
    ],
)
for name, why in skipped:
    print(f"\n{name}: {why}")
numba_speedup = next(
    (brute / t.best for t in timings if (t.backend, t.op, t.runs) == ("numba", "tensor", "native")),
    None,
)

# %% [markdown]
# The exact computation is $2 n^3 (d + d_v)$ flops (2.1 GFLOP at $n = 256$), the same for the
# brute force and the streaming kernel: the kernel wins by fusing (no $n^3$ array written,
# read, exponentiated and read again) and parallelising the softmax, not by doing less
# arithmetic. Its floor is the machine's matrix-product rate. Triton and CuPy kernels for
# `tensor` are planned; on those backends it runs the reference for now.
#
# ## 9. What the paper reports, and what we see here
#
# | paper | reports | here |
# |---|---|---|
# | triple-wise attention $D^{-1}\exp(Q(K_1 \oslash K_2)^\top)(V_1 \oslash V_2)$ | definition; the straightforward algorithm is cubic | `qkv.tensor` equals the from-scratch brute force; it reduces to softmax attention for $K_2 = V_2 = 1$ and is symmetric in the two pairs (section 1); time slope about 3 (section 7) |
# | captures triple-wise correlations that pairwise attention cannot (Match3) | motivation | a $d = 4$ trilinear score is $\cos(\theta_a + \theta_i + \theta_j)$; the weights sit on the completing pairs (section 2) |
# | entries $o(\sqrt[3]{\log n})$: $n^{1+o(1)}$ time, via a polynomial approximation of exp and $(A \oslash B)^\top (C \oslash D) = (A^\top C) \circ (B^\top D)$ | theorem, no experiments | Taylor polynomial of even degree, exact monomial features, the identity: time slope about 1 and a crossover with the exact kernel (section 7); error tiny for small entries and shrinking fast with the degree (section 6) |
# | entries $\Omega(\sqrt[3]{\log n})$: no $n^{3-o(1)}$-beating algorithm (SETH) | lower bound | at a fixed degree the error climbs to the values' spread once $R = d b^3$ passes about 1; the degree (and features) needed grows with $b$ (section 6) |
# | exact form: $O(n^3)$ time | | the streaming form keeps one $n \times n$ tile: memory $n^2$ against $n^3$ (section 3); the Numba kernel keeps $O(n d)$ per thread |
#
# The numbers of this run:

# %%
summary = [
    (
        "K2 = V2 = 1 vs sdpa(scale=1), rel. error",
        f"{rel_err(reduced, qkv.sdpa(q, k1, v1, scale=1.0)):.1e}",
    ),
    ("Match3: mean weight on completing pairs", f"{mass_on_matches:.3f}"),
    (
        f"peak memory brute force / streaming at n = {peaks[-1][0]} (reference)",
        f"{peaks[-1][1] / peaks[-1][2]:.0f}x",
    ),
    ("time slope, exact numba kernel", f"{slopes['tensor (numba)']:.2f}"),
    ("time slope, tensor_approx", f"{slopes['tensor_approx (NumPy, g = 4)']:.2f}"),
    ("crossover n, tensor_approx vs numba tensor (d = 8)", str(cross_numba)),
    (f"error at b = {bounds[0]:.1f}, degree 4 / 8", f"{errors[4][0]:.1e} / {errors[8][0]:.1e}"),
    (f"error at b = {bounds[-1]:.1f}, degree 4 / 8", f"{errors[4][-1]:.1e} / {errors[8][-1]:.1e}"),
]
if numba_speedup is not None:
    summary.append(
        (f"numba tensor vs NumPy brute force, n = {n}, d = {d}, fp32", f"{numba_speedup:.1f}x")
    )
show_table(("quantity", "value"), summary)

# %% [markdown]
# ## References
#
# * J. Alman, Z. Song. *How to Capture Higher-order Correlations? Generalizing Matrix Softmax
#   Attention to Kronecker Computation.* ICLR 2024.
#   [arXiv 2310.04064](https://arxiv.org/abs/2310.04064).
# * J. Alman, Z. Song. *Fast Attention Requires Bounded Entries.* NeurIPS 2023.
#   [arXiv 2302.13214](https://arxiv.org/abs/2302.13214) (the matrix case of the same
#   polynomial method and threshold).
# * C. Sanford, D. Hsu, M. Telgarsky. *Representational Strengths and Limitations of
#   Transformers.* NeurIPS 2023. [arXiv 2306.02896](https://arxiv.org/abs/2306.02896).
# * T. Dao et al. *FlashAttention.* NeurIPS 2022.
#   [arXiv 2205.14135](https://arxiv.org/abs/2205.14135) (the online softmax of section 3).
