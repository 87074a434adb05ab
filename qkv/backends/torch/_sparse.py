r"""Attention over per-head selected keys on torch tensors: the torch ``sparse_attention`` op.

Same arguments and results as :func:`qkv.reference.sparse.selected_keys`: each query head
gathers its selected keys and values (``-1`` = an empty slot) from its KV group and takes the
softmax over them alone; a row with no key gives zeros and ``lse = -inf``. A few torch
operations (gather, masked max-subtracted softmax, a batched product), autograd-friendly;
float64 in float64, float32 otherwise. Only the selected ``S`` keys of each row are touched.

Where :func:`qkv.backends.torch._attention.kernel_applies` says a Triton kernel runs (CUDA
tensors, or CPU tensors under ``TRITON_INTERPRET=1``; float16/bfloat16/float32, no gradient
needed), the fused gather-and-attend kernel of :mod:`qkv.backends.torch.triton.sparse` runs
instead of these operations.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qkv.backends.torch._attention import kernel_applies
from qkv.backends.torch._tensors import on_device

if TYPE_CHECKING:
    import torch

    Tensor = torch.Tensor

__all__ = ["sparse_attention"]


def sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    indices: Tensor,
    *,
    scale: float | None = None,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """``q (B, H, N, D)``, ``k (B, Hkv, M, D)``, ``v (B, Hkv, M, Dv)``, ``indices`` ``(B, H, S)``
    or ``(B, H, N, S)`` give ``O (B, H, N, Dv)`` (and ``lse (B, H, N)``)."""
    import torch

    B, H, N, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[3]
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = D**-0.5 if scale is None else float(scale)
    idx = on_device(indices, q.device).long()
    if kernel_applies(q, k, v, mask=None, return_weights=False, kernel_module="sparse"):
        from qkv.backends.torch.triton.sparse import sparse_forward

        out, lse = sparse_forward(q, k, v, idx, scale=scale)
        return (out, lse) if return_lse else out
    if idx.ndim == 3:
        idx = idx[:, :, None].expand(B, H, N, idx.shape[-1])  # (B, H, N, S)
    valid = idx >= 0  # (B, H, N, S)
    safe = idx.clamp(min=0)  # (B, H, N, S)
    group = torch.arange(H, device=q.device) // (H // Hkv)  # (H,)
    M = k.shape[2]
    rows = safe + (group * M)[None, :, None, None]  # (B, H, N, S): rows of the (Hkv*M) axis
    b = torch.arange(B, device=q.device)[:, None, None, None]  # (B, 1, 1, 1)
    k_sel = k.reshape(B, Hkv * M, D)[b, rows].to(work)  # (B, H, N, S, D): only selected rows
    v_sel = v.reshape(B, Hkv * M, Dv)[b, rows].to(work)  # (B, H, N, S, Dv)
    s = scale * torch.einsum("bhnd,bhnsd->bhns", q.to(work), k_sel)  # (B, H, N, S)
    s = s.masked_fill(~valid, float("-inf"))
    row_max = s.amax(dim=-1, keepdim=True)  # (B, H, N, 1); -inf for an empty row
    shift = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    p = torch.exp(s - shift)  # (B, H, N, S); exactly 0 on empty slots
    row_sum = p.sum(dim=-1, keepdim=True)  # (B, H, N, 1)
    w = p / torch.where(row_sum > 0, row_sum, torch.ones_like(row_sum))
    out = torch.einsum("bhns,bhnsd->bhnd", w, v_sel).to(q.dtype)  # (B, H, N, Dv)
    if not return_lse:
        return out
    return out, (torch.log(row_sum) + shift)[..., 0]  # (B, H, N)
