r"""PrFlashAttention: causal flash-attention tiles kept at random by distance to the diagonal.

Paper: *The Nature of Mathematical Modeling and Probabilistic Optimization Engineering in
Generative AI* (Fulu Li, arXiv 2410.18441), the PrFlashAttention section. No official code.

FlashAttention cuts causal attention into $b \times b$ tiles; for an autoregressive model only the
lower triangle of tiles, $j \le i$ (query block $i$, key block $j$), is computed. The paper keeps
that lower-triangular shape but lets a **probability distribution over block distances**
$d = i - j$ decide which tiles take part in a round of attention: tiles near the diagonal
(local context) are likely kept, far ones less so. We found no formula beyond this, so here
(documented choice) each causal tile is kept independently with probability

$$
P(\text{tile } (i, j) \text{ kept}) = p_{i-j}, \qquad
p_d = \begin{cases} \text{keep}^{\,d} & \text{keep a number (geometric decay)} \\
\text{keep}[d] & \text{keep a sequence of per-distance probabilities,} \end{cases}
$$

with the diagonal tile ($d = 0$, which holds each query's own token) always kept, so no query
row is ever empty, and the first key-block column always kept (``first_column``: the attention
sinks). The tiles are drawn with a seeded ``numpy.random.Generator``, one draw per call (one
round); one tile mask serves every batch row and head. The element mask is the tile mask
expanded to tokens and intersected with the causal mask, and feeds :func:`qkv.flash`. With
``keep = 1`` every causal tile is kept: the result is causal full attention.

The expected fraction of causal tiles computed is
$\sum_{j \le i} P(\text{kept}) / \tfrac{n_b (n_b + 1)}{2}$ (:func:`expected_tile_fraction`).
The flash kernels (reference and backends) skip the tiles above the diagonal but still compute
the masked tiles inside the triangle, so the saving is counted here, not timed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from qkv import _checks
from qkv.errors import ParameterError, ShapeError

Array = np.ndarray


def distance_probabilities(n_blocks: int, keep: float | Sequence[float]) -> Array:
    """The keep-probability $p_d$ of a tile at block distance ``d = 0 .. n_blocks - 1``.

    Args:
        n_blocks: query (= key) blocks.
        keep: a probability in ``[0, 1]`` (``p_d = keep ** d``) or one probability per distance
            (at least ``n_blocks`` of them).

    Returns:
        ``p (n_blocks,)`` float64 with ``p[0] = 1`` (the diagonal is always kept).
    """
    n = _checks.positive_int("n_blocks", n_blocks)
    if isinstance(keep, bool):
        raise ParameterError(f"keep: expected a probability or a sequence of them, got {keep!r}")
    try:
        given = np.asarray(keep, dtype=np.float64)
    except (TypeError, ValueError):
        raise ParameterError(
            f"keep: expected a probability or a sequence of them, got {keep!r}"
        ) from None
    if given.ndim > 1:
        raise ShapeError(f"keep: expected a number or a 1-D sequence, got shape {given.shape}")
    if not np.all(np.isfinite(given)) or np.any((given < 0) | (given > 1)):
        raise ParameterError(f"keep: expected probabilities in [0, 1], got {keep!r}")
    if given.ndim == 0:
        p = float(given) ** np.arange(n, dtype=np.float64)  # (n,) geometric decay
    elif len(given) < n:
        raise ShapeError(
            f"keep: expected a probability for each of the {n} block distances, got {len(given)}"
        )
    else:
        p = given[:n].copy()
    p[0] = 1.0
    return p


def tile_probabilities(
    n_blocks: int, keep: float | Sequence[float], *, first_column: bool = True
) -> Array:
    """$P(\\text{tile } (i, j) \\text{ kept})$ ``(n_blocks, n_blocks)``: ``p[i - j]`` below the
    diagonal, 1 on it (and on the first column with ``first_column``), 0 above it."""
    p = distance_probabilities(n_blocks, keep)
    i, j = np.indices((n_blocks, n_blocks))  # (nb, nb) each
    probs = np.where(j <= i, p[np.clip(i - j, 0, None)], 0.0)  # (nb, nb)
    if first_column:
        probs[:, 0] = 1.0
    return probs


def expected_tile_fraction(
    n_blocks: int, keep: float | Sequence[float], *, first_column: bool = True
) -> float:
    """Expected fraction of the ``n_b (n_b + 1) / 2`` causal tiles kept."""
    probs = tile_probabilities(n_blocks, keep, first_column=first_column)
    return float(probs.sum() / (n_blocks * (n_blocks + 1) / 2))


def prflash_block_mask(
    n_blocks: int,
    *,
    keep: float | Sequence[float] = 0.5,
    seed: int | np.random.Generator = 0,
    first_column: bool = True,
) -> Array:
    """One round's tile mask: tile ``(i, j)`` is drawn kept with probability ``p[i - j]``.

    Args:
        n_blocks: query (= key) blocks.
        keep: see :func:`distance_probabilities`.
        seed: an integer seed or a ``numpy.random.Generator`` (advanced by one draw).
        first_column: always keep key block 0.

    Returns:
        Lower-triangular bool ``(n_blocks, n_blocks)`` with a true diagonal.
    """
    probs = tile_probabilities(n_blocks, keep, first_column=first_column)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(_seed(seed))
    return rng.random(probs.shape) < probs  # u in [0, 1): p = 1 always, p = 0 never


def expand_block_mask(block_mask: Array, n: int, block: int) -> Array:
    """Token mask ``(n, n)``: the tile mask ``(n_b, n_b)`` repeated over ``block x block`` tiles,
    cut to ``n`` tokens and intersected with the causal mask."""
    tiles = np.repeat(np.repeat(block_mask, block, axis=0), block, axis=1)[:n, :n]  # (n, n)
    return tiles & np.tri(n, dtype=bool)


def prflash(
    q: Array,
    k: Array,
    v: Array,
    *,
    block: int = 64,
    keep: float | Sequence[float] = 0.5,
    seed: int | np.random.Generator = 0,
    first_column: bool = True,
    scale: float | None = None,
    return_mask: bool = False,
) -> Array | tuple[Array, Array]:
    r"""Causal attention over a random lower-triangular set of tiles, by :func:`qkv.flash`.

    Args:
        q: queries ``(B, H, N, D)``.
        k: keys ``(B, Hkv, N, D)`` (self-attention: as many keys as queries).
        v: values ``(B, Hkv, N, Dv)``.
        block: tile size $b$ (query and key blocks; also the flash tile sizes).
        keep: keep-probability by block distance (see :func:`distance_probabilities`).
        seed: integer seed or ``numpy.random.Generator`` of this round's draw.
        first_column: always keep key block 0 (the sinks).
        scale: multiplies $QK^\top$; default $1/\sqrt D$.
        return_mask: also return the tile mask ``(n_b, n_b)``.

    Returns:
        ``O (B, H, N, Dv)`` in the dtype of ``q`` (and the tile mask with ``return_mask``).

    The arrays are NumPy arrays (the mask is built with NumPy); the tiles run on the backend
    chosen for :func:`qkv.flash`.
    """
    dims = _checks.attention(q, k, v, scale=scale)
    if dims.N != dims.M:
        raise ShapeError(
            f"k: expected as many keys as queries N={dims.N} (causal self-attention), "
            f"got M={dims.M}"
        )
    b = _checks.positive_int("block", block)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not np.all(np.isfinite(np.asarray(x))):
            raise ParameterError(f"{name}: expected finite values, got NaN or inf")
    tiles = prflash_block_mask(-(-dims.N // b), keep=keep, seed=seed, first_column=first_column)
    import qkv  # the dispatched op, so the chosen backend runs the tiles

    out = qkv.flash(
        q,
        k,
        v,
        mask=expand_block_mask(tiles, dims.N, b),  # (N, N), broadcast over (B, H)
        causal=True,
        scale=scale,
        block_q=b,
        block_k=b,
    )
    return (out, tiles) if return_mask else out


def _seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ParameterError(
            f"seed: expected an integer >= 0 or a numpy.random.Generator, got {seed!r}"
        )
    return int(seed)


def tile_fraction(block_mask: Array) -> float:
    """Fraction of the causal tiles a tile mask ``(n_b, n_b)`` keeps (the FLOPs computed)."""
    nb = block_mask.shape[0]
    return float(np.tril(block_mask).sum() / (nb * (nb + 1) / 2))
