r"""DiffQKV attention (Lin et al., "Sigma: Differential Rescaling of Query, Key and Value for
Efficient Language Models", arXiv 2501.13629; no official code was found).

GQA compresses keys and values alike: $G$ KV heads of the query head dimension. Sigma measures
that a model is far less sensitive to compressing **K** than **V**, and that **Q** is never
cached, so it rescales the three differently:

* **differentially compressed KV**: $n_k$ key heads of dimension $d_k$ and $n_v$ value heads of
  dimension $d_v$, with typically $n_k < n_v$ and $d_k \le d_v$; query head $h$ of $H$ reads
  key head $\lfloor h / (H/n_k) \rfloor$ and value head $\lfloor h / (H/n_v) \rfloor$;
* **augmented Q**: query heads of a larger dimension $d_q > d_k$, which add parameters and
  representation capacity without touching the KV cache.

How $q \cdot k$ is dimension-matched when $d_q \ne d_k$ is not fixed by the text we could
check. ``qkv`` maps each augmented query head into the key space with a per-head matrix
$A_h \in \mathbb{R}^{d_q \times d_k}$ before the dot product:

$$
S_h = s\,(Q_h A_h)\,K_{\kappa(h)}^\top + B, \qquad
O_h = \operatorname{softmax}(S_h)\,V_{\nu(h)}, \qquad
\kappa(h) = \lfloor h\,n_k / H \rfloor,\ \nu(h) = \lfloor h\,n_v / H \rfloor,
$$

with $s = 1/\sqrt{d_k}$ (the length of the dot product). If the queries come from a linear
projection, $X W^Q_h A_h$ is again one linear map, so the added capacity is a training-time
reparameterisation unless a non-linearity sits between $W^Q_h$ and $A_h$ (apply it to ``q``
before the call). Optional "selective V-cache fetching" is not modelled.

The saving is in the cache and in decoding, which is memory-bound: :func:`diffqkv_cost`
counts both, and :func:`diffqkv_saving` compares two configurations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from qkv import _arrays, _checks
from qkv.errors import ParameterError, ShapeError
from qkv.reference import core
from qkv.reference.heads.grouped_query import repeat_heads

Array = np.ndarray


def _check(q: Array, k: Array, v: Array, q_down: Array | None) -> None:
    """Shapes and dtypes of a DiffQKV call (``mask``, ``causal`` and ``scale`` are checked by
    the ``qkv.sdpa`` call, on the same sizes ``(B, H, N, M)``)."""
    _checks.array("q", q, rank=4, layout="(B, H, N, Dq)")
    _checks.array("k", k, rank=4, layout="(B, Hk, M, Dk)")
    _checks.array("v", v, rank=4, layout="(B, Hv, M, Dv)")
    _checks.same_dtype(q=q, k=k, v=v)
    B, H, N, Dq = q.shape
    _, Hk, M, Dk = k.shape
    Hv = v.shape[1]
    if k.shape[0] != B or v.shape[0] != B:
        raise ShapeError(f"k, v: expected batch B={B} as q, got k {k.shape[0]} and v {v.shape[0]}")
    if v.shape[2] != M:
        raise ShapeError(f"v: expected M={M} tokens as k, got {v.shape[2]}")
    for name, heads in (("k", Hk), ("v", Hv)):
        if H % heads:
            raise ShapeError(f"{name}: expected a head count dividing H={H}, got {heads}")
    if q_down is None:
        if Dq != Dk:
            raise ShapeError(
                f"q_down: expected a (H, Dq, Dk) = ({H}, {Dq}, {Dk}) map when the query head "
                f"dim Dq={Dq} differs from the key head dim Dk={Dk}, got None"
            )
    else:
        _checks.array("q_down", q_down, rank=3, layout="(H, Dq, Dk)")
        if tuple(q_down.shape) != (H, Dq, Dk):
            raise ShapeError(
                f"q_down: expected (H, Dq, Dk) = ({H}, {Dq}, {Dk}), got {tuple(q_down.shape)}"
            )
        _checks.same_dtype(q=q, q_down=q_down)


def diffqkv(
    q: Any,
    k: Any,
    v: Any,
    *,
    q_down: Any = None,
    mask: Any = None,
    causal: bool = False,
    scale: float | None = None,
    backend: Any = None,
) -> Any:
    r"""DiffQKV attention: separate K and V head counts and dims, augmented queries.

    See the module docstring for the equations. The softmax attention runs through the
    dispatched :func:`qkv.sdpa` (the backend chosen by ``QKV_BACKEND``, ``qkv.use_backend`` or
    ``backend=``) after the key and value heads are repeated to ``H`` heads; the repetition
    materialises ``(B, H, M, .)`` arrays, which a fused kernel would index instead.

    Args:
        q: augmented queries ``(B, H, N, Dq)``.
        k: keys ``(B, Hk, M, Dk)``, ``Hk`` dividing ``H``.
        v: values ``(B, Hv, M, Dv)``, ``Hv`` dividing ``H`` (independently of ``Hk``).
        q_down: $A$, ``(H, Dq, Dk)``, mapping each query head into the key space; required when
            ``Dq != Dk``, optional otherwise.
        mask: bool (True = attend) or additive, broadcastable to ``(B, H, N, M)``.
        causal: bottom-right causal mask, as :func:`qkv.sdpa`.
        scale: $s$; default $1/\sqrt{D_k}$.
        backend: the backend of the ``sdpa`` call (default: the current one).

    Returns:
        ``O (B, H, N, Dv)`` with the array type and dtype of ``q``.
    """
    import qkv  # here, not at the top: qkv's __init__ imports this module

    qn, kn, vn = (_arrays.to_numpy(x) for x in (q, k, v))
    an = None if q_down is None else _arrays.to_numpy(q_down)
    mn = None if mask is None else _arrays.to_numpy(mask)
    _check(qn, kn, vn, an)
    H = qn.shape[1]
    if an is not None:
        work = core._work_dtype(qn.dtype)
        qk = np.einsum("bhnq,hqk->bhnk", qn.astype(work, copy=False), an.astype(work))
        qn = qk.astype(qn.dtype, copy=False)  # (B, H, N, Dk)
    k_h = repeat_heads(kn, H)  # (B, H, M, Dk)
    v_h = repeat_heads(vn, H)  # (B, H, M, Dv)
    out = qkv.sdpa(qn, k_h, v_h, mask=mn, causal=causal, scale=scale, backend=backend)
    return _arrays.from_numpy(out, q)


@dataclass(frozen=True)
class HeadConfig:
    """Head counts and dims of one attention layer (GQA: ``n_k == n_v`` and equal dims).

    Attributes:
        n_heads: query heads $H$.
        n_k: key heads.
        n_v: value heads.
        d_q: query head dim.
        d_k: key head dim.
        d_v: value head dim.
    """

    n_heads: int
    n_k: int
    n_v: int
    d_q: int
    d_k: int
    d_v: int

    def __post_init__(self) -> None:
        for name in ("n_heads", "n_k", "n_v", "d_q", "d_k", "d_v"):
            _checks.positive_int(name, getattr(self, name))
        for name in ("n_k", "n_v"):
            if self.n_heads % getattr(self, name):
                raise ParameterError(
                    f"{name}: expected a divisor of n_heads={self.n_heads}, "
                    f"got {getattr(self, name)}"
                )


@dataclass(frozen=True)
class Cost:
    r"""Per-layer, per-sequence cost of attention at a context length.

    Attributes:
        kv_cache_bytes: bytes of the K and V cache.
        k_cache_bytes: bytes of the K cache alone.
        decode_flops: multiply-add FLOPs (2 per MAC) of attention for one new token: the query
            map $A$ (when $d_q \ne d_k$), $QK^\top$ and $PV$; projections and softmax excluded.
        decode_bytes: bytes read from the cache for one new token (the whole cache).
    """

    kv_cache_bytes: int
    k_cache_bytes: int
    decode_flops: int
    decode_bytes: int


def diffqkv_cost(config: HeadConfig, *, context: int, bytes_per_element: int = 2) -> Cost:
    r"""Cache size and decode cost of one layer for one sequence of ``context`` tokens.

    $$
    \text{cache} = L\,(n_k d_k + n_v d_v)\,b, \qquad
    \text{FLOPs} = 2H\big(d_q d_k\,[d_q \ne d_k] + L\,d_k + L\,d_v\big)
    $$

    for $L$ = ``context`` and $b$ = ``bytes_per_element`` (2 for fp16/bf16). Multiply by the
    number of layers and the batch for a model.
    """
    L = _checks.positive_int("context", context)
    b = _checks.positive_int("bytes_per_element", bytes_per_element)
    c = config
    k_bytes = L * c.n_k * c.d_k * b
    kv_bytes = k_bytes + L * c.n_v * c.d_v * b
    query_map = c.d_q * c.d_k if c.d_q != c.d_k else 0
    flops = 2 * c.n_heads * (query_map + L * c.d_k + L * c.d_v)
    return Cost(kv_bytes, k_bytes, flops, kv_bytes)


def diffqkv_saving(
    config: HeadConfig, baseline: HeadConfig, *, context: int, bytes_per_element: int = 2
) -> dict[str, float]:
    """Fractions saved by ``config`` against ``baseline`` at ``context`` tokens.

    Returns:
        ``{"kv_cache", "decode_flops", "decode_bytes"}``: ``1 - config / baseline`` each (0.25
        is a quarter saved; negative means ``config`` costs more).
    """
    ours = diffqkv_cost(config, context=context, bytes_per_element=bytes_per_element)
    base = diffqkv_cost(baseline, context=context, bytes_per_element=bytes_per_element)
    return {
        "kv_cache": 1.0 - ours.kv_cache_bytes / base.kv_cache_bytes,
        "decode_flops": 1.0 - ours.decode_flops / base.decode_flops,
        "decode_bytes": 1.0 - ours.decode_bytes / base.decode_bytes,
    }
