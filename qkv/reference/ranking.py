r"""Top-$k$ selection, the step every key-selecting mechanism ends with.

``top_k(s, k)`` returns the indices of the $k$ largest scores along the last axis, best first,
ties going to the lower index: exactly ``np.argsort(-s, kind="stable")[..., :k]``. A full sort
costs $O(C \log C)$ per row; when $k$ is a small fraction of the $C$ scores (a 5% budget over a
64k-token cache) the $k$ winners are found in $O(C)$ by a partition and only they are sorted:

1. $t$ = the $k$-th largest score of the row (``np.partition``);
2. every score above $t$ is in; of those equal to $t$, the first $k - |\{s > t\}|$ by index;
3. the $k$ indices are ordered by score, then by index.

Quantised keys give many equal scores (every key of a codeword scores the same), so step 2's
tie rule is what makes the result match the stable sort. NaN scores rank last, as in the sort
(a row whose $k$-th score is NaN takes the sort).
"""

from __future__ import annotations

import numpy as np

Array = np.ndarray

#: Below this fraction of the row, partition then sort; above, one stable sort is as fast.
PARTITION_BELOW = 0.25


def top_k(scores: Array, k: int) -> Array:
    """Indices ``(..., k)`` of the ``k`` largest ``scores (..., C)``, best first, ties to the
    lower index (``0 <= k <= C``)."""
    C = scores.shape[-1]
    if k >= C * PARTITION_BELOW or k == 0:
        return np.argsort(-scores, axis=-1, kind="stable")[..., :k]
    neg = -scores  # smallest first, as the stable sort of -scores ranks them
    kth = np.partition(neg, k - 1, axis=-1)[..., k - 1 : k]  # (..., 1) the k-th smallest
    if np.isnan(kth).any():
        return np.argsort(neg, axis=-1, kind="stable")[..., :k]
    better = neg < kth  # (..., C) strictly inside
    tied = neg == kth  # (..., C)
    need = k - better.sum(axis=-1, keepdims=True)  # (..., 1) tied places left
    chosen = better | (tied & (np.cumsum(tied, axis=-1) <= need))  # (..., C) exactly k per row
    index = np.nonzero(chosen.reshape(-1, C))[1].reshape(*scores.shape[:-1], k)  # by index
    order = np.argsort(np.take_along_axis(neg, index, axis=-1), axis=-1, kind="stable")
    return np.take_along_axis(index, order, axis=-1)  # (..., k) best first
