r"""KV-cache ops on torch tensors: packed quantisation, window scoring, mixed-precision attention.

Same arguments and results as :mod:`qkv.reference.kv.quantization`,
:mod:`qkv.reference.kv.window_scoring` and :mod:`qkv.reference.kv.mixed_precision`.

* ``quantize`` / ``dequantize``: torch operations doing the reference's arithmetic step for
  step in the input dtype (so the codes are the reference's); where a Triton kernel runs
  (:func:`qkv.backends.torch._attention.kernel_applies`), ``dequantize`` unpacks and rescales in
  one kernel and ``quantize`` (float32) packs in one kernel after torch's group minimum and
  maximum.
* ``window_scores``: torch operations (masked softmax of the window, column sums, pooling);
  with a kernel, the column sums run in one Triton kernel per query head (no ``W x C`` array)
  and the pooling in torch.
* ``mixed_attention``: with a kernel, one Triton kernel per query row dequantises each code
  as it reads it (online softmax over quantised then floating slots); else the codes are
  dequantised and :func:`qkv.backends.torch._attention.sdpa` runs.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from qkv.backends.torch._attention import kernel_applies
from qkv.backends.torch._attention import sdpa as _sdpa
from qkv.backends.torch._tensors import on_device
from qkv.errors import Unsupported

if TYPE_CHECKING:
    import torch

    Tensor = torch.Tensor

__all__ = ["dequantize", "mixed_attention", "quantize", "window_scores"]


def _decline_bfloat16(x: Tensor, op: str) -> None:
    """The KV ops follow the reference's dtypes (float16/32/64): bfloat16 is declined."""
    if str(x.dtype) == "torch.bfloat16":
        raise Unsupported(f"{op}: bfloat16 is not a dtype of this op (float16, float32, float64)")


def _unpack(packed: Tensor, bits: int, dim: int) -> Tensor:
    """The first ``dim`` codes of each byte row ``(..., bytes)`` as int32 ``(..., dim)``."""
    import torch

    per = 8 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits  # (per,)
    lanes = (packed.to(torch.int32)[..., None] >> shifts) & ((1 << bits) - 1)  # (..., bytes, per)
    return lanes.reshape(*packed.shape[:-1], -1)[..., :dim]  # (..., dim)


def _expand(scale: Tensor, N: int, D: int) -> Tensor:
    """Per-group parameters ``(B, H, N/gn, D/gd)`` repeated to ``(B, H, N, D)``."""
    gn, gd = N // scale.shape[2], D // scale.shape[3]
    return scale.repeat_interleave(gn, dim=2).repeat_interleave(gd, dim=3)  # (B, H, N, D)


def quantize(
    x: Tensor, *, bits: int = 4, axis: str = "token", group_size: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """``x (B, H, N, D)`` to ``(packed (B, H, N, ceil(D bits / 8)) uint8, scale, zero)``."""
    import torch

    _decline_bfloat16(x, "quantize")
    from qkv.reference.kv.quantization import check_quantize

    gn, gd = check_quantize(x, bits=bits, axis=axis, group_size=group_size)
    B, H, N, D = x.shape
    levels = (1 << bits) - 1
    g = x.reshape(B, H, N // gn, gn, D // gd, gd)  # groups as axes 3, 5
    lo = g.amin(dim=(3, 5), keepdim=True)  # (B, H, N/gn, 1, D/gd, 1)
    hi = g.amax(dim=(3, 5), keepdim=True)
    scale = (hi - lo) / levels
    shape = (B, H, N // gn, D // gd)
    fp32 = x.dtype == torch.float32  # the kernel's IEEE division is float32
    if fp32 and kernel_applies(x, x, x, mask=None, return_weights=False, kernel_module="kv"):
        from qkv.backends.torch.triton.kv import pack_forward

        s, z = scale.reshape(shape), lo.reshape(shape)
        return pack_forward(x, s, z, bits=bits), s.clone(), z.clone()
    nonzero = scale > 0
    t = (g - lo) / torch.where(nonzero, scale, torch.ones_like(scale))
    q = torch.floor(t + 0.5).clamp(0, levels)
    codes = torch.where(nonzero, q, torch.zeros_like(q)).to(torch.int32).reshape(B, H, N, D)
    per = 8 // bits
    nbytes = math.ceil(D * bits / 8)
    codes = torch.nn.functional.pad(codes, (0, nbytes * per - D))  # (B, H, N, bytes * per)
    shifts = torch.arange(per, device=x.device, dtype=torch.int32) * bits  # (per,)
    packed = (codes.reshape(B, H, N, nbytes, per) << shifts).sum(-1).to(torch.uint8)
    return packed, scale.reshape(shape), lo.reshape(shape)


def dequantize(
    packed: Tensor,
    scale: Tensor,
    zero: Tensor,
    *,
    bits: int = 4,
    axis: str = "token",
    dim: int | None = None,
) -> Tensor:
    """Rebuild ``x_hat (B, H, N, D)`` in ``scale``'s dtype."""
    from qkv.reference.kv.quantization import check_dequantize

    _decline_bfloat16(scale, "dequantize")
    D, _, _ = check_dequantize(packed, scale, zero, bits=bits, axis=axis, dim=dim)
    packed, zero = on_device(packed, scale.device), on_device(zero, scale.device)
    if kernel_applies(scale, scale, scale, mask=None, return_weights=False, kernel_module="kv"):
        from qkv.backends.torch.triton.kv import dequantize_forward

        return dequantize_forward(packed, scale, zero, bits=bits, dim=D)
    N = packed.shape[2]
    q = _unpack(packed, bits, D).to(scale.dtype)  # (B, H, N, D)
    return q * _expand(scale, N, D) + _expand(zero, N, D)


def _pool(votes: Tensor, prefix: Tensor, kernel: int, pooling: str) -> Tensor:
    """SnapKV's stride-1 pool over slots ``(B, H, C)``; slots off the prefix count as 0 in an
    average and not at all in a max; the result is ``-inf`` off the prefix."""
    import torch

    pad = kernel // 2
    if pooling == "avgpool":
        base = torch.where(prefix, votes, torch.zeros_like(votes))
        padded = torch.nn.functional.pad(base, (pad, pad))
        pooled = padded.unfold(-1, kernel, 1).sum(-1) / kernel  # (B, H, C)
    else:
        base = torch.where(prefix, votes, torch.full_like(votes, -math.inf))
        padded = torch.nn.functional.pad(base, (pad, pad), value=-math.inf)
        pooled = padded.unfold(-1, kernel, 1).amax(-1)  # (B, H, C)
    return torch.where(prefix, pooled, torch.full_like(pooled, -math.inf))


def window_scores(
    q: Tensor,
    k: Tensor,
    indices: Tensor,
    *,
    n_tokens: int | None = None,
    kernel: int = 5,
    pooling: str = "avgpool",
    scale: float | None = None,
) -> Tensor:
    """Pooled observation-window votes ``(B, H, C)`` in ``q``'s dtype."""
    import torch

    _decline_bfloat16(q, "window_scores")
    from qkv.reference.kv.window_scoring import check_window_scores

    n = check_window_scores(
        q, k, indices, n_tokens=n_tokens, kernel=kernel, pooling=pooling, scale=scale
    )
    B, H, W, D = q.shape
    group = H // k.shape[1]
    s = D**-0.5 if scale is None else float(scale)
    idx = on_device(indices, q.device).long().repeat_interleave(group, dim=1)  # (B, H, C)
    prefix = (idx >= 0) & (idx < n - W)  # (B, H, C)
    if kernel_applies(q, k, k, mask=None, return_weights=False, kernel_module="kv"):
        from qkv.backends.torch.triton.kv import window_votes

        votes = window_votes(q, k, idx, n_tokens=n, scale=s)  # (B, H, C) float32
    else:
        work = torch.float64 if q.dtype == torch.float64 else torch.float32
        kk = k.repeat_interleave(group, dim=1).to(work)  # (B, H, C, D)
        logits = (q.to(work) @ kk.transpose(-1, -2)) * s  # (B, H, W, C)
        at = n - W + torch.arange(W, device=q.device)  # (W,)
        seen = (idx[:, :, None, :] >= 0) & (idx[:, :, None, :] <= at[:, None])  # (B, H, W, C)
        logits = logits.masked_fill(~seen, -math.inf)
        peak = logits.amax(-1, keepdim=True)  # (B, H, W, 1)
        e = torch.exp(logits - torch.where(torch.isinf(peak), torch.zeros_like(peak), peak))
        total = e.sum(-1, keepdim=True)
        votes = (e / torch.where(total > 0, total, torch.ones_like(total))).sum(2)  # (B, H, C)
    return _pool(votes, prefix, kernel, pooling).to(q.dtype)


def mixed_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_codes: Tensor,
    k_scale: Tensor,
    k_zero: Tensor,
    v_codes: Tensor,
    v_scale: Tensor,
    v_zero: Tensor,
    *,
    bits: int = 4,
    key_axis: str = "channel",
    value_axis: str = "token",
    scale: float | None = None,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention over quantised then floating slots: ``O (B, H, N, Dv)`` (and ``lse``)."""
    import torch

    _decline_bfloat16(q, "mixed_attention")
    from qkv.reference.kv.mixed_precision import check_mixed_attention

    check_mixed_attention(
        q, k, v, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero,
        bits=bits, key_axis=key_axis, value_axis=value_axis, scale=scale, return_lse=return_lse,
    )  # fmt: skip
    dev = q.device
    quantized = [on_device(a, dev) for a in (k_codes, k_scale, k_zero, v_codes, v_scale, v_zero)]
    D, Dv = q.shape[3], v.shape[3]
    if kernel_applies(q, k, v, mask=None, return_weights=False, kernel_module="kv"):
        from qkv.backends.torch.triton.kv import mixed_forward

        out, lse = mixed_forward(q, k, v, *quantized, bits=bits, scale=scale)
        return (out, lse) if return_lse else out
    kc, ks, kz, vc, vs, vz = quantized
    Mq = kc.shape[2]
    k_hat = _unpack(kc, bits, D).to(q.dtype) * _expand(ks, Mq, D) + _expand(kz, Mq, D)
    v_hat = _unpack(vc, bits, Dv).to(q.dtype) * _expand(vs, Mq, Dv) + _expand(vz, Mq, Dv)
    keys = torch.cat([k_hat, k], dim=2)  # (B, Hkv, Mq + Mf, D)
    values = torch.cat([v_hat, v], dim=2)  # (B, Hkv, Mq + Mf, Dv)
    return _sdpa(q, keys, values, scale=scale, return_lse=return_lse)
