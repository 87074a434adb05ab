r"""HiP attention: hierarchical tree search for the top key blocks, plus a sliding window.

Paper: *HiP Attention: Sparse Sub-Quadratic Attention with Hierarchical Attention Pruning*
(Lee et al., arXiv 2406.09827). Official code: https://github.com/DeepAuto-AI/hip-attention
(reference numba version ``src/hip_attn/v1_1/attention2_draft.py``).

Attention scores are locally smooth, so a key range can be judged by one representative. The
$T$ searchable keys (all but the last ``sliding_window``) are cut into $B = \lceil T / b_k
\rceil$ blocks of $b_k$ keys, and with $m = \lceil \text{mask\_k} / b_k \rceil$:

1. start from $m$ nodes $[\lfloor iB/m \rfloor, \lfloor (i+1)B/m \rfloor)$ covering all blocks;
2. split every node $[s, e)$ into $[s, \mu)$ and $[\mu, e)$, $\mu = \lceil (s + e) / 2 \rceil$;
3. score each child by its *first* block,
   $\sigma(s) = \max_{i \in Q'} \max_{j \in \text{block } s} q_i \cdot k_j$ (unscaled), with
   $Q'$ every other query of the query block ($q_{1::2}$, as the official code; the query
   itself at decode);
4. keep the $m$ best children; repeat from 2 until every node is one block.

The result is $m$ blocks ($m\,b_k$ keys); attention reads them and the sliding window. Each
round costs $2m$ block scores and there are about $\log_2(B/m)$ rounds, so a query costs
$O(m \log(T/m))$ dot products instead of $T$, and a length-$T$ sequence $O(T \log T)$. When
$B \le m$ every block is kept: the attention is dense. Defaults (official v1.1): ``mask_k=512``,
``block_size_k=1``, ``sliding_window=128``; the official query blocking (``block_size_q=32``)
matters at prefill only, and the block-sparse kernel is not reproduced here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qkv.reference.kv.policy import CacheView, KVSelector, check_budget
from qkv.reference.sparse.decode_scores import slots_of

Array = np.ndarray


def hip_tree_search(
    q: Array, keys: Array, *, mask_k: int, block_size_k: int = 1
) -> tuple[Array, int]:
    """The key blocks a query block keeps, and the dot products the search cost.

    Args:
        q: the query block ``(Nq, D)``.
        keys: searchable keys ``(T, D)``.
        mask_k: keys to keep (``>= 1``).
        block_size_k: keys per block.

    Returns:
        Sorted block indices ``(min(m, B),)`` and the number of ``q . k`` products computed.
    """
    mask_k = check_budget("mask_k", mask_k)
    bk = check_budget("block_size_k", block_size_k)
    n_blocks = -(-len(keys) // bk)
    m = -(-mask_k // bk)
    if n_blocks <= m:
        return np.arange(n_blocks), 0
    probe = q[1::2] if len(q) > 1 else q  # (Nq', D)
    i = np.arange(m)
    start, end = i * n_blocks // m, (i + 1) * n_blocks // m  # (m,) nodes
    cost = 0
    while int(np.max(end - start)) > 1:
        mid = (start + end + 1) // 2
        child_start = np.concatenate([start, mid])  # (2m,)
        child_end = np.concatenate([mid, end])  # (2m,)
        first = child_start[:, None] * bk + np.arange(bk)  # (2m, bk): each child's first block
        valid = (child_end > child_start)[:, None] & (first < len(keys))  # (2m, bk)
        dots = keys[np.where(valid, first, 0)] @ probe.T  # (2m, bk, Nq')
        score = np.where(valid[:, :, None], dots, -np.inf).max(axis=(1, 2))  # (2m,); -inf: empty
        cost += int(valid.sum()) * probe.shape[0]
        best = np.argsort(-score, kind="stable")[:m]  # (m,)
        start, end = child_start[best], child_end[best]
    return np.sort(start), cost


def hip_keys(
    q: Array, keys: Array, *, mask_k: int, block_size_k: int = 1, sliding_window: int = 128
) -> tuple[Array, int]:
    """Key indices a query block reads: the searched blocks plus the last ``sliding_window`` keys.

    Args:
        q: the query block ``(Nq, D)``.
        keys: all its keys ``(M, D)``.
        mask_k: keys the tree search keeps.
        block_size_k: keys per block.
        sliding_window: latest keys always read (excluded from the search).

    Returns:
        Sorted distinct key indices and the search's dot-product count.
    """
    window = check_budget("sliding_window", sliding_window, minimum=0)
    T = max(len(keys) - window, 0)
    blocks, cost = hip_tree_search(q, keys[:T], mask_k=mask_k, block_size_k=block_size_k)
    searched = (blocks[:, None] * block_size_k + np.arange(block_size_k)).ravel()  # (m * bk,)
    return np.concatenate([searched[searched < T], np.arange(T, len(keys))]), cost


@dataclass(frozen=True)
class HiP(KVSelector):
    """HiP's tree search as a decode-time selector, per query head.

    Attributes:
        mask_k: keys the tree search keeps per head.
        block_size_k: keys per block.
        sliding_window: latest keys every head reads.
    """

    mask_k: int = 512
    block_size_k: int = 1
    sliding_window: int = 128

    def __post_init__(self) -> None:
        check_budget("mask_k", self.mask_k)
        check_budget("block_size_k", self.block_size_k)
        check_budget("sliding_window", self.sliding_window, minimum=0)

    def select(self, layer: int, cache: CacheView) -> Array:
        """Sorted slots ``(B, H, S)`` each query head reads."""
        B, H = cache.queries.shape[:2]
        group = H // cache.keys.shape[1]
        mask = np.zeros((B, H, cache.keys.shape[2]), dtype=bool)
        for b in range(B):
            for h in range(H):
                length = int(cache.lengths[b, h // group])  # occupied slots come first
                chosen, _ = hip_keys(
                    cache.queries[b, h, -1:],
                    cache.keys[b, h // group, :length],
                    mask_k=self.mask_k,
                    block_size_k=self.block_size_k,
                    sliding_window=self.sliding_window,
                )
                mask[b, h, chosen] = True
        return slots_of(mask)


#: The catalog id.
hip = HiP
