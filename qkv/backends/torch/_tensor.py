r"""Exact tensor (Kronecker) attention on torch tensors: the ``tensor`` op of the torch backend.

$o_a = \sum_{i,j}\operatorname{softmax}_{(i,j)}(S_a)\,V_1[i]\circ V_2[j]$ with
$S_{a,ij} = \text{scale}\sum_l Q_{al} K_{1,il} K_{2,jl}$, exactly as
:func:`qkv.reference.forms.tensor_attention.tensor`: ``q (B, H, N, D)``, ``k1``/``k2
(B, Hkv, M, D)``, ``v1``/``v2 (B, Hkv, M, Dv)``, query head ``h`` reading KV head
``h // (H / Hkv)``. No ``N x M**2`` array is formed on either path:

* the Triton kernel of :mod:`qkv.backends.torch.triton.tensor` (forward only, online softmax
  tile by tile) under the rules of ``flash``'s kernel
  (:func:`qkv.backends.torch._attention.kernel_applies`: no input requiring grad while grad
  mode is on, head dims up to 256, a CUDA tensor or a CPU tensor under the Triton interpreter,
  float16/float32, and bfloat16 on CUDA);
* otherwise a streaming torch form (autograd-friendly), in float64 for float64 inputs and
  float32 otherwise. It walks the first keys $i$ in blocks of ``bi``, each block a score tile
  $S_{\cdot,i\cdot} = (Q\circ K_1[i])\,K_2^\top$ of ``(N, bi, M)`` per head; ``bi`` keeps
  each of a block's arrays (scores, $Q\circ K_1$, $P V_2$) within :data:`TILE_ELEMENTS`
  elements over all heads. A first pass takes the row maxima
  $m_a = \max_{ij} S_{a,ij}$ (without autograd: the result does not depend on them); a second
  sums, block by block,

  $$
  \ell_a = \sum_{ij} e^{S_{a,ij} - m_a},\qquad
  \tilde o_a = \sum_i V_1[i]\circ\Big(\sum_j e^{S_{a,ij} - m_a} V_2[j]\Big),
  $$

  and returns $\tilde o / \ell$. When autograd records, each block runs under
  :func:`torch.utils.checkpoint.checkpoint`, so backward recomputes the block's tile instead
  of keeping it: memory stays $O(N D_v)$ per block plus one tile.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qkv.backends.torch._attention import _work_dtype, kernel_applies

if TYPE_CHECKING:
    import torch

    Tensor = torch.Tensor

__all__ = ["TILE_ELEMENTS", "tensor"]

#: Most elements of one block's arrays, ``(B, H, N, bi, max(M, D, Dv))``, in the streaming form.
TILE_ELEMENTS = 2**22


def _block_scores(qg: Tensor, k1: Tensor, k2: Tensor) -> Tensor:
    r"""Scores of a block of first keys, $S_{a,ij} = \sum_l Q_{al} K_{1,il} K_{2,jl}$.

    ``qg (B, Hkv, G, N, D)`` (scaled, grouped queries), ``k1 (B, Hkv, bi, D)`` (the block),
    ``k2 (B, Hkv, M, D)``; returns ``(B, Hkv, G, N, bi, M)``.
    """
    qk = qg[:, :, :, :, None, :] * k1[:, :, None, None]  # (B, Hkv, G, N, bi, D): Q ∘ K1[i]
    return qk @ k2[:, :, None, None].transpose(-1, -2)  # (..., bi, D) @ (B, Hkv, 1, 1, D, M)


def _block_sums(
    qg: Tensor, k1: Tensor, k2: Tensor, v1: Tensor, v2: Tensor, m: Tensor
) -> tuple[Tensor, Tensor]:
    r"""One block's share of $\ell$ ``(B, Hkv, G, N)`` and $\tilde o$ ``(B, Hkv, G, N, Dv)``.

    ``qg (B, Hkv, G, N, D)``, ``k1 (B, Hkv, bi, D)`` and ``v1 (B, Hkv, bi, Dv)`` (the block),
    ``k2 (B, Hkv, M, D)``, ``v2 (B, Hkv, M, Dv)``, ``m (B, Hkv, G, N)`` the row maxima.
    """
    p = (_block_scores(qg, k1, k2) - m[..., None, None]).exp()  # (B, Hkv, G, N, bi, M)
    pv = p @ v2[:, :, None, None]  # (B, Hkv, G, N, bi, Dv): sum_j P_aij V2[j]
    out = (pv * v1[:, :, None, None]).sum(dim=-2)  # (B, Hkv, G, N, Dv): sum_i V1[i] ∘ (P V2)
    return p.sum(dim=(-2, -1)), out


def _streamed(q: Tensor, k1: Tensor, k2: Tensor, v1: Tensor, v2: Tensor, scale: float) -> Tensor:
    """The streaming torch form (see the module docstring); ``O (B, H, N, Dv)`` in the dtype
    of ``q``."""
    import torch
    from torch.utils.checkpoint import checkpoint

    B, H, N, D = q.shape
    Hkv, M, Dv = k1.shape[1], k1.shape[2], v1.shape[3]
    work = _work_dtype(q.dtype)
    qg = scale * q.to(work).reshape(B, Hkv, H // Hkv, N, D)  # (B, Hkv, G, N, D)
    k1, k2, v1, v2 = (t.to(work) for t in (k1, k2, v1, v2))
    bi = max(1, min(M, TILE_ELEMENTS // (B * H * N * max(M, D, Dv))))
    blocks = [slice(i, i + bi) for i in range(0, M, bi)]
    with torch.no_grad():  # row maxima m (B, Hkv, G, N), block by block
        m = torch.full((B, Hkv, H // Hkv, N), float("-inf"), dtype=work, device=q.device)
        for i in blocks:
            m = torch.maximum(m, _block_scores(qg, k1[:, :, i], k2).amax(dim=(-2, -1)))
    recording = torch.is_grad_enabled() and any(t.requires_grad for t in (qg, k1, k2, v1, v2))
    l_sum = qg.new_zeros((B, Hkv, H // Hkv, N))  # (B, Hkv, G, N)
    o_sum = qg.new_zeros((B, Hkv, H // Hkv, N, Dv))  # (B, Hkv, G, N, Dv)
    for i in blocks:
        args = (qg, k1[:, :, i], k2, v1[:, :, i], v2, m)
        if recording:
            l_part, o_part = checkpoint(_block_sums, *args, use_reentrant=False)
        else:
            l_part, o_part = _block_sums(*args)
        l_sum = l_sum + l_part
        o_sum = o_sum + o_part
    out = o_sum / l_sum[..., None]  # (B, Hkv, G, N, Dv)
    return out.reshape(B, H, N, Dv).to(q.dtype)


def tensor(
    q: Tensor,
    k1: Tensor,
    k2: Tensor,
    v1: Tensor,
    v2: Tensor,
    *,
    scale: float = 1.0,
) -> Tensor:
    r"""Exact tensor attention on torch tensors; arguments and result as the reference's
    :func:`~qkv.reference.forms.tensor_attention.tensor`.

    ``q (B, H, N, D)``, ``k1``/``k2 (B, Hkv, M, D)``, ``v1``/``v2 (B, Hkv, M, Dv)`` give
    ``O (B, H, N, Dv)`` in the dtype of ``q``; $O(N M^2 (D + D_v))$ time and no
    ``N x M**2`` array. The Triton kernel runs where it applies (see the module docstring),
    else the streaming torch form, which supports autograd.
    """
    scale = float(scale)
    no_mask = {"mask": None, "return_weights": False, "kernel_module": "tensor"}
    if kernel_applies(q, k1, v1, **no_mask) and kernel_applies(q, k2, v2, **no_mask):
        from qkv.backends.torch.triton.tensor import tensor_forward

        return tensor_forward(q, k1, k2, v1, v2, scale=scale)
    return _streamed(q, k1, k2, v1, v2, scale)
