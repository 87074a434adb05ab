r"""Triton kernels of the KV-cache ops: code packing, unpacking, window votes, mixed attention.

* ``_pack_kernel``: program per token row; for each byte, the $8/b$ codes
  $\operatorname{clip}(\lfloor (x - z)/s + \tfrac12\rfloor, 0, 2^b - 1)$ (IEEE division,
  ``div_rn``, as the reference's) shifted into place and summed. The group minimum and maximum
  come from torch.
* ``_unpack_kernel``: program per token row, $\hat x = q\,s + z$ with $q$ shifted out of its
  byte and $(s, z)$ of the element's group (group sizes ``gn`` tokens by ``gd`` channels).
* ``_window_kernel``: program per query head; for each window query, one pass over the slots
  for the running maximum and normaliser (base 2), a second that adds the probabilities to the
  head's votes in place (the program owns the row). Causality from the slots' token indices.
* ``_mixed_kernel``: program per query row; an online softmax (base 2) over the quantised slots,
  each key and value code dequantised as it is loaded, then over the floating slots. Output
  normalised, log-sum-exp (natural) in float32.

Arithmetic is float32. Loads are computed offsets and gathers through loaded integers (the
token indices), which the Triton interpreter runs too. This module imports triton; import it
only when a kernel is about to run.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import triton
import triton.language as tl

from qkv import _outputs
from qkv.backends.torch.triton.flash import runs_interpreted

if TYPE_CHECKING:
    import torch

LOG2E = 1.4426950408889634


def _pow2(n: int) -> int:
    return max(16, 1 << (max(n, 1) - 1).bit_length())


@triton.jit
def _pack_kernel(
    x_ptr, s_ptr, z_ptr, p_ptr,
    n_heads, n_tokens, head_dim, n_bytes, gn, gd, n_gn, n_gd, levels,
    BITS: tl.constexpr, PER: tl.constexpr, BLOCK_B: tl.constexpr,
):  # fmt: skip
    """Row ``(b, h, n)`` of contiguous ``x (B, H, N, D)`` float32 into ``packed`` bytes."""
    row = tl.program_id(0).to(tl.int64)
    n = row % n_tokens
    bh = row // n_tokens
    byte = tl.arange(0, BLOCK_B)  # (BLOCK_B,)
    acc = tl.zeros((BLOCK_B,), tl.int32)
    for lane in tl.static_range(PER):
        d = byte * PER + lane
        ok = d < head_dim
        x = tl.load(x_ptr + row * head_dim + d, mask=ok, other=0.0)
        g = (bh * n_gn + n // gn) * n_gd + d // gd  # the element's group
        s = tl.load(s_ptr + g, mask=ok, other=0.0)
        z = tl.load(z_ptr + g, mask=ok, other=0.0)
        t = tl.math.div_rn(x - z, tl.where(s > 0, s, 1.0))
        code = tl.minimum(tl.maximum(tl.floor(t + 0.5), 0.0), levels)
        code = tl.where(ok & (s > 0), code, 0.0).to(tl.int32)
        acc += code << (lane * BITS)
    tl.store(p_ptr + row * n_bytes + byte, acc.to(tl.uint8), mask=byte < n_bytes)


@triton.jit
def _unpack_kernel(
    p_ptr, s_ptr, z_ptr, o_ptr,
    n_tokens, head_dim, n_bytes, gn, gd, n_gn, n_gd,
    BITS: tl.constexpr, PER: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Row ``(b, h, n)`` of contiguous ``packed`` into ``out (B, H, N, D)``."""
    row = tl.program_id(0).to(tl.int64)
    n = row % n_tokens
    bh = row // n_tokens
    d = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    ok = d < head_dim
    byte = tl.load(p_ptr + row * n_bytes + d // PER, mask=ok, other=0).to(tl.int32)
    code = (byte >> ((d % PER) * BITS)) & ((1 << BITS) - 1)
    g = (bh * n_gn + n // gn) * n_gd + d // gd
    s = tl.load(s_ptr + g, mask=ok, other=0.0)
    z = tl.load(z_ptr + g, mask=ok, other=0.0)
    out = code.to(s.dtype) * s + z
    tl.store(o_ptr + row * head_dim + d, out, mask=ok)


@triton.jit
def _window_kernel(
    q_ptr, k_ptr, idx_ptr, votes_ptr,
    n_heads, group, n_window, n_slots, head_dim, start, scale_log2,
    BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Votes of query head ``(b, h)``: contiguous ``q (B, H, W, D)``, ``k (B, Hkv, C, D)``,
    ``idx (B, H, C)`` int64 (per query head), ``votes (B, H, C)`` float32 zeroed."""
    bh = tl.program_id(0).to(tl.int64)
    b = bh // n_heads
    hk = b * (n_heads // group) + (bh % n_heads) // group
    d = tl.arange(0, BLOCK_D)
    for i in range(n_window):
        q = tl.load(q_ptr + (bh * n_window + i) * head_dim + d, mask=d < head_dim, other=0.0)
        q = q.to(tl.float32) * scale_log2
        at = start + i
        m = -float("inf")
        ell = 0.0
        for c0 in range(0, n_slots, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            t = tl.load(idx_ptr + bh * n_slots + c, mask=c < n_slots, other=-1)
            seen = (t >= 0) & (t <= at)
            kt = tl.load(
                k_ptr + (hk * n_slots + c[:, None]) * head_dim + d[None, :],
                mask=seen[:, None] & (d[None, :] < head_dim),
                other=0.0,
            )
            s = tl.where(seen, tl.sum(kt.to(tl.float32) * q[None, :], axis=1), -float("inf"))
            m_new = tl.maximum(m, tl.max(s, axis=0))
            shift = tl.where(m_new == -float("inf"), 0.0, m_new)
            ell = ell * tl.exp2(m - shift) + tl.sum(tl.exp2(s - shift), axis=0)
            m = m_new
        if ell > 0:
            for c0 in range(0, n_slots, BLOCK_C):
                c = c0 + tl.arange(0, BLOCK_C)
                t = tl.load(idx_ptr + bh * n_slots + c, mask=c < n_slots, other=-1)
                seen = (t >= 0) & (t <= at)
                kt = tl.load(
                    k_ptr + (hk * n_slots + c[:, None]) * head_dim + d[None, :],
                    mask=seen[:, None] & (d[None, :] < head_dim),
                    other=0.0,
                )
                s = tl.sum(kt.to(tl.float32) * q[None, :], axis=1)
                p = tl.where(seen, tl.exp2(s - m) / ell, 0.0)
                old = tl.load(votes_ptr + bh * n_slots + c, mask=c < n_slots, other=0.0)
                tl.store(votes_ptr + bh * n_slots + c, old + p, mask=c < n_slots)


@triton.jit
def _dequantized_tile(
    c_ptr, s_ptr, z_ptr, kv, j, ok_j, e, dim, n_quant, n_bytes, gn, gd, n_gn, n_gd,
    BITS: tl.constexpr, PER: tl.constexpr,
):  # fmt: skip
    """Quantised slots ``j`` of KV head ``kv = b * Hkv + g`` dequantised: a
    ``(BLOCK_S, BLOCK_E)`` float32 tile (channels ``e``)."""
    ok = ok_j[:, None] & (e[None, :] < dim)
    rows = kv * n_quant + j[:, None]  # (BLOCK_S, 1): byte rows of the codes
    byte = tl.load(c_ptr + rows * n_bytes + e[None, :] // PER, mask=ok, other=0)
    code = (byte.to(tl.int32) >> ((e[None, :] % PER) * BITS)) & ((1 << BITS) - 1)
    grp = (kv * n_gn + j[:, None] // gn) * n_gd + e[None, :] // gd  # the element's group
    s = tl.load(s_ptr + grp, mask=ok, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + grp, mask=ok, other=0.0).to(tl.float32)
    return code.to(tl.float32) * s + z


@triton.jit
def _mixed_kernel(
    q_ptr, k_ptr, v_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, o_ptr, lse_ptr,
    n_heads, group, n_queries, n_quant, n_float, head_dim, value_dim, k_bytes, v_bytes,
    kgn, kgd, k_ngn, k_ngd, vgn, vgd, v_ngn, v_ngd, scale_log2,
    BITS: tl.constexpr, PER: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """Row ``(b, h, i)``: every array contiguous; ``o (B, H, N, Dv)``, ``lse (B, H, N)`` f32."""
    row = tl.program_id(0).to(tl.int64)
    bh = row // n_queries
    b = bh // n_heads
    kv = b * (n_heads // group) + (bh % n_heads) // group  # the KV head, as b * Hkv + g
    d = tl.arange(0, BLOCK_D)
    e = tl.arange(0, BLOCK_DV)
    q = tl.load(q_ptr + row * head_dim + d, mask=d < head_dim, other=0.0).to(tl.float32)
    q = q * scale_log2
    m = -float("inf")
    ell = 0.0
    acc = tl.zeros((BLOCK_DV,), tl.float32)
    for j0 in range(0, n_quant, BLOCK_S):
        j = j0 + tl.arange(0, BLOCK_S)
        ok = j < n_quant
        kt = _dequantized_tile(
            kc_ptr, ks_ptr, kz_ptr, kv, j, ok, d, head_dim, n_quant, k_bytes,
            kgn, kgd, k_ngn, k_ngd, BITS, PER,
        )  # fmt: skip
        s = tl.where(ok, tl.sum(kt * q[None, :], axis=1), -float("inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new)
        vt = _dequantized_tile(
            vc_ptr, vs_ptr, vz_ptr, kv, j, ok, e, value_dim, n_quant, v_bytes,
            vgn, vgd, v_ngn, v_ngd, BITS, PER,
        )  # fmt: skip
        ell = ell * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * vt, axis=0)
        m = m_new
    for j0 in range(0, n_float, BLOCK_S):
        j = j0 + tl.arange(0, BLOCK_S)
        ok = j < n_float
        kt = tl.load(
            k_ptr + (kv * n_float + j[:, None]) * head_dim + d[None, :],
            mask=ok[:, None] & (d[None, :] < head_dim),
            other=0.0,
        ).to(tl.float32)
        s = tl.where(ok, tl.sum(kt * q[None, :], axis=1), -float("inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new)
        vt = tl.load(
            v_ptr + (kv * n_float + j[:, None]) * value_dim + e[None, :],
            mask=ok[:, None] & (e[None, :] < value_dim),
            other=0.0,
        ).to(tl.float32)
        ell = ell * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * vt, axis=0)
        m = m_new
    tl.store(o_ptr + row * value_dim + e, acc / ell, mask=e < value_dim)
    tl.store(lse_ptr + row, (m + tl.log2(ell)) / 1.4426950408889634)


def interpreted() -> bool:
    """Whether the kernels run under the Triton interpreter (decided when triton decorated them)."""
    return runs_interpreted(_mixed_kernel)


def _layout(scale: torch.Tensor, N: int, D: int) -> tuple[int, int, int, int]:
    """``(gn, gd, N / gn, D / gd)`` of per-group parameters ``(B, H, N / gn, D / gd)``."""
    return N // scale.shape[2], D // scale.shape[3], scale.shape[2], scale.shape[3]


def pack_forward(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, *, bits: int):
    """Codes of float32 ``x (B, H, N, D)`` with its groups' ``scale`` and ``zero``, packed:
    ``(B, H, N, ceil(D bits / 8))`` uint8."""
    import torch

    B, H, N, D = x.shape
    n_bytes = math.ceil(D * bits / 8)
    packed = _outputs.empty((B, H, N, n_bytes), like=x, dtype=torch.uint8)
    x, scale, zero = (t.contiguous() for t in (x, scale, zero))
    _pack_kernel[(B * H * N,)](
        x, scale, zero, packed, H, N, D, n_bytes, *_layout(scale, N, D), float((1 << bits) - 1),
        BITS=bits, PER=8 // bits, BLOCK_B=_pow2(n_bytes),
    )  # fmt: skip
    return packed


def dequantize_forward(
    packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, *, bits: int, dim: int
):
    """``x_hat (B, H, N, dim)`` in ``scale``'s dtype."""
    B, H, N, n_bytes = packed.shape
    out = _outputs.empty((B, H, N, dim), like=scale)
    packed, scale, zero = (t.contiguous() for t in (packed, scale, zero))
    _unpack_kernel[(B * H * N,)](
        packed, scale, zero, out, N, dim, n_bytes, *_layout(scale, N, dim),
        BITS=bits, PER=8 // bits, BLOCK_D=_pow2(dim),
    )  # fmt: skip
    return out


def window_votes(
    q: torch.Tensor, k: torch.Tensor, idx: torch.Tensor, *, n_tokens: int, scale: float
):
    """Unpooled window votes ``(B, H, C)`` float32 of ``q (B, H, W, D)`` over ``k``; ``idx``
    the token of each slot per query head ``(B, H, C)``."""
    import torch

    B, H, W, D = q.shape
    C = k.shape[2]
    votes = torch.zeros((B, H, C), dtype=torch.float32, device=q.device)
    q, k, idx = q.contiguous(), k.contiguous(), idx.contiguous()
    _window_kernel[(B * H,)](
        q, k, idx, votes, H, H // k.shape[1], W, C, D, n_tokens - W, scale * LOG2E,
        BLOCK_C=_pow2(min(C, 64)), BLOCK_D=_pow2(D),
    )  # fmt: skip
    return votes


def mixed_forward(q, k, v, kc, ks, kz, vc, vs, vz, *, bits: int, scale: float | None):
    """``(O (B, H, N, Dv) in q's dtype, lse (B, H, N) float32)`` over quantised then floating
    slots (arguments as :func:`qkv.reference.kv.mixed_precision.mixed_attention`)."""
    import torch

    B, H, N, D = q.shape
    Hkv, Mf, Dv = k.shape[1], k.shape[2], v.shape[3]
    Mq = kc.shape[2]
    out = _outputs.empty((B, H, N, Dv), like=q)
    lse = _outputs.empty((B, H, N), like=q, dtype=torch.float32)
    args = [t.contiguous() for t in (q, k, v, kc, ks, kz, vc, vs, vz)]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    _mixed_kernel[(B * H * N,)](
        *args, out, lse, H, H // Hkv, N, Mq, Mf, D, Dv, kc.shape[3], vc.shape[3],
        *_layout(ks, Mq, D), *_layout(vs, Mq, Dv), scale * LOG2E,
        BITS=bits, PER=8 // bits, BLOCK_S=16, BLOCK_D=_pow2(D), BLOCK_DV=_pow2(Dv),
    )  # fmt: skip
    return out, lse
