r"""Exact tensor (Kronecker) attention forward as a Triton kernel: a streaming online softmax.

Tensor attention (Alman and Song, arXiv 2310.04064) scores query $a$ against every pair
$(i, j)$ of a first and a second key, $S_{a,ij} = \text{scale}\sum_l Q_{al} K_{1,il} K_{2,jl}$,
and returns $o_a = \sum_{ij}\operatorname{softmax}_{ij}(S_a)\,V_1[i]\circ V_2[j]$ (see
:mod:`qkv.reference.forms.tensor_attention`).

Program ``(b * H + h) * ceil(N / BLOCK_Q) + t`` owns query rows ``t * BLOCK_Q ...
(t + 1) * BLOCK_Q - 1`` of batch ``b`` and head ``h``, which read KV head ``h // G``
(``G = H / Hkv``). It walks the second keys in tiles of ``BLOCK_K`` (the tiles of $K_2$ and
$V_2$ are loaded once) and, for each tile, every first key $i$: the scores of the tile are one
product $S = (Q \circ K_1[i])\,K_2^\top$ of shape ``(BLOCK_Q, BLOCK_K)``, and their values
factor as $\sum_j P_{a,ij} V_1[i]\circ V_2[j] = V_1[i]\circ(P V_2)_a$. With base-2 scores
$S \leftarrow \log_2(e)\,S$ the online softmax is that of
:mod:`qkv.backends.torch.triton.flash`:

$$
m' = \max(m, \operatorname{rowmax} S),\quad \alpha = 2^{m - m'},\quad P = 2^{S - m'},\quad
\ell' = \alpha\ell + \operatorname{rowsum} P,\quad
\tilde O' = \alpha\tilde O + V_1[i] \circ (P V_2),
$$

and at the end $O = \tilde O / \ell$. Every row sees all ``M**2`` pairs (there is no mask), so
$\ell > 0$. Only one ``BLOCK_Q x BLOCK_K`` score tile exists at a time: $O(N M^2 (D + D_v))$
time, $O(N D_v)$ memory besides the output. Scores and the accumulator are float32;
$Q \circ K_1[i]$ is formed in float32 and rounded to the input dtype for the product (float16
products run on tensor cores; float32 ones are ``ieee``), and so is ``P`` before ``P V_2``.

This module imports triton; import it only when the kernel is about to run.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import triton
import triton.language as tl

from qkv import _outputs
from qkv.backends.torch.triton.flash import launch, runs_interpreted

if TYPE_CHECKING:
    import torch


@triton.jit
def _tensor_forward_kernel(
    q_ptr,
    k1_ptr,
    k2_ptr,
    v1_ptr,
    v2_ptr,
    o_ptr,
    sq_b,
    sq_h,
    sq_n,
    sq_d,
    sk1_b,
    sk1_h,
    sk1_m,
    sk1_d,
    sk2_b,
    sk2_h,
    sk2_m,
    sk2_d,
    sv1_b,
    sv1_h,
    sv1_m,
    sv1_d,
    sv2_b,
    sv2_h,
    sv2_m,
    sv2_d,
    n_heads,
    group,
    n_queries,
    n_keys,
    head_dim,
    value_dim,
    qk_scale,
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One ``(BLOCK_Q, Dv)`` tile of ``O (B, H, N, Dv)`` (contiguous).

    ``q (B, H, N, D)``, ``k1``/``k2 (B, Hkv, M, D)``, ``v1``/``v2 (B, Hkv, M, Dv)`` are read
    through their strides; ``qk_scale = scale * log2(e)``.
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
    d_ok = dq < head_dim
    dv_ok = dv < value_dim
    q = tl.load(
        q_ptr + b * sq_b + h * sq_h + rows[:, None] * sq_n + dq[None, :] * sq_d,
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    ).to(tl.float32)  # (BLOCK_Q, BLOCK_D)
    k1_base = k1_ptr + b * sk1_b + hk * sk1_h
    k2_base = k2_ptr + b * sk2_b + hk * sk2_h
    v1_base = v1_ptr + b * sv1_b + hk * sv1_h
    v2_base = v2_ptr + b * sv2_b + hk * sv2_h

    m_i = tl.full((BLOCK_Q,), float("-inf"), tl.float32)  # running max (base 2)
    l_i = tl.zeros((BLOCK_Q,), tl.float32)  # running normaliser
    acc = tl.zeros((BLOCK_Q, BLOCK_DV), tl.float32)  # unnormalised output
    for start in range(0, n_keys, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)  # (BLOCK_K,): second keys j
        col_ok = cols < n_keys
        k2_t = tl.load(
            k2_base + cols[None, :] * sk2_m + dq[:, None] * sk2_d,
            mask=col_ok[None, :] & d_ok[:, None],
            other=0.0,
        )  # (BLOCK_D, BLOCK_K): K2^T of this tile
        v2 = tl.load(
            v2_base + cols[:, None] * sv2_m + dv[None, :] * sv2_d,
            mask=col_ok[:, None] & dv_ok[None, :],
            other=0.0,
        )  # (BLOCK_K, BLOCK_DV)
        for i in range(0, n_keys):  # first keys i
            k1_i = tl.load(k1_base + i * sk1_m + dq * sk1_d, mask=d_ok, other=0.0)  # (BLOCK_D,)
            v1_i = tl.load(v1_base + i * sv1_m + dv * sv1_d, mask=dv_ok, other=0.0)  # (BLOCK_DV,)
            qk = (q * k1_i.to(tl.float32)[None, :]).to(k2_t.dtype)  # (BLOCK_Q, BLOCK_D): Q ∘ K1[i]
            s = tl.dot(qk, k2_t, input_precision=PRECISION) * qk_scale  # (BLOCK_Q, BLOCK_K)
            s = tl.where(col_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))  # (BLOCK_Q,)
            alpha = tl.exp2(m_i - m_new)  # 0 on the first step
            p = tl.exp2(s - m_new[:, None])  # (BLOCK_Q, BLOCK_K)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            pv = tl.dot(p.to(v2.dtype), v2, input_precision=PRECISION)  # (BLOCK_Q, BLOCK_DV)
            acc = acc * alpha[:, None] + pv * v1_i.to(tl.float32)[None, :]  # V1[i] ∘ (P V2)
            m_i = m_new

    out = acc / l_i[:, None]  # (BLOCK_Q, BLOCK_DV)
    o_rows = bh * n_queries + rows  # row index into the contiguous (B * H * N, Dv) output
    tl.store(
        o_ptr + o_rows[:, None] * value_dim + dv[None, :],
        out.to(o_ptr.dtype.element_ty),
        mask=row_ok[:, None] & dv_ok[None, :],
    )


def interpreted() -> bool:
    """Whether the kernel runs under the Triton interpreter (decided when triton decorated it)."""
    return runs_interpreted(_tensor_forward_kernel)


def tensor_forward(
    q: torch.Tensor,
    k1: torch.Tensor,
    k2: torch.Tensor,
    v1: torch.Tensor,
    v2: torch.Tensor,
    *,
    scale: float,
    block_q: int = 64,
    block_k: int = 64,
) -> torch.Tensor:
    r"""Run the kernel: ``O[a] = sum_ij softmax_ij(S_a) V1[i] ∘ V2[j]``, forward only.

    Args:
        q: ``(B, H, N, D)`` float16, bfloat16 or float32, on a CUDA device (or on the CPU under
            the Triton interpreter); any strides.
        k1, k2: ``(B, Hkv, M, D)``, same dtype and device, ``H % Hkv == 0``.
        v1, v2: ``(B, Hkv, M, Dv)``, same dtype and device; ``D, Dv <= 256``.
        scale: multiplies the scores $\sum_l Q_{al} K_{1,il} K_{2,jl}$.
        block_q, block_k: requested tile sizes (queries, second keys), adjusted by
            :func:`qkv.backends.torch.triton.flash.tile_sizes`.

    Returns:
        ``O (B, H, N, Dv)`` in the dtype of ``q``, contiguous, allocated with
        :func:`qkv._outputs.empty`.
    """
    B, H, N, D = q.shape
    Hkv, M, Dv = k1.shape[1], k1.shape[2], v1.shape[3]
    out = _outputs.empty((B, H, N, Dv), like=q)
    args = (
        q, k1, k2, v1, v2, out,
        *q.stride(), *k1.stride(), *k2.stride(), *v1.stride(), *v2.stride(),
        H, H // Hkv, N, M, D, Dv, float(scale) * math.log2(math.e),
    )  # fmt: skip
    launch(_tensor_forward_kernel, q, M, Dv, args, block_q=block_q, block_k=block_k)
    return out
