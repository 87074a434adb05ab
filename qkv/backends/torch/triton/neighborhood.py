r"""Neighborhood attention forward as a Triton kernel: one tile of queries per program.

Program ``(b * H + h) * ceil(N / BLOCK_Q) + i`` owns the queries ``i * BLOCK_Q ...`` (flat,
row-major token indices) of batch ``b`` and head ``h`` and reads KV head ``h // G``. Every grid
is handled as 3-D (missing leading axes have length 1, kernel 1). Each row computes its three
one-axis windows arithmetically (first key and key count, the rule of
:func:`qkv.reference.local.neighborhood_attention.axis_window`), then visits the ``K = k_0 k_1 k_2``
slots one at a time; slot $t$ of row $i$ is key

$$
n(i, t) = \big((f_0 + t_0 d_0) L_1 + f_1 + t_1 d_1\big) L_2 + f_2 + t_2 d_2 ,
$$

valid when $t_a < c_a$ on every axis. The key and value rows are loaded at these computed
addresses (no index array is read, so the Triton interpreter runs it too), and the online
softmax folds them in: $m' = \max(m, s)$, $\ell' = e^{m - m'}\ell + e^{s - m'}$,
$\tilde O' = e^{m - m'}\tilde O + e^{s - m'} v$. Scores and accumulator are float32; nothing of
size ``N x N`` exists. Dot products are row-wise reductions (each row reads its own keys), not
tensor-core tiles.

This module imports triton; import it only when the kernel is about to run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import triton
import triton.language as tl

from qkv import _outputs
from qkv.backends.torch.triton.flash import _pow2, runs_interpreted

if TYPE_CHECKING:
    import torch

#: Queries per program (at most; a short grid takes the power of two >= max(N, 16)).
BLOCK_Q = 32


@triton.jit
def _window(i, length, k, d, s, causal):
    """First key and key count of positions ``i`` along one axis (vectors of ``BLOCK_Q``)."""
    g = i % d
    place = i // d
    group_length = length // d + (g < length % d).to(tl.int32)
    leader_c = tl.minimum(place // s * s + s - 1, group_length - 1)
    lo_c = tl.maximum(leader_c - k + 1, 0)
    leader = tl.minimum(place // s * s + s // 2, group_length - 1)
    left = k // 2
    right = k // 2 + k % 2 - 1
    lo = tl.minimum(tl.maximum(leader, left), group_length - 1 - right) - left
    first = tl.where(causal != 0, lo_c, lo) * d + g
    count = tl.where(causal != 0, place - lo_c + 1, k)
    return first, count


@triton.jit
def _neighborhood_forward_kernel(
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
    sk_n,
    sk_d,
    sv_b,
    sv_h,
    sv_n,
    sv_d,
    n_heads,
    group,
    n_tokens,
    head_dim,
    value_dim,
    L0,
    L1,
    L2,
    k0,
    k1,
    k2,
    d0,
    d1,
    d2,
    s0,
    s1,
    s2,
    c0,
    c1,
    c2,
    scale,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """One ``(BLOCK, Dv)`` tile of ``O (B, H, N, Dv)`` and ``lse (B, H, N)`` (contiguous).

    ``q (B, H, N, D)``, ``k (B, Hkv, N, D)``, ``v (B, Hkv, N, Dv)`` are read through strides.
    """
    n_tiles = tl.cdiv(n_tokens, BLOCK)
    pid = tl.program_id(0)
    tile = pid % n_tiles
    bh = (pid // n_tiles).to(tl.int64)
    b = bh // n_heads
    h = bh % n_heads
    hk = h // group
    rows = tile * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,) flat query indices
    row_ok = rows < n_tokens
    dq = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q = tl.load(
        q_ptr + b * sq_b + h * sq_h + rows[:, None] * sq_n + dq[None, :] * sq_d,
        mask=row_ok[:, None] & (dq[None, :] < head_dim),
        other=0.0,
    ).to(tl.float32)  # (BLOCK, BLOCK_D)
    f0, n0 = _window(rows // (L1 * L2), L0, k0, d0, s0, c0)
    f1, n1 = _window(rows // L2 % L1, L1, k1, d1, s1, c1)
    f2, n2 = _window(rows % L2, L2, k2, d2, s2, c2)
    k_base = k_ptr + b * sk_b + hk * sk_h
    v_base = v_ptr + b * sv_b + hk * sv_h

    m = tl.full((BLOCK,), -1e30, tl.float32)  # running maximum (finite: no inf - inf)
    l_sum = tl.zeros((BLOCK,), tl.float32)
    acc = tl.zeros((BLOCK, BLOCK_DV), tl.float32)
    for t in range(0, k0 * k1 * k2):
        t0 = t // (k1 * k2)
        t1 = t // k2 % k1
        t2 = t % k2
        valid = row_ok & (t0 < n0) & (t1 < n1) & (t2 < n2)  # (BLOCK,)
        key = ((f0 + t0 * d0) * L1 + f1 + t1 * d1) * L2 + f2 + t2 * d2  # (BLOCK,)
        key = tl.where(valid, key, 0)
        k_rows = tl.load(
            k_base + key[:, None] * sk_n + dq[None, :] * sk_d,
            mask=valid[:, None] & (dq[None, :] < head_dim),
            other=0.0,
        ).to(tl.float32)  # (BLOCK, BLOCK_D)
        s = tl.sum(q * k_rows, axis=1) * scale  # (BLOCK,)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m, s)
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new)  # 0 where invalid
        v_rows = tl.load(
            v_base + key[:, None] * sv_n + dv[None, :] * sv_d,
            mask=valid[:, None] & (dv[None, :] < value_dim),
            other=0.0,
        ).to(tl.float32)  # (BLOCK, BLOCK_DV)
        l_sum = l_sum * alpha + p
        acc = acc * alpha[:, None] + p[:, None] * v_rows
        m = m_new

    safe = tl.where(l_sum > 0, l_sum, 1.0)
    o_rows = bh * n_tokens + rows  # row index into the contiguous (B * H * N, Dv) output
    tl.store(
        o_ptr + o_rows[:, None] * value_dim + dv[None, :],
        (acc / safe[:, None]).to(o_ptr.dtype.element_ty),
        mask=row_ok[:, None] & (dv[None, :] < value_dim),
    )
    tl.store(lse_ptr + o_rows, m + tl.log(safe), mask=row_ok)


def interpreted() -> bool:
    """Whether the kernel runs under the Triton interpreter (decided when triton decorated it)."""
    return runs_interpreted(_neighborhood_forward_kernel)


def neighborhood_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    grid: tuple[int, int, int],
    kernel_size: tuple[int, int, int],
    dilation: tuple[int, int, int],
    stride: tuple[int, int, int],
    causal: tuple[bool, bool, bool],
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the kernel on flattened tokens; forward only.

    Args:
        q: ``(B, H, N, D)`` float16, bfloat16 or float32, on a CUDA device (or on the CPU under
            the Triton interpreter); any strides.
        k: ``(B, Hkv, N, D)``, same dtype and device, ``H % Hkv == 0``.
        v: ``(B, Hkv, N, Dv)``, same dtype and device.
        grid: the spatial sizes padded in front to three axes (``N`` is their product).
        kernel_size: per-axis kernel sizes, padded with 1.
        dilation: per-axis dilations, padded with 1.
        stride: per-axis strides, padded with 1.
        causal: per-axis causal flags, padded with False.
        scale: multiplies $QK^\\top$.

    Returns:
        ``O (B, H, N, Dv)`` in the dtype of ``q`` and ``lse (B, H, N)`` float32, contiguous.
    """
    import torch

    B, H, N, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[3]
    out = _outputs.empty((B, H, N, Dv), like=q)
    lse = _outputs.empty((B, H, N), like=q, dtype=torch.float32)
    block = min(BLOCK_Q, _pow2(N))
    args = (
        q, k, v, out, lse, *q.stride(), *k.stride(), *v.stride(),
        H, H // Hkv, N, D, Dv, *grid, *kernel_size, *dilation, *stride,
        *(int(c) for c in causal), float(scale),
    )  # fmt: skip
    launch_grid = (triton.cdiv(N, block) * B * H,)
    _neighborhood_forward_kernel[launch_grid](
        *args, BLOCK=block, BLOCK_D=_pow2(D), BLOCK_DV=_pow2(Dv), num_warps=4
    )
    return out, lse
