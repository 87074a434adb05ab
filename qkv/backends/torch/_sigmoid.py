r"""Sigmoid attention on torch tensors: the ``sigmoid`` op of the torch backend.

$O = \sigma(\text{scale}\cdot QK^\top + A + b)\,V$ with no row normalisation, exactly as
:func:`qkv.reference.forms.sigmoid_attention.sigmoid`: queries ``(B, H, N, D)``, keys
``(B, Hkv, M, D)``, values ``(B, Hkv, M, Dv)``, grouped heads, bool or additive masks,
bottom-right ``causal``, optional ALiBi, default bias $b = -\log M$.

Two ways to compute it:

* the Triton kernel of :mod:`qkv.backends.torch.triton.sigmoid` (forward only, tile by tile, no
  ``N x M`` array) under the same conditions as ``flash``'s kernel (no mask, no weights, no
  autograd, head dims up to 256, a CUDA tensor or the Triton interpreter);
* otherwise a few torch operations (autograd-friendly): masked scores, ``torch.sigmoid``,
  a batched product with the values. Hidden entries have score $-\infty$, so their weight is
  exactly 0 and so is its gradient.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qkv.backends.torch._attention import KERNEL_MAX_HEAD_DIM, _on_device, kernel_applies, scores
from qkv.reference.forms.sigmoid_attention import default_bias

if TYPE_CHECKING:
    import torch

    Tensor = torch.Tensor

__all__ = ["KERNEL_MAX_HEAD_DIM", "sigmoid"]


def _alibi(H: int, N: int, M: int, like: Tensor) -> Tensor:
    r"""ALiBi biases $-m_h\,|i + (M - N) - j|$ ``(H, N, M)`` on the device and in the dtype of
    ``like`` (the reference's :func:`qkv.reference.core.alibi`, symmetric)."""
    import torch

    from qkv.reference.core import alibi

    return torch.from_numpy(alibi(H, N, M, symmetric=True)).to(like.device, like.dtype)


def sigmoid(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    bias: float | None = None,
    alibi: bool = False,
    return_weights: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    r"""Sigmoid attention on torch tensors; arguments and results as the reference's
    :func:`~qkv.reference.forms.sigmoid_attention.sigmoid`.

    ``q (B, H, N, D)``, ``k (B, Hkv, M, D)``, ``v (B, Hkv, M, Dv)`` give ``O (B, H, N, Dv)`` in
    the dtype of ``q`` (and ``P (B, H, N, M)`` with ``return_weights``). The explicit path
    computes in float64 for float64 inputs and float32 otherwise, and supports autograd.
    """
    import torch

    B, H, N, D = q.shape
    Hkv, M, Dv = k.shape[1], k.shape[2], v.shape[3]
    scale = D**-0.5 if scale is None else float(scale)
    b = default_bias(M) if bias is None else float(bias)
    mask = _on_device(mask, q)
    if kernel_applies(q, k, v, mask=mask, return_weights=return_weights, kernel_module="sigmoid"):
        from qkv.backends.torch.triton.sigmoid import sigmoid_forward

        return sigmoid_forward(q, k, v, causal=causal, scale=scale, bias=b, alibi=alibi)
    s = scores(q, k, mask, causal, scale)  # (B, H, N, M), float32 or float64
    if alibi:
        s = s + _alibi(H, N, M, s)  # (H, N, M) broadcast
    p = torch.sigmoid(s + b)  # (B, H, N, M); sigma(-inf) = 0
    vw = v.to(s.dtype)[:, :, None]  # (B, Hkv, 1, M, Dv)
    out = (p.reshape(B, Hkv, H // Hkv, N, M) @ vw).reshape(B, H, N, Dv)  # (B, H, N, Dv)
    if return_weights:
        return out.to(q.dtype), p.to(q.dtype)
    return out.to(q.dtype)
