r"""RCMHA and its two baselines, MDHA and RMHA ("RCMHA: Relative Convolutional Multi-Head
Attention for Natural Language Modelling", arXiv 2308.03429; official code:
https://github.com/hermansh-id/rcmha, built on labml's Transformer-XL and Primer-EZ modules).

RCMHA changes two parts of causal multi-head attention.

1. **A depth-wise causal convolution** (kernel size $K = 3$) runs along the tokens on each of
   the projected queries, keys and values, one filter per channel, shared by all heads:

   $$
   \tilde x_t = c + \sum_{s=0}^{K-1} w_{s} \odot x_{t-(K-1)+s}, \qquad x_{t<0} = 0,
   $$

   so $\tilde x_t$ mixes token $t$ with the $K - 1$ tokens before it and never a later one.
   Multi-DConv-Head Attention (MDHA, from Primer) is causal softmax attention on the
   convolved $\tilde Q, \tilde K, \tilde V$.

2. **Transformer-XL relative scores with memory.** The keys and values hold $M = m + N$ tokens:
   $m$ cached tokens of the previous segment followed by the $N$ current ones, so query $i$
   sits at position $i' = i + m$ and sees key $j$ when $j \le i'$. With the distance
   $\delta = i' - j \ge 0$,

   $$
   S_{ij} = \text{scale}\cdot\Big[\underbrace{(q_i + u)\cdot k_j}_{\text{content}}
   + \underbrace{q_i \cdot R_{\delta}}_{\text{position}} + \underbrace{b_{\delta}}_{\text{bias}}
   \Big], \qquad O_i = \sum_{j \le i'} \operatorname{softmax}_j(S_{ij})\, v_j ,
   $$

   with $R$ a table of one key vector per head and distance, $b$ one scalar per head and
   distance and $u$ one query vector per head. Relative Multi-Head Attention (RMHA) is this
   attention alone; RCMHA is the convolution followed by it.

Facts from the official code, and where this module follows or departs from them:

* The score is the labml form above: Transformer-XL's fourth term $v \cdot R_\delta$ is a
  scalar per head and distance, so the code learns it directly as $b$.
  :func:`fold_position_bias` turns a Transformer-XL $v$ into that $b$.
* The code learns $R$ directly (``key_pos_embeddings``, zero-initialised, $2P$ rows,
  $P = 4096$); Transformer-XL builds it from sinusoids and a projection $W_R$. Both give a
  table; :func:`transformer_xl_table` builds the latter. Here the table is indexed by the
  distance $\delta \in [0, L)$; the code's index $P + j - i'$ is $P - \delta$.
* ``scale`` multiplies all three terms (the code's $d^{-1/2}$), default $1/\sqrt{D}$.
* The code's convolution has a bias $c$; :class:`QKVConv` carries one per stream. Queries
  are convolved over the current segment only (zero padding before its first token); keys and
  values over memory plus segment, as the code projects and convolves ``cat(mem, x)``.
* Keys and values may have fewer heads than the queries (grouped heads, ``H % Hkv == 0``);
  $R$, $b$ and $u$ belong to the query heads. The paper and code use ``Hkv = H``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from qkv import _arrays, _checks
from qkv.errors import ParameterError, ShapeError
from qkv.reference import core

Array = np.ndarray

#: The convolution's kernel size in the paper and the official code.
KERNEL_SIZE = 3


# --------------------------------------------------------------------------- checks


def check_conv_weight(name: str, weight: Any, channels: int) -> int:
    """A depth-wise kernel ``(channels, K)`` with ``K >= 1``; returns ``K``."""
    if not _arrays.is_array(weight):
        raise TypeError(f"{name}: expected an array (C, K), got {type(weight).__name__}")
    shape = tuple(weight.shape)
    if len(shape) != 2:
        raise ShapeError(f"{name}: expected rank 2 (C, K), got shape {shape}")
    if shape[1] < 1:
        raise ParameterError(f"{name}: expected a kernel size K >= 1, got shape {shape}")
    _checks.array(name, weight, rank=2, layout="(C, K)")
    if shape[0] != channels:
        raise ShapeError(f"{name}: expected {channels} channels (C, K), got shape {shape}")
    return shape[1]


def check_conv(x: Any, weight: Any, bias: Any = None) -> None:
    """Arguments of :func:`causal_depthwise_conv`: ``x (B, H, L, C)``, ``weight (C, K)``,
    ``bias (C,)`` or ``None``, one floating dtype."""
    _checks.array("x", x, rank=4, layout="(B, H, L, C)")
    C = x.shape[-1]
    check_conv_weight("weight", weight, C)
    arrays = {"x": x, "weight": weight}
    if bias is not None:
        _checks.array("bias", bias, rank=1, layout="(C,)")
        if tuple(bias.shape) != (C,):
            raise ShapeError(f"bias: expected shape ({C},), got {tuple(bias.shape)}")
        arrays["bias"] = bias
    _checks.same_dtype(**arrays)


def check_relative_attention(
    q: Any,
    k: Any,
    v: Any,
    r: Any,
    u: Any,
    b: Any,
    *,
    conv_q: Any = None,
    conv_k: Any = None,
    conv_v: Any = None,
    scale: float | None = None,
    **_: Any,
) -> _checks.AttentionDims:
    """Check the arguments of :func:`relative_attention` and return its sizes.

    Raises ``ShapeError`` for the shape errors of :func:`qkv.sdpa`, fewer keys than queries
    (``M < N``: the keys are memory plus the current segment), tables ``r (H, L, D)``,
    ``u (H, D)``, ``b (H, Lb)`` of other shapes or shorter than the distances used
    (``L, Lb >= M``, since query ``N - 1`` reaches distance ``M - 1``), and convolution
    kernels of other channel counts; ``ParameterError`` for a kernel size below 1 or a bad
    ``scale``; ``DTypeError`` for mixed dtypes.
    """
    dims = _checks.attention(q, k, v, scale=scale)
    B, H, Hkv, N, M, D, Dv = dims
    if M < N:
        raise ShapeError(
            f"k: expected M >= N keys (m memory tokens then the N current ones), got M={M}, N={N}"
        )
    _checks.array("r", r, rank=3, layout="(H, L, D)")
    _checks.array("u", u, rank=2, layout="(H, D)")
    _checks.array("b", b, rank=2, layout="(H, L)")
    if r.shape[0] != H or r.shape[2] != D:
        raise ShapeError(f"r: expected shape (H={H}, L, D={D}), got {tuple(r.shape)}")
    if tuple(u.shape) != (H, D):
        raise ShapeError(f"u: expected shape (H={H}, D={D}), got {tuple(u.shape)}")
    if b.shape[0] != H:
        raise ShapeError(f"b: expected shape (H={H}, L), got {tuple(b.shape)}")
    for name, length in (("r", r.shape[1]), ("b", b.shape[1])):
        if length < M:
            raise ShapeError(
                f"{name}: relative table of length L={length}, but distances 0..{M - 1} are "
                f"used (M={M} keys); expected L >= {M}"
            )
    arrays = {"q": q, "r": r, "u": u, "b": b}
    for name, weight, channels in (
        ("conv_q", conv_q, D),
        ("conv_k", conv_k, D),
        ("conv_v", conv_v, Dv),
    ):
        if weight is not None:
            check_conv_weight(name, weight, channels)
            arrays[name] = weight
    _checks.same_dtype(**arrays)
    return dims


# --------------------------------------------------------------------------- the convolution


def identity_kernel(channels: int, size: int = KERNEL_SIZE, dtype: Any = np.float64) -> Array:
    """The depth-wise kernel ``(channels, size)`` that leaves its input unchanged: weight 1 on
    the current token (the last tap), 0 on the earlier ones."""
    channels = _checks.positive_int("channels", channels)
    size = _checks.positive_int("size", size)
    weight = np.zeros((channels, size), dtype=dtype)  # (C, K)
    weight[:, -1] = 1.0
    return weight


def causal_depthwise_conv(x: Array, weight: Array, bias: Array | None = None) -> Array:
    r"""Depth-wise causal 1-D convolution along the tokens, the same filters for every head.

    $$
    y_{t,c} = \text{bias}_c + \sum_{s=0}^{K-1} w_{c,s}\, x_{t-(K-1)+s,\,c}, \qquad x_{t<0} = 0 .
    $$

    Tap $s = K - 1$ weighs the current token, tap $0$ the one $K - 1$ steps back (PyTorch's
    ``Conv1d(C, C, K, groups=C, padding=K-1)`` with its last $K - 1$ outputs dropped, as the
    official code computes it).

    Args:
        x: ``(B, H, L, C)`` (projected queries, keys or values).
        weight: ``(C, K)``, one filter per channel, ``K >= 1``.
        bias: ``(C,)`` or ``None``.

    Returns:
        ``(B, H, L, C)`` in the dtype of ``x`` (float64 arithmetic for float64, else float32).
    """
    check_conv(x, weight, bias)
    work = core._work_dtype(x.dtype)
    xw = x.astype(work, copy=False)
    L, K = x.shape[2], weight.shape[1]
    y = np.zeros(xw.shape, dtype=work)  # (B, H, L, C)
    for s in range(K):
        lag = K - 1 - s  # tap s reads the token `lag` steps back
        if lag < L:
            y[:, :, lag:] += weight[:, s].astype(work) * xw[:, :, : L - lag]
    if bias is not None:
        y += bias.astype(work)
    return y.astype(x.dtype, copy=False)


@dataclass(frozen=True)
class QKVConv:
    """The three depth-wise causal convolutions of RCMHA and MDHA, one per stream.

    Attributes:
        q: query kernel ``(D, K)``.
        k: key kernel ``(D, K)``.
        v: value kernel ``(Dv, K)``.
        q_bias: ``(D,)`` or ``None``.
        k_bias: ``(D,)`` or ``None``.
        v_bias: ``(Dv,)`` or ``None``.
    """

    q: Array
    k: Array
    v: Array
    q_bias: Array | None = None
    k_bias: Array | None = None
    v_bias: Array | None = None

    @classmethod
    def identity(
        cls, D: int, Dv: int | None = None, *, size: int = KERNEL_SIZE, dtype: Any = np.float64
    ) -> QKVConv:
        """Kernels that change nothing (weight 1 on the current token), no biases."""
        Dv = D if Dv is None else Dv
        return cls(
            identity_kernel(D, size, dtype),
            identity_kernel(D, size, dtype),
            identity_kernel(Dv, size, dtype),
        )

    @classmethod
    def random(
        cls,
        D: int,
        Dv: int | None = None,
        *,
        size: int = KERNEL_SIZE,
        rng: np.random.Generator,
        dtype: Any = np.float64,
    ) -> QKVConv:
        """Random kernels and biases (PyTorch's ``Conv1d`` default: uniform on
        $\\pm 1/\\sqrt{K}$), drawn from ``rng``."""
        Dv = D if Dv is None else Dv
        bound = 1.0 / math.sqrt(_checks.positive_int("size", size))

        def draw(*shape: int) -> Array:
            return rng.uniform(-bound, bound, shape).astype(dtype)

        return cls(draw(D, size), draw(D, size), draw(Dv, size), draw(D), draw(D), draw(Dv))

    def apply(self, q: Array, k: Array, v: Array) -> tuple[Array, Array, Array]:
        """Convolve ``q (B, H, N, D)``, ``k (B, Hkv, M, D)`` and ``v (B, Hkv, M, Dv)``, each
        along its own token axis."""
        return (
            causal_depthwise_conv(q, self.q, self.q_bias),
            causal_depthwise_conv(k, self.k, self.k_bias),
            causal_depthwise_conv(v, self.v, self.v_bias),
        )


# --------------------------------------------------------------------------- relative scores


def relative_distances(n_queries: int, n_keys: int) -> Array:
    r"""Distances $\delta_{ij} = i + (M - N) - j$ ``(N, M)`` int: query $i$ sits at position
    $i + m$ after $m = M - N$ memory tokens; $\delta < 0$ marks a later (hidden) key."""
    i = np.arange(n_queries)[:, None] + (n_keys - n_queries)  # (N, 1)
    return i - np.arange(n_keys)[None, :]  # (N, M)


def relative_terms(
    q: Array, k: Array, r: Array, u: Array, b: Array, *, scale: float | None = None
) -> tuple[Array, Array, Array]:
    r"""The three terms of the relative score, each scaled, ``(B, H, N, M)``:

    $$
    \text{content}_{ij} = \text{scale}\,(q_i + u)\cdot k_j, \qquad
    \text{position}_{ij} = \text{scale}\,q_i\cdot R_{\delta_{ij}}, \qquad
    \text{bias}_{ij} = \text{scale}\,b_{\delta_{ij}} .
    $$

    The position term is $Q R^\top$ ``(N, L)``, one column per distance, read along
    $\delta_{ij} = i + m - j$: row $i$ shifted right by $i$ (Transformer-XL's "relative
    shift"). Entries of hidden keys ($\delta < 0$) are 0 in the position and bias terms.

    Args:
        q: queries ``(B, H, N, D)`` (after any convolution).
        k: keys ``(B, Hkv, M, D)``, ``M >= N``.
        r: relative key table ``(H, L, D)``, row $\delta$ for distance $\delta$, ``L >= M``.
        u: content query bias ``(H, D)``.
        b: relative scalar bias ``(H, Lb)``, ``Lb >= M``.
        scale: multiplies every term; default $1/\sqrt{D}$.

    Returns:
        ``(content, position, bias)``, each ``(B, H, N, M)`` (float64 for float64 inputs, else
        float32).
    """
    B, H, N, D = q.shape
    Hkv, M = k.shape[1], k.shape[2]
    G = H // Hkv
    work = core._work_dtype(q.dtype)
    scale = float(1.0 / math.sqrt(D) if scale is None else scale)
    qw = q.astype(work, copy=False)  # (B, H, N, D)
    uw = u.astype(work, copy=False)[None, :, None]  # (1, H, 1, D)
    qu = (qw + uw).reshape(B, Hkv, G, N, D)  # (B, Hkv, G, N, D)
    kt = k.astype(work, copy=False)[:, :, None].swapaxes(-1, -2)  # (B, Hkv, 1, D, M)
    content = scale * (qu @ kt).reshape(B, H, N, M)  # (B, H, N, M)
    delta = relative_distances(N, M)  # (N, M)
    hidden = delta < 0
    index = np.where(hidden, 0, delta)  # (N, M), a valid row of the tables everywhere
    qr = qw @ r.astype(work, copy=False).swapaxes(-1, -2)[None]  # (B, H, N, L)
    position = np.take_along_axis(qr, np.broadcast_to(index, (B, H, N, M)), axis=-1)
    position = np.where(hidden, 0.0, scale * position)  # (B, H, N, M)
    bias = np.where(hidden, 0.0, scale * b.astype(work, copy=False)[:, index])  # (H, N, M)
    return content, position, np.broadcast_to(bias, (B, H, N, M))


def relative_attention(
    q: Array,
    k: Array,
    v: Array,
    r: Array,
    u: Array,
    b: Array,
    *,
    conv_q: Array | None = None,
    conv_k: Array | None = None,
    conv_v: Array | None = None,
    scale: float | None = None,
) -> Array:
    r"""Causal relative-score attention with memory, optionally after bias-free depth-wise
    causal convolutions of $Q$, $K$, $V$ (the dispatched op that the backends fuse).

    $$
    S_{ij} = \text{scale}\,\big[(\tilde q_i + u)\cdot\tilde k_j + \tilde q_i\cdot R_{\delta_{ij}}
    + b_{\delta_{ij}}\big],\quad \delta_{ij} = i + (M - N) - j, \qquad
    O_i = \sum_{j:\ \delta_{ij} \ge 0} \operatorname{softmax}_j(S_{ij})\,\tilde v_j ,
    $$

    with $\tilde x = $ :func:`causal_depthwise_conv` ``(x, conv_x)`` where a kernel is given,
    else $\tilde x = x$. The op's convolutions carry no bias (labml's Primer-EZ form);
    :func:`rcmha` adds the code's biases. Every query sees at least key 0, so no row is empty.

    Args:
        q: queries ``(B, H, N, D)``.
        k: keys ``(B, Hkv, M, D)``: ``m = M - N >= 0`` memory tokens, then the current ``N``.
        v: values ``(B, Hkv, M, Dv)``.
        r: relative key table ``(H, L, D)``, ``L >= M``.
        u: content query bias ``(H, D)``.
        b: relative scalar bias ``(H, Lb)``, ``Lb >= M``.
        conv_q: query kernel ``(D, K)`` or ``None``.
        conv_k: key kernel ``(D, K)`` or ``None``.
        conv_v: value kernel ``(Dv, K)`` or ``None``.
        scale: multiplies the whole score; default $1/\sqrt{D}$.

    Returns:
        ``O (B, H, N, Dv)`` in the dtype of ``q`` (float64 arithmetic for float64 inputs, else
        float32).
    """
    dims = check_relative_attention(
        q, k, v, r, u, b, conv_q=conv_q, conv_k=conv_k, conv_v=conv_v, scale=scale
    )
    B, H, Hkv, N, M, D, Dv = dims
    G = dims.group
    if conv_q is not None:
        q = causal_depthwise_conv(q, conv_q)
    if conv_k is not None:
        k = causal_depthwise_conv(k, conv_k)
    if conv_v is not None:
        v = causal_depthwise_conv(v, conv_v)
    content, position, bias = relative_terms(q, k, r, u, b, scale=scale)
    visible = relative_distances(N, M) >= 0  # (N, M)
    s = np.where(visible, content + position + bias, -np.inf)  # (B, H, N, M)
    p = np.exp(s - s.max(axis=-1, keepdims=True))  # every row sees key 0: its max is finite
    p /= p.sum(axis=-1, keepdims=True)  # (B, H, N, M)
    vw = v.astype(p.dtype, copy=False)[:, :, None]  # (B, Hkv, 1, M, Dv)
    out = p.reshape(B, Hkv, G, N, M) @ vw  # (B, Hkv, G, N, Dv)
    return out.reshape(B, H, N, Dv).astype(q.dtype, copy=False)  # (B, H, N, Dv)


# --------------------------------------------------------------------------- the three models


def rmha(
    q: Array, k: Array, v: Array, r: Array, u: Array, b: Array, *, scale: float | None = None
) -> Array:
    r"""Relative Multi-Head Attention (the paper's RMHA baseline): :func:`relative_attention`
    without any convolution. Shapes as there; returns ``O (B, H, N, Dv)``."""
    return relative_attention(q, k, v, r, u, b, scale=scale)


def mdha(q: Array, k: Array, v: Array, conv: QKVConv, *, scale: float | None = None) -> Array:
    r"""Multi-DConv-Head Attention (the paper's MDHA baseline, from Primer): causal softmax
    attention on the convolved streams,
    $O = \operatorname{softmax}(\text{scale}\,\tilde Q\tilde K^\top + \text{causal})\,\tilde V$.

    Args:
        q: queries ``(B, H, N, D)``.
        k: keys ``(B, Hkv, M, D)`` (memory first when ``M > N``).
        v: values ``(B, Hkv, M, Dv)``.
        conv: the three kernels and biases.
        scale: default $1/\sqrt{D}$.

    Returns:
        ``O (B, H, N, Dv)`` in the dtype of ``q``.
    """
    q, k, v = conv.apply(q, k, v)
    return core.sdpa(q, k, v, causal=True, scale=scale)


def rcmha(
    q: Array,
    k: Array,
    v: Array,
    r: Array,
    u: Array,
    b: Array,
    conv: QKVConv,
    *,
    scale: float | None = None,
) -> Array:
    r"""Relative Convolutional Multi-Head Attention: the depth-wise causal convolutions (with
    their biases) on $Q$, $K$, $V$, then :func:`relative_attention`.

    $$
    \operatorname{RCMHA}(Q, K, V) = \operatorname{RelAttn}\big(\operatorname{DWConv}_q(Q),
    \operatorname{DWConv}_k(K), \operatorname{DWConv}_v(V)\big)
    $$

    Args:
        q: projected queries ``(B, H, N, D)``.
        k: projected keys ``(B, Hkv, M, D)`` (memory first when ``M > N``).
        v: projected values ``(B, Hkv, M, Dv)``.
        r: relative key table ``(H, L, D)``, ``L >= M``.
        u: content query bias ``(H, D)``.
        b: relative scalar bias ``(H, Lb)``, ``Lb >= M``.
        conv: the three kernels and biases.
        scale: default $1/\sqrt{D}$.

    Returns:
        ``O (B, H, N, Dv)`` in the dtype of ``q``. With ``R = b = u = 0`` and identity kernels
        this is causal softmax attention.
    """
    q, k, v = conv.apply(q, k, v)
    return relative_attention(q, k, v, r, u, b, scale=scale)


# --------------------------------------------------------------------------- tables


def sinusoids(length: int, dim: int) -> Array:
    r"""Transformer sinusoids of the distances $0, \dots, L-1$, float64 ``(length, dim)``:
    $[\sin(\delta\,\omega_i), \cos(\delta\,\omega_i)]$, $\omega_i = 10000^{-2i/\text{dim}}$,
    ``dim`` even."""
    length = _checks.positive_int("length", length)
    dim = _checks.positive_int("dim", dim)
    if dim % 2:
        raise ParameterError(f"dim: expected an even embedding width, got {dim}")
    angle = np.arange(length, dtype=np.float64)[:, None] * core.rope_frequencies(dim)  # (L, dim/2)
    return np.concatenate([np.sin(angle), np.cos(angle)], axis=-1)  # (L, dim)


def transformer_xl_table(w_r: Array, length: int, n_heads: int) -> Array:
    r"""Transformer-XL's relative key table $R_\delta = W_R^\top \phi(\delta)$, split into heads.

    Args:
        w_r: projection ``(C, H * D)`` of the sinusoids $\phi(\delta)$ of width ``C`` (even).
        length: number of distances ``L``.
        n_heads: ``H``.

    Returns:
        ``(H, L, D)`` in the dtype of ``w_r``.
    """
    _checks.array("w_r", w_r, rank=2, layout="(C, H * D)")
    C, HD = w_r.shape
    if HD % n_heads:
        raise ShapeError(f"w_r: expected H * D columns with H={n_heads}, got shape {(C, HD)}")
    table = sinusoids(length, C) @ w_r.astype(np.float64)  # (L, H * D)
    table = table.reshape(length, n_heads, HD // n_heads).swapaxes(0, 1)  # (H, L, D)
    return table.astype(w_r.dtype)


def fold_position_bias(r: Array, v_pos: Array) -> Array:
    r"""Transformer-XL's fourth term $v\cdot R_\delta$ as the scalar bias table $b$ the labml
    code learns: ``b[h, delta] = v_pos[h] . r[h, delta]``.

    Args:
        r: ``(H, L, D)``.
        v_pos: Transformer-XL's positional query bias ``(H, D)``.

    Returns:
        ``(H, L)``; add it to ``b``.
    """
    return np.einsum("hld,hd->hl", r, v_pos)
