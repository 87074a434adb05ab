r"""Neighborhood attention on torch tensors: the ``neighborhood`` op of the torch backend.

Same semantics as :func:`qkv.reference.local.neighborhood_attention.neighborhood` (NATTEN's windows per
axis, 1-3 spatial axes, grouped heads). Two ways to compute it:

* the Triton kernel of :mod:`qkv.backends.torch.triton.neighborhood` (forward only, neighbours
  at computed addresses, online softmax, no ``N x N`` array) under the conditions of ``flash``'s
  kernel: no weights asked for, no autograd, head dims up to 256, a CUDA tensor or the Triton
  interpreter;
* otherwise a gather form (autograd-friendly, any float dtype): the ``(N, K)`` neighbour table
  of :func:`qkv.reference.local.neighborhood_attention.neighbor_indices` indexes the keys and values, then
  scores, softmax over the ``K`` slots and a weighted sum. It holds ``N x K`` keys at once,
  never ``N x N``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qkv.backends.torch._attention import kernel_applies
from qkv.reference.local.neighborhood_attention import check_neighborhood, neighbor_indices

if TYPE_CHECKING:
    import torch

    Tensor = torch.Tensor


def _padded(values: tuple, fill: int) -> tuple:
    """Per-axis values padded in front to three axes."""
    return (fill,) * (3 - len(values)) + tuple(values)


def neighborhood(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    kernel_size: int | tuple[int, ...] = 7,
    dilation: int | tuple[int, ...] = 1,
    stride: int | tuple[int, ...] = 1,
    causal: bool | tuple[bool, ...] = False,
    scale: float | None = None,
    return_weights: bool = False,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, ...]:
    r"""Neighborhood attention on torch tensors; arguments and results as the reference's
    :func:`~qkv.reference.local.neighborhood_attention.neighborhood`.

    ``q (B, H, *spatial, D)``, ``k (B, Hkv, *spatial, D)``, ``v (B, Hkv, *spatial, Dv)`` give
    ``O (B, H, *spatial, Dv)`` in the dtype of ``q``, with ``P (B, H, *spatial, K)`` and
    ``lse (B, H, *spatial)`` as asked. The gather path computes in float64 for float64 inputs
    and float32 otherwise, and supports autograd.
    """
    import torch

    dims = check_neighborhood(
        q, k, v, kernel_size=kernel_size, dilation=dilation, stride=stride, causal=causal,
        scale=scale,
    )  # fmt: skip
    B, H, Hkv, spatial, D, Dv = dims[:6]
    N, K, G = dims.N, dims.K, dims.group
    scale = D**-0.5 if scale is None else float(scale)
    q3 = q.reshape(B, H, N, D)  # (B, H, N, D)
    k3 = k.reshape(B, Hkv, N, D)  # (B, Hkv, N, D)
    v3 = v.reshape(B, Hkv, N, Dv)  # (B, Hkv, N, Dv)
    if kernel_applies(q3, k3, v3, mask=None, return_weights=return_weights,
                      kernel_module="neighborhood"):  # fmt: skip
        from qkv.backends.torch.triton.neighborhood import neighborhood_forward

        out, lse = neighborhood_forward(
            q3, k3, v3, grid=_padded(spatial, 1), kernel_size=_padded(dims.kernel_size, 1),
            dilation=_padded(dims.dilation, 1), stride=_padded(dims.stride, 1),
            causal=_padded(dims.causal, False), scale=scale,
        )  # fmt: skip
        out = out.reshape(B, H, *spatial, Dv)  # (B, H, *spatial, Dv)
        return (out, lse.reshape(B, H, *spatial)) if return_lse else out
    keys, valid = neighbor_indices(
        spatial, kernel_size=dims.kernel_size, dilation=dims.dilation, stride=dims.stride,
        causal=dims.causal,
    )  # fmt: skip  # (N, K) each
    keys = torch.from_numpy(keys).to(q.device)
    valid = torch.from_numpy(valid).to(q.device)
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    qg = q3.to(work).reshape(B, Hkv, G, N, D)  # (B, Hkv, G, N, D)
    kn = k3.to(work)[:, :, keys]  # (B, Hkv, N, K, D)
    vn = v3.to(work)[:, :, keys]  # (B, Hkv, N, K, Dv)
    s = scale * torch.einsum("bhgnd,bhnkd->bhgnk", qg, kn)  # (B, Hkv, G, N, K)
    s = s.masked_fill(~valid, float("-inf"))  # slot 0 is always valid: no empty row
    weights = torch.softmax(s, dim=-1)  # (B, Hkv, G, N, K)
    out = torch.einsum("bhgnk,bhnkd->bhgnd", weights, vn)  # (B, Hkv, G, N, Dv)
    results = [out.reshape(B, H, *spatial, Dv).to(q.dtype)]  # (B, H, *spatial, Dv)
    if return_weights:
        results.append(weights.reshape(B, H, *spatial, K).to(q.dtype))  # (B, H, *spatial, K)
    if return_lse:
        results.append(torch.logsumexp(s, dim=-1).reshape(B, H, *spatial))  # (B, H, *spatial)
    return results[0] if len(results) == 1 else tuple(results)
