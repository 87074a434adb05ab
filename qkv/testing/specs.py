"""What the conformance kit knows about each op, keyed by op name, and how it compares results.

A family that adds an op adds its :class:`OpSpec` with :func:`register` (next to its reference
code or in this module): how to draw calls of it, how to name its outputs, the natural scale of
each output, and how to evaluate it in a given precision for the tolerance rule.

:func:`compare_op` compares any backend's result of one call with the reference under the kit's
rule (for ``qkv tour`` and backend tests). It needs NumPy only: hypothesis is imported when
calls are drawn, not here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from qkv import _arrays, _dispatch
from qkv.testing import precision
from qkv.testing.cases import Case, host
from qkv.testing.precision import as_tuple
from qkv.testing.tolerances import Comparison, compare


def _strategies() -> Any:
    """:mod:`qkv.testing.strategies`, imported when calls are first drawn (it needs hypothesis)."""
    from qkv.testing import strategies

    return strategies


def _attention_outputs(case: Case) -> tuple[str, ...]:
    names = ["out"]
    if case.kwargs.get("return_weights"):
        names.append("weights")
    if case.kwargs.get("return_lse"):
        names.append("lse")
    return tuple(names)


def _attention_scales(case: Case) -> tuple[float | None, ...]:
    """Outputs are convex combinations of value rows, weights are probabilities."""
    scales = {"out": float(np.abs(case.args[2]).max()), "weights": 1.0, "lse": None}
    return tuple(scales[name] for name in _attention_outputs(case))


def _flash_golden(case: Case) -> Any:
    """``flash`` must equal ``sdpa``: its golden output is ``sdpa``'s, independent of tiling."""
    kwargs = {k: v for k, v in case.kwargs.items() if k not in ("block_q", "block_k")}
    return _dispatch.OPS["sdpa"](*case.args, **kwargs)


@dataclass(frozen=True)
class OpSpec:
    """How to test one op.

    Attributes:
        cases: returns the hypothesis strategy of the op's calls (``None``: the kit cannot
            draw calls of the op yet; results can still be compared).
        outputs: the names of the outputs a call returns, in order, for messages (``None``:
            ``out`` for a single output, else ``output 0``, ``output 1``...).
        scales: the natural magnitude of each output for the absolute bounds (``None``: the
            largest golden value).
        same_precision: ``(op, args, kwargs, dtype) -> [outputs, ...]``, the op evaluated in
            ``dtype`` in equivalent ways (see :mod:`qkv.testing.precision`).
        golden: the float64 evaluation (default: the op's own reference function).
    """

    cases: Callable[[], Any] | None = None
    outputs: Callable[[Case], tuple[str, ...]] | None = None
    scales: Callable[[Case], tuple[float | None, ...]] | None = None
    same_precision: Callable[[str, tuple, dict, str], list[tuple[np.ndarray, ...]]] = (
        lambda op, args, kwargs, dtype: [precision.reference_in(op, args, kwargs, dtype)]
    )
    golden: Callable[[Case], Any] | None = None


#: op name -> :class:`OpSpec`.
SPECS: dict[str, OpSpec] = {}


def register(name: str, spec: OpSpec) -> None:
    """Make op ``name`` testable by the kit (replacing any earlier spec of that name)."""
    SPECS[name] = spec


def evaluate(case: Case) -> tuple[Any, ...]:
    """The reference's outputs for ``case`` on its arrays as they are (float64: the golden)."""
    spec = SPECS.get(case.op, OpSpec())
    if spec.golden is not None:
        return as_tuple(spec.golden(case))
    return as_tuple(_dispatch.OPS[case.op](*case.args, **case.kwargs))


def output_names(case: Case, count: int) -> tuple[str, ...]:
    """The names of the ``count`` outputs of ``case``'s call, for messages."""
    spec = SPECS.get(case.op, OpSpec())
    if spec.outputs is not None:
        return spec.outputs(case)
    return ("out",) if count == 1 else tuple(f"output {i}" for i in range(count))


def compare_outputs(
    case: Case, actual: Sequence[np.ndarray], dtype: str
) -> list[tuple[str, Comparison]]:
    """Each output of a backend next to the golden one, by the rule of
    :mod:`qkv.testing.tolerances`.

    ``case`` holds float64 arrays whose values are those the backend received in ``dtype``;
    ``actual`` its outputs as host arrays, as many and shaped as the reference's. The op's
    same-precision evaluations are computed only if the fixed rule fails somewhere.
    """
    spec = SPECS.get(case.op, OpSpec())
    golden = evaluate(case)
    names = output_names(case, len(golden))
    scales = spec.scales(case) if spec.scales is not None else (None,) * len(golden)
    results = [
        compare(a, g, dtype=dtype, scale=s) for a, g, s in zip(actual, golden, scales, strict=True)
    ]
    if not all(results):
        variants = spec.same_precision(case.op, case.args, case.kwargs, dtype)
        results = [
            compare(a, g, dtype=dtype, scale=s, same_precision=[v[i] for v in variants])
            for i, (a, g, s) in enumerate(zip(actual, golden, scales, strict=True))
        ]
    return list(zip(names, results, strict=True))


def compare_op(
    op: str,
    actual: Any,
    args: Sequence[Any],
    kwargs: Mapping[str, Any] | None = None,
    *,
    dtype: str | None = None,
) -> Comparison:
    """Whether ``actual``, a backend's result of ``op(*args, **kwargs)``, matches the reference.

    ``args``/``kwargs`` are the arrays the backend received (NumPy, torch or CuPy, in the dtype
    it computed in, default: the dtype of the first floating argument); the golden output is the
    reference on the same values in float64. Returns the first failing output's comparison, or,
    when all pass, the one with the largest norm-wise error; its reason names the output.
    """
    case = Case.of_call(op, tuple(args), dict(kwargs or {}))
    if dtype is None:
        dtype = next(_arrays.dtype_name(a) for a in args if _arrays.is_float(a))
    outputs = [np.asarray(host(a), dtype=np.float64) for a in as_tuple(actual)]
    expected = len(evaluate(case))
    if len(outputs) != expected:
        return Comparison(False, f"{len(outputs)} output(s), expected {expected}")
    results = compare_outputs(case, outputs, dtype)
    failed = [(name, r) for name, r in results if not r.ok]
    name, result = failed[0] if failed else max(results, key=lambda nr: nr[1].norm_rel_error)
    return Comparison(
        result.ok, f"{name}: {result.reason}", result.max_abs_error, result.norm_rel_error
    )


register(
    "sdpa",
    OpSpec(
        cases=lambda: _strategies().attention_cases("sdpa"),
        outputs=_attention_outputs,
        scales=_attention_scales,
        same_precision=precision.attention,
    ),
)
register(
    "flash",
    OpSpec(
        cases=lambda: _strategies().attention_cases("flash", blocks=True),
        outputs=_attention_outputs,
        scales=_attention_scales,
        same_precision=precision.attention,
        golden=_flash_golden,
    ),
)
register(
    "rope",
    OpSpec(
        cases=lambda: _strategies().rope_cases("rope"),
        scales=lambda case: (float(np.abs(case.args[0]).max()),),
        same_precision=precision.rope,
    ),
)


def _register_families() -> None:
    """Import every ``qkv.testing.ops_*`` module: each registers its family's specs."""
    import importlib
    import pkgutil

    import qkv.testing

    for module in pkgutil.iter_modules(qkv.testing.__path__):
        if module.name.startswith("ops_"):
            importlib.import_module(f"qkv.testing.{module.name}")


_register_families()
