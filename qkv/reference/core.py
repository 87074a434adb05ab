r"""Softmax attention: the baseline every other mechanism in qkv builds on.

Scaled dot-product attention maps queries $Q \in \mathbb{R}^{N \times d}$, keys
$K \in \mathbb{R}^{M \times d}$ and values $V \in \mathbb{R}^{M \times d_v}$ to

$$
\operatorname{Attention}(Q, K, V) = \operatorname{softmax}\!\Big(\tfrac{QK^\top}{\sqrt d} + B\Big)\,V,
$$

with an optional additive bias or boolean mask $B$. This module holds the readable forms:

* :func:`sdpa` materialises the $N \times M$ score matrix, as the equation reads;
* :func:`flash` computes the same thing tile by tile with the online softmax and never keeps an
  $N \times M$ array;
* :func:`rope` and :func:`alibi` are the two positional schemes many other mechanisms reuse.

Conventions (shared with ``torch.nn.functional.scaled_dot_product_attention``): queries are
``(B, H, N, D)``, keys ``(B, Hkv, M, D)`` and values ``(B, Hkv, M, Dv)``; query head ``h`` reads
KV head ``h // (H / Hkv)`` (grouped heads). A boolean mask is True where a query may attend.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qkv import _checks

Array = np.ndarray


def _work_dtype(dtype: np.dtype) -> type:
    """Arithmetic dtype: float64 stays float64, lower precisions accumulate in float32."""
    return np.float64 if dtype == np.float64 else np.float32


def causal_allowed(
    n_queries: int, n_keys: int, rows: slice = slice(None), cols: slice = slice(None)
) -> Array:
    r"""Boolean causal pattern, aligned at the bottom-right corner.

    Query $i$ may attend key $j$ when $j \le i + (M - N)$: the last query sees every key, as in
    decoding with a cache of $M - N$ earlier tokens. When $N > M$ the first $N - M$ queries see
    no key at all and their output is zero. ``rows``/``cols`` select a tile.

    Returns ``(len(rows), len(cols))`` bool.
    """
    i = np.arange(n_queries)[rows][:, None]  # (n, 1)
    j = np.arange(n_keys)[cols][None, :]  # (1, m)
    return j <= i + (n_keys - n_queries)


def _tile_scores(
    q: Array,
    k: Array,
    scale: float,
    mask: Array | None,
    causal: bool,
    N: int,
    M: int,
    rows: slice,
    cols: slice,
) -> Array:
    r"""Scores $S = \text{scale}\cdot Q K^\top + B$ of one tile, with $-\infty$ where masked.

    ``q (B, Hkv, G, n, D)``, ``k (B, Hkv, m, D)``, ``mask`` broadcast to ``(B, H, N, M)``.
    Returns ``(B, Hkv, G, n, m)``.
    """
    s = scale * (q @ k[:, :, None].swapaxes(-1, -2))  # (B, Hkv, G, n, D) @ (B, Hkv, 1, D, m)
    B, Hkv, G, n, m = s.shape
    if mask is not None:
        tile = mask[:, :, rows, cols].reshape(B, Hkv, G, n, m)  # (B, Hkv, G, n, m)
        if tile.dtype == np.bool_:
            s = np.where(tile, s, -np.inf)
        else:  # an additive -inf masks the entry outright (so a NaN score stays shielded)
            s = np.where(np.isneginf(tile), -np.inf, s + tile.astype(s.dtype, copy=False))
    if causal:
        s = np.where(causal_allowed(N, M, rows, cols), s, -np.inf)
    return s


def _prepare(
    q: Array, k: Array, v: Array, mask: Array | None, causal: bool, scale: float | None
) -> tuple:
    """Check the inputs, group query heads with their KV head, pick the arithmetic dtype."""
    dims = _checks.attention(q, k, v, mask=mask, causal=causal, scale=scale)
    B, H, Hkv, N, M, D, _ = dims
    work = _work_dtype(q.dtype)
    qg = q.astype(work, copy=False).reshape(B, Hkv, dims.group, N, D)  # (B, Hkv, G, N, D)
    k = k.astype(work, copy=False)  # (B, Hkv, M, D)
    v = v.astype(work, copy=False)  # (B, Hkv, M, Dv)
    if mask is not None:
        mask = np.broadcast_to(np.asarray(mask), (B, H, N, M))  # (B, H, N, M), a view
    scale = float(1.0 / np.sqrt(D) if scale is None else scale)  # a Python float: keeps dtype
    return dims, qg, k, v, mask, scale


def _results(out: Array, weights: Array | None, lse: Array, return_weights: bool, return_lse: bool):
    if not (return_weights or return_lse):
        return out
    return (out, *([weights] if return_weights else []), *([lse] if return_lse else []))


def sdpa(
    q: Array,
    k: Array,
    v: Array,
    *,
    mask: Array | None = None,
    causal: bool = False,
    scale: float | None = None,
    return_weights: bool = False,
    return_lse: bool = False,
) -> Array | tuple[Array, ...]:
    r"""Scaled dot-product attention, materialising the score matrix.

    $$
    S = \text{scale}\cdot Q K^\top + B, \qquad
    P = \operatorname{softmax}_{\text{row}}(S), \qquad O = P V,
    \qquad \mathrm{lse}_i = \log \textstyle\sum_j e^{S_{ij}}
    $$

    Args:
        q: queries ``(B, H, N, D)``.
        k: keys ``(B, Hkv, M, D)``; ``H`` must be a multiple of ``Hkv`` (grouped heads: query
            head ``h`` reads KV head ``h // (H // Hkv)``; ``Hkv = 1`` is multi-query attention).
        v: values ``(B, Hkv, M, Dv)``.
        mask: broadcastable to ``(B, H, N, M)``; bool (True = attend) or float (added to the
            scores; ``-inf`` masks).
        causal: query ``i`` attends key ``j`` only if ``j <= i + (M - N)`` (bottom-right
            alignment, as in decoding with a cache); combined with ``mask`` by logical and.
        scale: multiplies $QK^\top$; default $1/\sqrt{D}$.
        return_weights: also return the attention weights ``P (B, H, N, M)``.
        return_lse: also return the log-sum-exp of the scaled, masked scores ``(B, H, N)``.

    Returns:
        ``O (B, H, N, Dv)`` in the dtype of ``q``; with ``return_weights`` / ``return_lse`` the
        tuple ``(O, P)``, ``(O, lse)`` or ``(O, P, lse)``. ``lse`` is float64 for float64 inputs
        and float32 otherwise.

    A row whose every key is masked gets zero output, zero weights and ``lse = -inf``. The
    arithmetic is float64 for float64 inputs and float32 for lower precisions. A NaN in query
    row ``i`` makes output row ``i`` NaN; a NaN in key ``j`` makes NaN every row that may attend
    ``j`` (masked rows are shielded); a NaN in value ``j`` reaches every row through the product
    ``P V``, since ``0 * NaN`` is NaN.
    """
    dims, qg, k, v, mask, scale = _prepare(q, k, v, mask, causal, scale)
    B, H, Hkv, N, M, D, Dv = dims
    everything = slice(None)
    s = _tile_scores(qg, k, scale, mask, causal, N, M, everything, everything)  # (B, Hkv, G, N, M)
    row_max = s.max(axis=-1, keepdims=True)  # (B, Hkv, G, N, 1)
    # Subtract the row maximum before exp; a fully masked row has max -inf, shift it by 0.
    p = np.exp(s - np.where(np.isneginf(row_max), 0.0, row_max))  # (B, Hkv, G, N, M)
    row_sum = p.sum(axis=-1, keepdims=True)  # (B, Hkv, G, N, 1)
    weights = p / np.where(row_sum > 0, row_sum, 1.0)  # (B, Hkv, G, N, M)
    out = weights @ v[:, :, None]  # (B, Hkv, G, N, M) @ (B, Hkv, 1, M, Dv) = (B, Hkv, G, N, Dv)
    with np.errstate(divide="ignore"):
        lse = (np.log(row_sum) + row_max)[..., 0]  # (B, Hkv, G, N)
    return _results(
        out.reshape(B, H, N, Dv).astype(q.dtype, copy=False),  # (B, H, N, Dv)
        weights.reshape(B, H, N, M).astype(q.dtype, copy=False),  # (B, H, N, M)
        lse.reshape(B, H, N),  # (B, H, N)
        return_weights,
        return_lse,
    )


def flash(
    q: Array,
    k: Array,
    v: Array,
    *,
    mask: Array | None = None,
    causal: bool = False,
    scale: float | None = None,
    return_weights: bool = False,
    return_lse: bool = False,
    block_q: int = 64,
    block_k: int = 64,
) -> Array | tuple[Array, ...]:
    r"""Softmax attention computed tile by tile with the online softmax (FlashAttention).

    Same arguments and results as :func:`sdpa`, plus the tile sizes ``block_q`` and
    ``block_k``. Queries are cut into blocks of ``block_q`` rows and keys into blocks of
    ``block_k``; only ``block_q x block_k`` scores exist at any time.

    For one query block, keep a running maximum $m$, a running normaliser $\ell$ and an
    unnormalised output $\tilde O$. Visiting key block $j$ with scores $S_j$:

    $$
    m' = \max\big(m, \operatorname{rowmax}(S_j)\big),\quad
    \alpha = e^{m - m'},\quad
    P_j = e^{S_j - m'},\quad
    \ell' = \alpha\,\ell + \operatorname{rowsum}(P_j),\quad
    \tilde O' = \alpha\,\tilde O + P_j V_j .
    $$

    Every earlier term was scaled by $e^{-m}$; multiplying by $\alpha$ rescales it to $e^{-m'}$,
    so after the last block $\tilde O / \ell = \operatorname{softmax}(S) V$ exactly, and
    $\mathrm{lse} = m + \log \ell$. With ``causal``, key blocks wholly above the diagonal are
    skipped. ``return_weights`` rebuilds $P = e^{S - \mathrm{lse}}$ in a second tiled pass
    (that output is $N \times M$ by request).
    """
    _checks.positive_int("block_q", block_q)
    _checks.positive_int("block_k", block_k)
    dims, qg, k, v, mask, scale = _prepare(q, k, v, mask, causal, scale)
    B, H, Hkv, N, M, D, Dv = dims
    G = dims.group
    work = qg.dtype
    out = np.zeros((B, Hkv, G, N, Dv), dtype=work)  # (B, Hkv, G, N, Dv)
    lse = np.full((B, Hkv, G, N), -np.inf, dtype=work)  # (B, Hkv, G, N)
    for i0 in range(0, N, block_q):
        rows = slice(i0, min(i0 + block_q, N))
        n = rows.stop - i0
        m_i = np.full((B, Hkv, G, n, 1), -np.inf, dtype=work)  # running max
        l_i = np.zeros((B, Hkv, G, n, 1), dtype=work)  # running normaliser
        acc = np.zeros((B, Hkv, G, n, Dv), dtype=work)  # unnormalised output
        last_key = M if not causal else min(M, rows.stop + (M - N))  # keys any row may see
        for j0 in range(0, max(last_key, 0), block_k):
            cols = slice(j0, min(j0 + block_k, M))
            s = _tile_scores(
                qg[:, :, :, rows], k[:, :, cols], scale, mask, causal, N, M, rows, cols
            )
            m_new = np.maximum(m_i, s.max(axis=-1, keepdims=True))  # (B, Hkv, G, n, 1)
            shift = np.where(np.isneginf(m_new), 0.0, m_new)  # rows with nothing seen yet
            alpha = np.exp(m_i - shift)  # (B, Hkv, G, n, 1); exp(-inf) = 0 on the first visit
            p = np.exp(s - shift)  # (B, Hkv, G, n, m)
            l_i = alpha * l_i + p.sum(axis=-1, keepdims=True)
            acc = alpha * acc + p @ v[:, :, None, cols]  # (B, Hkv, G, n, Dv)
            m_i = m_new
        out[:, :, :, rows] = acc / np.where(l_i > 0, l_i, 1.0)
        with np.errstate(divide="ignore"):
            lse[:, :, :, rows] = (m_i + np.log(l_i))[..., 0]
    weights = None
    if return_weights:
        weights = np.zeros((B, Hkv, G, N, M), dtype=work)  # (B, Hkv, G, N, M)
        for i0 in range(0, N, block_q):
            rows = slice(i0, min(i0 + block_q, N))
            for j0 in range(0, M, block_k):
                cols = slice(j0, min(j0 + block_k, M))
                s = _tile_scores(
                    qg[:, :, :, rows], k[:, :, cols], scale, mask, causal, N, M, rows, cols
                )
                row_lse = lse[:, :, :, rows, None]  # -inf for rows with no key: weights 0
                weights[:, :, :, rows, cols] = np.exp(
                    s - np.where(np.isneginf(row_lse), 0.0, row_lse)
                )
        weights = weights.reshape(B, H, N, M).astype(q.dtype, copy=False)  # (B, H, N, M)
    return _results(
        out.reshape(B, H, N, Dv).astype(q.dtype, copy=False),  # (B, H, N, Dv)
        weights,
        lse.reshape(B, H, N),  # (B, H, N)
        return_weights,
        return_lse,
    )


def rope_frequencies(dim: int, base: float = 10000.0) -> Array:
    r"""$\theta_i = \text{base}^{-2i/d}$ for $i = 0, \dots, d/2 - 1$, float64 ``(dim // 2,)``."""
    return base ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)


def rope(
    x: Array,
    *,
    positions: Array | None = None,
    offset: int = 0,
    base: float = 10000.0,
    pairing: str = "adjacent",
) -> Array:
    r"""Rotary position embedding (RoFormer, arXiv 2104.09864).

    Each pair of features $(x_a, x_b)$ of the token at position $p$ is rotated by the angle
    $p\,\theta_i$, $\theta_i = \text{base}^{-2i/D}$:

    $$
    \begin{pmatrix} x'_a \\ x'_b \end{pmatrix} =
    \begin{pmatrix} \cos p\theta_i & -\sin p\theta_i \\ \sin p\theta_i & \cos p\theta_i \end{pmatrix}
    \begin{pmatrix} x_a \\ x_b \end{pmatrix},
    $$

    so that $\langle \mathrm{rope}(q, m), \mathrm{rope}(k, n) \rangle$ depends on $m - n$ only.

    Args:
        x: ``(B, H, N, D)`` queries or keys, ``D`` even.
        positions: integer positions ``(N,)`` or ``(B, N)``; default ``offset + arange(N)``.
        offset: first position when ``positions`` is not given (a decode step's cache length).
        base: the frequency base (10000 in the paper).
        pairing: ``"adjacent"`` pairs ``(x_{2i}, x_{2i+1})`` as in the paper;
            ``"half"`` pairs ``(x_i, x_{i + D/2})`` as GPT-NeoX and Llama lay them out.

    Returns:
        ``(B, H, N, D)`` in the dtype of ``x``.
    """
    _checks.rope_call(x, positions=positions, offset=offset, pairing=pairing)
    B, H, N, D = x.shape
    positions = offset + np.arange(N) if positions is None else np.asarray(positions)
    angle = positions[..., None] * rope_frequencies(D, base)  # (N, D/2) or (B, N, D/2)
    if angle.ndim == 3:
        angle = angle[:, None]  # (B, 1, N, D/2)
    work = _work_dtype(x.dtype)
    cos, sin = np.cos(angle).astype(work), np.sin(angle).astype(work)
    xw = x.astype(work, copy=False)
    if pairing == "adjacent":
        a, b = xw[..., 0::2], xw[..., 1::2]  # (B, H, N, D/2) each
    else:
        a, b = xw[..., : D // 2], xw[..., D // 2 :]  # (B, H, N, D/2) each
    ra, rb = a * cos - b * sin, a * sin + b * cos
    if pairing == "adjacent":
        out = np.stack([ra, rb], axis=-1).reshape(B, H, N, D)  # interleave back: (B, H, N, D)
    else:
        out = np.concatenate([ra, rb], axis=-1)  # (B, H, N, D)
    return out.astype(x.dtype, copy=False)


def alibi_slopes(n_heads: int) -> Array:
    r"""ALiBi head slopes (Press et al., arXiv 2108.12409), float64 ``(n_heads,)``.

    For $H$ a power of two the slopes are the geometric sequence $m_h = 2^{-8h/H}$,
    $h = 1, \dots, H$. Otherwise, as the paper prescribes, take the $2^{\lfloor\log_2 H\rfloor}$
    slopes and fill the rest with every other slope of the sequence for twice that many heads.
    """
    n_heads = _checks.positive_int("n_heads", n_heads)

    def geometric(n: int) -> Array:
        return 2.0 ** (-8.0 * np.arange(1, n + 1) / n)

    closest = 2 ** int(np.floor(np.log2(n_heads)))
    slopes = geometric(closest)
    if closest < n_heads:
        slopes = np.concatenate([slopes, geometric(2 * closest)[0::2][: n_heads - closest]])
    return slopes


def alibi(
    n_heads: int,
    n_queries: int,
    n_keys: int,
    *,
    symmetric: bool = False,
    dtype: Any = np.float64,
) -> Array:
    r"""ALiBi attention biases $B_{hij} = -m_h\,(i' - j)$, to pass as an additive ``mask``.

    Query $i$ sits at position $i' = i + (M - N)$ (the bottom-right alignment of
    :func:`sdpa`'s ``causal``). The paper uses the bias with a causal mask, so only $j \le i'$
    matters there; ``symmetric=True`` gives $-m_h\,|i' - j|$ for bidirectional encoders.

    Returns:
        ``(n_heads, n_queries, n_keys)`` biases, broadcastable to ``(B, H, N, M)``.
    """
    n_queries = _checks.positive_int("n_queries", n_queries)
    n_keys = _checks.positive_int("n_keys", n_keys)
    distance = (np.arange(n_queries)[:, None] + (n_keys - n_queries)) - np.arange(n_keys)  # (N, M)
    if symmetric:
        distance = np.abs(distance)
    bias = -alibi_slopes(n_heads)[:, None, None] * distance  # (H, N, M)
    return bias.astype(dtype)
