"""The conformance kit tests itself: toy backends with known bugs must each be caught.

Each toy is a module object built here, implementing ``sdpa`` on NumPy (float32 arithmetic for
low-precision inputs, like a real kernel) with at most one deliberate bug.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from rich.console import Console

import qkv
from qkv import _checks, _dispatch, _outputs
from qkv.errors import BackendUnavailable, Unsupported
from qkv.testing import check_backend, compare, compare_indices, compare_op, round_to
from qkv.testing.cases import Case
from qkv.testing.check import Report
from qkv.testing.strategies import attention_cases, rope_cases
from qkv.testing.tolerances import TOLERANCES

QUICK = {"max_examples": 60, "dtypes": ("float32",), "seed": 0, "shrink_budget": 5}


def toy_sdpa(bug: str | None = None):
    """A straightforward NumPy ``sdpa``, one head at a time, with the named bug (or none)."""

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
    ) -> Any:
        B, H, N, D = q.shape
        Hkv, M, Dv = k.shape[1], k.shape[2], v.shape[3]
        G = H // Hkv
        work = np.float64 if q.dtype == np.float64 else np.float32
        if bug == "missing scale" or scale is None:
            scale = 1.0 / math.sqrt(D)
        allowed = np.ones((B, H, N, M), dtype=bool)
        bias = np.zeros((B, H, N, M), dtype=work)
        if mask is not None:
            mask = np.broadcast_to(mask, (B, H, N, M))
            if mask.dtype == np.bool_:
                allowed &= mask
            else:
                allowed &= ~np.isneginf(mask)
                bias = np.where(allowed, mask, 0.0).astype(work)
        if causal:
            shift = 0 if bug == "top-left causal" else M - N
            allowed &= np.arange(M)[None, :] <= np.arange(N)[:, None] + shift
        out = _outputs.empty((B, H, N, Dv), like=q)
        weights = _outputs.empty((B, H, N, M), like=q)
        lse = _outputs.empty((B, H, N), like=q, dtype=work)
        for b in range(B):
            for h in range(H):
                kv = h % Hkv if bug == "gqa modulo" else h // G
                s = scale * (q[b, h].astype(work) @ k[b, kv].astype(work).T) + bias[b, h]
                s = np.where(allowed[b, h], s, -np.inf)  # (N, M)
                m = s.max(axis=-1, keepdims=True)
                if bug != "nan rows":
                    m = np.where(np.isneginf(m), 0.0, m)
                with np.errstate(invalid="ignore"):
                    p = np.exp(s - m)
                total = p.sum(axis=-1, keepdims=True)
                with np.errstate(invalid="ignore"):
                    w = p / (total if bug == "nan rows" else np.where(total > 0, total, 1.0))
                o = (w @ v[b, kv].astype(work)).astype(q.dtype)
                if bug == "unwritten":  # forgets the last element of every head
                    out[b, h, : N - 1] = o[: N - 1]
                    out[b, h, N - 1, : Dv - 1] = o[N - 1, : Dv - 1]
                else:
                    out[b, h] = o
                weights[b, h] = w
                with np.errstate(divide="ignore"):
                    lse[b, h] = (np.log(total) + m)[:, 0]
        result = [out]
        if return_weights:
            result.append(weights)
        if return_lse:
            result.append(lse)
        return result[0] if len(result) == 1 else tuple(result)

    return sdpa


def toy_backend(name: str, **ops: Any) -> types.ModuleType:
    """A backend module object with the protocol, NumPy arrays, and the given ops."""
    module = types.ModuleType(f"qkv_toy_{name}")
    module.NAME = name
    module.available = lambda: (True, "a toy")
    module.asarray = np.asarray
    module.to_numpy = np.asarray
    for op, fn in ops.items():
        setattr(module, op, fn)
    return module


def failure_of(report: Report) -> Any:
    failed = [row for row in report.rows if row.status == "failed"]
    assert failed, report.text()
    return failed[0].failure


# --------------------------------------------------------------------------- broken toys


def test_correct_toy_passes() -> None:
    report = check_backend(
        toy_backend("correct", sdpa=toy_sdpa()),
        ops=["sdpa", "flash"],
        max_examples=60,
        dtypes=("float32", "float16", "bfloat16"),
        seed=0,
    )
    assert report.ok, report.text()
    by = {(r.op, r.dtype): r for r in report.rows}
    assert by[("sdpa", "float32")].examples == 60
    assert by[("sdpa", "float16")].status == "passed"
    assert by[("sdpa", "bfloat16")].status == "declined"  # NumPy cannot hold bfloat16
    assert by[("flash", None)].status == "not provided"


def test_top_left_causal_is_caught() -> None:
    failure = failure_of(
        check_backend(toy_backend("tl", sdpa=toy_sdpa("top-left causal")), ["sdpa"], **QUICK)
    )
    assert failure.case.kwargs.get("causal") is True
    q, k, _ = failure.case.args
    assert q.shape[2] != k.shape[2]  # the alignments only differ when N != M


def test_missing_scale_is_caught() -> None:
    failure = failure_of(
        check_backend(toy_backend("ns", sdpa=toy_sdpa("missing scale")), ["sdpa"], **QUICK)
    )
    assert failure.kind == "mismatch"
    assert "scale" in failure.case.kwargs


def test_wrong_gqa_mapping_is_caught() -> None:
    failure = failure_of(
        check_backend(toy_backend("gqa", sdpa=toy_sdpa("gqa modulo")), ["sdpa"], **QUICK)
    )
    q, k, _ = failure.case.args
    H, Hkv = q.shape[1], k.shape[1]
    assert Hkv > 1 and H > Hkv  # h % Hkv and h // G agree otherwise


def test_unwritten_output_is_caught_by_poisoning() -> None:
    failure = failure_of(
        check_backend(toy_backend("uw", sdpa=toy_sdpa("unwritten")), ["sdpa"], **QUICK)
    )
    assert "NaN where a number was expected" in failure.message


def test_nan_for_fully_masked_rows_is_caught() -> None:
    failure = failure_of(
        check_backend(toy_backend("nan", sdpa=toy_sdpa("nan rows")), ["sdpa"], **QUICK)
    )
    assert "NaN" in failure.message
    notes = failure.case.notes
    assert notes.get("fully masked mask rows") or notes.get("rows causal masks fully")


def test_declining_everything_does_not_pass() -> None:
    def decline(*args: Any, **kwargs: Any) -> None:
        raise Unsupported("not today")

    report = check_backend(
        toy_backend("lazy", sdpa=decline, rope=decline), ["sdpa", "rope"], **QUICK
    )
    assert not report.ok
    assert {r.status for r in report.rows} == {"declined"}
    assert "every example was declined" in " ".join(report.problems())
    assert report.rows[0].decline_reasons["not today"] == 60


def test_errors_dtypes_and_mutation_are_failures() -> None:
    def crash(q: np.ndarray, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("kernel exploded")

    def widen(q: np.ndarray, *args: Any, **kwargs: Any) -> Any:
        out = toy_sdpa()(q, *args, **kwargs)
        return out.astype(np.float64) if isinstance(out, np.ndarray) else out

    def scribble(q: np.ndarray, *args: Any, **kwargs: Any) -> Any:
        out = toy_sdpa()(q, *args, **kwargs)
        q[...] = 0.0
        return out

    for bad, kind in ((crash, "error"), (widen, "dtype"), (scribble, "mutated input")):
        failure = failure_of(check_backend(toy_backend(kind, sdpa=bad), ["sdpa"], **QUICK))
        assert failure.kind == kind


def test_report_rendering_and_errors() -> None:
    report = check_backend(
        toy_backend("render", sdpa=toy_sdpa("gqa modulo")), ["sdpa", "rope"], **QUICK
    )
    console = Console(record=True, width=200)
    console.print(report.table())
    text = console.export_text()
    assert "failed" in text and "not provided" in text and "does not conform" in text
    data = json.loads(json.dumps(report.as_dict()))
    assert data["ok"] is False and data["rows"][0]["failure"]["kind"] == "mismatch"
    with pytest.raises(ValueError, match="unknown"):
        check_backend("reference", ops=["no_such_op"])
    with pytest.raises(ValueError, match="dtypes"):
        check_backend("reference", ops=["sdpa"], dtypes=("int8",))
    nothing = check_backend(toy_backend("empty"), **QUICK)
    assert not nothing.ok and "provides none" in nothing.problems()[0]


def test_unavailable_backend_raises_with_reason() -> None:
    module = toy_backend("away")
    module.available = lambda: (False, "the widget is unplugged")
    with pytest.raises(BackendUnavailable, match="widget is unplugged"):
        check_backend(module)


# --------------------------------------------------------------------------- tolerances


def test_round_to_matches_the_dtypes() -> None:
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).standard_normal(1000) * np.logspace(-30, 30, 1000)
    x = np.concatenate([x, [np.inf, -np.inf, 0.0, -0.0, 3.3895313892515355e38]])
    expected = torch.from_numpy(x.astype(np.float32)).bfloat16().double().numpy()
    np.testing.assert_array_equal(round_to(x, "bfloat16"), expected)
    with np.errstate(over="ignore"):
        halves = x.astype(np.float16).astype(float)
    np.testing.assert_array_equal(round_to(x, "float16"), halves)
    assert np.isnan(round_to(np.array([np.nan]), "bfloat16")).all()


def test_compare_special_values() -> None:
    g = np.array([1.0, -np.inf, 2.0])
    assert compare(g.copy(), g, dtype="float32")  # -inf lse equals -inf
    assert not compare(np.array([1.0, -np.inf, np.nan]), g, dtype="float32")
    assert not compare(np.array([1.0, 0.0, 2.0]), g, dtype="float32")
    assert not compare(np.array([np.inf, -np.inf, 2.0]), g, dtype="float32")
    assert compare(np.array([np.nan]), np.array([np.nan]), dtype="float32")
    assert not compare(np.array([1.0]), np.array([np.nan]), dtype="float32")
    assert not compare(np.zeros(2), np.zeros(3), dtype="float32")


def test_compare_fixed_and_same_precision_rules() -> None:
    g = np.linspace(-1.0, 1.0, 200_001)
    tol = TOLERANCES["float32"]
    assert compare(g * (1 + 0.5 * tol.rtol_norm), g, dtype="float32")
    assert not compare(g * (1 + 20 * tol.rtol_norm), g, dtype="float32")
    one_off = g.copy()
    one_off[7] += 1e-3  # norm-wise small, element-wise not
    result = compare(one_off, g, dtype="float32")
    assert not result and "element" in result.reason
    # an ill-conditioned output: the honest evaluation in the dtype is off by 1e-3 everywhere
    honest = [g + 1e-3]
    for dtype in ("float32", "float16"):
        fudge = TOLERANCES[dtype].fudge
        assert compare(g + 0.9 * fudge * 1e-3, g, dtype=dtype, same_precision=honest)
        assert not compare(g + 1.5 * fudge * 1e-2, g, dtype=dtype, same_precision=honest)


def test_compare_op_on_any_array_type() -> None:
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((1, 4, 9, 8)).astype(np.float32) for _ in range(3))
    k, v = k[:, :2], v[:, :2]
    out, lse = qkv.sdpa(q, k, v, causal=True, return_lse=True)
    result = compare_op("sdpa", (out, lse), (q, k, v), {"causal": True, "return_lse": True})
    assert result.ok and result.reason.startswith(("out:", "lse:"))
    wrong = compare_op("sdpa", out + 1e-3, (q, k, v), {"causal": True})
    assert not wrong and wrong.reason.startswith("out:")
    assert not compare_op("sdpa", (out, lse), (q, k, v), {"causal": True})  # one too many
    torch = pytest.importorskip("torch")
    qt, kt, vt = (torch.from_numpy(x).to(torch.bfloat16) for x in (q, k, v))
    bf = qkv.sdpa(qt, kt, vt, backend="torch")
    assert compare_op("sdpa", bf, (qt, kt, vt))


def test_compare_indices_sets_and_ties() -> None:
    golden = np.array([[0, 2, 5]])
    assert compare_indices(np.array([[5, 0, 2]]), golden)
    assert not compare_indices(np.array([[0, 2, 4]]), golden)
    scores = np.array([[9.0, 1.0, 8.0, 0.0, 7.0, 7.0]])  # 4 and 5 tie for third place
    assert compare_indices(np.array([[0, 2, 4]]), golden, scores=scores)
    assert not compare_indices(np.array([[0, 2, 1]]), golden, scores=scores)
    assert not compare_indices(np.array([[0, 0, 2]]), golden, scores=scores)


# --------------------------------------------------------------------------- strategies


@settings(max_examples=40, deadline=None, database=None, derandomize=True)
@given(attention_cases("flash", blocks=True))
def test_attention_cases_are_valid_inputs(case: Case) -> None:
    dims = _checks.attention_call(*case.args, **case.kwargs)
    assert 1 <= dims.B <= 2 and 1 <= dims.Hkv <= 3 and dims.group <= 4
    assert max(dims.N, dims.M) <= 70
    s = case.kwargs.get("scale", 1 / math.sqrt(dims.D)) * np.einsum(
        "bhgnd,bhmd->bhgnm",
        case.args[0].reshape(dims.B, dims.Hkv, dims.group, dims.N, -1),
        case.args[1],
    )
    assert np.abs(s).max() <= 1e4 * (1 + 1e-9)


@settings(max_examples=40, deadline=None, database=None, derandomize=True)
@given(rope_cases())
def test_rope_cases_are_valid_inputs(case: Case) -> None:
    _checks.rope_call(*case.args, **case.kwargs)


ATTENTION_TARGETS = {
    "one query token": lambda c: c.args[0].shape[2] == 1,
    "N > M, causal": lambda c: c.args[0].shape[2] > c.args[1].shape[2] and c.kwargs.get("causal"),
    "N < M, masked": lambda c: c.args[0].shape[2] < c.args[1].shape[2] and "mask" in c.kwargs,
    "GQA ratio 4, Hkv > 1": lambda c: c.args[0].shape[1] == 4 * c.args[1].shape[1] > 4,
    "odd D, Dv != D": lambda c: c.args[0].shape[3] % 2 and c.args[2].shape[3] != c.args[0].shape[3],
    "D = 256": lambda c: c.args[0].shape[3] == 256,
    "bool (N, M) mask": lambda c: (
        getattr(c.kwargs.get("mask"), "shape", ()) == (c.args[0].shape[2], c.args[1].shape[2])
        and c.kwargs["mask"].dtype == bool
    ),
    "additive mask, dead rows": lambda c: (
        c.notes.get("fully masked mask rows", 0) > 0 and c.kwargs["mask"].dtype != bool
    ),
    "logits 1e4 with lse": lambda c: (
        c.notes["max|logit|"] == "10000" and c.kwargs.get("return_lse")
    ),
    "explicit scale": lambda c: "scale" in c.kwargs,
}
ROPE_TARGETS = {
    "positions (B, N)": lambda c: getattr(c.kwargs.get("positions"), "ndim", 0) == 2,
    "positions (N,), int32": lambda c: (
        str(getattr(c.kwargs.get("positions"), "dtype", "")) == "int32"
    ),
    "large offset, half pairing": lambda c: (
        c.kwargs.get("offset", 0) >= 2047 and c.kwargs["pairing"] == "half"
    ),
}


@pytest.mark.parametrize(
    ("strategy", "targets"),
    [(attention_cases(), ATTENTION_TARGETS), (rope_cases(), ROPE_TARGETS)],
    ids=["attention", "rope"],
)
def test_strategies_reach_the_hard_cases(strategy: Any, targets: dict[str, Any]) -> None:
    seen: set[str] = set()

    @settings(max_examples=500, deadline=None, database=None, derandomize=True)
    @given(strategy)
    def draw(case: Case) -> None:
        seen.update(name for name, hit in targets.items() if hit(case))

    draw()
    assert seen == set(targets), f"never drawn: {set(targets) - seen}"


# --------------------------------------------------------------------------- pytest plugin


TOY_MODULE = '''
"""A toy qkv backend outside the qkv repository."""
import numpy as np

NAME = "{name}"


def available():
    return True, "always"


def asarray(x):
    return np.asarray(x)


def to_numpy(x):
    return np.asarray(x)


def sdpa(q, k, v, *, mask=None, causal=False, scale=None, return_weights=False, return_lse=False):
    if return_weights or mask is not None:
        from qkv.errors import Unsupported

        raise Unsupported("no masks, no weights")
    B, H, N, D = q.shape
    G = H // k.shape[1]
    k, v = np.repeat(k, G, axis=1), np.repeat(v, G, axis=1)
    s = (1 / np.sqrt(D) if scale is None else scale) * (q @ k.swapaxes(-1, -2))
    if causal:
        M = k.shape[2]
        s = np.where(np.arange(M) <= np.arange(N)[:, None] + {shift}, s, -np.inf)
    m = s.max(-1, keepdims=True)
    m = np.where(np.isinf(m), 0, m)
    total = np.exp(s - m).sum(-1, keepdims=True)
    out = ((np.exp(s - m) / np.where(total > 0, total, 1)) @ v).astype(q.dtype)
    if not return_lse:
        return out
    with np.errstate(divide="ignore"):
        lse = (np.log(total) + m)[..., 0]
    return out, lse.astype(np.float64 if q.dtype == np.float64 else np.float32)
'''


def run_plugin(tmp_path: Path, name: str, shift: str, *extra: str) -> subprocess.CompletedProcess:
    (tmp_path / f"{name}.py").write_text(TOY_MODULE.format(name=name, shift=shift))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    command = [sys.executable, "-m", "pytest", "-p", "qkv", f"--qkv-backend={name}",
               "--qkv-max-examples=50", "--qkv-dtypes=float32,float16", "--pyargs", "qkv.testing",
               "-rs", "-p", "no:cacheprovider", *extra]  # fmt: skip
    return subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )


def test_plugin_checks_an_outside_backend(tmp_path: Path) -> None:
    good = run_plugin(tmp_path, "toy_good", "(M - N)")
    assert good.returncode == 0, good.stdout + good.stderr
    from qkv.testing.specs import SPECS

    drawable = [op for op in _dispatch.OPS if op in SPECS and SPECS[op].cases is not None]
    others = len(drawable) - 1  # the toy provides sdpa only
    assert f"1 passed, {others} skipped" in good.stdout
    assert "toy_good': flash not provided" in good.stdout
    bad = run_plugin(tmp_path, "toy_bad", "0")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "test_conformance[toy_bad-sdpa]" in bad.stdout and "causal=True" in bad.stdout
    unknown = run_plugin(tmp_path, "toy_none", "0", "--qkv-backend=no_such_backend_xyz")
    assert unknown.returncode == 4 and "no_such_backend_xyz" in unknown.stderr


def test_lazy_exports_resolve() -> None:
    import qkv.testing

    assert sorted(qkv.testing.__all__) == sorted(qkv.testing._EXPORTS)
    for name in qkv.testing.__all__:
        assert getattr(qkv.testing, name) is not None


def test_plugin_module_imports_cheaply() -> None:
    code = textwrap.dedent(
        """
        import sys
        import qkv.testing.plugin
        import qkv.testing.specs
        heavy = [m for m in ("hypothesis", "torch", "triton", "numba", "cupy") if m in sys.modules]
        print(",".join(heavy))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""
