r"""``sparse_attention`` forward as a Triton kernel: fused gather-and-attend, split over slots.

Program ``(row, split)`` owns query row ``row = (b * H + h) * N + i`` and the slots
``split * CHUNK ... (split + 1) * CHUNK - 1`` of its index list. It walks them in tiles of
``BLOCK_S``: loads the tile's key indices, gathers those rows of ``K`` and ``V`` of KV head
``h // (H / Hkv)`` straight from memory (empty slots, ``-1``, are masked off and read nothing),
and runs the online softmax in base 2 over them:

$$
m' = \max(m, \max_t s_t),\quad \ell' = 2^{m - m'}\ell + \sum_t 2^{s_t - m'},\quad
a' = 2^{m - m'} a + \sum_t 2^{s_t - m'} v_{j_t},
$$

with $s_t = \log_2 e\,(\text{scale}\cdot q\cdot k_{j_t} + b_t)$, $b_t$ the slot's optional
bias ($-\infty$ drops the slot; none when ``HAS_BIAS`` is off). Each program stores its normalised
partial output $a/\ell$ and partial log-sum-exp (natural log; $-\infty$ for a split with no
selected key); :func:`sparse_forward` merges the splits by their log-sum-exps (flash-decoding),
the same rule as :func:`qkv.reference.sparse.selected_keys.merge_partials`. Splitting the slots
is what gives a decode step (``N = 1``, a handful of heads) enough programs to fill a GPU.
Arithmetic is float32; products of one query row use elementwise multiply-and-sum (no
``tl.dot``). The loads of ``K`` and ``V`` are gathers through loaded integers (never loaded
pointers), which the Triton interpreter runs too.

This module imports triton; import it only when the kernel is about to run.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import triton
import triton.language as tl

from qkv import _outputs
from qkv.backends._split import split_slots
from qkv.backends.torch.triton.flash import runs_interpreted

if TYPE_CHECKING:
    import torch

LOG2E = 1.4426950408889634
#: Slots a GPU program walks at least (see :func:`qkv.backends._split.split_slots`).
MIN_CHUNK = 64
#: Programs aimed at on a GPU (rows times splits).
GPU_PROGRAMS = 1024


@triton.jit
def _sparse_forward_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    idx_ptr,
    b_ptr,
    o_ptr,
    lse_ptr,
    sq_b,
    sq_h,
    sq_n,
    sk_b,
    sk_h,
    sk_m,
    sv_b,
    sv_h,
    sv_m,
    si_b,
    si_h,
    si_n,
    sb_b,
    sb_h,
    sb_n,
    bias_group,
    n_heads,
    group,
    n_queries,
    n_slots,
    head_dim,
    value_dim,
    chunk,
    n_splits,
    scale_log2,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """One split of one row: partial ``O`` into ``o (B*H*N, n_splits, Dv)`` float32 and its
    log-sum-exp into ``lse (B*H*N, n_splits)`` float32 (both contiguous).

    ``q (B, H, N, D)``, ``k (B, Hkv, M, D)``, ``v (B, Hkv, M, Dv)`` with a contiguous last axis,
    ``indices`` int32/int64 ``(B, H, N, S)`` through strides (``si_n = 0`` shares a head's list
    among its queries, last axis contiguous); with ``HAS_BIAS`` a float32 ``bias`` read at
    ``b * sb_b + (h // bias_group) * sb_h + i * sb_n + t`` (``bias_group = H / Hkv`` for a bias
    per KV head, ``sb_n = 0`` for one per head).
    """
    pid = tl.program_id(0)
    split = pid % n_splits
    row = (pid // n_splits).to(tl.int64)
    i = row % n_queries
    bh = row // n_queries
    b = bh // n_heads
    h = bh % n_heads
    hk = h // group
    d = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    e = tl.arange(0, BLOCK_DV)  # (BLOCK_DV,)
    q = tl.load(q_ptr + b * sq_b + h * sq_h + i * sq_n + d, mask=d < head_dim, other=0.0)
    q = q.to(tl.float32) * scale_log2  # (BLOCK_D,), base-2 scores
    k_base = k_ptr + b * sk_b + hk * sk_h
    v_base = v_ptr + b * sv_b + hk * sv_h
    i_base = idx_ptr + b * si_b + h * si_h + i * si_n
    b_base = b_ptr + b * sb_b + (h // bias_group) * sb_h + i * sb_n

    m = -float("inf")
    ell = 0.0
    acc = tl.zeros((BLOCK_DV,), tl.float32)
    first = split * chunk
    stop = tl.minimum(first + chunk, n_slots)
    for start in range(first, stop, BLOCK_S):
        t = start + tl.arange(0, BLOCK_S)  # (BLOCK_S,)
        j = tl.load(i_base + t, mask=t < stop, other=-1).to(tl.int64)  # (BLOCK_S,)
        ok = j >= 0
        kt = tl.load(
            k_base + j[:, None] * sk_m + d[None, :],
            mask=ok[:, None] & (d[None, :] < head_dim),
            other=0.0,
        )  # (BLOCK_S, BLOCK_D): the gathered keys
        s = tl.sum(kt.to(tl.float32) * q[None, :], axis=1)  # (BLOCK_S,)
        if HAS_BIAS:
            bias = tl.load(b_base + t, mask=ok, other=0.0).to(tl.float32)  # (BLOCK_S,)
            s = s + bias * 1.4426950408889634  # -inf drops the slot
        s = tl.where(ok, s, -float("inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        shift = tl.where(m_new == -float("inf"), 0.0, m_new)  # an all-empty tile so far
        alpha = tl.exp2(m - shift)  # 0 while m = -inf
        p = tl.exp2(s - shift)  # (BLOCK_S,); 0 on empty slots
        vt = tl.load(
            v_base + j[:, None] * sv_m + e[None, :],
            mask=ok[:, None] & (e[None, :] < value_dim),
            other=0.0,
        )  # (BLOCK_S, BLOCK_DV): the gathered values
        ell = ell * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * vt.to(tl.float32), axis=0)
        m = m_new

    safe = tl.where(ell > 0, ell, 1.0)
    part = (row * n_splits + split).to(tl.int64)
    tl.store(o_ptr + part * value_dim + e, acc / safe, mask=e < value_dim)
    lse = tl.where(ell > 0, (m + tl.log2(safe)) / 1.4426950408889634, -float("inf"))
    tl.store(lse_ptr + part, lse)


def interpreted() -> bool:
    """Whether the kernel runs under the Triton interpreter (decided when triton decorated it)."""
    return runs_interpreted(_sparse_forward_kernel)


def _pow2(n: int) -> int:
    return max(16, 1 << (max(n, 1) - 1).bit_length())


def sparse_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    *,
    scale: float | None,
    bias: torch.Tensor | None = None,
    block_s: int = 64,
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Run the kernel and merge its splits: ``(O, lse)``.

    Args:
        q: ``(B, H, N, D)`` float16, bfloat16 or float32, on a CUDA device (or on the CPU under
            the Triton interpreter); any strides.
        k: ``(B, Hkv, M, D)``, same dtype and device, ``H % Hkv == 0``.
        v: ``(B, Hkv, M, Dv)``, same dtype and device.
        indices: integer ``(B, H, S)`` or ``(B, H, N, S)`` on the same device; ``-1`` = empty.
        scale: multiplies the scores; default ``1/sqrt(D)``.
        bias: optional per-slot bias added to the scaled scores, ``(B, H, S)``, ``(B, Hkv, S)``
            or ``(B, H, N, S)`` on the same device (read as float32; ``-inf`` drops a slot).
        block_s: slots per tile (rounded up to a power of two, at least 16).
        chunk: slots per program (rounded up to a multiple of the tile); default: a row's whole
            list under the interpreter, :func:`qkv.backends._split.split_slots` on a GPU.

    Returns:
        ``O (B, H, N, Dv)`` in the dtype of ``q`` and ``lse (B, H, N)`` float32; a row with no
        selected key gives zeros and ``lse = -inf``.
    """
    import torch

    B, H, N, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[3]
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    idx = indices if indices.dtype in (torch.int32, torch.int64) else indices.long()
    idx = idx.contiguous()
    si_n = idx.stride(2) if idx.ndim == 4 else 0
    S = idx.shape[-1]
    bs = _pow2(min(block_s, max(S, 1)))
    gpu = q.device.type == "cuda" and not interpreted()
    if chunk is not None:
        chunk = -(-max(chunk, 1) // bs) * bs
        n_splits = max(1, -(-S // chunk))
    elif gpu:
        chunk, n_splits = split_slots(
            B * H * N, S, programs=GPU_PROGRAMS, min_chunk=MIN_CHUNK, multiple=bs
        )
    else:
        chunk, n_splits = max(S, 1), 1  # the interpreter: one program per row
    part_o = torch.empty((B * H * N, n_splits, Dv), device=q.device, dtype=torch.float32)
    part_lse = torch.empty((B * H * N, n_splits), device=q.device, dtype=torch.float32)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if bias is None:
        b_arg, b_strides, bias_group = q, (0, 0, 0), 1
    else:
        b_arg = bias.to(torch.float32).contiguous()
        b_n = b_arg.stride(2) if b_arg.ndim == 4 else 0
        b_strides = (b_arg.stride(0), b_arg.stride(1), b_n)
        bias_group = H // b_arg.shape[1]  # H / Hkv for a bias per KV head, else 1
    _sparse_forward_kernel[(B * H * N * n_splits,)](
        q, k, v, idx, b_arg, part_o, part_lse,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], idx.stride(0), idx.stride(1), si_n,
        *b_strides, bias_group,
        H, H // Hkv, N, S, D, Dv, chunk, n_splits, scale * LOG2E,
        BLOCK_S=bs, BLOCK_D=_pow2(D), BLOCK_DV=_pow2(Dv), HAS_BIAS=bias is not None,
    )  # fmt: skip
    top = part_lse.amax(dim=1, keepdim=True)  # (rows, 1)
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    w = torch.exp(part_lse - top)  # (rows, splits); 0 for an empty split
    total = w.sum(dim=1)  # (rows,)
    merged = (w[..., None] * part_o).sum(dim=1) / torch.where(total > 0, total, 1.0)[:, None]
    out = _outputs.empty((B, H, N, Dv), like=q)
    out.copy_(merged.view(B, H, N, Dv))  # (B, H, N, Dv), in q's dtype
    lse = (torch.log(total) + top[:, 0]).view(B, H, N)  # (B, H, N)
    return out, lse
