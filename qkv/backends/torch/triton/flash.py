r"""Flash attention forward as a Triton kernel: online softmax, one query tile per program.

Program ``(b * H + h) * ceil(N / BLOCK_Q) + i`` owns the query rows
``i * BLOCK_Q ... (i + 1) * BLOCK_Q - 1`` of batch ``b`` and head ``h``; it reads KV head
``h // G`` (``G = H / Hkv``) and walks its keys in tiles of ``BLOCK_K``, keeping per row a running maximum $m$, a running normaliser $\ell$ and an
unnormalised output $\tilde O$ (``BLOCK_Q x Dv``). For a key tile with scores $S$ (base 2,
$S = \log_2(e)\cdot\text{scale}\cdot QK^\top$, $-\infty$ where masked):

$$
m' = \max(m, \operatorname{rowmax} S),\quad \alpha = 2^{m - m'},\quad P = 2^{S - m'},\quad
\ell' = \alpha\ell + \operatorname{rowsum} P,\quad \tilde O' = \alpha\tilde O + P V .
$$

At the end $O = \tilde O / \ell$ and $\mathrm{lse} = \ln 2\,(m + \log_2 \ell)$ (natural log).
Only ``BLOCK_Q x BLOCK_K`` scores exist at a time. Rows and keys past ``N``/``M`` and head-dim
columns past ``D``/``Dv`` (tiles are padded to powers of two) are masked on load and store.
With ``causal``, keys past the last one the tile's final row may see (bottom-right alignment,
``j <= i + M - N``) are never loaded; a row that sees no key gets ``O = 0`` and
``lse = -inf``. Scores and the accumulator are float32; ``P`` is cast to the input dtype
before ``P V`` (float16/bfloat16 tensor-core products, float32 ``ieee`` products for float32).

This module imports triton; import it only when the kernel is about to run.
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Any

import triton
import triton.language as tl

from qkv import _outputs

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch

#: Shared-memory budget (bytes) the GPU tile choice aims under; the launch halves tiles further
#: if triton still reports that a configuration needs more than the device has.
SMEM_BUDGET = 96 * 1024
#: Largest tile side used on a GPU (larger tiles spill registers).
GPU_MAX_TILE = 128
#: Smallest tile side: ``tl.dot`` needs at least 16 along every axis.
MIN_TILE = 16


@triton.jit
def _flash_forward_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    lse_ptr,
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
    qk_scale,
    CAUSAL: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One ``(BLOCK_Q, Dv)`` output tile of ``O (B, H, N, Dv)`` and its ``lse`` rows.

    ``q (B, H, N, D)``, ``k (B, Hkv, M, D)``, ``v (B, Hkv, M, Dv)`` are read through their
    strides; ``o`` and ``lse (B, H, N)`` are contiguous. ``qk_scale = scale * log2(e)``.
    """
    n_tiles = tl.cdiv(n_queries, BLOCK_Q)
    pid = tl.program_id(0)
    tile = pid % n_tiles  # consecutive programs share (b, h), so they reuse the same K and V
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

    m_i = tl.full((BLOCK_Q,), float("-inf"), tl.float32)  # running max (base 2)
    l_i = tl.zeros((BLOCK_Q,), tl.float32)  # running normaliser
    acc = tl.zeros((BLOCK_Q, BLOCK_DV), tl.float32)  # unnormalised output
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
        s = tl.dot(q, k_t, input_precision=PRECISION) * qk_scale  # (BLOCK_Q, BLOCK_K)
        visible = col_ok[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= rows[:, None] + (n_keys - n_queries))
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # (BLOCK_Q,)
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing seen yet
        alpha = tl.exp2(m_i - shift)  # 0 on a row's first visible tile
        p = tl.exp2(s - shift[:, None])  # (BLOCK_Q, BLOCK_K)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(
            v_base + cols[:, None] * sv_m + dv[None, :] * sv_d,
            mask=col_ok[:, None] & (dv[None, :] < value_dim),
            other=0.0,
        )  # (BLOCK_K, BLOCK_DV)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]  # (BLOCK_Q, BLOCK_DV)
    log2_l = tl.log2(tl.where(seen, l_i, 1.0))
    lse = tl.where(seen, (m_i + log2_l) * 0.6931471805599453, float("-inf"))  # ln 2 (m + log2 l)
    o_rows = bh * n_queries + rows  # row index into the contiguous (B * H * N, Dv) output
    tl.store(
        o_ptr + o_rows[:, None] * value_dim + dv[None, :],
        out.to(o_ptr.dtype.element_ty),
        mask=row_ok[:, None] & (dv[None, :] < value_dim),
    )
    tl.store(lse_ptr + o_rows, lse, mask=row_ok)


def runs_interpreted(kernel: Any) -> bool:
    """Whether ``kernel`` runs under the Triton interpreter (decided when triton decorated it)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def interpreted() -> bool:
    """Whether the kernel runs under the Triton interpreter (decided when triton decorated it)."""
    return runs_interpreted(_flash_forward_kernel)


def _pow2(n: int) -> int:
    """The smallest power of two ``>= max(n, MIN_TILE)``."""
    return max(MIN_TILE, 1 << (max(n, 1) - 1).bit_length())


def tile_sizes(
    block_q: int,
    block_k: int,
    n_queries: int,
    n_keys: int,
    d_pad: int,
    dv_pad: int,
    itemsize: int,
    gpu: bool,
) -> tuple[int, int]:
    """Kernel tiles ``(BLOCK_Q, BLOCK_K)`` from the requested block sizes.

    Each is rounded up to a power of two of at least 16 (``tl.dot``'s minimum) and kept no
    larger than the padded sequence it cuts. On a GPU each is also capped at ``GPU_MAX_TILE``,
    then ``BLOCK_K`` and, once it reaches 16, ``BLOCK_Q`` are halved until the tiles of ``Q``
    and two pipelined stages of ``K`` and ``V`` fit ``SMEM_BUDGET``.
    """
    bq = min(_pow2(block_q), _pow2(n_queries))
    bk = min(_pow2(block_k), _pow2(n_keys))
    if gpu:
        bq, bk = min(bq, GPU_MAX_TILE), min(bk, GPU_MAX_TILE)

        def smem(bq: int, bk: int) -> int:
            return (bq * d_pad + 2 * bk * (d_pad + dv_pad)) * itemsize

        while smem(bq, bk) > SMEM_BUDGET and bk > MIN_TILE:
            bk //= 2
        while smem(bq, bk) > SMEM_BUDGET and bq > MIN_TILE:
            bq //= 2
    return bq, bk


def launch(
    kernel: Any,
    q: torch.Tensor,
    n_keys: int,
    value_dim: int,
    args: Sequence[Any],
    *,
    block_q: int,
    block_k: int,
    **constexprs: Any,
) -> None:
    """Launch one of this package's forward kernels over the query tiles of ``q (B, H, N, D)``.

    The shared launcher of the flash, sigmoid and tensor kernels: one program per
    ``(b, h, query tile)``, so the grid is ``ceil(N / BLOCK_Q) * B * H``. ``args`` are the
    kernel's positional arguments and ``constexprs`` its constexpr keywords other than the
    ones chosen here: ``BLOCK_Q`` and ``BLOCK_K`` by :func:`tile_sizes` (``n_keys`` keys),
    ``BLOCK_D`` and ``BLOCK_DV`` (``D`` and ``value_dim`` padded by :func:`_pow2`) and
    ``PRECISION`` (``ieee`` for float32, else ``tf32``, which only float32 operands use). If
    triton reports that a configuration needs more resources than the GPU has, the larger of
    the two tiles (``BLOCK_K`` on a tie) is halved and the launch retried, down to
    ``MIN_TILE`` each.
    """
    import torch
    from triton.runtime.errors import OutOfResources

    B, H, N, D = q.shape
    d_pad, dv_pad = _pow2(D), _pow2(value_dim)
    gpu = q.device.type == "cuda" and not runs_interpreted(kernel)
    bq, bk = tile_sizes(block_q, block_k, N, n_keys, d_pad, dv_pad, q.element_size(), gpu)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # only float32 operands use it
    while True:
        try:
            with torch.cuda.device(q.device) if gpu else contextlib.nullcontext():
                kernel[(triton.cdiv(N, bq) * B * H,)](
                    *args,
                    **constexprs,
                    BLOCK_Q=bq,
                    BLOCK_K=bk,
                    BLOCK_D=d_pad,
                    BLOCK_DV=dv_pad,
                    PRECISION=precision,
                    num_warps=8 if bq * dv_pad >= 64 * 128 else 4,
                    num_stages=2,
                )
        except OutOfResources:  # the tile estimate fell short on this GPU: halve and retry
            if bq == bk == MIN_TILE:
                raise
            bk, bq = (bk // 2, bq) if bk >= bq else (bk, bq // 2)
        else:
            return


def flash_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    block_q: int,
    block_k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Run the kernel: ``O = softmax(scale * Q K^T) V`` and its log-sum-exp, forward only.

    Args:
        q: ``(B, H, N, D)`` float16, bfloat16 or float32, on a CUDA device (or on the CPU under
            the Triton interpreter); any strides.
        k: ``(B, Hkv, M, D)``, same dtype and device, ``H % Hkv == 0``.
        v: ``(B, Hkv, M, Dv)``, same dtype and device; ``D, Dv <= 256``.
        causal: bottom-right causal pattern, ``j <= i + (M - N)``.
        scale: multiplies $QK^\top$.
        block_q, block_k: requested tile sizes, adjusted by :func:`tile_sizes`.

    Returns:
        ``O (B, H, N, Dv)`` in the dtype of ``q`` and ``lse (B, H, N)`` float32, both
        contiguous and allocated with :func:`qkv._outputs.empty`.
    """
    import torch

    B, H, N, D = q.shape
    Hkv, M, Dv = k.shape[1], k.shape[2], v.shape[3]
    out = _outputs.empty((B, H, N, Dv), like=q)
    lse = _outputs.empty((B, H, N), like=q, dtype=torch.float32)
    args = (
        q, k, v, out, lse,
        *q.stride(), *k.stride(), *v.stride(),
        H, H // Hkv, N, M, D, Dv, scale * math.log2(math.e),
    )  # fmt: skip
    launch(
        _flash_forward_kernel, q, M, Dv, args,
        block_q=block_q, block_k=block_k, CAUSAL=bool(causal),
    )  # fmt: skip
    return out, lse
