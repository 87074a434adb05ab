r"""LeanVec's first-stage scores on torch tensors: float queries against 8-bit vectors.

Same arguments and result as :func:`qkv.reference.retrieval.leanvec_projection.lvq_dot`:
$s_{ij} = \tilde q_i \cdot (\ell_j + \Delta_j c_j)$ as one batched product, the codes widened
to the queries' dtype (exact: every code up to 255 is representable in float16 and bfloat16).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    Tensor = torch.Tensor

__all__ = ["lvq_dot"]


def lvq_dot(queries: Tensor, codes: Tensor, scales: Tensor, offsets: Tensor) -> Tensor:
    """Scores ``(Nq, N)`` of ``queries (Nq, d)`` against ``codes (N, d)`` uint8 with
    ``scales, offsets (N,)`` in the queries' dtype."""
    decoded = offsets[:, None] + scales[:, None] * codes.to(scales.dtype)  # (N, d)
    return queries @ decoded.T  # (Nq, N)
