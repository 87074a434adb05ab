r"""Attention over per-head selected keys on torch tensors: the torch ``sparse_attention`` op.

Same arguments and results as :func:`qkv.reference.sparse.selected_keys`: each query head
gathers its selected keys and values (``-1`` = an empty slot) from its KV group and takes the
softmax over them alone; a row with no key gives zeros and ``lse = -inf``. A few torch
operations (gather, masked max-subtracted softmax, a batched product), autograd-friendly;
float64 in float64, float32 otherwise. Only the selected ``S`` keys of each row are touched:
they are gathered with one ``index_select`` per ``K`` and ``V`` from the flat
``(B * Hkv * M, D)`` views, scored with one batched product, and the optional per-slot ``bias``
(``(B, H, S)``, ``(B, Hkv, S)`` or ``(B, H, N, S)``) is added to the scaled scores before the
empty slots are masked. The row sum of the max-subtracted weights is at least 1 in a row with a
key and 0 in a row without, so dividing by ``max(sum, 1)`` needs no test.

Where :func:`qkv.backends.torch._attention.kernel_applies` says a Triton kernel runs (CUDA
tensors, or CPU tensors under ``TRITON_INTERPRET=1``; float16/bfloat16/float32, no gradient
needed), the fused gather-and-attend kernel of :mod:`qkv.backends.torch.triton.sparse` runs
instead of these operations.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from qkv.backends.torch._attention import kernel_applies
from qkv.backends.torch._tensors import on_device

if TYPE_CHECKING:
    import torch

    Tensor = torch.Tensor

__all__ = ["sparse_attention"]


@functools.lru_cache(maxsize=64)
def _row_base(B: int, H: int, Hkv: int, M: int, device: str) -> Tensor:
    """``(B, H, 1, 1)`` int64: the first row of each query head's KV head in ``(B*Hkv*M, D)``."""
    import torch

    b = torch.arange(B, device=device)[:, None]  # (B, 1)
    g = torch.arange(H, device=device)[None, :] // (H // Hkv)  # (1, H)
    return ((b * Hkv + g) * M)[:, :, None, None]  # (B, H, 1, 1)


def _bias_rows(bias: Tensor, B: int, H: int, N: int, per_query: bool) -> Tensor:
    """A checked bias laid out to broadcast over the scores ``(B, H, Ni, N / Ni, S)``."""
    if bias.ndim == 3 and bias.shape[1] != H:  # (B, Hkv, S): shared by a group's heads
        bias = bias.repeat_interleave(H // bias.shape[1], dim=1)  # (B, H, S)
    rows = bias.reshape(B, H, N if bias.ndim == 4 else 1, bias.shape[-1])  # (B, H, 1 or N, S)
    return rows.unsqueeze(3) if per_query else rows.unsqueeze(2)


def sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    indices: Tensor,
    *,
    scale: float | None = None,
    bias: Tensor | None = None,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """``q (B, H, N, D)``, ``k (B, Hkv, M, D)``, ``v (B, Hkv, M, Dv)``, ``indices`` ``(B, H, S)``
    or ``(B, H, N, S)``, optional ``bias`` ``(B, H, S)``, ``(B, Hkv, S)`` or ``(B, H, N, S)``
    give ``O (B, H, N, Dv)`` (and ``lse (B, H, N)``)."""
    import torch

    B, H, N, D = q.shape
    Hkv, M, Dv = k.shape[1], k.shape[2], v.shape[3]
    scale = D**-0.5 if scale is None else float(scale)
    idx = on_device(indices, q.device)
    bias = None if bias is None else on_device(bias, q.device)
    bias_grad = bias is not None and bias.requires_grad and torch.is_grad_enabled()
    if not bias_grad and kernel_applies(
        q, k, v, mask=None, return_weights=False, kernel_module="sparse"
    ):
        from qkv.backends.torch.triton.sparse import sparse_forward

        out, lse = sparse_forward(q, k, v, idx, scale=scale, bias=bias)
        return (out, lse) if return_lse else out
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    S = idx.shape[-1]
    Ni = N if idx.ndim == 4 else 1  # queries with their own list
    idx = idx.reshape(B, H, Ni, S)  # (B, H, Ni, S)
    valid = idx >= 0  # (B, H, Ni, S)
    rows = idx.clamp(min=0) + _row_base(B, H, Hkv, M, str(q.device))  # (B, H, Ni, S)
    rows = rows.reshape(-1)  # (B*H*Ni*S,): rows of the flat (B*Hkv*M, D) views
    k_sel = k.reshape(B * Hkv * M, D).index_select(0, rows).to(work)  # (B*H*Ni*S, D)
    v_sel = v.reshape(B * Hkv * M, Dv).index_select(0, rows).to(work)  # (B*H*Ni*S, Dv)
    k_sel = k_sel.view(B, H, Ni, S, D)  # (B, H, Ni, S, D)
    v_sel = v_sel.view(B, H, Ni, S, Dv)  # (B, H, Ni, S, Dv)
    qx = q.to(work).reshape(B, H, Ni, N // Ni, D) * scale  # (B, H, Ni, N/Ni, D)
    s = qx @ k_sel.transpose(-1, -2)  # (B, H, Ni, N/Ni, S)
    if bias is not None:
        s = s + _bias_rows(bias.to(work), B, H, N, Ni > 1)
    s = s.masked_fill(~valid.unsqueeze(3), float("-inf"))  # (B, H, Ni, N/Ni, S)
    shift = s.detach().amax(dim=-1, keepdim=True).nan_to_num(neginf=0.0)  # 0 in an empty row
    p = torch.exp(s - shift)  # (B, H, Ni, N/Ni, S); exactly 0 on empty slots
    row_sum = p.sum(dim=-1, keepdim=True)  # >= 1 with a key, 0 without
    out = (p @ v_sel) / row_sum.clamp(min=1.0)  # (B, H, Ni, N/Ni, Dv)
    out = out.reshape(B, H, N, Dv).to(q.dtype)  # (B, H, N, Dv)
    if not return_lse:
        return out
    return out, (torch.log(row_sum) + shift).reshape(B, H, N)  # (B, H, N)
