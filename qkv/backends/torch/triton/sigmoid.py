r"""Sigmoid attention forward (FlashSigmoid) as a Triton kernel: one query tile per program.

Program ``(b * H + h) * ceil(N / BLOCK_Q) + i`` owns the query rows
``i * BLOCK_Q ... (i + 1) * BLOCK_Q - 1`` of batch ``b`` and head ``h``; it reads KV head
``h // G`` (``G = H / Hkv``) and walks its keys in tiles of ``BLOCK_K``. For a key tile:

$$
S = \text{scale}\cdot Q K^\top + A + b,\qquad P = \sigma(S)\ (0 \text{ where hidden}),\qquad
O \mathrel{+}= P V ,
$$

with ALiBi $A_{hij} = -m_h\,|i + (M - N) - j|$ when asked. Unlike flash attention there is no
running maximum and no normaliser: the tiles' contributions simply add up, which is why
FlashSigmoid is faster than FlashAttention-2 (the paper's 17% on an H100). Tile choice, padding
and masking of ragged edges follow :mod:`qkv.backends.torch.triton.flash`; causal key tiles past
the tile's last visible key are never loaded. The accumulator is float32; ``P`` is cast to the
input dtype before ``P V``.

This module imports triton; import it only when the kernel is about to run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import triton
import triton.language as tl

from qkv import _outputs
from qkv.backends.torch.triton.flash import launch, runs_interpreted

if TYPE_CHECKING:
    import torch


@triton.jit
def _sigmoid_forward_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    slopes_ptr,
    sq_b,
    sq_h,
    sq_n,
    sq_d,
    sk_b,
    sk_h,
    sk_m,
    sk_d,
    sv_b,
    sv_h,
    sv_m,
    sv_d,
    n_heads,
    group,
    n_queries,
    n_keys,
    head_dim,
    value_dim,
    scale,
    bias,
    CAUSAL: tl.constexpr,
    ALIBI: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One ``(BLOCK_Q, Dv)`` tile of ``O (B, H, N, Dv)`` (contiguous).

    ``q (B, H, N, D)``, ``k (B, Hkv, M, D)``, ``v (B, Hkv, M, Dv)`` are read through their
    strides; ``slopes (H,)`` float32 is read only with ``ALIBI``.
    """
    n_tiles = tl.cdiv(n_queries, BLOCK_Q)
    pid = tl.program_id(0)
    tile = pid % n_tiles
    bh = (pid // n_tiles).to(tl.int64)
    b = bh // n_heads
    h = bh % n_heads
    hk = h // group
    rows = tile * BLOCK_Q + tl.arange(0, BLOCK_Q)  # (BLOCK_Q,)
    dq = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    dv = tl.arange(0, BLOCK_DV)  # (BLOCK_DV,)
    row_ok = rows < n_queries
    q = tl.load(
        q_ptr + b * sq_b + h * sq_h + rows[:, None] * sq_n + dq[None, :] * sq_d,
        mask=row_ok[:, None] & (dq[None, :] < head_dim),
        other=0.0,
    )  # (BLOCK_Q, BLOCK_D)
    k_base = k_ptr + b * sk_b + hk * sk_h
    v_base = v_ptr + b * sv_b + hk * sv_h
    slope = 0.0
    if ALIBI:
        slope = tl.load(slopes_ptr + h)
    position = rows + (n_keys - n_queries)  # (BLOCK_Q,): query i sits at key position i + M - N

    acc = tl.zeros((BLOCK_Q, BLOCK_DV), tl.float32)
    stop = n_keys
    if CAUSAL:  # keys beyond what the tile's last row may see are never loaded
        last_row = tl.minimum((tile + 1) * BLOCK_Q, n_queries)
        stop = tl.maximum(tl.minimum(n_keys, last_row + n_keys - n_queries), 0)
    for start in range(0, stop, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
        col_ok = cols < n_keys
        k_t = tl.load(
            k_base + cols[None, :] * sk_m + dq[:, None] * sk_d,
            mask=col_ok[None, :] & (dq[:, None] < head_dim),
            other=0.0,
        )  # (BLOCK_D, BLOCK_K): K^T of this tile
        s = tl.dot(q, k_t, input_precision=PRECISION) * scale + bias  # (BLOCK_Q, BLOCK_K)
        if ALIBI:
            distance = tl.abs(position[:, None] - cols[None, :]).to(tl.float32)
            s = s - slope * distance
        visible = col_ok[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= position[:, None])
        z = tl.exp(-tl.abs(s))  # sigma(s) = z / (1 + z) or 1 / (1 + z): no overflow
        p = tl.where(visible, tl.where(s >= 0, 1.0, z) / (1.0 + z), 0.0)  # (BLOCK_Q, BLOCK_K)
        v = tl.load(
            v_base + cols[:, None] * sv_m + dv[None, :] * sv_d,
            mask=col_ok[:, None] & (dv[None, :] < value_dim),
            other=0.0,
        )  # (BLOCK_K, BLOCK_DV)
        acc += tl.dot(p.to(v.dtype), v, input_precision=PRECISION)

    o_rows = bh * n_queries + rows  # row index into the contiguous (B * H * N, Dv) output
    tl.store(
        o_ptr + o_rows[:, None] * value_dim + dv[None, :],
        acc.to(o_ptr.dtype.element_ty),
        mask=row_ok[:, None] & (dv[None, :] < value_dim),
    )


def interpreted() -> bool:
    """Whether the kernel runs under the Triton interpreter (decided when triton decorated it)."""
    return runs_interpreted(_sigmoid_forward_kernel)


def sigmoid_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    bias: float,
    alibi: bool,
    block_q: int = 64,
    block_k: int = 64,
) -> torch.Tensor:
    r"""Run the kernel: ``O = sigmoid(scale * Q K^T + A + bias) V``, forward only.

    Args:
        q: ``(B, H, N, D)`` float16, bfloat16 or float32, on a CUDA device (or on the CPU under
            the Triton interpreter); any strides.
        k: ``(B, Hkv, M, D)``, same dtype and device, ``H % Hkv == 0``.
        v: ``(B, Hkv, M, Dv)``, same dtype and device; ``D, Dv <= 256``.
        causal: bottom-right causal pattern, ``j <= i + (M - N)``.
        scale: multiplies $QK^\top$; bias: the scalar $b$.
        alibi: add ALiBi with the slopes of :func:`qkv.reference.core.alibi_slopes`.
        block_q, block_k: requested tile sizes, adjusted by
            :func:`qkv.backends.torch.triton.flash.tile_sizes`.

    Returns:
        ``O (B, H, N, Dv)`` in the dtype of ``q``, contiguous, allocated with
        :func:`qkv._outputs.empty`.
    """
    import torch

    from qkv.reference.core import alibi_slopes

    B, H, N, D = q.shape
    Hkv, M, Dv = k.shape[1], k.shape[2], v.shape[3]
    out = _outputs.empty((B, H, N, Dv), like=q)
    slopes = torch.from_numpy(alibi_slopes(H)).to(q.device, torch.float32) if alibi else out
    args = (
        q, k, v, out, slopes,
        *q.stride(), *k.stride(), *v.stride(),
        H, H // Hkv, N, M, D, Dv, float(scale), float(bias),
    )  # fmt: skip
    launch(
        _sigmoid_forward_kernel, q, M, Dv, args,
        block_q=block_q, block_k=block_k, CAUSAL=bool(causal), ALIBI=bool(alibi),
    )  # fmt: skip
    return out
