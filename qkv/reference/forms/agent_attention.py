r"""Agent Attention: softmax attention through a few agent tokens (Han et al., arXiv 2312.08874).

Official code: `LeapLabTHU/Agent-Attention <https://github.com/LeapLabTHU/Agent-Attention>`_
(``agent_transformer/models/agent_deit.py``).

A small set of $n \ll N$ **agent tokens** $A \in \mathbb{R}^{n \times d}$ stands between the $N$
queries and the $M$ keys. The agents first *aggregate* from the keys and values, then
*broadcast* back to the queries, two softmax hops of cost $O(N n d)$ each:

$$
V_A = \sigma\!\big(s\,A K^\top + B_1\big)\, V, \qquad
O = \sigma\!\big(s\,Q A^\top + B_2\big)\, V_A + \operatorname{DWC}(V),
$$

with $\sigma$ the row softmax, $s = d^{-1/2}$, the agent biases $B_1 \in \mathbb{R}^{n \times M}$
(``agent_bias``) and $B_2 \in \mathbb{R}^{N \times n}$ (``query_bias``), and a depth-wise
convolution of the values over the token grid that restores the diversity a rank-$n$ map lacks.
The agents are the queries pooled: $A = P\,Q$, where $P \in \mathbb{R}^{n \times N}$ averages
the queries of each adaptive-pooling bin (the official code applies ``AdaptiveAvgPool2d`` to
``q`` over the patch grid).

**The generalised-linear-attention view.** Without biases and DWC,

$$
O = \underbrace{\sigma(s\,Q A^\top)}_{\phi_q(Q) \in \mathbb{R}^{N \times n}}
\Big(\underbrace{\sigma(s\,A K^\top)}_{\phi_k(K)^\top \in \mathbb{R}^{n \times M}}\,V\Big)
= \phi_q(Q)\,\big(\phi_k(K)^\top V\big),
$$

linear attention with the feature maps $\phi_q(Q) = \sigma(s\,QA^\top)$ and
$\phi_k(K) = \sigma(s\,A K^\top)^\top$: the $N \times M$ matrix $\phi_q\phi_k^\top$ is never
formed, and its rows still sum to one (a product of two row-stochastic matrices).

**Backends.** The two hops are plain softmax attention, so backends accelerate agent attention
by running them: :func:`agent` (the reference) calls :func:`qkv.reference.core.sdpa` and is pure
NumPy, while :func:`dispatched_agent` (exported as ``qkv.agent``) routes both hops through the
dispatched ``qkv.sdpa`` (``QKV_BACKEND``, ``qkv.use_backend``, or its ``backend=`` keyword). The
pooling, the biases and the DWC are linear-time NumPy around the hops.

Differences from the official DeiT code, by choice: every token is pooled and convolved (DeiT
keeps its ``[CLS]`` token out of both; pass ``agents`` to pool as you like); the biases are taken
as given arrays (the code builds them from interpolated, separable position tables); the output
projection belongs to the caller.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from qkv import _arrays, _checks
from qkv.errors import ParameterError, ShapeError
from qkv.reference import core

Array = np.ndarray
#: The official default: 49 agents (a 7 x 7 pool of DeiT's 14 x 14 patch grid).
DEFAULT_AGENTS = 49


def pooling_matrix(length: int, bins: int) -> Array:
    r"""Adaptive average pooling of ``length`` items into ``bins`` as a matrix ``(bins, length)``.

    Bin $i$ covers items $\lfloor iL/b \rfloor$ to $\lceil (i+1)L/b \rceil - 1$ (the rule of
    ``torch.nn.AdaptiveAvgPool1d``); row $i$ holds $1/|\text{bin}_i|$ there and zeros elsewhere.
    """
    length = _checks.positive_int("length", length)
    bins = _checks.positive_int("bins", bins)
    i = np.arange(bins)
    start = (i * length) // bins  # (bins,)
    stop = -((-(i + 1) * length) // bins)  # (bins,): ceil((i + 1) L / b)
    j = np.arange(length)
    inside = (j >= start[:, None]) & (j < stop[:, None])  # (bins, length)
    return inside / (stop - start)[:, None]


def _agent_grid(n_agents: Any, grid: tuple[int, int] | None, N: int) -> tuple[int, ...]:
    """Agents per axis: ``(n,)`` for a sequence, ``(ah, aw)`` for a grid; checked against it."""
    if grid is None:
        if isinstance(n_agents, tuple):
            raise ParameterError(f"n_agents: expected an int without a grid, got {n_agents!r}")
        shape: tuple[int, ...] = (_checks.positive_int("n_agents", n_agents),)
        tokens: tuple[int, ...] = (N,)
    else:
        if isinstance(n_agents, tuple):
            shape = tuple(_checks.positive_int("n_agents", a) for a in n_agents)
        else:
            n = _checks.positive_int("n_agents", n_agents)
            side = math.isqrt(n)
            if side * side != n:
                raise ParameterError(
                    f"n_agents: expected a square number (a side x side pool) or a pair "
                    f"(ah, aw) with a grid, got {n}"
                )
            shape = (side, side)
        if len(shape) != 2:
            raise ParameterError(f"n_agents: expected a pair (ah, aw), got {n_agents!r}")
        tokens = grid
    if any(a > t for a, t in zip(shape, tokens, strict=True)):
        raise ParameterError(
            f"n_agents: expected at most as many agents as tokens per axis {tokens}, "
            f"got {shape} (agent count larger than the token count)"
        )
    return shape


def _check_grid(grid: Any, N: int) -> tuple[int, int] | None:
    """``None``, or a pair ``(h, w)`` of positive ints with ``h * w = N``, as ints."""
    if grid is None:
        return None
    if (
        not isinstance(grid, tuple)
        or len(grid) != 2
        or not all(isinstance(g, (int, np.integer)) and g >= 1 for g in grid)
    ):
        raise ParameterError(f"grid: expected a pair of positive ints (h, w), got {grid!r}")
    if grid[0] * grid[1] != N:
        raise ShapeError(f"grid: expected h * w = N = {N} query tokens, got {grid}")
    return int(grid[0]), int(grid[1])


def agent_tokens(
    q: Array, n_agents: int | tuple[int, int], grid: tuple[int, int] | None = None
) -> Array:
    r"""Agent tokens pooled from the queries, $A = P\,Q$.

    Args:
        q: queries ``(B, H, N, D)``.
        n_agents: agents for a sequence (an int), or per grid axis ``(ah, aw)`` (an int must
            then be square, ``side x side``, as in the official code).
        grid: the token grid ``(h, w)``, ``h * w = N``, tokens in row-major order; ``None``
            pools the sequence.

    Returns:
        ``A (B, H, n, D)`` in the arithmetic dtype of :func:`qkv.reference.core.sdpa`, with
        $P = P_h \otimes P_w$ on a grid (a rectangle's mean is the mean of its rows' means).
    """
    _checks.array("q", q, rank=4, layout="(B, H, N, D)")
    N = q.shape[2]
    grid = _check_grid(grid, N)
    shape = _agent_grid(n_agents, grid, N)
    if grid is None:
        pool = pooling_matrix(N, shape[0])  # (n, N)
    else:
        pool = np.kron(pooling_matrix(grid[0], shape[0]), pooling_matrix(grid[1], shape[1]))
    work = core._work_dtype(q.dtype)
    # One (n, N) x (N, B*H*D) product: A[b, h] = P Q[b, h] for every batch and head.
    return np.einsum("an,bhnd->bhad", pool.astype(work), q.astype(work, copy=False), optimize=True)


def depthwise_conv(
    v: Array, weight: Array, bias: Array | None = None, grid: tuple[int, int] | None = None
) -> Array:
    r"""Depth-wise convolution of the values over the token sequence or grid, zero "same" padding.

    Each channel $(h, c)$ is convolved on its own (``groups`` = channels, as ``nn.Conv2d(C, C,
    3, padding=1, groups=C)`` in the official code), written as a cross-correlation like torch:

    $$
    \operatorname{DWC}(V)_{y,x} = b + \sum_{a,b'} W_{a,b'}\; V_{y + a - r_h,\; x + b' - r_w}
    $$

    with $r = (k - 1)/2$ and zeros outside the grid.

    Args:
        v: values ``(B, Hkv, M, Dv)``.
        weight: ``(Hkv, Dv, k)`` on a sequence or ``(Hkv, Dv, kh, kw)`` on a grid, odd sizes.
        bias: ``(Hkv, Dv)`` or ``None``.
        grid: ``(h, w)`` with ``h * w = M``, or ``None`` for a sequence.

    Returns:
        ``(B, Hkv, M, Dv)`` in the arithmetic dtype.
    """
    _checks.array("v", v, rank=4, layout="(B, Hkv, M, Dv)")
    B, Hkv, M, Dv = v.shape
    grid = _check_grid(grid, M)
    spatial = (M,) if grid is None else grid
    _check_dwc(weight, bias, Hkv, Dv, len(spatial))
    work = core._work_dtype(v.dtype)
    x = v.astype(work, copy=False).reshape(B, Hkv, *spatial, Dv)  # (B, Hkv, *spatial, Dv)
    w = np.moveaxis(np.asarray(weight, dtype=work), 1, -1)  # (Hkv, *kernel, Dv)
    kernel = w.shape[1:-1]
    pads = [(0, 0), (0, 0)] + [(r // 2, r // 2) for r in kernel] + [(0, 0)]
    padded = np.pad(x, pads)  # (B, Hkv, *(spatial + kernel - 1), Dv)
    out = np.zeros_like(x)  # (B, Hkv, *spatial, Dv)
    per_channel = (Hkv,) + (1,) * len(spatial) + (Dv,)  # broadcasts over the grid
    for offset in np.ndindex(*kernel):  # one shifted copy of the grid per kernel tap
        window = tuple(slice(o, o + n) for o, n in zip(offset, spatial, strict=True))
        tap = w[(slice(None), *offset)].reshape(per_channel)  # (Hkv, 1, .., 1, Dv)
        out += tap * padded[(slice(None), slice(None), *window)]
    if bias is not None:
        out += np.asarray(bias, dtype=work).reshape(per_channel)  # (Hkv, 1, .., 1, Dv)
    return out.reshape(B, Hkv, M, Dv)  # (B, Hkv, M, Dv)


def _check_dwc(weight: Any, bias: Any, Hkv: int, Dv: int, dims: int) -> None:
    layout = "(Hkv, Dv, k)" if dims == 1 else "(Hkv, Dv, kh, kw)"
    _checks.array("dwc", weight, rank=2 + dims, layout=layout)
    if tuple(weight.shape[:2]) != (Hkv, Dv) or any(r % 2 == 0 for r in weight.shape[2:]):
        raise ShapeError(
            f"dwc: expected {layout} = ({Hkv}, {Dv}, odd kernel sizes), got {tuple(weight.shape)}"
        )
    if bias is not None:
        _checks.array("dwc_bias", bias, rank=2, layout="(Hkv, Dv)")
        if tuple(bias.shape) != (Hkv, Dv):
            raise ShapeError(f"dwc_bias: expected (Hkv, Dv) = ({Hkv}, {Dv}), got {bias.shape}")


def _check_bias(name: str, bias: Any, target: tuple[int, int, int, int], layout: str) -> None:
    """An additive float bias that broadcasts to ``target`` and holds finite values only."""
    if not _arrays.is_array(bias):
        raise TypeError(f"{name}: expected an array broadcastable to {layout}, got {type(bias)}")
    _checks.array(name, bias, rank=bias.ndim, layout=layout)
    try:
        ok = bias.ndim <= 4 and np.broadcast_shapes(bias.shape, target) == target
    except ValueError:
        ok = False
    if not ok:
        raise ShapeError(
            f"{name}: expected a shape broadcastable to {layout}={target}, got {bias.shape}"
        )
    if not np.isfinite(bias).all():
        raise ParameterError(f"{name}: expected finite values, got NaN or infinity")


def _check(
    q: Array,
    k: Array,
    v: Array,
    *,
    n_agents: Any,
    grid: Any,
    agents: Array | None,
    agent_bias: Array | None,
    query_bias: Array | None,
    dwc: Array | None,
    dwc_bias: Array | None,
    scale: float | None,
) -> None:
    """All argument checks of agent attention, on NumPy arrays."""
    B, H, Hkv, N, M, D, Dv = _checks.attention(q, k, v, scale=scale)
    grid = _check_grid(grid, N)
    if agents is None:
        n = math.prod(_agent_grid(DEFAULT_AGENTS if n_agents is None else n_agents, grid, N))
    else:
        if n_agents is not None:
            raise ParameterError("n_agents: expected None when agents are given")
        _checks.array("agents", agents, rank=4, layout="(B, H, n, D)")
        n = agents.shape[2]
        if (agents.shape[0], agents.shape[1], agents.shape[3]) != (B, H, D):
            raise ShapeError(
                f"agents: expected (B, H, n, D) = ({B}, {H}, n, {D}), got {agents.shape}"
            )
        if n > N:
            raise ParameterError(f"agents: expected at most N = {N} agents, got {n}")
        _checks.same_dtype(q=q, agents=agents)
    if agent_bias is not None:
        _check_bias("agent_bias", agent_bias, (B, H, n, M), "(B, H, n, M)")
    if query_bias is not None:
        _check_bias("query_bias", query_bias, (B, H, N, n), "(B, H, N, n)")
    if dwc is not None:
        if M != N:
            raise ShapeError(f"dwc: expected as many value tokens as queries, got M={M}, N={N}")
        _check_dwc(dwc, dwc_bias, Hkv, Dv, 1 if grid is None else 2)
    elif dwc_bias is not None:
        raise ParameterError("dwc_bias: expected None without dwc weights")


def _agent(
    q: Array,
    k: Array,
    v: Array,
    attend: Callable[..., Array],
    *,
    n_agents: int | tuple[int, int] | None,
    grid: tuple[int, int] | None,
    agents: Array | None,
    agent_bias: Array | None,
    query_bias: Array | None,
    dwc: Array | None,
    dwc_bias: Array | None,
    scale: float | None,
) -> Array:
    """Agent attention on checked NumPy arrays with the hops computed by ``attend`` (an sdpa)."""
    B, H, N, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[3]
    work = core._work_dtype(q.dtype)
    if agents is None:
        agents = agent_tokens(q, DEFAULT_AGENTS if n_agents is None else n_agents, grid)
    a = agents.astype(work, copy=False)  # (B, H, n, D)
    qw, kw, vw = (x.astype(work, copy=False) for x in (q, k, v))
    b1 = None if agent_bias is None else agent_bias.astype(work, copy=False)
    b2 = None if query_bias is None else query_bias.astype(work, copy=False)
    s = float(1.0 / np.sqrt(D) if scale is None else scale)
    v_agents = attend(a, kw, vw, mask=b1, scale=s)  # agents read the keys: (B, H, n, Dv)
    out = attend(qw, a, v_agents, mask=b2, scale=s)  # queries read the agents: (B, H, N, Dv)
    if dwc is not None:
        conv = depthwise_conv(vw, dwc, dwc_bias, grid)  # (B, Hkv, N, Dv)
        grouped = out.reshape(B, Hkv, H // Hkv, N, Dv)  # (B, Hkv, G, N, Dv)
        out = (grouped + conv[:, :, None]).reshape(B, H, N, Dv)  # (B, H, N, Dv)
    return out.astype(q.dtype, copy=False)


def agent(
    q: Array,
    k: Array,
    v: Array,
    *,
    n_agents: int | tuple[int, int] | None = None,
    grid: tuple[int, int] | None = None,
    agents: Array | None = None,
    agent_bias: Array | None = None,
    query_bias: Array | None = None,
    dwc: Array | None = None,
    dwc_bias: Array | None = None,
    scale: float | None = None,
) -> Array:
    r"""Agent attention, $O = \sigma(sQA^\top + B_2)\,\sigma(sAK^\top + B_1)\,V + \operatorname{DWC}(V)$.

    The NumPy reference: both hops run :func:`qkv.reference.core.sdpa`. See the module
    docstring for the equations and :func:`dispatched_agent` for the form whose hops run on a
    backend.

    Args:
        q: queries ``(B, H, N, D)``; the agents are pooled from them.
        k: keys ``(B, Hkv, M, D)``, ``H % Hkv == 0`` (grouped heads read as in ``sdpa``).
        v: values ``(B, Hkv, M, Dv)``.
        n_agents: agents pooled from the queries: an int for a sequence, or on a ``grid`` a
            square int or a pair ``(ah, aw)``. Default ``49`` (the official 7 x 7), ``None``
            when ``agents`` is given. More agents than tokens (per axis) is an error.
        grid: the query tokens' grid ``(h, w)`` (row-major, ``h * w = N``) for 2-D pooling and
            a 2-D DWC; ``None`` treats the tokens as a sequence (1-D pooling and DWC).
        agents: explicit agent tokens ``(B, H, n, D)``, ``n <= N``, instead of pooling.
        agent_bias: $B_1$, added to the agents' scores over the keys; broadcastable to
            ``(B, H, n, M)``, finite (the official code's ``position_bias``).
        query_bias: $B_2$, added to the queries' scores over the agents; broadcastable to
            ``(B, H, N, n)``, finite (the official code's ``agent_bias``).
        dwc: depth-wise convolution weights of the values, ``(Hkv, Dv, k)`` on a sequence or
            ``(Hkv, Dv, kh, kw)`` on a grid, odd sizes, zero "same" padding (needs ``M == N``);
            each KV head's result is added to the outputs of the query heads that read it.
        dwc_bias: the convolution's bias ``(Hkv, Dv)``.
        scale: $s$, multiplies both hops' dot products; default $1/\sqrt D$.

    Returns:
        ``O (B, H, N, Dv)`` in the dtype of ``q`` (float64 arithmetic for float64, float32
        otherwise). Cost $O((N + M)\,n\,D)$ time and $O((N + M)\,n)$ memory for the hops.
    """
    _check(
        q,
        k,
        v,
        n_agents=n_agents,
        grid=grid,
        agents=agents,
        agent_bias=agent_bias,
        query_bias=query_bias,
        dwc=dwc,
        dwc_bias=dwc_bias,
        scale=scale,
    )
    return _agent(
        q,
        k,
        v,
        core.sdpa,
        n_agents=n_agents,
        grid=grid,
        agents=agents,
        agent_bias=agent_bias,
        query_bias=query_bias,
        dwc=dwc,
        dwc_bias=dwc_bias,
        scale=scale,
    )


def dispatched_agent(
    q: Any,
    k: Any,
    v: Any,
    *,
    n_agents: int | tuple[int, int] | None = None,
    grid: tuple[int, int] | None = None,
    agents: Any = None,
    agent_bias: Any = None,
    query_bias: Any = None,
    dwc: Any = None,
    dwc_bias: Any = None,
    scale: float | None = None,
    backend: Any = None,
) -> Any:
    """Agent attention with both hops through the dispatched ``qkv.sdpa`` (``qkv.agent``).

    Same arguments and result as :func:`agent`, plus ``backend=`` (a name or module; default:
    the backend of ``qkv.use_backend`` / ``QKV_BACKEND``), which runs the two softmax hops. The
    pooling, biases and DWC run in NumPy. Arrays of any kind are accepted and the result has
    the type of ``q`` (torch tensors are detached: no gradient flows through this form).
    """
    import qkv  # here, not at the top: qkv's __init__ imports this module

    def host(x: Any) -> Any:
        return None if x is None else _arrays.to_numpy(x)

    arrays = {
        "agents": host(agents),
        "agent_bias": host(agent_bias),
        "query_bias": host(query_bias),
        "dwc": host(dwc),
        "dwc_bias": host(dwc_bias),
    }
    qn, kn, vn = host(q), host(k), host(v)
    _check(qn, kn, vn, n_agents=n_agents, grid=grid, scale=scale, **arrays)

    def hop(x: Array, keys: Array, values: Array, **kwargs: Any) -> Array:
        return qkv.sdpa(x, keys, values, backend=backend, **kwargs)

    out = _agent(qn, kn, vn, hop, n_agents=n_agents, grid=grid, scale=scale, **arrays)
    return _arrays.from_numpy(out, q)
