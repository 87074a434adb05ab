r"""Neighborhood attention (Hassani et al., "Faster Neighborhood Attention: Reducing the O(n^2)
Cost of Self Attention at the Threadblock Level", arXiv 2403.04690; official code:
https://github.com/SHI-Labs/NATTEN).

Each query attends only to the ``kernel_size`` keys nearest to it along every spatial axis, so
the cost is linear in the number of tokens. With queries, keys and values laid out on a grid of
1, 2 or 3 spatial axes, query $i$ sees the key set $\mathcal{N}(i)$ and

$$
O_i = \sum_{j \in \mathcal{N}(i)} \operatorname{softmax}_{j \in \mathcal{N}(i)}
\big(\text{scale}\,\langle q_i, k_j\rangle\big)\, v_j ,
\qquad \mathcal{N}(i) = \mathcal{N}_1(i_1) \times \dots \times \mathcal{N}_r(i_r).
$$

The set is a product of one-axis windows. Along an axis of length $L$ with kernel size $k$,
dilation $d$ and stride $s$ (NATTEN's semantics, as in its reference and Flex masks):

* **dilation groups**: position $i$ belongs to group $g = i \bmod d$ at place $i' = \lfloor i/d
  \rfloor$; the group holds $L_g = \lceil (L - g)/d \rceil$ positions and a query only sees keys
  of its own group;
* **stride**: the places of a group are cut into runs of $s$; every query of a run uses the
  window of the run's *leader*, $\ell = \min(s\lfloor i'/s\rfloor + \lfloor s/2\rfloor, L_g - 1)$
  (the middle one; for even $s$ the right one of the two);
* **non-causal window**: $w_l = \lfloor k/2 \rfloor$ keys left and $w_r = \lfloor k/2 \rfloor
  + (k \bmod 2) - 1$ right of the centre $c = \operatorname{clamp}(\ell, w_l, L_g - 1 - w_r)$:
  $j' \in [c - w_l, c + w_r]$. Near a border the window is shifted inward, so every query sees
  exactly $k$ keys; an even $k$ has one key more on the left than on the right;
* **causal window**: the leader is the run's last place, $\ell = \min(s\lfloor i'/s\rfloor + s
  - 1, L_g - 1)$, and $j' \in [\max(0, \ell - k + 1), i']$: $\min(k, i' + 1)$ keys for $s = 1$.

Key $j'$ of group $g$ is position $j = j' d + g$. Every group must hold a whole window,
$k\,d \le L$, and $1 \le s \le k$ (so that a causal query always sees itself).

:func:`neighborhood` gathers each query's neighbours by index and never forms an ``N x N``
array; :func:`neighbor_mask` builds the same pattern as a boolean ``(N, N)`` mask from the
pairwise rule, for teaching and as an independent check through
:func:`qkv.reference.core.sdpa`.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import numpy as np

from qkv import _arrays, _checks
from qkv.errors import ParameterError, ShapeError
from qkv.reference import core

Array = np.ndarray

#: NAT's and DiNAT's kernel size (7 per axis).
DEFAULT_KERNEL_SIZE = 7
#: Spatial ranks the op takes: 1-D sequences, 2-D images, 3-D volumes or videos.
SPATIAL_RANKS = (1, 2, 3)


class NeighborhoodDims(NamedTuple):
    """Sizes and per-axis hyperparameters of a neighborhood-attention call.

    ``q (B, H, *spatial, D)``, ``k (B, Hkv, *spatial, D)``, ``v (B, Hkv, *spatial, Dv)``; the
    per-axis tuples have one entry per spatial axis.
    """

    B: int
    H: int
    Hkv: int
    spatial: tuple[int, ...]
    D: int
    Dv: int
    kernel_size: tuple[int, ...]
    dilation: tuple[int, ...]
    stride: tuple[int, ...]
    causal: tuple[bool, ...]

    @property
    def N(self) -> int:
        """Number of tokens, the product of the spatial sizes."""
        return math.prod(self.spatial)

    @property
    def K(self) -> int:
        """Neighbours per query (slots), the product of the kernel sizes."""
        return math.prod(self.kernel_size)

    @property
    def group(self) -> int:
        """Query heads per KV head, ``G = H / Hkv``."""
        return self.H // self.Hkv


def _per_axis(name: str, value: Any, rank: int, kind: type) -> tuple:
    """``value`` (one entry, or a tuple/list of ``rank`` entries) as a tuple of ``rank``."""
    if kind is bool:
        ok = isinstance(value, (bool, np.bool_))
        noun = "a bool"
    else:
        ok = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
        noun = "an int"
    if ok:
        return (kind(value),) * rank
    if isinstance(value, (tuple, list)):
        if len(value) != rank:
            raise ParameterError(
                f"{name}: expected {noun} or a tuple of {rank} (one per spatial axis), "
                f"got {tuple(value)!r} of length {len(value)}"
            )
        return tuple(_per_axis(name, x, 1, kind)[0] for x in value)
    raise ParameterError(f"{name}: expected {noun} or a tuple of {rank}, got {value!r}")


def check_axes(
    spatial: tuple[int, ...],
    *,
    kernel_size: Any = DEFAULT_KERNEL_SIZE,
    dilation: Any = 1,
    stride: Any = 1,
    causal: Any = False,
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[bool, ...]]:
    """Per-axis ``(kernel_size, dilation, stride, causal)`` for a grid ``spatial``, checked.

    Raises ``ParameterError`` for a tuple of the wrong length, ``kernel_size < 1``,
    ``dilation < 1``, ``kernel_size * dilation > length`` on some axis, or a stride outside
    ``[1, kernel_size]``.
    """
    rank = len(spatial)
    ks = _per_axis("kernel_size", kernel_size, rank, int)
    ds = _per_axis("dilation", dilation, rank, int)
    ss = _per_axis("stride", stride, rank, int)
    cs = _per_axis("causal", causal, rank, bool)
    for axis, (L, k, d, s) in enumerate(zip(spatial, ks, ds, ss, strict=True)):
        if k < 1:
            raise ParameterError(f"kernel_size: expected >= 1 on axis {axis}, got {k}")
        if d < 1:
            raise ParameterError(f"dilation: expected >= 1 on axis {axis}, got {d}")
        if k * d > L:
            raise ParameterError(
                f"kernel_size, dilation: expected kernel_size * dilation <= length on axis "
                f"{axis} (every dilation group must hold a whole window), got {k} * {d} = "
                f"{k * d} > {L}"
            )
        if not 1 <= s <= k:
            raise ParameterError(
                f"stride: expected 1 <= stride <= kernel_size on axis {axis}, got stride {s} "
                f"with kernel_size {k}"
            )
    return ks, ds, ss, cs


def check_neighborhood(
    q: Any,
    k: Any,
    v: Any,
    *,
    kernel_size: Any = DEFAULT_KERNEL_SIZE,
    dilation: Any = 1,
    stride: Any = 1,
    causal: Any = False,
    scale: float | None = None,
    **_: Any,
) -> NeighborhoodDims:
    """Check the arguments of :func:`neighborhood` and return its sizes.

    Raises ``ShapeError`` for ranks other than 4-6 (1-3 spatial axes), ``k``/``v`` whose rank,
    batch, heads, spatial sizes or head dim disagree with ``q``, ``H % Hkv != 0`` or empty axes;
    ``DTypeError`` for non-float or mixed dtypes; ``ParameterError`` for bad per-axis
    hyperparameters (see :func:`check_axes`) or a ``scale`` that is not finite and > 0.
    """
    layout_q, layout_k = "(B, H, *spatial, D)", "(B, Hkv, *spatial, D)"
    layout_v = "(B, Hkv, *spatial, Dv)"
    if not _arrays.is_array(q):
        raise TypeError(f"q: expected a NumPy, torch or CuPy array {layout_q}, got {type(q)}")
    rank = q.ndim
    if rank - 3 not in SPATIAL_RANKS:
        raise ShapeError(
            f"q: expected rank 4, 5 or 6 {layout_q} with 1-3 spatial axes, "
            f"got shape {tuple(q.shape)}"
        )
    _checks.array("q", q, rank=rank, layout=layout_q)
    _checks.array("k", k, rank=rank, layout=layout_k)
    _checks.array("v", v, rank=rank, layout=layout_v)
    _checks.same_dtype(q=q, k=k, v=v)
    B, H, *spatial, D = (int(n) for n in q.shape)
    Bk, Hkv, *spatial_k, Dk = (int(n) for n in k.shape)
    Bv, Hv, *spatial_v, Dv = (int(n) for n in v.shape)
    if Bk != B or Bv != B:
        raise ShapeError(f"k, v: expected batch B={B} as q, got k {Bk} and v {Bv}")
    if spatial_k != spatial or spatial_v != spatial:
        raise ShapeError(
            f"k, v: expected the spatial sizes {tuple(spatial)} of q, got k "
            f"{tuple(spatial_k)} and v {tuple(spatial_v)}"
        )
    if Dk != D:
        raise ShapeError(f"k: expected head dim D={D} as q, got {Dk}")
    if Hv != Hkv:
        raise ShapeError(f"v: expected Hkv={Hkv} heads as k, got {Hv}")
    if H % Hkv:
        raise ShapeError(
            f"q, k: expected query heads H divisible by KV heads Hkv, got H={H}, Hkv={Hkv}"
        )
    ks, ds, ss, cs = check_axes(
        tuple(spatial), kernel_size=kernel_size, dilation=dilation, stride=stride, causal=causal
    )
    if scale is not None and not (
        isinstance(scale, (int, float, np.integer, np.floating))
        and not isinstance(scale, (bool, np.bool_))
        and math.isfinite(scale)
        and scale > 0
    ):
        raise ParameterError(f"scale: expected a finite number > 0 or None, got {scale!r}")
    return NeighborhoodDims(B, H, Hkv, tuple(spatial), D, Dv, ks, ds, ss, cs)


def axis_window(
    index: Array, length: int, kernel_size: int, dilation: int, stride: int, causal: bool
) -> tuple[Array, Array]:
    r"""The window of each query position ``index`` along one axis.

    Returns ``(first, count)``, integer arrays shaped like ``index``: the query sees the keys
    ``first + t * dilation`` for ``t = 0 .. count - 1`` (``count = kernel_size`` unless
    causal). See the module docstring for the rule: group $g = i \bmod d$, place $i' = \lfloor
    i/d \rfloor$, leader $\ell$, then $j' \in [c - w_l, c + w_r]$ or $[\max(0, \ell - k + 1), i']$.
    """
    k, d, s = kernel_size, dilation, stride
    g, place = index % d, index // d
    group_length = length // d + (g < length % d)  # L_g
    if causal:
        leader = np.minimum(place // s * s + s - 1, group_length - 1)
        lo = np.maximum(leader - k + 1, 0)
        count = place - lo + 1
    else:
        leader = np.minimum(place // s * s + s // 2, group_length - 1)
        left, right = k // 2, k // 2 + k % 2 - 1  # w_l, w_r
        centre = np.clip(leader, left, group_length - 1 - right)
        lo = centre - left
        count = np.full_like(index, k)
    return lo * d + g, count


def neighbor_indices(
    spatial: tuple[int, ...],
    *,
    kernel_size: Any = DEFAULT_KERNEL_SIZE,
    dilation: Any = 1,
    stride: Any = 1,
    causal: Any = False,
) -> tuple[Array, Array]:
    """The neighbours of every query of a grid ``spatial``, as flat token indices.

    Returns ``keys (N, K)`` int64 and ``valid (N, K)`` bool, ``N = prod(spatial)`` (row-major
    token order), ``K = prod(kernel_size)`` slots ordered row-major over the per-axis slots;
    per axis, slot ``t`` is the window's ``t``-th key in increasing position. Slots past a causal
    window's end are invalid (their ``keys`` entry is 0).
    """
    ks, ds, ss, cs = check_axes(
        tuple(spatial), kernel_size=kernel_size, dilation=dilation, stride=stride, causal=causal
    )
    rank = len(spatial)
    coords = np.indices(spatial).reshape(rank, -1)  # (rank, N)
    keys = np.zeros((coords.shape[1], 1), dtype=np.int64)  # (N, 1), grows to (N, K)
    valid = np.ones((coords.shape[1], 1), dtype=bool)  # (N, 1)
    for axis in range(rank):
        first, count = axis_window(
            coords[axis], spatial[axis], ks[axis], ds[axis], ss[axis], cs[axis]
        )
        t = np.arange(ks[axis])  # (k,)
        key_axis = first[:, None] + t[None, :] * ds[axis]  # (N, k)
        ok_axis = t[None, :] < count[:, None]  # (N, k)
        keys = (keys[:, :, None] * spatial[axis] + key_axis[:, None, :]).reshape(len(keys), -1)
        valid = (valid[:, :, None] & ok_axis[:, None, :]).reshape(len(valid), -1)  # (N, K)
    return np.where(valid, keys, 0), valid


def axis_mask(
    length: int, kernel_size: int, dilation: int = 1, stride: int = 1, causal: bool = False
) -> Array:
    r"""Which key position each query position may see along one axis, ``(L, L)`` bool.

    Written pairwise (query $i$ against every key $j$), independently of
    :func:`axis_window`: same dilation group, then the non-causal band around the clamped
    centre, or $j' \le i'$ and $\ell - j' < k$ for the causal form.
    """
    k, d, s = kernel_size, dilation, stride
    i = np.arange(length)[:, None]  # (L, 1)
    j = np.arange(length)[None, :]  # (1, L)
    same_group = i % d == j % d  # (L, L)
    ip, jp = i // d, j // d
    group_length = (length - i % d + d - 1) // d  # ceil((L - g) / d), (L, 1)
    if causal:
        leader = np.minimum(ip - ip % s + s - 1, group_length - 1)
        inside = (jp <= ip) & (leader - jp < k)
    else:
        leader = np.minimum(ip - ip % s + s // 2, group_length - 1)
        centre = np.maximum(np.minimum(leader, group_length - 1 - (k - 1 - k // 2)), k // 2)
        inside = (jp >= centre - k // 2) & (jp - centre <= k - 1 - k // 2)
    return same_group & inside


def neighbor_mask(
    spatial: tuple[int, ...],
    *,
    kernel_size: Any = DEFAULT_KERNEL_SIZE,
    dilation: Any = 1,
    stride: Any = 1,
    causal: Any = False,
) -> Array:
    """The neighborhood pattern as a boolean attention mask ``(N, N)`` (True = attend).

    Query ``i`` (row-major token index) may attend key ``j`` iff every axis allows the pair
    (:func:`axis_mask`); for ``qkv.sdpa(q, k, v, mask=...)`` on ``(B, H, N, D)`` tensors this
    gives the same output as :func:`neighborhood`, at the cost of an ``N x N`` array.
    """
    ks, ds, ss, cs = check_axes(
        tuple(spatial), kernel_size=kernel_size, dilation=dilation, stride=stride, causal=causal
    )
    per_axis = [axis_mask(*args) for args in zip(spatial, ks, ds, ss, cs, strict=True)]
    # kron of (L1, L1) and (L2, L2) is indexed [(i1, i2), (j1, j2)] in row-major order.
    return functools.reduce(np.kron, [m.astype(np.uint8) for m in per_axis]).astype(bool)


def neighborhood(
    q: Array,
    k: Array,
    v: Array,
    *,
    kernel_size: int | tuple[int, ...] = DEFAULT_KERNEL_SIZE,
    dilation: int | tuple[int, ...] = 1,
    stride: int | tuple[int, ...] = 1,
    causal: bool | tuple[bool, ...] = False,
    scale: float | None = None,
    return_weights: bool = False,
    return_lse: bool = False,
) -> Array | tuple[Array, ...]:
    r"""Neighborhood attention over 1-D, 2-D or 3-D token grids (NATTEN semantics).

    $$
    S_{i,t} = \text{scale}\,\langle q_i, k_{n(i,t)} \rangle, \qquad
    P_{i,t} = \frac{e^{S_{i,t} - m_i}}{\sum_{t'} e^{S_{i,t'} - m_i}}, \qquad
    O_i = \sum_t P_{i,t}\, v_{n(i,t)},
    $$

    where $n(i, t)$ is the $t$-th neighbour of query $i$ (:func:`neighbor_indices`) and
    $m_i = \max_t S_{i,t}$. The neighbours are gathered by index: the work and memory are
    $O(N K D)$ with $K = \prod k$, never $N \times N$.

    Args:
        q: queries ``(B, H, *spatial, D)`` with 1, 2 or 3 spatial axes.
        k: keys ``(B, Hkv, *spatial, D)``; ``H`` a multiple of ``Hkv`` (query head ``h`` reads
            KV head ``h // (H // Hkv)``).
        v: values ``(B, Hkv, *spatial, Dv)``.
        kernel_size: window size per axis (an int for every axis, or a tuple); default 7 as in
            NAT and DiNAT. Even sizes are allowed: the window then has ``k/2`` keys left of its
            centre and ``k/2 - 1`` right.
        dilation: gap between neighbours per axis; ``kernel_size * dilation <= length``.
        stride: queries per shared window per axis, ``1 <= stride <= kernel_size``;
            ``stride = kernel_size`` gives blocked (window) attention.
        causal: per axis, a query sees only keys at or before it (NATTEN's ``is_causal``);
            a query at place $i'$ of its group then sees $\min(k, i' + 1)$ keys for stride 1.
        scale: multiplies $QK^\top$; default $1/\sqrt{D}$.
        return_weights: also return the weights ``P (B, H, *spatial, K)`` in the slot order of
            :func:`neighbor_indices` (0 in a causal window's unused slots).
        return_lse: also return the log-sum-exp of each query's scores ``(B, H, *spatial)``.

    Returns:
        ``O (B, H, *spatial, Dv)`` in the dtype of ``q``, or the tuple ``(O, P)``, ``(O, lse)``
        or ``(O, P, lse)``; ``lse`` is float64 for float64 inputs and float32 otherwise. The
        arithmetic is float64 for float64 inputs and float32 otherwise.
    """
    dims = check_neighborhood(
        q, k, v, kernel_size=kernel_size, dilation=dilation, stride=stride, causal=causal,
        scale=scale,
    )  # fmt: skip
    B, H, Hkv, spatial, D, Dv = dims[:6]
    N, K, G = dims.N, dims.K, dims.group
    keys, valid = neighbor_indices(
        spatial, kernel_size=dims.kernel_size, dilation=dims.dilation, stride=dims.stride,
        causal=dims.causal,
    )  # fmt: skip  # (N, K) each
    work = core._work_dtype(q.dtype)
    scale = float(1.0 / np.sqrt(D) if scale is None else scale)
    qg = q.astype(work, copy=False).reshape(B, Hkv, G, N, D)  # (B, Hkv, G, N, D)
    kn = k.astype(work, copy=False).reshape(B, Hkv, N, D)[:, :, keys]  # (B, Hkv, N, K, D)
    vn = v.astype(work, copy=False).reshape(B, Hkv, N, Dv)[:, :, keys]  # (B, Hkv, N, K, Dv)
    s = scale * np.einsum("bhgnd,bhnkd->bhgnk", qg, kn)  # (B, Hkv, G, N, K)
    s = np.where(valid, s, -np.inf)
    row_max = s.max(axis=-1, keepdims=True)  # (B, Hkv, G, N, 1); finite: slot 0 is valid
    p = np.exp(s - row_max)  # (B, Hkv, G, N, K), 0 in unused slots
    row_sum = p.sum(axis=-1, keepdims=True)  # (B, Hkv, G, N, 1), >= 1
    weights = p / row_sum  # (B, Hkv, G, N, K)
    out = np.einsum("bhgnk,bhnkd->bhgnd", weights, vn)  # (B, Hkv, G, N, Dv)
    out = out.reshape(B, H, *spatial, Dv).astype(q.dtype, copy=False)  # (B, H, *spatial, Dv)
    if not (return_weights or return_lse):
        return out
    results: list[Array] = [out]
    if return_weights:
        results.append(weights.reshape(B, H, *spatial, K).astype(q.dtype, copy=False))
    if return_lse:
        lse = (np.log(row_sum) + row_max)[..., 0]  # (B, Hkv, G, N)
        results.append(lse.reshape(B, H, *spatial))  # (B, H, *spatial)
    return tuple(results)
