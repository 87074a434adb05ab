r"""Conformance-kit spec of ``relative_attention`` (RCMHA's relative-score attention with fused
depth-wise causal convolutions, arXiv 2308.03429).

Importing this module registers the op's :class:`qkv.testing.specs.OpSpec`. The strategy draws
batch 1-2, 1-3 KV heads with 1-3 query heads each, ``N`` from one token up to 40, memory
``m = M - N`` of 0, 1, 3 or 17 tokens, head dims 1-64 (``Dv`` sometimes different), tables
longer than needed by 0-5 rows, for each stream no kernel or a kernel of 1-4 taps, an explicit
``scale`` or not, the largest content logit from 1 to 1e4 (with ``R`` and ``b`` of matching
size) and value magnitudes from 1e-3 to 1e3. Hypothesis is imported only when calls are drawn.

Same-precision evaluations (see :mod:`qkv.testing.precision`): for float32/float64 the reference
in that dtype, as written and with the head dim summed backwards, and the exact output moved by a
first-order bound of the rounding error; for float16/bfloat16 the reference in that dtype (which
computes in float32 and rounds the output) and the float32 first-order bound.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from qkv.reference.heads.relative_conv import (
    causal_depthwise_conv,
    relative_distances,
    relative_terms,
)
from qkv.testing import precision
from qkv.testing.cases import Case
from qkv.testing.specs import OpSpec, register
from qkv.testing.tolerances import UNIT_ROUNDOFF

#: Memory lengths ``m = M - N`` drawn.
MEMORY = (0, 1, 3, 17)
#: The largest query count drawn (the Triton interpreter runs every case).
MAX_QUERIES = 40
CONVS = ("conv_q", "conv_k", "conv_v")


def relative_cases() -> Any:
    """The hypothesis strategy of ``relative_attention`` calls, each a :class:`Case`."""
    from hypothesis import strategies as st

    from qkv.testing.strategies import SPECIAL_TOKENS

    @st.composite
    def cases(draw: st.DrawFn) -> Case:
        B = draw(st.integers(1, 2))
        Hkv = draw(st.integers(1, 3))
        G = draw(st.integers(1, 3))
        H = Hkv * G
        small = [n for n in SPECIAL_TOKENS if n <= MAX_QUERIES]
        N = draw(st.one_of(st.sampled_from(small), st.integers(1, MAX_QUERIES)))
        m = draw(st.sampled_from(MEMORY))
        M = N + m
        D = draw(st.one_of(st.sampled_from([1, 2, 3, 8, 16, 31, 32, 64]), st.integers(1, 64)))
        Dv = D if draw(st.integers(0, 3)) < 3 else draw(st.integers(1, 40))
        extra = draw(st.integers(0, 5))
        taps = {name: draw(st.sampled_from([None, 3, 1, 2, 4])) for name in CONVS}
        scale = draw(st.sampled_from([None, 1.0, 0.3, 0.125]))
        logits = draw(st.sampled_from([1.0, 10.0, 100.0, 1e3, 1e4]))
        values = draw(st.sampled_from([1.0, 1e-3, 1e3]))
        seed = draw(st.integers(0, 2**32 - 1))

        rng = np.random.default_rng(seed)
        q = rng.standard_normal((B, H, N, D))  # (B, H, N, D)
        k = rng.standard_normal((B, Hkv, M, D))  # (B, Hkv, M, D)
        v = values * rng.standard_normal((B, Hkv, M, Dv))  # (B, Hkv, M, Dv)
        L = M + extra
        r = rng.standard_normal((H, L, D))  # (H, L, D)
        u = rng.standard_normal((H, D))  # (H, D)
        kwargs: dict[str, Any] = {}
        for name, channels in zip(CONVS, (D, D, Dv), strict=True):
            if taps[name] is not None:
                kwargs[name] = rng.uniform(-1.0, 1.0, (channels, taps[name]))  # (C, K)
        effective = 1.0 / math.sqrt(D) if scale is None else scale
        # Rescale q, k and R so that the largest |scale * q~ . k~| is about `logits`.
        qc = causal_depthwise_conv(q, kwargs["conv_q"]) if "conv_q" in kwargs else q
        kc = causal_depthwise_conv(k, kwargs["conv_k"]) if "conv_k" in kwargs else k
        G_axis = qc.reshape(B, Hkv, G, N, D)  # (B, Hkv, G, N, D)
        top = float(np.abs(np.einsum("bhgnd,bhmd->bhgnm", G_axis, kc)).max())
        factor = math.sqrt(logits / (effective * max(top, 1e-12)))
        q, k, r = q * factor, k * factor, r * factor
        u = u * factor
        b = (logits / effective) * rng.uniform(-1.0, 1.0, (H, L)) / 4  # (H, L)
        if scale is not None:
            kwargs["scale"] = scale
        notes = {
            "seed": seed,
            "memory": m,
            "max|logit|": f"~{logits:g}",
            "|v|": f"~{values:g}",
            "taps": {n: t for n, t in taps.items() if t is not None},
        }
        return Case("relative_attention", (q, k, v, r, u, b), kwargs, notes)

    return cases()


def _streams(args: tuple, kwargs: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The convolved ``q~, k~, v~`` in float64."""
    return tuple(  # type: ignore[return-value]
        causal_depthwise_conv(x, kwargs[name]) if kwargs.get(name) is not None else x
        for x, name in zip(args[:3], CONVS, strict=True)
    )


def _scales(case: Case) -> tuple[float]:
    """Each output row is a convex combination of rows of ``v~``: bounded by ``max |v~|``."""
    return (float(np.abs(_streams(case.args, case.kwargs)[2]).max()),)


def _first_order(args: tuple, kwargs: dict, dtype: str) -> tuple[np.ndarray]:
    r"""The exact output moved by a first-order bound of the rounding error in ``dtype``.

    With $\bar x$ the convolution of $|x|$ by $|w|$ (a bound on $|\tilde x|$ and, times $K u$,
    on the convolution's rounding), a score may be off by
    $\delta_{ij} = c\,u\,\big(K\sqrt D\,\text{scale}\,[\sum_d (\bar q + |u|)\bar k
    + \sum_d \bar q |R_\delta|] + \text{scale}\,|b_\delta| + |S_{ij}|\big)$; the output then
    by at most $\sum_j P_{ij}\delta_{ij}(|\tilde v_j| + |O_i|) + c\,u\,K \sum_j P_{ij} \bar v_j$.
    """
    u_round = precision.NOISE * UNIT_ROUNDOFF[dtype]
    q, k, v, r, u, b = args
    B, H, N, D = q.shape
    Hkv, M = k.shape[1], k.shape[2]
    G = H // Hkv
    scale = kwargs.get("scale")
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qt, kt, vt = _streams(args, kwargs)
    absolute = {
        name: np.abs(kwargs[name]) if kwargs.get(name) is not None else None for name in CONVS
    }
    qa, ka, va = (
        causal_depthwise_conv(np.abs(x), absolute[name])
        if absolute[name] is not None
        else np.abs(x)
        for x, name in zip((q, k, v), CONVS, strict=True)
    )
    taps = max((w.shape[1] for w in absolute.values() if w is not None), default=1)
    content, position, bias = relative_terms(qt, kt, r, u, b, scale=scale)
    visible = relative_distances(N, M) >= 0  # (N, M)
    s = np.where(visible, content + position + bias, -np.inf)  # (B, H, N, M)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)  # (B, H, N, M)
    ka_h = np.repeat(ka, G, axis=1)  # (B, H, M, D)
    vt_h, va_h = np.repeat(vt, G, axis=1), np.repeat(va, G, axis=1)  # (B, H, M, Dv)
    _, mag_position, mag_bias = relative_terms(
        qa, ka, np.abs(r), np.zeros_like(u), np.abs(b), scale=scale
    )
    mag_content = scale * np.einsum("bhnd,bhmd->bhnm", qa + np.abs(u)[None, :, None], ka_h)
    typical = taps * math.sqrt(D) * (mag_content + mag_position) + mag_bias
    delta = u_round * np.where(visible, typical + np.abs(np.where(visible, s, 0.0)), 0.0)
    o = np.einsum("bhnm,bhmd->bhnd", p, vt_h)  # (B, H, N, Dv)
    pd = p * delta
    row = pd.sum(axis=-1, keepdims=True)  # (B, H, N, 1)
    err = np.einsum("bhnm,bhmd->bhnd", pd, np.abs(vt_h)) + row * np.abs(o)
    err += u_round * taps * np.einsum("bhnm,bhmd->bhnd", p, va_h)
    return (o + err,)


def same_precision(op: str, args: tuple, kwargs: dict, dtype: str) -> list[tuple]:
    """Evaluations of ``relative_attention`` in ``dtype`` (see the module docstring)."""
    if dtype in ("float32", "float64"):
        q, k, v, r, u, b = args
        flipped = dict(kwargs)
        for name in ("conv_q", "conv_k"):
            if kwargs.get(name) is not None:
                flipped[name] = kwargs[name][::-1]
        reversed_d = (q[..., ::-1], k[..., ::-1], v, r[..., ::-1], u[..., ::-1], b)
        return [
            precision.reference_in(op, args, kwargs, dtype),
            precision.reference_in(op, reversed_d, flipped, dtype),
            _first_order(args, kwargs, dtype),
        ]
    return [precision.reference_in(op, args, kwargs, dtype), _first_order(args, kwargs, "float32")]


register(
    "relative_attention",
    OpSpec(cases=relative_cases, scales=_scales, same_precision=same_precision),
)
