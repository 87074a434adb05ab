"""Conformance-kit specs of the KV-cache ops: ``quantize``, ``dequantize``, ``window_scores``
and ``mixed_attention``.

Importing this module registers their :class:`qkv.testing.specs.OpSpec`. Hypothesis is
imported only when calls are drawn. What the strategies draw:

* ``quantize``: batch 1-2, 1-3 heads, 1-20 tokens, head dims 1-40 (odd ones: padded bytes),
  2/4/8 bits, both groupings with the whole axis or a drawn divisor as group, magnitudes 1e-3 to
  1e3 and groups made constant (scale 0). Codes are integers: an honest kernel computes the
  reference's arithmetic in its dtype and gives the reference's codes in that dtype, which the
  same-precision rule accepts where rounding moved a code away from the float64 golden one.
* ``dequantize``: the output of ``quantize`` on such an array (``dim`` given or implied).
* ``window_scores``: batch and grouped heads, 1-8 window queries, 1-40 slots with empty ones
  (``-1``), prompt lengths from the window to past the last cached token, odd kernels 1-7,
  both poolings, an explicit ``scale``, logits up to 100.
* ``mixed_attention``: grouped heads, 1-3 queries, 1-20 quantised and 0-20 floating slots,
  both groupings of keys and values, 2/4/8 bits, odd head dims, ``scale``, ``return_lse``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qkv.reference.kv.quantization import dequantize, quantize
from qkv.testing.cases import Case
from qkv.testing.specs import OpSpec, register


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def quantize_cases(op: str = "quantize") -> Any:
    """The hypothesis strategy of ``quantize`` calls (or, with ``op="dequantize"``, of
    ``dequantize`` calls on ``quantize``'s float64 output)."""
    from hypothesis import strategies as st

    @st.composite
    def cases(draw: st.DrawFn) -> Case:
        B, H = draw(st.integers(1, 2)), draw(st.integers(1, 3))
        N = draw(st.one_of(st.sampled_from([1, 2, 7, 16]), st.integers(1, 20)))
        D = draw(st.one_of(st.sampled_from([1, 3, 8, 33]), st.integers(1, 40)))
        bits = draw(st.sampled_from([4, 2, 8]))
        axis = draw(st.sampled_from(["token", "channel"]))
        group = draw(st.one_of(st.none(), st.sampled_from(_divisors(D if axis == "token" else N))))
        magnitude = draw(st.sampled_from([1.0, 1e-3, 1e3]))
        constant = draw(st.sampled_from([0.0, 0.3]))  # share of tokens made constant
        seed = draw(st.integers(0, 2**32 - 1))
        rng = np.random.default_rng(seed)
        x = magnitude * rng.standard_normal((B, H, N, D))  # (B, H, N, D)
        x[:, :, rng.random(N) < constant] = magnitude
        kwargs: dict[str, Any] = {"bits": bits, "axis": axis}
        if group is not None:
            kwargs["group_size"] = group
        notes = {"seed": seed, "|x|": f"~{magnitude:g}", "constant tokens": constant}
        if op == "quantize":
            return Case(op, (x,), kwargs, notes)
        packed, scale, zero = quantize(x, **kwargs)
        out_kwargs: dict[str, Any] = {"bits": bits, "axis": axis}
        if D * bits % 8 or draw(st.booleans()):
            out_kwargs["dim"] = D
        return Case(op, (packed, scale, zero), out_kwargs, notes)

    return cases()


def window_cases() -> Any:
    """The hypothesis strategy of ``window_scores`` calls."""
    from hypothesis import strategies as st

    @st.composite
    def cases(draw: st.DrawFn) -> Case:
        B, Hkv = draw(st.integers(1, 2)), draw(st.integers(1, 3))
        H = Hkv * draw(st.sampled_from([1, 2, 4]))
        C = draw(st.one_of(st.sampled_from([1, 5, 32]), st.integers(1, 40)))
        W = draw(st.integers(1, 8))
        D = draw(st.one_of(st.sampled_from([1, 8, 64]), st.integers(1, 40)))
        extra = draw(st.sampled_from([0, 0, 1, 5]))  # prompt tokens beyond the cached ones
        empty = draw(st.sampled_from([0.0, 0.2, 1.0]))
        logits = draw(st.sampled_from([1.0, 10.0, 100.0]))
        seed = draw(st.integers(0, 2**32 - 1))
        rng = np.random.default_rng(seed)
        q = logits**0.5 * rng.standard_normal((B, H, W, D))  # (B, H, W, D)
        k = logits**0.5 * rng.standard_normal((B, Hkv, C, D))  # (B, Hkv, C, D)
        idx = np.broadcast_to(np.arange(C), (B, Hkv, C)).copy()  # (B, Hkv, C)
        idx[rng.random(idx.shape) < empty] = -1
        kwargs: dict[str, Any] = {"n_tokens": max(C + extra, W)}
        kwargs["kernel"] = draw(st.sampled_from([5, 1, 3, 7]))
        kwargs["pooling"] = draw(st.sampled_from(["avgpool", "maxpool"]))
        if draw(st.integers(0, 3)) == 3:
            kwargs["scale"] = draw(st.sampled_from([0.05, 1.0]))
        notes = {"seed": seed, "|logits|": f"~{logits:g}", "empty slots": empty}
        return Case("window_scores", (q, k, idx), kwargs, notes)

    return cases()


def mixed_cases() -> Any:
    """The hypothesis strategy of ``mixed_attention`` calls."""
    from hypothesis import strategies as st

    @st.composite
    def cases(draw: st.DrawFn) -> Case:
        B, Hkv = draw(st.integers(1, 2)), draw(st.integers(1, 3))
        H = Hkv * draw(st.sampled_from([1, 2, 4]))
        N = draw(st.integers(1, 3))
        Mq, Mf = draw(st.integers(1, 20)), draw(st.integers(0, 20))
        D = draw(st.one_of(st.sampled_from([1, 8, 64]), st.integers(1, 40)))
        Dv = draw(st.sampled_from([D, 1, 5]))
        bits = draw(st.sampled_from([4, 2, 8]))
        key_axis = draw(st.sampled_from(["channel", "token"]))
        value_axis = draw(st.sampled_from(["token", "channel"]))
        logits = draw(st.sampled_from([1.0, 30.0]))
        values = draw(st.sampled_from([1.0, 1e-3, 1e3]))
        seed = draw(st.integers(0, 2**32 - 1))
        rng = np.random.default_rng(seed)
        q = logits**0.5 * rng.standard_normal((B, H, N, D))  # (B, H, N, D)
        keys = logits**0.5 * rng.standard_normal((B, Hkv, Mq + Mf, D))  # (B, Hkv, M, D)
        vals = values * rng.standard_normal((B, Hkv, Mq + Mf, Dv))  # (B, Hkv, M, Dv)
        kq = quantize(keys[:, :, :Mq], bits=bits, axis=key_axis)
        vq = quantize(vals[:, :, :Mq], bits=bits, axis=value_axis)
        kwargs: dict[str, Any] = {"bits": bits, "key_axis": key_axis, "value_axis": value_axis}
        if draw(st.booleans()):
            kwargs["return_lse"] = True
        if draw(st.integers(0, 3)) == 3:
            kwargs["scale"] = draw(st.sampled_from([0.05, 1.0]))
        args = (q, keys[:, :, Mq:], vals[:, :, Mq:], *kq, *vq)
        notes = {"seed": seed, "|logits|": f"~{logits:g}", "|v|": f"~{values:g}"}
        return Case("mixed_attention", args, kwargs, notes)

    return cases()


def _mixed_outputs(case: Case) -> tuple[str, ...]:
    return ("out", "lse") if case.kwargs.get("return_lse") else ("out",)


def _mixed_scales(case: Case) -> tuple[float | None, ...]:
    """``out`` is a convex combination of value rows, floating or dequantised."""
    _, _, v, _, _, _, vc, vs, vz = case.args
    axis = case.kwargs.get("value_axis", "token")
    bits = case.kwargs.get("bits", 4)
    v_hat = dequantize(vc, vs, vz, bits=bits, axis=axis, dim=v.shape[3])
    bound = max(float(np.abs(v_hat).max()), float(np.abs(v).max(initial=0.0)))
    return (bound, None)[: len(_mixed_outputs(case))]


register(
    "quantize",
    OpSpec(
        cases=quantize_cases,
        outputs=lambda case: ("packed", "scale", "zero"),
        scales=lambda case: (255.0, None, None),
    ),
)
register("dequantize", OpSpec(cases=lambda: quantize_cases("dequantize")))
register("window_scores", OpSpec(cases=window_cases))
register(
    "mixed_attention",
    OpSpec(cases=mixed_cases, outputs=_mixed_outputs, scales=_mixed_scales),
)
