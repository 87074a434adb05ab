"""The Numba backend: compiled CPU kernels (``@njit``, ``parallel=True`` where it pays).

Takes and returns NumPy arrays; torch tensors and CuPy arrays are copied in and out by the
dispatcher. Kernels compile on first use and are cached on disk. Numba itself is imported only
when an op runs, so this module imports (and reports itself unavailable) without it.

Ops: ``sdpa`` and ``flash`` (one tiled online-softmax kernel, see
:mod:`qkv.backends.numba._attention`), ``sigmoid`` (the same tiled kernel with the logistic
function in place of the softmax, see :mod:`qkv.backends.numba._sigmoid`) and ``rope``. They compute float32 and float64 natively;
other dtypes raise :class:`qkv.errors.Unsupported`, so the dispatcher runs the reference.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qkv import _arrays
from qkv.errors import Unsupported

NAME = "numba"


def available() -> tuple[bool, str]:
    try:
        import numba  # noqa: F401
    except ImportError:
        return False, "the numba package is not installed; fix: pip install 'qkv[numba]'"
    try:
        import scipy.linalg.cython_blas  # noqa: F401
    except ImportError:
        return False, (
            "scipy is not installed (Numba's np.dot calls SciPy's BLAS); "
            "fix: pip install 'qkv[numba]'"
        )
    return True, "numba is installed"


def asarray(x: Any) -> np.ndarray:
    return _arrays.to_numpy(x)


def to_numpy(x: Any) -> np.ndarray:
    return np.asarray(x)


def _native(q: np.ndarray) -> None:
    if q.dtype not in (np.float32, np.float64):
        raise Unsupported(f"dtype {q.dtype}: the numba kernels compute float32 and float64")


def sdpa(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    *,
    mask: np.ndarray | None = None,
    causal: bool = False,
    scale: float | None = None,
    return_weights: bool = False,
    return_lse: bool = False,
) -> np.ndarray | tuple[np.ndarray, ...]:
    """Scaled dot-product attention; same arguments and results as :func:`qkv.reference.core.sdpa`.

    ``q (B, H, N, D)``, ``k (B, Hkv, M, D)``, ``v (B, Hkv, M, Dv)``. Runs the tiled
    online-softmax kernel of :func:`flash`: no ``N x M`` array is made unless
    ``return_weights`` asks for one.
    """
    _native(q)
    from qkv.backends.numba import _attention

    return _attention.attention(
        q,
        k,
        v,
        mask=mask,
        causal=causal,
        scale=scale,
        return_weights=return_weights,
        return_lse=return_lse,
    )


def flash(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    *,
    mask: np.ndarray | None = None,
    causal: bool = False,
    scale: float | None = None,
    return_weights: bool = False,
    return_lse: bool = False,
    block_q: int = 64,
    block_k: int = 64,
) -> np.ndarray | tuple[np.ndarray, ...]:
    """Tiled online-softmax attention; same arguments and results as :func:`qkv.reference.core.flash`.

    ``q (B, H, N, D)``, ``k (B, Hkv, M, D)``, ``v (B, Hkv, M, Dv)``. ``block_q`` and
    ``block_k`` are accepted for compatibility and not used: the kernel's tiles
    (``_attention.BQ x _attention.BK``) were chosen by measurement for its BLAS tile products.
    """
    return sdpa(
        q,
        k,
        v,
        mask=mask,
        causal=causal,
        scale=scale,
        return_weights=return_weights,
        return_lse=return_lse,
    )


def sigmoid(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    *,
    mask: np.ndarray | None = None,
    causal: bool = False,
    scale: float | None = None,
    bias: float | None = None,
    alibi: bool = False,
    return_weights: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Sigmoid attention; same arguments and results as
    :func:`qkv.reference.forms.sigmoid_attention.sigmoid`.

    ``q (B, H, N, D)``, ``k (B, Hkv, M, D)``, ``v (B, Hkv, M, Dv)``; a fused tiled kernel, no
    ``N x M`` array unless ``return_weights``.
    """
    _native(q)
    from qkv.backends.numba import _sigmoid

    return _sigmoid.sigmoid(
        q,
        k,
        v,
        mask=mask,
        causal=causal,
        scale=scale,
        bias=bias,
        alibi=alibi,
        return_weights=return_weights,
    )


def rope(
    x: np.ndarray,
    *,
    positions: np.ndarray | None = None,
    offset: int = 0,
    base: float = 10000.0,
    pairing: str = "adjacent",
) -> np.ndarray:
    """Rotary position embedding; same arguments and result as :func:`qkv.reference.core.rope`.

    ``x (B, H, N, D)``; ``positions`` integers ``(N,)`` or ``(B, N)``.
    """
    _native(x)
    from qkv.backends.numba import _rope

    return _rope.rope(x, positions=positions, offset=offset, base=base, pairing=pairing)


def gaussian(
    x: np.ndarray,
    offsets: np.ndarray,
    scales: np.ndarray,
    logits: np.ndarray | None = None,
    *,
    axis: int = -1,
    mixture: str = "product",
    eps: float = 1e-8,
    return_weights: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Multi-head Gaussian adaptive attention; same arguments and results as
    :func:`qkv.reference.forms.gaussian_attention.gaussian`.

    ``x`` any shape with the normalisation axis ``axis``; ``offsets``, ``scales``, ``logits``
    ``(H, G)``. One fused pass per row (see :mod:`qkv.backends.numba._gaussian`).
    """
    _native(x)
    from qkv.backends.numba import _gaussian
    from qkv.reference.forms.gaussian_attention import check_gaussian

    axis = check_gaussian(x, offsets, scales, logits, axis=axis, mixture=mixture, eps=eps)
    return _gaussian.gaussian(
        x,
        offsets,
        scales,
        logits,
        axis=axis,
        mixture=mixture,
        eps=eps,
        return_weights=return_weights,
    )


def tensor(
    q: np.ndarray,
    k1: np.ndarray,
    k2: np.ndarray,
    v1: np.ndarray,
    v2: np.ndarray,
    *,
    scale: float = 1.0,
) -> np.ndarray:
    """Exact tensor (Kronecker) attention; same arguments and result as
    :func:`qkv.reference.forms.tensor_attention.tensor`.

    ``q (B, H, N, D)``; ``k1``, ``k2 (B, Hkv, M, D)``; ``v1``, ``v2 (B, Hkv, M, Dv)``. A streaming
    online-softmax kernel (see :mod:`qkv.backends.numba._tensor`): ``O(N M^2 D)`` time, no
    ``N x M^2`` array.
    """
    _native(q)
    from qkv.backends.numba import _tensor

    return _tensor.tensor(q, k1, k2, v1, v2, scale=scale)


def neighborhood(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    *,
    kernel_size: int | tuple[int, ...] = 7,
    dilation: int | tuple[int, ...] = 1,
    stride: int | tuple[int, ...] = 1,
    causal: bool | tuple[bool, ...] = False,
    scale: float | None = None,
    return_weights: bool = False,
    return_lse: bool = False,
) -> np.ndarray | tuple[np.ndarray, ...]:
    """Neighborhood attention; same arguments and results as
    :func:`qkv.reference.local.neighborhood_attention.neighborhood`.

    ``q (B, H, *spatial, D)``, ``k (B, Hkv, *spatial, D)``, ``v (B, Hkv, *spatial, Dv)`` with 1-3
    spatial axes. One fused pass per query over its computed neighbours (see
    :mod:`qkv.backends.numba._neighborhood`): ``O(N K D)`` time, no ``N x N`` array.
    """
    _native(q)
    from qkv.backends.numba import _neighborhood
    from qkv.reference.local.neighborhood_attention import check_neighborhood

    dims = check_neighborhood(
        q, k, v, kernel_size=kernel_size, dilation=dilation, stride=stride, causal=causal,
        scale=scale,
    )  # fmt: skip
    return _neighborhood.neighborhood(
        q, k, v, kernel_size=dims.kernel_size, dilation=dims.dilation, stride=dims.stride,
        causal=dims.causal, scale=scale, return_weights=return_weights, return_lse=return_lse,
    )  # fmt: skip


def relative_attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    r: np.ndarray,
    u: np.ndarray,
    b: np.ndarray,
    *,
    conv_q: np.ndarray | None = None,
    conv_k: np.ndarray | None = None,
    conv_v: np.ndarray | None = None,
    scale: float | None = None,
) -> np.ndarray:
    """RCMHA's relative-score attention with the depth-wise causal convolutions fused in; same
    arguments and result as :func:`qkv.reference.heads.relative_conv.relative_attention`.

    ``q (B, H, N, D)``, ``k (B, Hkv, M, D)``, ``v (B, Hkv, M, Dv)``, ``r (H, L, D)``,
    ``u (H, D)``, ``b (H, Lb)``, kernels ``(D, K)`` / ``(Dv, K)``. One tiled online-softmax
    kernel (see :mod:`qkv.backends.numba._relative`): no ``N x M`` array.
    """
    _native(q)
    from qkv.backends.numba import _relative

    return _relative.relative_attention(
        q, k, v, r, u, b, conv_q=conv_q, conv_k=conv_k, conv_v=conv_v, scale=scale
    )


def sdim(
    targets: np.ndarray,
    behaviours: np.ndarray,
    planes: np.ndarray,
    *,
    valid: np.ndarray | None = None,
    normalize: bool = True,
) -> np.ndarray:
    """SDIM SimHash interest; same arguments and result as
    :func:`qkv.reference.recsys.sdim_hashing.sdim`.

    ``targets (B, C, d)``, ``behaviours (B, L, d)``, ``planes (d, m, tau)``. Behaviours are
    grouped by bucket once per (user, hash), then each candidate is a binary search (see
    :mod:`qkv.backends.numba._sdim`).
    """
    _native(targets)
    from qkv.backends.numba import _sdim

    return _sdim.sdim(targets, behaviours, planes, valid=valid, normalize=normalize)


# sparse: attention over per-head selected keys (fused gather-and-attend, one pass per row)
def sparse_attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    indices: np.ndarray,
    *,
    scale: float | None = None,
    bias: np.ndarray | None = None,
    return_lse: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Attention over per-head selected keys; same arguments and results as
    :func:`qkv.reference.sparse.selected_keys.sparse_attention`.

    ``q (B, H, N, D)``, ``k (B, Hkv, M, D)``, ``v (B, Hkv, M, Dv)``, ``indices (B, H, S)`` or
    ``(B, H, N, S)`` (``-1`` = empty slot), optional per-slot ``bias`` ``(B, H, S)``,
    ``(B, Hkv, S)`` or ``(B, H, N, S)``. Reads only the selected key and value rows (see
    :mod:`qkv.backends.numba._sparse`).
    """
    _native(q)
    from qkv.backends.numba import _sparse

    return _sparse.sparse_attention(q, k, v, indices, scale=scale, bias=bias, return_lse=return_lse)


# retrieval: LeanVec's first stage, float queries against 8-bit reduced vectors
def lvq_dot(
    queries: np.ndarray, codes: np.ndarray, scales: np.ndarray, offsets: np.ndarray
) -> np.ndarray:
    """Scores of float queries against 8-bit vectors; same arguments and result as
    :func:`qkv.reference.retrieval.leanvec_projection.lvq_dot`.

    ``queries (Nq, d)``, ``codes (N, d)`` uint8, ``scales, offsets (N,)``; the codes are widened
    inside the dot product, never copied to floats (see :mod:`qkv.backends.numba._lvq`).
    """
    _native(queries)
    from qkv.backends.numba import _lvq

    return _lvq.lvq_dot(queries, codes, scales, offsets)


# kv: packed quantisation, SnapKV's window scoring, attention over a mixed-precision cache
def quantize(
    x: np.ndarray, *, bits: int = 4, axis: str = "token", group_size: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Packed asymmetric quantisation; same arguments and results as
    :func:`qkv.reference.kv.quantization.quantize` (equal codes: the same arithmetic).

    ``x (B, H, N, D)`` gives ``packed (B, H, N, ceil(D bits / 8))`` uint8 and the scales and
    zero points of each group (see :mod:`qkv.backends.numba._kv`).
    """
    _native(x)
    from qkv.backends.numba import _kv
    from qkv.reference.kv.quantization import check_quantize

    group_n, group_d = check_quantize(x, bits=bits, axis=axis, group_size=group_size)
    return _kv.quantize(x, bits=bits, group_n=group_n, group_d=group_d)


def dequantize(
    packed: np.ndarray,
    scale: np.ndarray,
    zero: np.ndarray,
    *,
    bits: int = 4,
    axis: str = "token",
    dim: int | None = None,
) -> np.ndarray:
    """Rebuild ``x_hat (B, H, N, D)``; same arguments and result as
    :func:`qkv.reference.kv.quantization.dequantize`."""
    _native(scale)
    from qkv.backends.numba import _kv
    from qkv.reference.kv.quantization import check_dequantize

    D, _, _ = check_dequantize(packed, scale, zero, bits=bits, axis=axis, dim=dim)
    return _kv.dequantize(packed, scale, zero, bits=bits, dim=D)


def window_scores(
    q: np.ndarray,
    k: np.ndarray,
    indices: np.ndarray,
    *,
    n_tokens: int | None = None,
    kernel: int = 5,
    pooling: str = "avgpool",
    scale: float | None = None,
) -> np.ndarray:
    """Pooled observation-window votes ``(B, H, C)``; same arguments and result as
    :func:`qkv.reference.kv.window_scoring.window_scores` (no ``W x C`` array is kept)."""
    _native(q)
    from qkv.backends.numba import _kv
    from qkv.reference.kv.window_scoring import check_window_scores

    n = check_window_scores(
        q, k, indices, n_tokens=n_tokens, kernel=kernel, pooling=pooling, scale=scale
    )
    return _kv.window_scores(q, k, indices, n_tokens=n, kernel=kernel, pooling=pooling, scale=scale)


def mixed_attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    k_codes: np.ndarray,
    k_scale: np.ndarray,
    k_zero: np.ndarray,
    v_codes: np.ndarray,
    v_scale: np.ndarray,
    v_zero: np.ndarray,
    *,
    bits: int = 4,
    key_axis: str = "channel",
    value_axis: str = "token",
    scale: float | None = None,
    return_lse: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Attention over packed and floating slots, codes dequantised as they are read; same
    arguments and results as :func:`qkv.reference.kv.mixed_precision.mixed_attention`."""
    _native(q)
    from qkv.backends.numba import _kv
    from qkv.reference.kv.mixed_precision import check_mixed_attention

    check_mixed_attention(
        q, k, v, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero,
        bits=bits, key_axis=key_axis, value_axis=value_axis, scale=scale, return_lse=return_lse,
    )  # fmt: skip
    quantized = (k_codes, k_scale, k_zero, v_codes, v_scale, v_zero)
    return _kv.mixed_attention(q, k, v, quantized, bits=bits, scale=scale, return_lse=return_lse)


def graph_search_batch(
    q: np.ndarray,
    k: np.ndarray,
    neighbours: np.ndarray,
    entry: np.ndarray,
    *,
    start: int,
    top_k: int = 100,
    ef: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """RetrievalAttention's greedy graph search, one compiled search per query in parallel;
    same arguments and results as
    :func:`qkv.reference.retrieval.attention_index.graph_search_batch`."""
    _native(q)
    from qkv.backends.numba import _graph_search
    from qkv.reference.retrieval.attention_index import check_graph_search

    top_k, ef = check_graph_search(q, k, neighbours, entry, start=start, top_k=top_k, ef=ef)
    return _graph_search.graph_search_batch(
        q, k, neighbours, entry, start=start, top_k=top_k, ef=ef
    )
