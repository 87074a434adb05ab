r"""RCMHA's relative-score attention on torch tensors: the ``relative_attention`` op of the torch
backend (see :func:`qkv.reference.heads.relative_conv.relative_attention`).

Two ways to compute it:

* the fused Triton kernel of :mod:`qkv.backends.torch.triton.relative` (forward only, the
  convolutions and the relative shift in the kernel, no ``N x M`` array) on CUDA tensors of
  float16, bfloat16 or float32, and on float32 CPU tensors under ``TRITON_INTERPRET=1``, when no
  input needs gradients and ``D, Dv <= 128``;
* otherwise a few torch operations (autograd-friendly) in float32, or float64 for float64
  inputs: the convolutions as shifted sums, the three score terms (the position term gathered
  from $\tilde Q R^\top$ along the distance), a masked softmax and a batched product.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

from qkv.backends.torch._attention import _interpreting
from qkv.backends.torch._tensors import on_device

if TYPE_CHECKING:
    import torch

    Tensor = torch.Tensor


def _conv(x: Tensor, weight: Tensor | None, work: torch.dtype) -> Tensor:
    r"""$y_t = \sum_s w_{:,s} \odot x_{t-(K-1)+s}$ along axis 2 of ``x (B, H, L, C)`` in
    ``work``; ``weight (C, K)`` or ``None`` (no convolution)."""
    import torch

    x = x.to(work)
    if weight is None:
        return x
    L, K = x.shape[2], weight.shape[1]
    w = weight.to(work)
    y = torch.zeros_like(x)  # (B, H, L, C)
    for s in range(K):
        lag = K - 1 - s
        if lag < L:
            y = y + torch.nn.functional.pad(x[:, :, : L - lag], (0, 0, lag, 0)) * w[:, s]
    return y


def kernel_applies(q: Tensor, k: Tensor, v: Tensor, *tables: Tensor | None) -> bool:
    """Whether the Triton kernel runs for these tensors (see the module docstring)."""
    import torch

    tensors = [t for t in (q, k, v, *tables) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    if max(q.shape[-1], v.shape[-1]) > 128 or importlib.util.find_spec("triton") is None:
        return False
    if any(t.device != q.device for t in tensors):
        return False
    if q.device.type == "cuda":
        return q.dtype in (torch.float16, torch.bfloat16, torch.float32)
    if q.device.type != "cpu" or not _interpreting() or q.dtype != torch.float32:
        return False
    from qkv.backends.torch.triton import relative

    return relative.interpreted()


def relative_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    r: Tensor,
    u: Tensor,
    b: Tensor,
    *,
    conv_q: Tensor | None = None,
    conv_k: Tensor | None = None,
    conv_v: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    r"""Relative-score attention with optional depth-wise causal convolutions; arguments and
    result as the reference's
    :func:`~qkv.reference.heads.relative_conv.relative_attention`.

    ``q (B, H, N, D)``, ``k (B, Hkv, M, D)``, ``v (B, Hkv, M, Dv)``, ``r (H, L, D)``,
    ``u (H, D)``, ``b (H, Lb)``, kernels ``(D, K)`` / ``(Dv, K)``; returns ``O (B, H, N, Dv)``
    in the dtype of ``q``.
    """
    import torch

    B, H, N, D = q.shape
    Hkv, M, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = H // Hkv
    scale = D**-0.5 if scale is None else float(scale)
    r, u, b = (on_device(t, q.device) for t in (r, u, b))
    convs = [None if w is None else on_device(w, q.device) for w in (conv_q, conv_k, conv_v)]
    if kernel_applies(q, k, v, r, u, b, *convs):
        from qkv.backends.torch.triton.relative import relative_forward

        identity = [
            torch.ones((c, 1), dtype=q.dtype, device=q.device) if w is None else w
            for w, c in zip(convs, (D, D, Dv), strict=True)
        ]
        return relative_forward(q, k, v, r, u, b, *identity, scale=scale)
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    qc, kc, vc = (_conv(x, w, work) for x, w in zip((q, k, v), convs, strict=True))
    qu = (qc + u.to(work)[None, :, None]).reshape(B, Hkv, G, N, D)  # (B, Hkv, G, N, D)
    content = (qu @ kc[:, :, None].transpose(-1, -2)).reshape(B, H, N, M)  # (B, H, N, M)
    i = torch.arange(N, device=q.device)[:, None] + (M - N)
    delta = i - torch.arange(M, device=q.device)[None, :]  # (N, M)
    visible = delta >= 0
    index = delta.clamp(min=0)  # (N, M)
    qr = qc @ r.to(work).transpose(-1, -2)[None]  # (B, H, N, L)
    position = torch.gather(qr, -1, index.expand(B, H, N, M))  # (B, H, N, M)
    bias = b.to(work)[:, index]  # (H, N, M)
    s = torch.where(visible, scale * (content + position + bias), float("-inf"))
    p = torch.softmax(s, dim=-1)  # every row sees key 0
    out = p.reshape(B, Hkv, G, N, M) @ vc[:, :, None]  # (B, Hkv, G, N, Dv)
    return out.reshape(B, H, N, Dv).to(q.dtype)  # (B, H, N, Dv)
