r"""Bi-level routing attention (BiFormer; Zhu et al., arXiv 2303.08810).

Official code: `rayleizhu/BiFormer <https://github.com/rayleizhu/BiFormer>`_
(``ops/torch/bra.py``, class ``BiLevelRoutingAttention``).

Each query first picks, at the coarse level of regions, where to look, and then attends
token to token inside the regions it picked. The $H_s \times W_s$ map is cut into
$S \times S$ regions (``n_win`` $= S$) of $\tfrac{H_s}{S} \times \tfrac{W_s}{S}$ tokens each.

1. **Region-level queries and keys** are the means over each region's tokens, with the heads
   concatenated (the routing is shared by all heads):
   $Q^r, K^r \in \mathbb{R}^{S^2 \times C}$, $C = H \cdot D$.
2. **Region-to-region affinity and routing.** $A^r = Q^r (K^r)^\top \in \mathbb{R}^{S^2 \times S^2}$
   and $I^r = \operatorname{topkIndex}(A^r) \in \mathbb{N}^{S^2 \times k}$: row $i$ lists the $k$
   regions that region $i$ routes to. The routing is a hard selection; no gradient flows
   through it.
3. **Token-to-token attention** in the routed regions. Every query of region $i$ attends to
   the $k \cdot \tfrac{H_s W_s}{S^2}$ keys and values gathered from the regions of $I^r_i$,
   $K^g = \operatorname{gather}(K, I^r)$, $V^g = \operatorname{gather}(V, I^r)$:

$$
O = \operatorname{softmax}\!\big(s\,Q (K^g)^\top\big)\,V^g + \operatorname{LCE}(V),
$$

with $\operatorname{LCE}$ (LePE in the code) a depth-wise $k \times k$ convolution of the values
over the whole map (zero "same" padding; BiFormer uses $5 \times 5$), its weights passed in.

**Scale.** The official code scales by ``qk_dim ** -0.5``, the full query/key width
$C = H \cdot D$, not by the head width; this is the default here. ``per_head_scale=True``
gives the usual $D^{-1/2}$.

**Ties.** A region's top-$k$ is ordered by decreasing affinity; equal affinities are broken
in favour of the lower region index (regions are numbered row-major). The attention output
depends only on the *set* of routed regions.

**Where the official code differs, by choice.** The projections (``qkv``, ``wo``) belong to
the caller; the optional key/value down-sampling (``kv_downsample_mode``, ``identity`` in the
released models) and the soft or differentiable routing variants are not offered.

**Backends.** After the gather, the token attention is one ``sdpa`` call batched over the
$B S^2$ query regions. :func:`bilevel_routing` (the reference) calls
:func:`qkv.reference.core.sdpa`; :func:`dispatched_bilevel_routing` (exported as
``qkv.bilevel_routing``) runs that call through the dispatched ``qkv.sdpa``. Routing, gather
and LePE are NumPy in both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from qkv import _arrays, _checks
from qkv.errors import ParameterError, ShapeError
from qkv.reference import core
from qkv.reference.forms.agent_attention import depthwise_conv
from qkv.reference.local import davit

Array = np.ndarray
#: The official defaults: a 7 x 7 grid of regions, 4 routed regions per region.
DEFAULT_N_WIN = 7
DEFAULT_TOPK = 4


def _region_shape(spatial: tuple[int, int], n_win: int) -> tuple[int, int]:
    """Tokens per region side, ``(Hs / S, Ws / S)``; both sides must divide evenly."""
    if spatial[0] % n_win or spatial[1] % n_win:
        raise ShapeError(
            f"q: expected spatial sizes (Hs, Ws) divisible by the number of routing windows "
            f"n_win = {n_win}, got (Hs, Ws) = {spatial}"
        )
    return spatial[0] // n_win, spatial[1] // n_win


def _regions(x: Array, n_win: int) -> Array:
    """``x (B, H, Hs, Ws, D)`` as regions ``(B, S^2, H, w^2, D)``, regions row-major."""
    B, H, Hs, Ws, D = x.shape
    region = _region_shape((Hs, Ws), n_win)
    tokens = davit.window_partition(x, region)  # (B * S^2, H, w^2, D)
    return tokens.reshape(B, n_win * n_win, H, -1, D)  # (B, S^2, H, w^2, D)


def _affinity(q_regions: Array, k_regions: Array) -> Array:
    """$A^r = Q^r (K^r)^\\top$ from region tensors ``(B, S^2, H, w^2, D)``; ``(B, S^2, S^2)``."""
    B, S2 = q_regions.shape[:2]
    q_r = q_regions.mean(axis=3).reshape(B, S2, -1)  # (B, S^2, H * D): heads concatenated
    k_r = k_regions.mean(axis=3).reshape(B, S2, -1)  # (B, S^2, H * D)
    return q_r @ k_r.swapaxes(-1, -2)  # (B, S^2, S^2)


def _top_regions(affinity: Array, topk: int) -> Array:
    """Row-wise top-k of ``(B, S^2, S^2)``: decreasing affinity, ties to the lower index."""
    return np.argsort(-affinity, axis=-1, kind="stable")[..., :topk]  # (B, S^2, topk)


def region_affinity(q: Array, k: Array, *, n_win: int = DEFAULT_N_WIN) -> Array:
    r"""The region-to-region affinity $A^r = Q^r (K^r)^\top$.

    Args:
        q: queries ``(B, H, Hs, Ws, D)``.
        k: keys ``(B, H, Hs, Ws, D)``.
        n_win: regions per side $S$; ``Hs`` and ``Ws`` must be multiples of it.

    Returns:
        ``(B, S^2, S^2)``: entry ``(b, i, j)`` is the dot product of region ``i``'s mean query
        and region ``j``'s mean key, over all heads (regions numbered row-major).
    """
    check_bilevel_routing(q, k, k, n_win=n_win, topk=1)
    work = core._work_dtype(q.dtype)
    regions = [_regions(x.astype(work, copy=False), n_win) for x in (q, k)]
    return _affinity(*regions)


def routing_indices(
    q: Array, k: Array, *, n_win: int = DEFAULT_N_WIN, topk: int = DEFAULT_TOPK
) -> Array:
    r"""The routed regions $I^r = \operatorname{topkIndex}(A^r)$.

    Args:
        q: queries ``(B, H, Hs, Ws, D)``.
        k: keys ``(B, H, Hs, Ws, D)``.
        n_win: regions per side $S$; ``Hs`` and ``Ws`` must be multiples of it.
        topk: regions each region routes to, ``1 <= topk <= S^2``.

    Returns:
        ``(B, S^2, topk)`` int64 region indices (row-major), by decreasing affinity, equal
        affinities in increasing index order.
    """
    check_bilevel_routing(q, k, k, n_win=n_win, topk=topk)
    return _top_regions(region_affinity(q, k, n_win=n_win), topk)


def check_bilevel_routing(
    q: Any,
    k: Any,
    v: Any,
    *,
    n_win: Any = DEFAULT_N_WIN,
    topk: Any = DEFAULT_TOPK,
    lepe: Any = None,
    lepe_bias: Any = None,
    scale: Any = None,
    per_head_scale: Any = False,
    **_: Any,
) -> None:
    """All argument checks of bi-level routing attention (see :func:`bilevel_routing`)."""
    dims = davit.spatial_attention(q, k, v)
    if dims.Hkv != dims.H:
        raise ShapeError(
            f"k, v: expected as many heads as q (H = {dims.H}; the routing is shared by all "
            f"heads), got {dims.Hkv}"
        )
    n_win = _checks.positive_int("n_win", n_win)
    _region_shape(tuple(q.shape[2:4]), n_win)
    regions = n_win * n_win
    if (
        isinstance(topk, bool)
        or not isinstance(topk, (int, np.integer))
        or not (1 <= topk <= regions)
    ):
        raise ParameterError(
            f"topk: expected an integer from 1 to the region count n_win^2 = {regions}, "
            f"got {topk!r}"
        )
    if lepe is not None:
        _checks.array("lepe", lepe, rank=4, layout="(H, Dv, kh, kw)")
        if tuple(lepe.shape[:2]) != (dims.H, dims.Dv) or any(r % 2 == 0 for r in lepe.shape[2:]):
            raise ShapeError(
                f"lepe: expected (H, Dv, kh, kw) = ({dims.H}, {dims.Dv}, odd, odd), "
                f"got {tuple(lepe.shape)}"
            )
        if lepe_bias is not None:
            _checks.array("lepe_bias", lepe_bias, rank=2, layout="(H, Dv)")
            if tuple(lepe_bias.shape) != (dims.H, dims.Dv):
                raise ShapeError(
                    f"lepe_bias: expected (H, Dv) = ({dims.H}, {dims.Dv}), "
                    f"got {tuple(lepe_bias.shape)}"
                )
    elif lepe_bias is not None:
        raise ParameterError("lepe_bias: expected None without lepe weights")
    davit.check_scale(scale)
    davit.check_flag("per_head_scale", per_head_scale)
    if per_head_scale and scale is not None:
        raise ParameterError("per_head_scale: expected False when an explicit scale is given")


def _bilevel_routing(
    q: Array,
    k: Array,
    v: Array,
    attend: Callable[..., Array],
    *,
    n_win: int,
    topk: int,
    lepe: Array | None,
    lepe_bias: Array | None,
    scale: float | None,
    per_head_scale: bool,
) -> Array:
    """Bi-level routing attention on checked NumPy arrays, token attention run by ``attend``."""
    B, H, Hs, Ws, D = q.shape
    Dv = v.shape[-1]
    S2 = n_win * n_win
    work = core._work_dtype(q.dtype)
    qw, kw, vw = (x.astype(work, copy=False) for x in (q, k, v))
    q_reg, k_reg, v_reg = (_regions(x, n_win) for x in (qw, kw, vw))  # (B, S^2, H, w^2, D)
    w2 = q_reg.shape[3]
    routes = _top_regions(_affinity(q_reg, k_reg), topk)  # (B, S^2, topk)
    batch = np.arange(B)[:, None, None]  # (B, 1, 1)

    def gather(regions: Array) -> Array:
        picked = regions[batch, routes]  # (B, S^2, topk, H, w^2, d)
        picked = picked.transpose(0, 1, 3, 2, 4, 5)  # (B, S^2, H, topk, w^2, d)
        return picked.reshape(B * S2, H, topk * w2, -1)  # (B * S^2, H, topk * w^2, d)

    if scale is None:
        scale = D**-0.5 if per_head_scale else (H * D) ** -0.5
    queries = q_reg.reshape(B * S2, H, w2, D)  # (B * S^2, H, w^2, D)
    out = attend(queries, gather(k_reg), gather(v_reg), scale=float(scale))  # (B*S^2, H, w^2, Dv)
    region = (Hs // n_win, Ws // n_win)
    out = davit.window_unpartition(out, region, (Hs, Ws)).astype(work, copy=False)
    if lepe is not None:
        flat = vw.reshape(B, H, Hs * Ws, Dv)  # (B, H, Hs * Ws, Dv)
        bias = None if lepe_bias is None else lepe_bias.astype(work, copy=False)
        conv = depthwise_conv(flat, lepe.astype(work, copy=False), bias, grid=(Hs, Ws))
        out = out + conv.reshape(B, H, Hs, Ws, Dv)  # (B, H, Hs, Ws, Dv)
    return out.astype(q.dtype, copy=False)


def bilevel_routing(
    q: Array,
    k: Array,
    v: Array,
    *,
    n_win: int = DEFAULT_N_WIN,
    topk: int = DEFAULT_TOPK,
    lepe: Array | None = None,
    lepe_bias: Array | None = None,
    scale: float | None = None,
    per_head_scale: bool = False,
) -> Array:
    r"""Bi-level routing attention, $O = \operatorname{softmax}(s\,Q (K^g)^\top) V^g + \operatorname{LCE}(V)$.

    Args:
        q: queries ``(B, H, Hs, Ws, D)`` on a map of ``Hs x Ws`` tokens.
        k: keys ``(B, H, Hs, Ws, D)`` (as many heads as ``q``: the routing is shared by all
            heads).
        v: values ``(B, H, Hs, Ws, Dv)``.
        n_win: regions per side $S$ (default 7, the official value); ``Hs`` and ``Ws`` must be
            multiples of it.
        topk: regions each region routes to, from 1 to $S^2$ (default 4).
        lepe: the LCE/LePE depth-wise convolution weights ``(H, Dv, kh, kw)``, odd sizes, zero
            "same" padding over the whole map; channel ``h * Dv + c`` of the official
            ``nn.Conv2d(dim, dim, k, groups=dim)`` is ``lepe[h, c]``. ``None``: no LCE term.
        lepe_bias: the convolution's bias ``(H, Dv)``, or ``None``.
        scale: $s$; default $(H D)^{-1/2}$, the official code's full query/key width.
        per_head_scale: use $s = D^{-1/2}$ instead (the usual per-head scale).

    Returns:
        ``(B, H, Hs, Ws, Dv)`` in the dtype of ``q``. With ``topk = S^2`` and no ``lepe`` it is
        full attention over the map at scale $s$.
    """
    check_bilevel_routing(
        q,
        k,
        v,
        n_win=n_win,
        topk=topk,
        lepe=lepe,
        lepe_bias=lepe_bias,
        scale=scale,
        per_head_scale=per_head_scale,
    )
    return _bilevel_routing(
        q,
        k,
        v,
        core.sdpa,
        n_win=n_win,
        topk=topk,
        lepe=lepe,
        lepe_bias=lepe_bias,
        scale=scale,
        per_head_scale=per_head_scale,
    )


def dispatched_bilevel_routing(
    q: Any,
    k: Any,
    v: Any,
    *,
    n_win: int = DEFAULT_N_WIN,
    topk: int = DEFAULT_TOPK,
    lepe: Any = None,
    lepe_bias: Any = None,
    scale: float | None = None,
    per_head_scale: bool = False,
    backend: Any = None,
) -> Any:
    """Bi-level routing attention through the dispatched ``qkv.sdpa`` (``qkv.bilevel_routing``).

    Same arguments and result as :func:`bilevel_routing`, plus ``backend=`` (a name or module;
    default: the backend of ``qkv.use_backend`` / ``QKV_BACKEND``), which runs the token
    attention batched over the query regions. Routing, gather and LePE run in NumPy. The
    result has the array type of ``q``.
    """
    qn, kn, vn = (_arrays.to_numpy(x) for x in (q, k, v))
    weights = {
        "lepe": None if lepe is None else _arrays.to_numpy(lepe),
        "lepe_bias": None if lepe_bias is None else _arrays.to_numpy(lepe_bias),
    }
    options = dict(n_win=n_win, topk=topk, scale=scale, per_head_scale=per_head_scale)
    check_bilevel_routing(qn, kn, vn, **options, **weights)
    out = _bilevel_routing(qn, kn, vn, davit.dispatched_sdpa(backend), **options, **weights)
    return _arrays.from_numpy(out, q)
