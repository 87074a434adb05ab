"""The CuPy backend: CUDA C kernels in ``kernels/*.cu``, compiled by NVRTC at first use.

NumPy input is copied to the current GPU and the result copied back; CuPy input stays on its
device. Needs an NVIDIA GPU of compute capability 8.0 or newer and the ``cupy-cuda13x`` package;
``cupy`` is imported only when an op runs, so importing this module works anywhere.

Ops:

* ``sdpa`` and ``flash`` run one fused flash-attention forward kernel (``flash_fwd.cu``): fp16
  on tensor cores (``mma.sync``, fp32 accumulation, probabilities rounded to fp16 for the
  ``P V`` product as in FlashAttention), fp32 on CUDA cores in exact fp32. Grouped heads,
  bottom-right causal alignment, boolean or additive masks (with broadcasting), any ``N`` and
  ``M``, head dims up to 256 (``Dv`` may differ from ``D``); short query sets split the keys
  across blocks (flash-decoding) and merge the parts. No ``N x M`` array is formed.
* ``rope`` runs ``rope.cu`` for float16, float32 and float64.
* ``sigmoid`` runs ``sigmoid_fwd.cu``; ``tensor`` (exact tensor attention) runs
  ``tensor_fwd.cu``, a streaming online softmax over all key pairs (fp32 on CUDA cores, fp16 or
  fp32 inputs, no ``N x M**2`` array).

Declined inputs (the dispatcher runs the reference instead, with a ``FallbackWarning``):
float64 and bfloat16 attention, ``return_weights=True`` (the fused kernel never forms the
weights), head dims over 256, GPUs older than sm_80.

Status: the kernels compile with ``nvcc -arch=sm_90`` and NVRTC but have not yet run on a GPU;
``make gpu-check`` runs their tests and benchmarks where a GPU is lent.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qkv import _arrays
from qkv.backends.cupy import _launch
from qkv.errors import Unsupported

NAME = "cupy"


def available() -> tuple[bool, str]:
    try:
        import cupy
    except ImportError:
        return (
            False,
            "the cupy package is not installed; fix: pip install 'qkv[cupy]' on a machine with an NVIDIA GPU",
        )
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDA driver missing or no device
        return (
            False,
            f"no usable NVIDIA GPU ({type(exc).__name__}: {exc}); fix: run on a machine with an NVIDIA GPU and driver",
        )
    if count < 1:
        return False, "no NVIDIA GPU found; fix: run on a machine with an NVIDIA GPU and driver"
    return True, f"{count} CUDA device(s)"


def asarray(x: Any) -> Any:
    """``x`` as a CuPy array on the current device (CuPy arrays pass through unchanged).

    CuPy has no bfloat16 dtype, so a bfloat16 torch tensor is declined (``Unsupported``).
    """
    if _arrays.dtype_name(x) == "bfloat16":
        raise Unsupported("bfloat16: CuPy has no bfloat16 dtype")
    import cupy

    return cupy.asarray(x)


def to_numpy(x: Any) -> np.ndarray:
    import cupy

    return cupy.asnumpy(x)


def _attention(
    q: Any,
    k: Any,
    v: Any,
    mask: Any,
    causal: bool,
    scale: float | None,
    return_weights: bool,
    return_lse: bool,
) -> Any:
    if return_weights:
        raise Unsupported(
            "return_weights=True: the fused kernel never forms the N x M weights; "
            "the reference computes them"
        )
    out, lse = _launch.flash_forward(q, k, v, mask=mask, causal=causal, scale=scale)
    return (out, lse) if return_lse else out


def sdpa(
    q: Any,
    k: Any,
    v: Any,
    *,
    mask: Any = None,
    causal: bool = False,
    scale: float | None = None,
    return_weights: bool = False,
    return_lse: bool = False,
) -> Any:
    """Scaled dot-product attention on the GPU; the reference's semantics (see ``qkv.sdpa``).

    ``q (B, H, N, D)``, ``k (B, Hkv, M, D)``, ``v (B, Hkv, M, Dv)`` as CuPy arrays, float16 or
    float32. Returns ``O (B, H, N, Dv)`` in the input dtype, or ``(O, lse)`` with
    ``return_lse`` (``lse (B, H, N)`` float32; ``-inf`` and zero output for fully masked rows).
    Runs the same fused kernel as :func:`flash`: the result is the same maths, computed tile by
    tile.
    """
    return _attention(q, k, v, mask, causal, scale, return_weights, return_lse)


def flash(
    q: Any,
    k: Any,
    v: Any,
    *,
    mask: Any = None,
    causal: bool = False,
    scale: float | None = None,
    return_weights: bool = False,
    return_lse: bool = False,
    block_q: int = 64,
    block_k: int = 64,
) -> Any:
    """Flash attention on the GPU; arguments and results as :func:`sdpa`.

    ``block_q`` and ``block_k`` shape the reference's tiling only: the kernel chooses its own
    tiles per head dim (64 queries x 64 keys, or 32 keys for heads wider than 128, on fp16; see
    ``_launch.tile_config``), which changes rounding, never the maths.
    """
    return _attention(q, k, v, mask, causal, scale, return_weights, return_lse)


def sigmoid(
    q: Any,
    k: Any,
    v: Any,
    *,
    mask: Any = None,
    causal: bool = False,
    scale: float | None = None,
    bias: float | None = None,
    alibi: bool = False,
    return_weights: bool = False,
) -> Any:
    """Sigmoid attention on the GPU (``sigmoid_fwd.cu``); the reference's semantics (see
    :func:`qkv.reference.forms.sigmoid_attention.sigmoid`).

    ``q (B, H, N, D)``, ``k (B, Hkv, M, D)``, ``v (B, Hkv, M, Dv)`` as CuPy arrays, float16 or
    float32; returns ``O (B, H, N, Dv)`` in the input dtype. One fused, tiled kernel on CUDA
    cores in fp32 (masks, causal, ALiBi, grouped heads); no ``N x M`` array. Declines (reference
    fallback) ``return_weights=True``, float64, head dims over 256. Compiled, not yet run on a
    GPU.
    """
    if return_weights:
        raise Unsupported(
            "return_weights=True: the fused kernel never forms the N x M weights; "
            "the reference computes them"
        )
    from qkv.reference.forms.sigmoid_attention import default_bias

    b = default_bias(k.shape[2]) if bias is None else float(bias)
    return _launch.sigmoid_forward(
        q, k, v, mask=mask, causal=causal, scale=scale, bias=b, alibi=alibi
    )


def rope(
    x: Any,
    *,
    positions: Any = None,
    offset: int = 0,
    base: float = 10000.0,
    pairing: str = "adjacent",
) -> Any:
    """Rotary position embedding on the GPU; the reference's semantics (see ``qkv.rope``).

    ``x (B, H, N, D)`` float16, float32 or float64; ``positions`` integer ``(N,)`` or
    ``(B, N)``. Angles, cosines and sines in float64, the rotation in float32 (float64 for
    float64 input), as the reference does; returns ``(B, H, N, D)`` in the dtype of ``x``.
    """
    return _launch.rope_forward(x, positions=positions, offset=offset, base=base, pairing=pairing)


def tensor(
    q: Any,
    k1: Any,
    k2: Any,
    v1: Any,
    v2: Any,
    *,
    scale: float = 1.0,
) -> Any:
    r"""Exact tensor (Kronecker) attention on the GPU (``tensor_fwd.cu``); the reference's
    semantics (see :func:`qkv.reference.forms.tensor_attention.tensor`).

    ``q (B, H, N, D)``, ``k1``/``k2 (B, Hkv, M, D)``, ``v1``/``v2 (B, Hkv, M, Dv)`` as CuPy
    arrays, float16 or float32, grouped heads, any ``N`` and ``M``; returns ``O (B, H, N, Dv)``
    in the input dtype, $o_a = \sum_{ij}\operatorname{softmax}_{ij}(S_a)\,V_1[i]\circ V_2[j]$
    with $S_{a,ij} = \text{scale}\sum_l Q_{al} K_{1,il} K_{2,jl}$. A streaming online softmax
    in fp32, $O(N M^2 (D + D_v))$ time, no ``N x M**2`` array. Declines (reference fallback)
    float64 and head dims over 256. Compiled, not yet run on a GPU.
    """
    return _launch.tensor_forward(q, k1, k2, v1, v2, scale=scale)


def neighborhood(
    q: Any,
    k: Any,
    v: Any,
    *,
    kernel_size: int | tuple[int, ...] = 7,
    dilation: int | tuple[int, ...] = 1,
    stride: int | tuple[int, ...] = 1,
    causal: bool | tuple[bool, ...] = False,
    scale: float | None = None,
    return_weights: bool = False,
    return_lse: bool = False,
) -> Any:
    """Neighborhood attention on the GPU (``neighborhood_fwd.cu``); the reference's semantics
    (see :func:`qkv.reference.local.neighborhood_attention.neighborhood`).

    ``q (B, H, *spatial, D)``, ``k (B, Hkv, *spatial, D)``, ``v (B, Hkv, *spatial, Dv)`` as CuPy
    arrays with 1-3 spatial axes, float16 or float32; returns ``O (B, H, *spatial, Dv)`` in the
    input dtype (and ``lse`` float32 with ``return_lse``). One warp per query walks its computed
    neighbours with the online softmax in fp32; no ``N x N`` array. Declines (reference
    fallback) ``return_weights=True``, float64, head dims over 256. Compiled, not yet run on a
    GPU.
    """
    if return_weights:
        raise Unsupported(
            "return_weights=True: the fused kernel never forms the weights; "
            "the reference computes them"
        )
    from qkv.backends.cupy import _neighborhood
    from qkv.reference.local.neighborhood_attention import check_neighborhood

    dims = check_neighborhood(
        q, k, v, kernel_size=kernel_size, dilation=dilation, stride=stride, causal=causal,
        scale=scale,
    )  # fmt: skip
    out, lse = _neighborhood.neighborhood_forward(q, k, v, dims, scale=scale)
    return (out, lse) if return_lse else out


# heads: RCMHA's relative-score attention with fused convolutions (relative_fwd.cu)
RELATIVE_ELEMENTS = {"float16": "f16", "float32": "f32"}


def relative_arguments(
    q: Any, k: Any, v: Any, r: Any, u: Any, b: Any, wq: Any, wk: Any, wv: Any, out: Any, *,
    scale: float,
) -> tuple:  # fmt: skip
    """The arguments of ``qkv_relative_fwd_<element>`` in its parameter order (NumPy or CuPy
    arrays; ``r``, ``u``, ``b`` and the kernels contiguous, the others with a contiguous last
    axis). Plain Python and NumPy, so the packing is tested without a GPU."""
    B, H, N, D = q.shape
    Hkv, M, Dv = k.shape[1], k.shape[2], v.shape[3]
    sizes = (B, H, Hkv, N, M, D, Dv, r.shape[1], b.shape[1], wq.shape[1], wk.shape[1], wv.shape[1])
    strides = (*_launch.element_strides(q)[:3], *_launch.element_strides(k)[:3])
    strides += _launch.element_strides(v)[:3]
    return (
        q, k, v, r, u, b, wq, wk, wv, out,
        *(np.int32(s) for s in sizes), *(np.int64(s) for s in strides), np.float32(scale),
    )  # fmt: skip


def relative_attention(
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
) -> Any:
    r"""RCMHA's relative-score attention on the GPU (``relative_fwd.cu``), the convolutions fused
    in; the reference's semantics (see
    :func:`qkv.reference.heads.relative_conv.relative_attention`).

    ``q (B, H, N, D)``, ``k (B, Hkv, M, D)``, ``v (B, Hkv, M, Dv)``, ``r (H, L, D)``,
    ``u (H, D)``, ``b (H, Lb)``, kernels ``(D, K)`` / ``(Dv, K)`` as CuPy arrays, float16 or
    float32; returns ``O (B, H, N, Dv)`` in the input dtype. One block per query row, an online
    softmax over key tiles in fp32; no ``N x M`` array. Declines (reference fallback) float64
    and head dims over 256. Compiled, not yet run on a GPU.
    """
    element = RELATIVE_ELEMENTS.get(_arrays.dtype_name(q))
    if element is None:
        raise Unsupported(f"dtype {_arrays.dtype_name(q)}: relative_fwd.cu takes float16, float32")
    B, H, N, D = q.shape
    Dv = v.shape[3]
    if max(D, Dv) > 256:
        raise Unsupported(f"head dims up to 256 (got D={D}, Dv={Dv}); the reference runs")
    import math

    import cupy

    from qkv import _outputs

    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    q, k, v = (_launch._last_axis_contiguous(x) for x in (q, k, v))
    r, u, b = (cupy.ascontiguousarray(x) for x in (r, u, b))
    kernels = [
        cupy.ones((c, 1), dtype=q.dtype) if w is None else cupy.ascontiguousarray(w)
        for w, c in ((conv_q, D), (conv_k, D), (conv_v, Dv))
    ]
    with q.device as device:
        out = _outputs.empty((B, H, N, Dv), like=q)
        args = relative_arguments(q, k, v, r, u, b, *kernels, out, scale=scale)
        kernel = _launch._kernel(device.id, "relative_fwd.cu", (), f"qkv_relative_fwd_{element}", 0)
        kernel((N, H, B), (128, 1, 1), args)
    return out


# sparse: attention over per-head selected keys (sparse_fwd.cu, split over slots and merged)
def sparse_attention(
    q: Any,
    k: Any,
    v: Any,
    indices: Any,
    *,
    scale: float | None = None,
    bias: Any = None,
    return_lse: bool = False,
) -> Any:
    """Attention over per-head selected keys on the GPU (``sparse_fwd.cu``); the reference's
    semantics (see :func:`qkv.reference.sparse.selected_keys.sparse_attention`).

    ``q (B, H, N, D)``, ``k (B, Hkv, M, D)``, ``v (B, Hkv, M, Dv)`` as CuPy arrays, float16 or
    float32, integer ``indices (B, H, S)`` or ``(B, H, N, S)`` (``-1`` = empty slot), optional
    per-slot ``bias`` (read as float32); returns
    ``O (B, H, N, Dv)`` in the input dtype (and ``lse`` float32 with ``return_lse``). One warp
    per (row, slot chunk) gathers only the selected rows, the chunks merged by log-sum-exp.
    Declines (reference fallback) float64 and head dims over 256. Compiled, not yet run on a GPU.
    """
    from qkv.backends.cupy import _sparse

    out, lse = _sparse.sparse_forward(q, k, v, indices, scale=scale, bias=bias)
    return (out, lse) if return_lse else out


# kv: packed quantisation, SnapKV's window scoring, attention over a mixed-precision cache (kv.cu)
def quantize(x: Any, *, bits: int = 4, axis: str = "token", group_size: int | None = None) -> Any:
    """Packed asymmetric quantisation on the GPU (``kv.cu``: group minimum/maximum, then packing
    with IEEE division, so the codes are the reference's float32 codes); the reference's
    semantics (see :func:`qkv.reference.kv.quantization.quantize`). float32 only (others
    declined). Compiled, not yet run on a GPU."""
    from qkv.backends.cupy import _kv
    from qkv.reference.kv.quantization import check_quantize

    group_n, group_d = check_quantize(x, bits=bits, axis=axis, group_size=group_size)
    return _kv.quantize_forward(x, bits=bits, group_n=group_n, group_d=group_d)


def dequantize(
    packed: Any,
    scale: Any,
    zero: Any,
    *,
    bits: int = 4,
    axis: str = "token",
    dim: int | None = None,
) -> Any:
    """``x_hat (B, H, N, D)`` on the GPU (``kv.cu``, one thread per element); the reference's
    semantics (see :func:`qkv.reference.kv.quantization.dequantize`). float16 and float32
    parameters. Compiled, not yet run on a GPU."""
    from qkv.backends.cupy import _kv
    from qkv.reference.kv.quantization import check_dequantize

    D, _, _ = check_dequantize(packed, scale, zero, bits=bits, axis=axis, dim=dim)
    return _kv.dequantize_forward(packed, scale, zero, bits=bits, dim=D)


def window_scores(
    q: Any,
    k: Any,
    indices: Any,
    *,
    n_tokens: int | None = None,
    kernel: int = 5,
    pooling: str = "avgpool",
    scale: float | None = None,
) -> Any:
    """SnapKV's pooled window votes ``(B, H, C)`` on the GPU: the column sums in ``kv.cu`` (one
    block per query head, no ``W x C`` array), the pooling in CuPy; the reference's semantics
    (see :func:`qkv.reference.kv.window_scoring.window_scores`). float16 and float32.
    Compiled, not yet run on a GPU."""
    import cupy

    from qkv.backends.cupy import _kv
    from qkv.reference.kv.window_scoring import check_window_scores

    n = check_window_scores(
        q, k, indices, n_tokens=n_tokens, kernel=kernel, pooling=pooling, scale=scale
    )
    _kv.kernel_name("window", _arrays.dtype_name(q))
    B, H, W, D = q.shape
    idx = cupy.repeat(cupy.asarray(indices, dtype=cupy.int64), H // k.shape[1], axis=1)
    votes = _kv.window_forward(
        q, k, idx, n_tokens=n, scale=D**-0.5 if scale is None else float(scale)
    )
    prefix = (idx >= 0) & (idx < n - W)  # (B, H, C)
    return _kv.pool_votes(votes, prefix, kernel, pooling, cupy).astype(q.dtype)


def mixed_attention(
    q: Any,
    k: Any,
    v: Any,
    k_codes: Any,
    k_scale: Any,
    k_zero: Any,
    v_codes: Any,
    v_scale: Any,
    v_zero: Any,
    *,
    bits: int = 4,
    key_axis: str = "channel",
    value_axis: str = "token",
    scale: float | None = None,
    return_lse: bool = False,
) -> Any:
    """Attention over packed and floating slots on the GPU (``kv.cu``: one warp per query row,
    codes dequantised as they are read); the reference's semantics (see
    :func:`qkv.reference.kv.mixed_precision.mixed_attention`). float16 and float32, head dims
    up to 256. Compiled, not yet run on a GPU."""
    from qkv.backends.cupy import _kv
    from qkv.reference.kv.mixed_precision import check_mixed_attention

    check_mixed_attention(
        q, k, v, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero,
        bits=bits, key_axis=key_axis, value_axis=value_axis, scale=scale, return_lse=return_lse,
    )  # fmt: skip
    out, lse = _kv.mixed_forward(
        q, k, v, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, bits=bits, scale=scale
    )
    return (out, lse) if return_lse else out


# retrieval: LeanVec's first stage, float queries against 8-bit vectors
def lvq_dot(queries: Any, codes: Any, scales: Any, offsets: Any) -> Any:
    """Scores ``(Nq, N)`` of float ``queries (Nq, d)`` against 8-bit ``codes (N, d)`` with
    ``scales, offsets (N,)``: the reference's expression run by CuPy on the GPU (a decode of the
    codes and one batched product; see
    :func:`qkv.reference.retrieval.leanvec_projection.lvq_dot`). Not yet run on a GPU."""
    from qkv.reference.retrieval.leanvec_projection import lvq_dot as decoded_product

    return decoded_product(queries, codes, scales, offsets)
