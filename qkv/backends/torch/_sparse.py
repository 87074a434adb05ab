r"""Attention over per-head selected keys on torch tensors: the torch ``sparse_attention`` op.

Same arguments and results as :func:`qkv.reference.sparse.selected_keys`: each query head
gathers its selected keys and values (``-1`` = an empty slot) from its KV group and takes the
softmax over them alone; a row with no key gives zeros and ``lse = -inf``. A few torch
operations (gather, masked max-subtracted softmax, a batched product), autograd-friendly;
float64 in float64, float32 otherwise. Only the selected ``S`` keys of each row are touched:
they are gathered with one ``index_select`` per ``K`` and ``V`` from the flat
``(B * Hkv * M, D)`` views, scored with one batched product, and the optional per-slot ``bias``
(``(B, H, S)``, ``(B, Hkv, S)`` or ``(B, H, N, S)``) is added to the scaled scores before the
empty slots are masked (an empty slot's gathered value row is zeroed, so that whatever the row
it stands on holds, it adds nothing). When the query heads of each KV group hold one list
(per-head lists, the lab engine's case), each list is gathered once for the whole group and its
``G`` heads are scored as rows of one product: a quarter of the gathering at ``G = 4``. The row sum of the max-subtracted weights is at least 1 in a row with a
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
def _row_base(B: int, L: int, Hkv: int, M: int, device: str) -> Tensor:
    """``(B, L, 1, 1)`` int64: the first row, in ``(B*Hkv*M, D)``, of the KV head that each of
    the ``L`` lists of a batch entry reads (``L = H`` lists, one a head, or ``L = Hkv``)."""
    import torch

    b = torch.arange(B, device=device)[:, None]  # (B, 1)
    g = torch.arange(L, device=device)[None, :] // (L // Hkv)  # (1, L)
    return ((b * Hkv + g) * M)[:, :, None, None]  # (B, L, 1, 1)


def _shared_by_groups(idx: Tensor, Hkv: int) -> bool:
    """Whether the query heads of every KV group hold one list (``idx (B, H, 1, S)``)."""
    import torch

    B, H, _, S = idx.shape
    if H == Hkv:
        return False
    by_group = idx.reshape(B, Hkv, H // Hkv, S)  # (B, Hkv, G, S)
    return torch.equal(by_group, by_group[:, :, :1].expand_as(by_group))


def _bias_rows(bias: Tensor, B: int, H: int, N: int, L: int, Ni: int) -> Tensor:
    """A checked bias laid out as the scores, ``(B, L, Ni, R, S)`` with ``R = (H / L)(N / Ni)``
    rows per list: query head ``h`` of list ``l`` is ``l (H / L) + p``, row ``r = p (N / Ni) + i``."""
    S = bias.shape[-1]
    if bias.ndim == 3 and bias.shape[1] != H:  # (B, Hkv, S): shared by a group's heads
        bias = bias.repeat_interleave(H // bias.shape[1], dim=1)  # (B, H, S)
    Nb = N if bias.ndim == 4 else 1
    rows = bias.reshape(B, L, H // L, Nb, S).expand(B, L, H // L, N, S)  # (B, L, H/L, N, S)
    return rows.reshape(B, L, Ni, H // L * N // Ni, S)  # (B, L, Ni, R, S)


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
    L = Hkv if Ni == 1 and _shared_by_groups(idx, Hkv) else H  # distinct lists per batch entry
    R = H // L * N // Ni  # query rows reading one list
    idx = idx.reshape(B, L, H // L, Ni, S)[:, :, 0]  # (B, L, Ni, S): one copy of each list
    empty = idx < 0  # (B, L, Ni, S)
    rows = idx.clamp(min=0) + _row_base(B, L, Hkv, M, str(q.device))  # (B, L, Ni, S)
    rows = rows.reshape(-1)  # (B*L*Ni*S,): rows of the flat (B*Hkv*M, D) views
    k_sel = k.reshape(B * Hkv * M, D).index_select(0, rows).to(work)  # (B*L*Ni*S, D)
    v_sel = v.reshape(B * Hkv * M, Dv).index_select(0, rows).to(work)  # (B*L*Ni*S, Dv)
    k_sel = k_sel.view(B, L, Ni, S, D)  # (B, L, Ni, S, D)
    v_sel = v_sel.view(B, L, Ni, S, Dv)  # (B, L, Ni, S, Dv)
    has_empty = bool(empty.any())
    if has_empty:  # an empty slot's value row adds 0, whatever the row it stands on holds
        v_sel = v_sel.masked_fill(empty.unsqueeze(-1), 0.0)
    qx = q.to(work).reshape(B, L, H // L, Ni, N // Ni, D)  # (B, L, H/L, Ni, N/Ni, D)
    qx = qx.transpose(2, 3).reshape(B, L, Ni, R, D) * scale  # (B, L, Ni, R, D)
    s = qx @ k_sel.transpose(-1, -2)  # (B, L, Ni, R, S)
    if bias is not None:
        s = s + _bias_rows(bias.to(work), B, H, N, L, Ni)
    if has_empty:
        s = s.masked_fill(empty.unsqueeze(3), float("-inf"))  # (B, L, Ni, R, S)
    shift = s.detach().amax(dim=-1, keepdim=True).nan_to_num(neginf=0.0)  # 0 in an empty row
    p = torch.exp(s - shift)  # (B, L, Ni, R, S); exactly 0 on empty slots
    row_sum = p.sum(dim=-1, keepdim=True)  # >= 1 with a key, 0 without
    out = (p @ v_sel) / row_sum.clamp(min=1.0)  # (B, L, Ni, R, Dv)
    out = _heads_first(out, B, H, N, L, Ni).to(q.dtype)  # (B, H, N, Dv)
    if not return_lse:
        return out
    lse = _heads_first(torch.log(row_sum) + shift, B, H, N, L, Ni)  # (B, H, N, 1)
    return out, lse[..., 0]  # (B, H, N)


def _heads_first(x: Tensor, B: int, H: int, N: int, L: int, Ni: int) -> Tensor:
    """``(B, L, Ni, R, C)`` rows of the lists back to ``(B, H, N, C)``."""
    x = x.reshape(B, L, Ni, H // L, N // Ni, x.shape[-1])  # (B, L, Ni, H/L, N/Ni, C)
    return x.transpose(2, 3).reshape(B, H, N, x.shape[-1])  # (B, H, N, C)
