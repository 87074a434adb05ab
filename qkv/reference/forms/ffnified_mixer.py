r"""FFNified attention: MetaMixer's convolutional query-key-value token mixer (FFNet).

*Paper:* Yun, Lee and Ro, "MetaMixer Is All You Need" (arXiv 2406.02021).
*Official code:* https://github.com/ysj9909/FFNet (``models/ffnet.py``: ``Token_Mixer``,
``Channel_Mixer``, ``FFBlock``, ``RepVGGDW``, ``Conv2d_BN``).

Self-attention reads $\operatorname{softmax}(Q K^\top) V$: the query meets every key, a softmax
turns the matches into coefficients, and the coefficients weigh the values. *FFNification* keeps
that query-key-value skeleton and swaps each part for something cheap and local, on a feature
map $x \in \mathbb R^{B \times C \times H \times W}$:

$$
q = \mathrm{BN}(W_q * x) \;(\text{1x1 conv}),\qquad
a = \operatorname{GELU}(K_1 \circledast q) \;(\text{"softmax" of the query-key match}),\qquad
\text{out} = K_2 \circledast a \;(\text{coefficients times "values"}),
$$

where $\circledast$ is a depth-wise convolution (each channel its own $k \times k$ kernel,
zero padding $k // 2$, stride 1, cross-correlation as ``torch.nn.Conv2d``). The kernels of the
depth-wise convolutions are the *keys* and *values*: a static memory of local spatial patterns
that every position's query is matched against, and GELU replaces the softmax (no normalisation
over positions). The official defaults use kernel sizes ``ks1 = ks2 = [3, 3, 7, 7]`` per stage.

**RepVGG branches.** A 7x7 depth-wise convolution of the code (``RepVGGDW``) is trained as two
parallel branches, 7x7 + BN and 3x3 + BN (padding 1), summed. In eval mode a BN is an affine map
per channel, $\mathrm{BN}(t) = \gamma (t - m) / \sqrt{v + \epsilon} + \beta$, so each branch
folds into one kernel and bias, and the 3x3 kernel zero-padded to 7x7 adds to the 7x7 one:
:func:`fuse_rep` returns that single 7x7 convolution, equal to the two branches (tested).
Other kernel sizes are plain depth-wise convolutions with a bias, as the code.

**Block** (``FFBlock``, layer scale off and no squeeze-excite as in the default config):
$x \leftarrow x + \text{mixer}(x)$, then the channel mixer
$x \leftarrow x + W_2\,\operatorname{GELU}(W_1\,\mathrm{DW}_{7\times 7}(x) + b_1) + b_2$
with $W_1 \in \mathbb R^{3C \times C}$ (expansion 3).

GELU is the exact one, $x\,\Phi(x)$, as ``torch.nn.GELU()``. Everything here is the eval-mode
forward. There is no backend kernel: the cost is in the convolutions, which belong to a
convolution library (``torch.nn.functional.conv2d``), not to an attention kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from qkv import _checks
from qkv.errors import ParameterError, ShapeError

Array = np.ndarray

_erf = np.vectorize(math.erf, otypes=[np.float64])


def gelu(x: Array) -> Array:
    r"""The exact GELU, $x \Phi(x) = \frac x2 \big(1 + \operatorname{erf}(x / \sqrt2)\big)$."""
    return (0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))).astype(x.dtype, copy=False)


@dataclass(frozen=True)
class BatchNorm:
    """Eval-mode batch norm over channels: ``weight``, ``bias``, running ``mean`` and ``var``,
    each ``(C,)``, and ``eps`` (PyTorch's default 1e-5)."""

    weight: Array
    bias: Array
    mean: Array
    var: Array
    eps: float = 1e-5

    def affine(self) -> tuple[Array, Array]:
        r"""The map as ``(scale, shift)``, each ``(C,)``: $\mathrm{BN}(t) = s\,t + h$ with
        $s = \gamma / \sqrt{v + \epsilon}$, $h = \beta - m s$."""
        scale = self.weight / np.sqrt(self.var + self.eps)
        return scale, self.bias - self.mean * scale

    def __call__(self, x: Array) -> Array:
        """Apply to ``x (B, C, H, W)``."""
        scale, shift = self.affine()
        return x * scale[:, None, None] + shift[:, None, None]  # (B, C, H, W)


@dataclass(frozen=True)
class DepthwiseConv:
    """One depth-wise convolution: ``kernel (C, k, k)`` (``k`` odd) and ``bias (C,)``."""

    kernel: Array
    bias: Array

    def __call__(self, x: Array) -> Array:
        """Apply to ``x (B, C, H, W)`` (zero padding ``k // 2``, stride 1)."""
        return depthwise_conv2d(x, self.kernel) + self.bias[:, None, None]  # (B, C, H, W)


@dataclass(frozen=True)
class RepDW:
    """The two-branch depth-wise convolution of ``RepVGGDW``: ``large (C, k, k)`` + BN and
    ``small (C, s, s)`` + BN (``s < k``, both odd; the code uses 7 and 3), summed."""

    large: Array
    large_bn: BatchNorm
    small: Array
    small_bn: BatchNorm

    def __call__(self, x: Array) -> Array:
        """Apply the two branches to ``x (B, C, H, W)`` and add them (the training-time form)."""
        return self.large_bn(depthwise_conv2d(x, self.large)) + self.small_bn(
            depthwise_conv2d(x, self.small)
        )


@dataclass(frozen=True)
class FFNifiedMixer:
    """Weights of the token mixer: the "query" 1x1 convolution ``query (C, C)`` (no bias) with
    its ``query_bn``, and the depth-wise "key" and "value" convolutions (``RepDW`` for 7x7 in
    the code, ``DepthwiseConv`` otherwise or after :func:`fuse`). ``query_bn=None`` means the
    BN is already folded into ``query`` and ``query_bias (C,)``."""

    query: Array
    query_bn: BatchNorm | None
    key: RepDW | DepthwiseConv
    value: RepDW | DepthwiseConv
    query_bias: Array | None = None


@dataclass(frozen=True)
class FFNetBlock:
    """One ``FFBlock``: the token ``mixer`` and the channel mixer (``dw``, a 7x7 depth-wise
    convolution; ``up (E, C)``, ``up_bias (E,)``, ``down (C, E)``, ``down_bias (C,)``)."""

    mixer: FFNifiedMixer
    dw: RepDW | DepthwiseConv
    up: Array
    up_bias: Array
    down: Array
    down_bias: Array


def _check_map(name: str, x: Array) -> None:
    _checks.array(name, x, rank=4, layout="(B, C, H, W)")


def _check_kernel(name: str, kernel: Array, channels: int) -> int:
    if kernel.ndim != 3 or kernel.shape[0] != channels or kernel.shape[1] != kernel.shape[2]:
        raise ShapeError(
            f"{name}: expected a depth-wise kernel (C, k, k) with C = {channels}, "
            f"got {tuple(kernel.shape)}"
        )
    if kernel.shape[1] % 2 == 0:
        raise ShapeError(f"{name}: expected an odd kernel size k, got {kernel.shape[1]}")
    return int(kernel.shape[1])


def depthwise_conv2d(x: Array, kernel: Array) -> Array:
    r"""Depth-wise 2-D cross-correlation with zero padding $p = k // 2$ and stride 1.

    $$
    \text{out}[b, c, i, j] = \sum_{u, v = 0}^{k - 1} K[c, u, v]\;
    x[b, c, i + u - p, j + v - p] \qquad (x = 0 \text{ outside the map}).
    $$

    ``x (B, C, H, W)``, ``kernel (C, k, k)`` with ``k`` odd; returns ``(B, C, H, W)``. This is
    ``torch.nn.functional.conv2d(x, kernel[:, None], padding=k // 2, groups=C)``.
    """
    _check_map("x", x)
    k = _check_kernel("kernel", kernel, x.shape[1])
    B, C, H, W = x.shape
    p = k // 2
    padded = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))  # (B, C, H + 2p, W + 2p)
    out = np.zeros_like(x, dtype=np.result_type(x, kernel))  # (B, C, H, W)
    for u in range(k):
        for v in range(k):
            out += kernel[None, :, u, v, None, None] * padded[:, :, u : u + H, v : v + W]
    return out


def fuse_bn(kernel: Array, bn: BatchNorm) -> DepthwiseConv:
    r"""Fold an eval-mode BN into the depth-wise convolution before it (``Conv2d_BN.fuse``):
    $K' = s K$, $b' = h$ with $(s, h)$ = ``bn.affine()``. ``kernel (C, k, k)``."""
    scale, shift = bn.affine()
    return DepthwiseConv(kernel * scale[:, None, None], shift)


def fuse_rep(rep: RepDW) -> DepthwiseConv:
    r"""The single depth-wise convolution equal to a :class:`RepDW` (``RepVGGDW.fuse``).

    Each branch folds its BN (:func:`fuse_bn`); the small kernel, zero-padded by
    $(k - s) / 2$ on every side, is centred in the large one, so the sum of the two convolutions
    is one convolution with the summed kernels and biases:
    $K = s_1 K_{k} + \operatorname{pad}(s_2 K_{s})$, $b = h_1 + h_2$.
    """
    large, small = fuse_bn(rep.large, rep.large_bn), fuse_bn(rep.small, rep.small_bn)
    k = _check_kernel("rep.large", rep.large, rep.large.shape[0])
    s = _check_kernel("rep.small", rep.small, rep.large.shape[0])
    if s > k:
        raise ShapeError(f"rep.small: expected a kernel no larger than {k}, got {s}")
    m = (k - s) // 2
    padded = np.pad(small.kernel, ((0, 0), (m, m), (m, m)))  # (C, k, k)
    return DepthwiseConv(large.kernel + padded, large.bias + small.bias)


def _fused(conv: RepDW | DepthwiseConv) -> DepthwiseConv:
    return fuse_rep(conv) if isinstance(conv, RepDW) else conv


def fuse(mixer: FFNifiedMixer) -> FFNifiedMixer:
    """The inference form of a mixer: the query's BN folded into the 1x1 weights and bias,
    every :class:`RepDW` fused into one kernel. Computes the same function in eval mode."""
    query, bias = mixer.query, mixer.query_bias
    if mixer.query_bn is not None:
        scale, shift = mixer.query_bn.affine()
        query = mixer.query * scale[:, None]  # (C, C): rows are output channels
        bias = shift if bias is None else bias * scale + shift
    return FFNifiedMixer(query, None, _fused(mixer.key), _fused(mixer.value), bias)


def fuse_block(block: FFNetBlock) -> FFNetBlock:
    """The inference form of a block: :func:`fuse` on its mixer and its 7x7 ``dw`` fused."""
    return FFNetBlock(
        fuse(block.mixer), _fused(block.dw), block.up, block.up_bias, block.down, block.down_bias
    )


def pointwise(x: Array, weight: Array, bias: Array | None = None) -> Array:
    """A 1x1 convolution: ``weight (C_out, C_in)``, ``bias (C_out,)``, ``x (B, C_in, H, W)``;
    returns ``(B, C_out, H, W)``."""
    out = np.einsum("oc,bchw->bohw", weight, x)  # (B, C_out, H, W)
    return out if bias is None else out + bias[:, None, None]


def ffnified(x: Array, mixer: FFNifiedMixer) -> Array:
    r"""The FFNified token mixer (``Token_Mixer.forward``) on ``x (B, C, H, W)``:

    $$
    q = \mathrm{BN}(W_q x), \qquad a = \operatorname{GELU}(\mathrm{DW}_{\text{key}}(q)), \qquad
    \text{out} = \mathrm{DW}_{\text{value}}(a).
    $$

    Returns ``(B, C, H, W)``, in the dtype of ``x`` for same-dtype weights.
    """
    _check_map("x", x)
    C = x.shape[1]
    if mixer.query.shape != (C, C):
        raise ShapeError(f"mixer.query: expected (C, C) = {(C, C)}, got {mixer.query.shape}")
    q = pointwise(x, mixer.query, mixer.query_bias)  # (B, C, H, W)
    if mixer.query_bn is not None:
        q = mixer.query_bn(q)
    return mixer.value(gelu(mixer.key(q)))  # (B, C, H, W)


def ffnet_block(x: Array, block: FFNetBlock) -> Array:
    r"""One FFNet block (``FFBlock``) on ``x (B, C, H, W)``:
    $x' = x + \text{ffnified}(x)$, then
    $x' + W_2\,\operatorname{GELU}(W_1\,\mathrm{DW}(x') + b_1) + b_2$. Returns ``(B, C, H, W)``.
    """
    x = x + ffnified(x, block.mixer)  # (B, C, H, W)
    hidden = gelu(pointwise(block.dw(x), block.up, block.up_bias))  # (B, E, H, W)
    return x + pointwise(hidden, block.down, block.down_bias)  # (B, C, H, W)


def _random_bn(channels: int, rng: np.random.Generator) -> BatchNorm:
    """A BN with non-trivial running statistics, as after training (so fusing is tested)."""
    return BatchNorm(
        weight=1.0 + 0.2 * rng.standard_normal(channels),
        bias=0.1 * rng.standard_normal(channels),
        mean=0.1 * rng.standard_normal(channels),
        var=rng.uniform(0.5, 1.5, channels),
    )


def _random_dw(channels: int, size: int, rng: np.random.Generator) -> RepDW | DepthwiseConv:
    """``RepVGGDW`` (7x7 + 3x3) for ``size`` 7, a plain depth-wise convolution otherwise."""
    if size < 1 or size % 2 == 0:
        raise ParameterError(f"kernel size: expected an odd integer >= 1, got {size}")
    if size == 7:
        return RepDW(
            large=rng.standard_normal((channels, 7, 7)) / 7,
            large_bn=_random_bn(channels, rng),
            small=rng.standard_normal((channels, 3, 3)) / 3,
            small_bn=_random_bn(channels, rng),
        )
    kernel = rng.standard_normal((channels, size, size)) / size  # (C, k, k)
    return DepthwiseConv(kernel, 0.1 * rng.standard_normal(channels))


def init_mixer(
    channels: int, *, ks1: int = 7, ks2: int = 7, rng: np.random.Generator
) -> FFNifiedMixer:
    """Random eval-mode mixer weights (float64) from ``rng``: kernel entries of standard
    deviation ``1 / k`` (a unit-scale output for unit inputs) and BNs with non-trivial
    statistics, so that fusing changes every number. ``ks1``/``ks2``: key and value kernels."""
    _checks.positive_int("channels", channels)
    query = rng.standard_normal((channels, channels)) / math.sqrt(channels)  # (C, C)
    return FFNifiedMixer(
        query,
        _random_bn(channels, rng),
        _random_dw(channels, ks1, rng),
        _random_dw(channels, ks2, rng),
    )


def init_block(
    channels: int, *, expansion: int = 3, ks1: int = 7, ks2: int = 7, rng: np.random.Generator
) -> FFNetBlock:
    """Random weights of one block (see :func:`init_mixer`); hidden width ``expansion * C``."""
    hidden = _checks.positive_int("expansion", expansion) * channels
    mixer = init_mixer(channels, ks1=ks1, ks2=ks2, rng=rng)
    return FFNetBlock(
        mixer=mixer,
        dw=_random_dw(channels, 7, rng),
        up=rng.standard_normal((hidden, channels)) / math.sqrt(channels),
        up_bias=0.1 * rng.standard_normal(hidden),
        down=rng.standard_normal((channels, hidden)) / math.sqrt(hidden),
        down_bias=0.1 * rng.standard_normal(channels),
    )
