r"""RCMHA's relative-score attention as a Triton forward kernel, with the depth-wise causal
convolutions of $Q$, $K$ and $V$ fused in (the ``relative_attention`` op).

Program ``(b * H + h) * ceil(N / BLOCK_Q) + t`` owns query rows ``t * BLOCK_Q ...`` of batch
``b`` and query head ``h`` (KV head ``h // G``). It

1. convolves its query tile from the raw queries: $\tilde q_i = \sum_s w_{q,s} \odot q_{i-(K-1)+s}$,
   one masked, shifted load per tap;
2. walks the visible keys in tiles of ``BLOCK_K``, convolving each key and value tile the same
   way; the content scores are one ``tl.dot`` of $\text{scale}(\tilde Q + u)$ with
   $\tilde K^\top$;
3. computes the position scores without any ``N x M x D`` array: the tile's distances
   $\delta = i + m - j$ span a band of ``BLOCK_Q + BLOCK_K - 1`` values starting at
   $\delta_{lo} = t\,\text{BLOCK\_Q} + m - (j_0 + \text{BLOCK\_K} - 1)$, so one ``tl.dot``
   $\text{scale}\,\tilde Q R_{band}^\top$ (plus $\text{scale}\,b_{band}$) gives every value the
   tile needs, ``BLOCK_Q x BLOCK_W``. Row ``a`` needs column
   $a + \text{BLOCK\_K} - 1 - c$ for key ``c`` of the tile: a skewed read, Transformer-XL's
   relative shift. The band goes to a per-program scratch row block in global memory and is
   read back skewed (a barrier between the write and the read, and before the next write);
4. folds the tile into an online softmax in float32.

Operands of the dot products are in the input dtype (float16/bfloat16 on tensor cores, float32
at ``ieee`` precision); accumulation, the softmax and the band are float32. The scratch holds
``BLOCK_Q x BLOCK_W`` float32 per program (``O(N (BLOCK_Q + BLOCK_K))`` per head in all).

This module imports triton; import it only when the kernel is about to run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import triton
import triton.language as tl

from qkv import _outputs
from qkv.backends.torch.triton.flash import runs_interpreted

if TYPE_CHECKING:
    import torch

#: Largest head dim the kernel takes (the band and tiles stay within registers).
MAX_HEAD_DIM = 128


@triton.jit
def _conv_tile(
    base, rows, row_ok, stride_row, cols, col_ok, stride_col, w_ptr, taps, ROW_AXIS: tl.constexpr
):
    """Convolve a tile along its token axis: ``sum_s w[c, s] * x[row - (taps-1) + s, c]``.

    ``rows``/``cols`` index tokens and channels; ``ROW_AXIS`` says whether tokens run along the
    tile's first axis (``(tokens, channels)``) or its second (``(channels, tokens)``). Returns
    float32.
    """
    acc = tl.zeros((rows.shape[0], cols.shape[0]), tl.float32)
    for s in range(0, taps):
        if ROW_AXIS:
            src = rows - (taps - 1) + s
            ok = (row_ok & (src >= 0))[:, None] & col_ok[None, :]
            x = tl.load(
                base + src[:, None] * stride_row + cols[None, :] * stride_col, mask=ok, other=0.0
            )
            w = tl.load(w_ptr + cols * taps + s, mask=col_ok, other=0.0)
            acc += x.to(tl.float32) * w.to(tl.float32)[None, :]
        else:
            src = cols - (taps - 1) + s
            ok = row_ok[:, None] & (col_ok & (src >= 0))[None, :]
            x = tl.load(
                base + rows[:, None] * stride_row + src[None, :] * stride_col, mask=ok, other=0.0
            )
            w = tl.load(w_ptr + rows * taps + s, mask=row_ok, other=0.0)
            acc += x.to(tl.float32) * w.to(tl.float32)[:, None]
    return acc


@triton.jit
def _relative_forward_kernel(
    q_ptr, k_ptr, v_ptr, r_ptr, u_ptr, b_ptr, wq_ptr, wk_ptr, wv_ptr, o_ptr, band_ptr,
    sq_b, sq_h, sq_n, sq_d,
    sk_b, sk_h, sk_m, sk_d,
    sv_b, sv_h, sv_m, sv_d,
    sr_h, sr_l, sr_d,
    su_h, su_d,
    sb_h, sb_l,
    n_heads, group, n_queries, n_keys, head_dim, value_dim, taps_q, taps_k, taps_v, scale,
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """One ``(BLOCK_Q, Dv)`` tile of ``O (B, H, N, Dv)`` (contiguous); inputs through strides,
    kernels ``(C, K)`` contiguous, ``band`` a float32 scratch of ``BLOCK_Q x BLOCK_W`` per
    program."""
    n_tiles = tl.cdiv(n_queries, BLOCK_Q)
    pid = tl.program_id(0)
    tile = pid % n_tiles
    bh = (pid // n_tiles).to(tl.int64)
    b = bh // n_heads
    h = bh % n_heads
    hk = h // group
    dtype = q_ptr.dtype.element_ty
    memory = n_keys - n_queries  # query i sits at key position i + memory

    rows = tile * BLOCK_Q + tl.arange(0, BLOCK_Q)  # (BLOCK_Q,)
    row_ok = rows < n_queries
    dq = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    d_ok = dq < head_dim
    dv_ok = dv < value_dim
    q_tilde = _conv_tile(
        q_ptr + b * sq_b + h * sq_h, rows, row_ok, sq_n, dq, d_ok, sq_d, wq_ptr, taps_q, True
    )  # (BLOCK_Q, BLOCK_D) float32
    u = tl.load(u_ptr + h * su_h + dq * su_d, mask=d_ok, other=0.0).to(tl.float32)
    q_content = ((q_tilde + u[None, :]) * scale).to(dtype)
    q_position = (q_tilde * scale).to(dtype)

    k_base = k_ptr + b * sk_b + hk * sk_h
    v_base = v_ptr + b * sv_b + hk * sv_h
    r_base = r_ptr + h * sr_h
    b_base = b_ptr + h * sb_h
    band_base = band_ptr + pid.to(tl.int64) * (BLOCK_Q * BLOCK_W)
    qi = tl.arange(0, BLOCK_Q)
    wi = tl.arange(0, BLOCK_W)
    kj = tl.arange(0, BLOCK_K)
    # (BLOCK_Q, BLOCK_K): where (row a, key c) finds its band entry, column a + BLOCK_K - 1 - c
    skew = qi[:, None] * BLOCK_W + qi[:, None] + (BLOCK_K - 1) - kj[None, :]
    position = rows + memory

    m_i = tl.full((BLOCK_Q,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_Q,), tl.float32)
    acc = tl.zeros((BLOCK_Q, BLOCK_DV), tl.float32)
    last_row = tl.minimum((tile + 1) * BLOCK_Q, n_queries) - 1
    stop = tl.minimum(n_keys, last_row + memory + 1)  # keys the tile's last row may see
    for start in range(0, stop, BLOCK_K):
        cols = start + kj  # (BLOCK_K,)
        col_ok = cols < n_keys
        k_t = _conv_tile(k_base, dq, d_ok, sk_d, cols, col_ok, sk_m, wk_ptr, taps_k, False)
        s = tl.dot(q_content, k_t.to(dtype), input_precision=PRECISION)  # (BLOCK_Q, BLOCK_K)

        distance = tile * BLOCK_Q + memory - (start + BLOCK_K - 1) + wi  # (BLOCK_W,)
        in_table = (distance >= 0) & (distance < n_keys)
        r_t = tl.load(
            r_base + distance[None, :] * sr_l + dq[:, None] * sr_d,
            mask=d_ok[:, None] & in_table[None, :],
            other=0.0,
        )  # (BLOCK_D, BLOCK_W): R of the band, transposed
        bias = tl.load(b_base + distance * sb_l, mask=in_table, other=0.0).to(tl.float32)
        band = tl.dot(q_position, r_t, input_precision=PRECISION) + scale * bias[None, :]
        tl.store(band_base + qi[:, None] * BLOCK_W + wi[None, :], band)
        tl.debug_barrier()
        s += tl.load(band_base + skew)  # the relative shift: row a, key c reads column a + BK-1-c
        tl.debug_barrier()

        visible = col_ok[None, :] & (cols[None, :] <= position[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # padding rows see no key
        alpha = tl.exp(m_i - shift)
        p = tl.exp(s - shift[:, None])
        l_i = alpha * l_i + tl.sum(p, 1)
        v_t = _conv_tile(v_base, cols, col_ok, sv_m, dv, dv_ok, sv_d, wv_ptr, taps_v, True)
        acc = acc * alpha[:, None] + tl.dot(p.to(dtype), v_t.to(dtype), input_precision=PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_rows = bh * n_queries + rows
    tl.store(
        o_ptr + o_rows[:, None] * value_dim + dv[None, :],
        out.to(o_ptr.dtype.element_ty),
        mask=row_ok[:, None] & dv_ok[None, :],
    )


def interpreted() -> bool:
    """Whether the kernel runs under the Triton interpreter (decided when triton decorated it)."""
    return runs_interpreted(_relative_forward_kernel)


def _pow2(x: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(x))


def relative_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    r: torch.Tensor,
    u: torch.Tensor,
    b: torch.Tensor,
    wq: torch.Tensor,
    wk: torch.Tensor,
    wv: torch.Tensor,
    *,
    scale: float,
    block_q: int = 32,
    block_k: int = 32,
) -> torch.Tensor:
    r"""Run the kernel, forward only.

    Args:
        q: ``(B, H, N, D)`` float16, bfloat16 or float32, on a CUDA device (or the CPU under the
            Triton interpreter); any strides.
        k: ``(B, Hkv, M, D)``, ``M >= N``, same dtype and device.
        v: ``(B, Hkv, M, Dv)``; ``D, Dv <= 128``.
        r: ``(H, L, D)``, ``L >= M``.
        u: ``(H, D)``.
        b: ``(H, Lb)``, ``Lb >= M``.
        wq: query kernel ``(D, K)`` (an identity ``(D, 1)`` of ones where there is none).
        wk: key kernel ``(D, K)``.
        wv: value kernel ``(Dv, K)``.
        scale: multiplies the whole score.
        block_q: query rows per program (a power of two, at least 16).
        block_k: keys per tile (a power of two, at least 16).

    Returns:
        ``O (B, H, N, Dv)`` in the dtype of ``q``, contiguous, allocated with
        :func:`qkv._outputs.empty`.
    """
    import torch

    B, H, N, D = q.shape
    Hkv, M, Dv = k.shape[1], k.shape[2], v.shape[3]
    bq = min(block_q, _pow2(N))
    bw = _pow2(bq + block_k - 1)
    grid = triton.cdiv(N, bq) * B * H
    out = _outputs.empty((B, H, N, Dv), like=q)
    band = torch.empty((grid, bq, bw), dtype=torch.float32, device=q.device)
    wq, wk, wv = (w.contiguous() for w in (wq, wk, wv))
    _relative_forward_kernel[(grid,)](
        q, k, v, r, u, b, wq, wk, wv, out, band,
        *q.stride(), *k.stride(), *v.stride(), *r.stride(), *u.stride(), *b.stride(),
        H, H // Hkv, N, M, D, Dv, wq.shape[1], wk.shape[1], wv.shape[1], float(scale),
        BLOCK_Q=bq, BLOCK_K=block_k, BLOCK_W=bw, BLOCK_D=_pow2(D), BLOCK_DV=_pow2(Dv),
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )  # fmt: skip
    return out
