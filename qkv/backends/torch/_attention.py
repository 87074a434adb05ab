r"""Softmax attention on torch tensors: ``sdpa`` and ``flash`` of the torch backend.

Both follow :mod:`qkv.reference.core` exactly: queries ``(B, H, N, D)``, keys ``(B, Hkv, M, D)``,
values ``(B, Hkv, M, Dv)``; query head ``h`` reads KV head ``h // (H // Hkv)``; a boolean mask is
True where a query may attend, a float mask is added to the scores and ``-inf`` masks outright;
``causal`` lets query ``i`` see key ``j`` only when ``j <= i + (M - N)`` (bottom-right alignment,
which differs from torch's top-left ``is_causal`` when ``M != N``); a row that may see no key
gets zero output, zero weights and ``lse = -inf``.

Three ways to compute it live here:

* the *fused* path, :func:`torch.nn.functional.scaled_dot_product_attention`, for plain ``sdpa``
  calls: masks, causality and grouped heads are translated into its arguments, and rows that
  may see no key are given a harmless mask before the call and zeroed after it, so neither the
  output nor its gradients ever hold NaN;
* the *explicit* path, a few torch operations that spell out
  $P = \operatorname{softmax}(S)$ and $\mathrm{lse} = \log \sum_j e^{S_{ij}}$, for
  ``return_weights`` and ``return_lse``;
* the Triton kernel of :mod:`qkv.backends.torch.triton.flash`, for ``flash`` where it applies
  (see :func:`flash`).

All three support autograd except the Triton kernel, which is forward only.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import TYPE_CHECKING, Any

from qkv.backends.torch._tensors import on_device

if TYPE_CHECKING:
    import torch

    Tensor = torch.Tensor

#: Largest head dim (of queries/keys and of values) the Triton kernel handles.
KERNEL_MAX_HEAD_DIM = 256


def causal_allowed(n_queries: int, n_keys: int, device: torch.device) -> Tensor:
    """Bool ``(N, M)``: True where query ``i`` may attend key ``j``, i.e. ``j <= i + (M - N)``."""
    import torch

    i = torch.arange(n_queries, device=device)[:, None]  # (N, 1)
    j = torch.arange(n_keys, device=device)[None, :]  # (1, M)
    return j <= i + (n_keys - n_queries)  # (N, M)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic dtype of the explicit path: float64 stays float64, the rest use float32."""
    import torch

    return torch.float64 if dtype == torch.float64 else torch.float32


def _fused(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool, scale: float
) -> Tensor:
    r"""``O = softmax(scale * Q K^T + mask) V`` through torch's fused SDPA, ``(B, H, N, Dv)``.

    The caller's mask and the bottom-right causal pattern are merged into one ``attn_mask``
    broadcastable to ``(B, H, N, M)``. Rows that may see no key (``dead``) are unmasked for the
    call, so the softmax there is finite, and their output is set to zero afterwards; gradients
    into those rows are therefore zero rather than NaN. On the CPU, float16 and bfloat16 inputs
    are computed in float32 (as the reference does) and the output cast back.
    """
    import torch
    import torch.nn.functional as F

    B, H, N, D = q.shape
    Hkv, M = k.shape[1], k.shape[2]
    half = q.dtype in (torch.float16, torch.bfloat16)
    work = torch.float32 if half and q.device.type == "cpu" else q.dtype
    attn_mask = None
    dead = None
    is_causal = causal and N == M and mask is None  # top-left equals bottom-right here
    if (causal and not is_causal) or mask is not None:
        keep = causal_allowed(N, M, q.device) if causal else None  # (N, M) or None
        if mask is not None and mask.ndim < 2:  # torch wants an (N, M) tail: (M,) -> (1, M)
            mask = mask.reshape(1, *mask.shape)
        if mask is None:
            attn_mask = keep
        elif mask.dtype == torch.bool:
            attn_mask = mask if keep is None else mask & keep
            keep = attn_mask
        else:
            allowed = ~torch.isneginf(mask)  # an additive -inf masks outright
            keep = allowed if keep is None else allowed & keep
            attn_mask = torch.where(keep, mask.to(work), float("-inf"))
        if mask is not None or N > M:  # only then can a row see no key at all
            dead = ~keep.any(dim=-1, keepdim=True)  # broadcastable to (B, H, N, 1)
            if attn_mask.dtype == torch.bool:
                attn_mask = attn_mask | dead
            else:
                attn_mask = torch.where(dead, 0.0, attn_mask)
    out = F.scaled_dot_product_attention(
        q.to(work),
        k.to(work),
        v.to(work),
        attn_mask=attn_mask,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=H != Hkv,
    )  # (B, H, N, Dv)
    if dead is not None:
        out = out.masked_fill(dead, 0.0)
    return out.to(q.dtype)


def scores(q: Tensor, k: Tensor, mask: Tensor | None, causal: bool, scale: float) -> Tensor:
    r"""$S = \text{scale}\cdot QK^\top$ with the mask and the causal pattern, ``(B, H, N, M)``.

    ``q (B, H, N, D)``, ``k (B, Hkv, M, D)`` (grouped heads); a bool mask and the causal
    pattern give $-\infty$, a float mask is added (its ``-inf`` entries give $-\infty$ outright,
    so a NaN score there stays shielded). In float64 for float64 inputs, else float32.
    """
    import torch

    B, H, N, D = q.shape
    Hkv, M = k.shape[1], k.shape[2]
    work = _work_dtype(q.dtype)
    qg = q.to(work).reshape(B, Hkv, H // Hkv, N, D)  # (B, Hkv, G, N, D)
    kw = k.to(work)[:, :, None]  # (B, Hkv, 1, M, D)
    s = (scale * (qg @ kw.transpose(-1, -2))).reshape(B, H, N, M)  # (B, H, N, M)
    if mask is not None:
        if mask.dtype == torch.bool:
            s = torch.where(mask, s, float("-inf"))
        else:  # -inf masks outright, so a NaN score there stays shielded
            s = torch.where(torch.isneginf(mask), float("-inf"), s + mask.to(work))
    if causal:
        s = torch.where(causal_allowed(N, M, q.device), s, float("-inf"))
    return s


def _explicit(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    causal: bool,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Attention spelled out: ``(O (B, H, N, Dv), P (B, H, N, M), lse (B, H, N))``.

    $S = \text{scale}\cdot QK^\top$ masked to $-\infty$, $P = e^{S - m} / \sum_j e^{S_{ij} - m}$
    with $m$ the row maximum (taken as a constant for autograd: the result does not depend on
    it), $O = PV$, $\mathrm{lse} = m + \log \sum_j e^{S_{ij} - m}$. Rows with no visible key get
    $P = 0$, $O = 0$, $\mathrm{lse} = -\infty$, with finite gradients. Arithmetic in float64 for
    float64 inputs, else float32; ``O`` and ``P`` are returned in the dtype of ``q`` and ``lse``
    in the arithmetic dtype.
    """
    import torch

    B, H, N, D = q.shape
    Hkv, M, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = H // Hkv
    vw = v.to(_work_dtype(q.dtype))[:, :, None]  # (B, Hkv, 1, M, Dv)
    s = scores(q, k, mask, causal, scale)  # (B, H, N, M)
    row_max = s.detach().amax(dim=-1, keepdim=True)  # (B, H, N, 1)
    shift = torch.where(torch.isneginf(row_max), 0.0, row_max)  # a row with no key: shift 0
    p = torch.exp(s - shift)  # (B, H, N, M)
    row_sum = p.sum(dim=-1, keepdim=True)  # (B, H, N, 1)
    alive = row_sum > 0
    safe_sum = torch.where(alive, row_sum, 1.0)
    weights = p / safe_sum  # (B, H, N, M)
    out = (weights.reshape(B, Hkv, G, N, M) @ vw).reshape(B, H, N, Dv)  # (B, H, N, Dv)
    lse = torch.where(alive, torch.log(safe_sum) + shift, float("-inf"))[..., 0]  # (B, H, N)
    return out.to(q.dtype), weights.to(q.dtype), lse


def _on_device(mask: Any, q: Tensor) -> Tensor | None:
    """The mask as a tensor on the device of ``q`` (it may come as a NumPy array)."""
    return None if mask is None else on_device(mask, q.device)


def sdpa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    return_weights: bool = False,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, ...]:
    r"""Scaled dot-product attention on torch tensors, with autograd.

    $O = \operatorname{softmax}(\text{scale}\cdot QK^\top + \text{mask})\,V$; arguments, shapes
    and results as :func:`qkv.reference.core.sdpa`: ``q (B, H, N, D)``, ``k (B, Hkv, M, D)``,
    ``v (B, Hkv, M, Dv)``, ``mask`` broadcastable to ``(B, H, N, M)``; returns
    ``O (B, H, N, Dv)`` in the dtype of ``q``, or ``(O, P)``, ``(O, lse)``, ``(O, P, lse)`` with
    ``P (B, H, N, M)`` in the dtype of ``q`` and ``lse (B, H, N)`` in float64 for float64 inputs
    and float32 otherwise.

    Without ``return_weights``/``return_lse`` this runs torch's fused
    ``scaled_dot_product_attention`` (``enable_gqa`` for grouped heads, a bool mask for the
    bottom-right causal pattern when ``M != N``); with them, an explicit float32/float64
    softmax. On the fused path NaN inputs propagate as torch propagates them (the mask is added
    to the scores, so a NaN key also reaches rows where that key is masked); the explicit path
    follows the reference there too.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    mask = _on_device(mask, q)
    if not (return_weights or return_lse):
        return _fused(q, k, v, mask, causal, scale)
    out, weights, lse = _explicit(q, k, v, mask, causal, scale)
    return (out, *([weights] if return_weights else []), *([lse] if return_lse else []))


def _interpreting() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for the Triton interpreter (read as triton reads it)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def kernel_applies(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None,
    return_weights: bool,
    kernel_module: str = "flash",
) -> bool:
    """Whether the Triton kernel of ``qkv.backends.torch.triton.<kernel_module>`` runs for these
    arguments (see :func:`flash`'s docstring; ``sigmoid`` uses the same rules)."""
    import torch

    if mask is not None or return_weights:
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return False
    if max(q.shape[-1], v.shape[-1]) > KERNEL_MAX_HEAD_DIM:
        return False
    if not (q.device == k.device == v.device):
        return False
    if q.device.type == "cuda":
        dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)
    elif q.device.type == "cpu" and _interpreting():
        dtypes = (torch.float16, torch.float32)  # the interpreter has no bfloat16 maths
    else:
        return False
    if q.dtype not in dtypes or importlib.util.find_spec("triton") is None:
        return False
    kernel = importlib.import_module(f"qkv.backends.torch.triton.{kernel_module}")

    # The interpreter is chosen when the kernel is decorated, i.e. when that module is imported.
    return q.device.type == "cuda" or kernel.interpreted()


def flash(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    return_weights: bool = False,
    return_lse: bool = False,
    block_q: int = 64,
    block_k: int = 64,
) -> Tensor | tuple[Tensor, ...]:
    r"""Memory-efficient softmax attention; same arguments and results as :func:`sdpa`.

    Shapes as :func:`qkv.reference.core.flash`: ``q (B, H, N, D)``, ``k (B, Hkv, M, D)``,
    ``v (B, Hkv, M, Dv)`` give ``O (B, H, N, Dv)`` and, with ``return_lse``, ``lse (B, H, N)``.

    Which path runs:

    * the **Triton kernel** (online softmax tile by tile, forward only, no ``N x M`` array) when
      there is no ``mask``, no ``return_weights``, no input that requires grad while grad mode
      is on, head dims ``D`` and ``Dv`` of at most 256, triton is installed, and either the
      tensors are on a CUDA device (float16, bfloat16 or float32) or they are CPU tensors and
      the Triton interpreter was on (``TRITON_INTERPRET=1`` when the kernel module was first
      imported; float16 or float32). ``block_q``/``block_k`` set its tile sizes (see
      :func:`qkv.backends.torch.triton.flash.flash_forward`);
    * otherwise **torch's path of** :func:`sdpa` (fused SDPA, or the explicit softmax for
      ``return_weights``/``return_lse``), which gives the same results and supports autograd;
      the block sizes then play no part.
    """
    mask = _on_device(mask, q)
    if not kernel_applies(q, k, v, mask=mask, return_weights=return_weights):
        return sdpa(
            q,
            k,
            v,
            mask=mask,
            causal=causal,
            scale=scale,
            return_weights=return_weights,
            return_lse=return_lse,
        )
    from qkv.backends.torch.triton.flash import flash_forward

    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out, lse = flash_forward(q, k, v, causal=causal, scale=scale, block_q=block_q, block_k=block_k)
    return (out, lse) if return_lse else out
