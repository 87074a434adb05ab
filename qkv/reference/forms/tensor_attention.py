r"""Tensor (Kronecker) attention: every query reads every *pair* of keys.

Alman and Song, "How to Capture Higher-order Correlations? Generalizing Matrix Softmax
Attention to Kronecker Computation" (ICLR 2024, arXiv 2310.04064). Softmax attention scores
pairs (query, key); tensor attention scores triples (query, key of the first set, key of the
second set). With $Q \in \mathbb{R}^{n \times d}$, two key matrices $K_1, K_2$ and two value
matrices $V_1, V_2$ (all $n \times d$ in the paper), let $K_1 \oslash K_2 \in
\mathbb{R}^{n^2 \times d}$ be the column-wise Kronecker product, whose row $(i, j)$ is
$K_1[i] \circ K_2[j]$ (elementwise product), and likewise $V_1 \oslash V_2$. Then

$$
A = \exp\!\big(Q (K_1 \oslash K_2)^\top\big) \in \mathbb{R}^{n \times n^2}, \qquad
D = \operatorname{diag}(A \mathbf 1_{n^2}), \qquad
\operatorname{Att}(Q, K_1, K_2, V_1, V_2) = D^{-1} A\, (V_1 \oslash V_2),
$$

that is, for query $a$, with the score $S_{a,ij} = \sum_l Q_{al} K_{1,il} K_{2,jl}$:

$$
o_a = \sum_{i,j} \frac{e^{S_{a,ij}}}{\sum_{i',j'} e^{S_{a,i'j'}}}\; V_1[i] \circ V_2[j] .
$$

The paper has no $1/\sqrt d$ factor; ``scale`` (default 1, the paper) multiplies the scores.

Forms here:

* :func:`tensor_brute_force` materialises the $n \times n^2$ scores and $V_1 \oslash V_2$, as the
  equation reads ($O(n^3 d)$ time *and* memory);
* :func:`tensor` (the default) streams over the first key index $i$ with the online softmax.
  For fixed $i$ the scores of all $j$ are one matrix product,
  $S_{\cdot, i\cdot} = (Q \circ K_1[i])\, K_2^\top$ (an $n \times n$ tile), and their values
  factor as $\sum_j P_{a,ij} V_1[i] \circ V_2[j] = V_1[i] \circ (P_{\cdot,i\cdot} V_2)_a$:
  $O(n^3 d)$ time, $O(n d)$ memory beyond the $n \times n$ tiles of one step;
* :func:`tensor_approx` is the paper's fast algorithm for bounded entries: $\exp$ replaced by
  its Taylor polynomial, factored through monomial features and the identity
  $(A \oslash B)^\top (C \oslash D) = (A^\top C) \circ (B^\top D)$, so that no $n^2$ object is
  ever formed: time linear in $n$ for fixed $d$ and degree.

Layout, as in the rest of qkv: ``q (B, H, N, D)``; ``k1``, ``k2 (B, Hkv, M, D)``; ``v1``,
``v2 (B, Hkv, M, Dv)``; query head ``h`` reads KV head ``h // (H / Hkv)``. The paper's square
case is ``N = M``; queries and keys may differ in number here, but the two key sets (and the two
value sets) must have one shape. There is no mask (the paper has none).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections import Counter

import numpy as np

from qkv import _checks
from qkv.reference.core import _work_dtype

Array = np.ndarray

#: Elements of one block of polynomial features (rows x features, all heads together) that
#: :func:`tensor_approx` keeps at a time: bounds its memory whatever ``N`` and ``M`` are.
FEATURE_BLOCK_ELEMENTS = 2**22


def _prepare(q: Array, k1: Array, k2: Array, v1: Array, v2: Array, scale: float) -> tuple:
    """The arrays in the arithmetic dtype, the scaled queries grouped by the KV head they read."""
    B, H, Hkv, N, M, D, Dv = dims = _checks.tensor_call(q, k1, k2, v1, v2, scale=scale)
    work = _work_dtype(q.dtype)
    scale = float(scale)  # a Python float: multiplying keeps the dtype
    qg = scale * q.astype(work, copy=False).reshape(B, Hkv, dims.group, N, D)  # (B, Hkv, G, N, D)
    k1, k2, v1, v2 = (x.astype(work, copy=False) for x in (k1, k2, v1, v2))
    return dims, qg, k1, k2, v1, v2


def tensor_brute_force(
    q: Array, k1: Array, k2: Array, v1: Array, v2: Array, *, scale: float = 1.0
) -> Array:
    r"""Tensor attention as the equation reads, materialising the $N \times M^2$ scores.

    $$
    S = \text{scale}\cdot Q (K_1 \oslash K_2)^\top, \qquad
    O = \operatorname{softmax}_{\text{row}}(S)\, (V_1 \oslash V_2),
    $$

    row $(i, j) = iM + j$ of $K_1 \oslash K_2$ being $K_1[i] \circ K_2[j]$. Memory grows as
    $N M^2$: for checks and small sizes only; :func:`tensor` computes the same thing in
    $O(N D)$ memory beyond an $N \times M$ tile.

    Args:
        q: queries ``(B, H, N, D)``.
        k1: the first key set ``(B, Hkv, M, D)``; ``H % Hkv == 0``.
        k2: the second key set, shaped as ``k1``.
        v1: the first value set ``(B, Hkv, M, Dv)``.
        v2: the second value set, shaped as ``v1``.
        scale: multiplies the scores; default 1 (the paper has no $1/\sqrt D$).

    Returns:
        ``O (B, H, N, Dv)`` in the dtype of ``q`` (computed in float64 for float64 inputs,
        float32 otherwise).
    """
    (B, H, Hkv, N, M, D, Dv), qg, k1, k2, v1, v2 = _prepare(q, k1, k2, v1, v2, scale)
    kk = (k1[:, :, :, None, :] * k2[:, :, None, :, :]).reshape(B, Hkv, M * M, D)  # K1 ⊘ K2
    vv = (v1[:, :, :, None, :] * v2[:, :, None, :, :]).reshape(B, Hkv, M * M, Dv)  # V1 ⊘ V2
    s = qg @ kk[:, :, None].swapaxes(-1, -2)  # (B, Hkv, G, N, D) @ (B, Hkv, 1, D, M²)
    p = np.exp(s - s.max(axis=-1, keepdims=True))  # (B, Hkv, G, N, M²): exponents <= 0
    out = (p @ vv[:, :, None]) / p.sum(axis=-1, keepdims=True)  # (B, Hkv, G, N, Dv)
    return out.reshape(B, H, N, Dv).astype(q.dtype, copy=False)  # (B, H, N, Dv)


def tensor(q: Array, k1: Array, k2: Array, v1: Array, v2: Array, *, scale: float = 1.0) -> Array:
    r"""Exact tensor attention $D^{-1}\exp(Q (K_1 \oslash K_2)^\top)(V_1 \oslash V_2)$, streamed.

    Visits the first key index $i = 1, \dots, M$ in turn; for each it scores all second keys
    $j$ at once and folds them into an online softmax. With the running maximum $m$, normaliser
    $\ell$ and unnormalised output $\tilde O$ of every query row:

    $$
    S_i = \text{scale}\cdot(Q \circ K_1[i])\, K_2^\top \in \mathbb{R}^{N \times M},\quad
    m' = \max(m, \operatorname{rowmax} S_i),\quad \alpha = e^{m - m'},\quad
    P_i = e^{S_i - m'},
    $$
    $$
    \ell' = \alpha\,\ell + \operatorname{rowsum} P_i,\qquad
    \tilde O' = \alpha\,\tilde O + V_1[i] \circ (P_i V_2),
    $$

    the last term being $\sum_j P_{i,\cdot j}\, V_1[i] \circ V_2[j]$. At the end
    $O = \tilde O / \ell$ exactly. $O(N M^2 (D + D_v))$ time; besides the inputs and the output
    only the $N \times M$ tiles of one step (scores and their exponentials) and
    $O(N (D + D_v))$ running state exist (per head).

    Args:
        q: queries ``(B, H, N, D)``.
        k1: the first key set ``(B, Hkv, M, D)``; ``H % Hkv == 0`` (query head ``h`` reads KV
            head ``h // (H // Hkv)``).
        k2: the second key set, shaped as ``k1``.
        v1: the first value set ``(B, Hkv, M, Dv)``.
        v2: the second value set, shaped as ``v1``.
        scale: multiplies the scores; default 1, as in the paper (no $1/\sqrt D$).

    Returns:
        ``O (B, H, N, Dv)`` in the dtype of ``q`` (computed in float64 for float64 inputs,
        float32 otherwise). Non-finite inputs give NaN in the rows they reach.
    """
    (B, H, Hkv, N, M, D, Dv), qg, k1, k2, v1, v2 = _prepare(q, k1, k2, v1, v2, scale)
    G = H // Hkv
    work = qg.dtype
    k2t = k2[:, :, None].swapaxes(-1, -2)  # (B, Hkv, 1, D, M)
    v2g = v2[:, :, None]  # (B, Hkv, 1, M, Dv)
    m = np.full((B, Hkv, G, N, 1), -np.inf, dtype=work)  # running max
    l = np.zeros((B, Hkv, G, N, 1), dtype=work)  # running normaliser
    acc = np.zeros((B, Hkv, G, N, Dv), dtype=work)  # unnormalised output
    for i in range(M):
        s = (qg * k1[:, :, None, None, i]) @ k2t  # (B, Hkv, G, N, M): scores S[a, (i, j)]
        m_new = np.maximum(m, s.max(axis=-1, keepdims=True))  # (B, Hkv, G, N, 1)
        alpha = np.exp(m - m_new)  # exp(-inf) = 0 on the first visit
        p = np.exp(s - m_new)  # (B, Hkv, G, N, M)
        l = alpha * l + p.sum(axis=-1, keepdims=True)
        acc = alpha * acc + v1[:, :, None, None, i] * (p @ v2g)  # V1[i] ∘ (P_i V2)
        m = m_new
    out = acc / l  # (B, Hkv, G, N, Dv)
    return out.reshape(B, H, N, Dv).astype(q.dtype, copy=False)  # (B, H, N, Dv)


# --------------------------------------------------------------------------- approximation


@functools.cache
def monomial_table(d: int, degree: int) -> tuple[tuple[tuple[Array, Array], ...], Array]:
    r"""How to build every monomial $x^\alpha$ of total degree $|\alpha| \le$ ``degree``.

    Monomials of degree $t$ are indexed by the non-decreasing tuples
    $l_1 \le \dots \le l_t$ of coordinates (``itertools.combinations_with_replacement`` order),
    $\binom{d + t - 1}{t}$ of them, $F = \binom{d + g}{g}$ in all up to degree $g$.
    Each is a monomial of degree $t - 1$ times one coordinate:
    $x_{l_1} \cdots x_{l_t} = (x_{l_1} \cdots x_{l_{t-1}})\, x_{l_t}$.

    Returns:
        ``steps``: for $t = 1, \dots, g$ the pair ``(parent, last)`` of int arrays of length
        $\binom{d+t-1}{t}$: the index of $x_{l_1} \cdots x_{l_{t-1}}$ among the degree $t - 1$
        monomials, and $l_t$;
        ``inv_factorial``: $1/\alpha! = 1/\prod_l \alpha_l!$ of each of the $F$ monomials, in
        the order of :func:`monomials` (degree 0 first), float64 ``(F,)``.
    """
    previous: dict[tuple[int, ...], int] = {(): 0}
    steps = []
    inv_factorial = [1.0]
    for t in range(1, degree + 1):
        tuples = list(itertools.combinations_with_replacement(range(d), t))
        parent = np.array([previous[c[:-1]] for c in tuples], dtype=np.intp)
        last = np.array([c[-1] for c in tuples], dtype=np.intp)
        steps.append((parent, last))
        inv_factorial += [
            1.0 / math.prod(math.factorial(n) for n in Counter(c).values()) for c in tuples
        ]
        previous = {c: index for index, c in enumerate(tuples)}
    return tuple(steps), np.array(inv_factorial)


def monomials(x: Array, degree: int) -> Array:
    r"""Every monomial $x^\alpha = \prod_l x_l^{\alpha_l}$ with $|\alpha| \le$ ``degree``.

    ``x (..., d)`` gives ``(..., F)``, $F = \binom{d + g}{g}$, in the order of
    :func:`monomial_table`. Monomials multiply coordinate-wise, which is what makes tensor
    attention factor: $(k_1 \circ k_2)^\alpha = k_1^\alpha\, k_2^\alpha$.
    """
    steps, _ = monomial_table(x.shape[-1], degree)
    current = np.ones((*x.shape[:-1], 1), dtype=x.dtype)  # (..., 1): the monomial 1
    features = [current]
    for parent, last in steps:
        current = current[..., parent] * x[..., last]  # (..., C(d + t - 1, t))
        features.append(current)
    return np.concatenate(features, axis=-1)  # (..., F)


def _blocks(length: int, per_row: int) -> list[slice]:
    """Slices cutting ``length`` rows into blocks of at most ``FEATURE_BLOCK_ELEMENTS`` elements
    (``per_row`` elements per row)."""
    size = max(1, FEATURE_BLOCK_ELEMENTS // per_row)
    return [slice(start, min(start + size, length)) for start in range(0, length, size)]


def tensor_approx(
    q: Array,
    k1: Array,
    k2: Array,
    v1: Array,
    v2: Array,
    *,
    degree: int = 4,
    scale: float = 1.0,
) -> Array:
    r"""Tensor attention with $\exp$ replaced by its Taylor polynomial: near-linear in $N, M$.

    The paper's fast algorithm for bounded entries (section "upper bound"), with the
    polynomial and the factorisation made explicit. Write $x = \text{scale}\cdot q$ for a query
    and $y = k_1 \circ k_2$ for a key pair, so that the score is $s = x \cdot y$.

    **1. Polynomial.** Replace $e^s$ by the Taylor polynomial of degree $g$ (``degree``),
    $T_g(s) = \sum_{t \le g} s^t / t!$. By the multinomial theorem
    $s^t / t! = \sum_{|\alpha| = t} x^\alpha y^\alpha / \alpha!$, so

    $$
    T_g(x \cdot y) = \sum_{|\alpha| \le g} \frac{x^\alpha}{\alpha!}\; y^\alpha
    = \phi(x) \cdot \psi(y), \qquad
    \phi(x)_\alpha = \frac{x^\alpha}{\alpha!},\quad \psi(y)_\alpha = y^\alpha ,
    $$

    with $F = \binom{D + g}{g}$ monomials $\alpha$ (the symmetric, exact expansion, no sketch).

    **2. Kronecker.** Monomials multiply coordinate-wise, $\psi(k_1 \circ k_2) =
    \psi(k_1) \circ \psi(k_2)$, so the $N \times M^2$ matrix $T_g(Q(K_1 \oslash K_2)^\top)$ is
    $\Phi(Q)\,\big(\Psi(K_1) \oslash \Psi(K_2)\big)^\top$, of rank at most $F$. With
    $(A \oslash B)^\top (C \oslash D) = (A^\top C) \circ (B^\top D)$:

    $$
    \tilde A\, (V_1 \oslash V_2) = \Phi(Q)\,\big[(\Psi(K_1)^\top V_1) \circ (\Psi(K_2)^\top V_2)\big],
    \qquad
    \tilde A\, \mathbf 1 = \Phi(Q)\,\big[(\Psi(K_1)^\top \mathbf 1) \circ (\Psi(K_2)^\top \mathbf 1)\big],
    $$

    and $O = \operatorname{diag}(\tilde A \mathbf 1)^{-1} \tilde A (V_1 \oslash V_2)$: two
    $F \times (D_v + 1)$ matrices (a column of ones appended to the values gives the
    normaliser), then one product per query. Time $O((N + M) F D_v)$, against
    $O(N M^2 (D + D_v))$ exactly; memory $O(F D_v)$ per head plus one block of features (no
    $M^2$ object, no $N \times M$ one). $F$ grows like $D^g / g!$: the method pays off for
    small $D$ and $g$, as the paper's regime ($d = O(\log n)$) has it.

    **Why even degrees only.** $T_g > 0$ on the whole real line when $g$ is even (at its
    minimum $x_0$, $T_g'(x_0) = T_{g-1}(x_0) = 0$, so $T_g(x_0) = x_0^g / g! > 0$); odd $T_g$
    goes negative. So every approximate weight $T_g(s)/\sum T_g$ is positive and each output
    row is a convex combination of the rows $V_1[i] \circ V_2[j]$, for any input: far outside
    the accurate range the result is wrong but bounded, never a division by a vanishing or
    negative normaliser. Odd degrees raise ``ParameterError``.

    **When it is accurate.** If every score satisfies $|s| \le R$ (see
    :func:`score_radius`, a bound computed in $O((N + M) D)$), each weight is within a factor
    $1 \pm \varepsilon$ of the exact one before normalising, with
    $\varepsilon = e^R R^{g+1}/(g+1)!$ (:func:`taylor_relative_error`; Taylor's remainder), and
    then for every output element
    $|\tilde o_{ae} - o_{ae}| \le \tfrac{\varepsilon}{1 - \varepsilon}
    \max_{ij} |(V_1[i] \circ V_2[j])_e - o_{ae}|$. So what matters is the size of the scores,
    not $n$. The bounded-entry theorems are stated for scores of the size
    $\max|\text{entry}|^3$ (in the matrix case, Alman and Song 2023, arXiv 2302.13214, the
    attention matrix is $\exp(QK^\top/d)$; here ``scale = 1/D`` gives that normalisation, and
    entries bounded by $b$ then give $R \le b^3$). For $b = o(\sqrt[3]{\log n})$, so
    $R = o(\log n)$, a degree $g = o(\log n)$ reaches $\varepsilon = 1/\mathrm{poly}(n)$ while
    $F = \binom{D + g}{g}$ stays $n^{o(1)}$ for $D = O(\log n)$: time $n^{1+o(1)}$. With
    larger entries the degree, and $F$ with it, must grow with $R$ (the paper proves that for
    $b = \Omega(\sqrt[3]{\log n})$ no algorithm is much faster than $n^3$, assuming SETH).

    Which polynomial: the abstract fixes only that $\exp$ is replaced by a low-degree
    polynomial on the bounded range (the matrix-case paper uses one with relative error
    $\varepsilon$ on a bounded interval, from Aggarwal and Alman 2022). Taylor about 0 is used
    here because it does not depend on the input (no range to estimate first), is most accurate
    for the small scores the regime is about, is positive everywhere for even $g$, and has the
    explicit bound above.

    Args:
        q: queries ``(B, H, N, D)``.
        k1: the first key set ``(B, Hkv, M, D)``; ``H % Hkv == 0``.
        k2: the second key set, shaped as ``k1``.
        v1: the first value set ``(B, Hkv, M, Dv)``.
        v2: the second value set, shaped as ``v1``.
        degree: the Taylor degree $g$, one of ``2, 4, 6, 8, 10, 12`` (even), with at most
            ``2**18`` features $\binom{D + g}{g}$ per head.
        scale: multiplies the scores; default 1, as in the paper.

    Returns:
        ``O (B, H, N, Dv)`` in the dtype of ``q`` (computed in float64 for float64 inputs,
        float32 otherwise).
    """
    _checks.tensor_approx_call(q, k1, k2, v1, v2, degree=degree, scale=scale)
    (B, H, Hkv, N, M, D, Dv), qg, k1, k2, v1, v2 = _prepare(q, k1, k2, v1, v2, scale)
    G = H // Hkv
    degree = int(degree)
    _, inv_factorial = monomial_table(D, degree)
    inv_factorial = inv_factorial.astype(qg.dtype)  # (F,): 1 / alpha!
    F = inv_factorial.shape[0]
    ones = np.ones((B, Hkv, M, 1), dtype=qg.dtype)
    # Psi(K)^T [V, 1] for each key set, summed over blocks of keys: (B, Hkv, F, Dv + 1).
    factors = []
    for k, v in ((k1, v1), (k2, v2)):
        v_one = np.concatenate([v, ones], axis=-1)  # (B, Hkv, M, Dv + 1)
        kv = np.zeros((B, Hkv, F, Dv + 1), dtype=qg.dtype)
        for rows in _blocks(M, B * Hkv * F):
            psi = monomials(k[:, :, rows], degree)  # (B, Hkv, m, F)
            kv += psi.swapaxes(-1, -2) @ v_one[:, :, rows]  # (B, Hkv, F, m) @ (B, Hkv, m, Dv+1)
        factors.append(kv)
    w = factors[0] * factors[1]  # (A^T C) ∘ (B^T D): (B, Hkv, F, Dv + 1)
    out = np.empty((B, Hkv, G, N, Dv), dtype=qg.dtype)  # (B, Hkv, G, N, Dv)
    for rows in _blocks(N, B * H * F):
        phi = monomials(qg[:, :, :, rows], degree) * inv_factorial  # (B, Hkv, G, n, F)
        num_den = phi @ w[:, :, None]  # (B, Hkv, G, n, F) @ (B, Hkv, 1, F, Dv + 1)
        out[:, :, :, rows] = num_den[..., :Dv] / num_den[..., Dv:]  # D^{-1} A (V1 ⊘ V2)
    return out.reshape(B, H, N, Dv).astype(q.dtype, copy=False)  # (B, H, N, Dv)


def score_radius(q: Array, k1: Array, k2: Array, *, scale: float = 1.0) -> Array:
    r"""A bound $R_a \ge \max_{i,j} |S_{a,ij}|$ on each query's scores, in $O((N + M) D)$.

    $|S_{a,ij}| = \text{scale}\,|\sum_l q_{al} k_{1,il} k_{2,jl}|
    \le \text{scale}\sum_l |q_{al}| \max_i |k_{1,il}| \max_j |k_{2,jl}|$.

    ``q (B, H, N, D)``, ``k1``/``k2 (B, Hkv, M, D)``; returns float64 ``(B, H, N)``.
    """
    B, H, N, D = q.shape
    Hkv = k1.shape[1]
    top = np.abs(k1).max(axis=2) * np.abs(k2).max(axis=2)  # (B, Hkv, D)
    qg = np.abs(q.astype(np.float64)).reshape(B, Hkv, H // Hkv, N, D)  # (B, Hkv, G, N, D)
    radius = scale * (qg @ top[:, :, None, :, None].astype(np.float64))[..., 0]  # (B, Hkv, G, N)
    return radius.reshape(B, H, N)  # (B, H, N)


def taylor_relative_error(degree: int, radius: float | Array) -> float | Array:
    r"""$\varepsilon(R) = e^R R^{g+1}/(g+1)!$: the largest relative error of $T_g$ on $[-R, R]$
    (an upper bound).

    For $|s| \le R$, Taylor's remainder gives $|e^s - T_g(s)| \le e^{\max(s, 0)}
    |s|^{g+1}/(g+1)!$, and dividing by $e^s \ge e^{-R}$ gives at most $\varepsilon(R)$.
    Vectorised over ``radius``.
    """
    radius = np.asarray(radius, dtype=np.float64)
    return np.exp(radius) * radius ** (degree + 1) / math.factorial(degree + 1)
