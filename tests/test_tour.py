"""``qkv tour``: structure of the result, and that wrong or failing backends make it fail."""

from __future__ import annotations

import io
import sys
from dataclasses import replace
from types import ModuleType

import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

from qkv import _dispatch, catalog, tour
from qkv.cli import app
from qkv.errors import Unsupported
from qkv.lab import minilm
from qkv.reference import core

SMALL_TOKENS = 64


@pytest.fixture(autouse=True)
def _one_timed_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Time each run once: the tests check results, not speed."""
    monkeypatch.setattr(tour, "TIMING_REPEATS", 1)


@pytest.fixture
def small(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tour the first 64 tokens of the capture only (the same code path, about 15x less work)."""
    data = minilm.load()
    cut = {name: getattr(data, name)[:, :, :SMALL_TOKENS].copy() for name in ("q", "k", "v")}
    prefix = replace(data, **cut, tokens=data.tokens[:SMALL_TOKENS])
    monkeypatch.setattr(tour, "load", lambda: prefix)


def toy_backend(name: str, available: bool = True, **ops) -> ModuleType:
    """A minimal backend module named ``name`` with the given ops (NumPy arrays throughout)."""
    module = ModuleType(f"qkv_test_toy_{name}")
    module.NAME = name
    module.available = lambda: (available, "toy backend" if available else "no toy hardware")
    module.asarray = np.asarray
    module.to_numpy = np.asarray
    for op_name, fn in ops.items():
        setattr(module, op_name, fn)
    return module


def render(result: tour.TourResult) -> str:
    console = Console(file=io.StringIO(), width=200)
    console.print(result.table())
    return console.file.getvalue()


def test_reference_tour_structure() -> None:
    """The full-size tour on the reference alone."""
    result = tour.run(backends=["reference"])
    assert result.ok
    assert "244 tokens" in result.data
    implemented = [m.id for m in catalog.implemented()]
    assert {"sdpa", "flash", "rope", "alibi"} <= set(implemented)
    expected = [(c.mechanism, c.label) for m in implemented for c in tour.CASES.get(m, ())]
    assert [(r.mechanism, r.case) for r in result.rows] == expected
    assert set(result.untoured) == set(implemented) - set(tour.CASES)
    for row in result.rows:
        assert row.backend == "reference" and row.status == "ok"
        assert row.err_norm <= tour.TOUR_RTOL_FP32 and row.err_max <= tour.TOUR_RTOL_FP32
        assert row.seconds > 0 and row.speedup == 1.0
    assert "sdpa" in render(result) and "alibi" in render(result)


def test_relative_errors_against_a_hand_computed_case() -> None:
    golden = np.array([[3.0, -4.0], [0.0, 0.0]])  # Frobenius norm 5, largest magnitude 4
    out = golden + np.array([[0.0, 0.0], [0.0, 0.5]])
    assert tour.relative_errors(out, golden) == pytest.approx((0.1, 0.125))
    assert all(np.isnan(tour.relative_errors(out * np.nan, golden)))


def test_a_wrong_a_failing_and_a_declining_backend(small: None) -> None:
    def sdpa(q, k, v, *, causal=False, mask=None, **kw):
        if mask is not None:
            raise Unsupported("no additive masks")
        return core.sdpa(q, k, v, causal=causal, mask=mask, **kw) * np.float32(1.001)

    def flash(q, k, v, **kw):
        raise RuntimeError("kernel launch failed")

    result = tour.run(backends=[toy_backend("wrong", sdpa=sdpa, flash=flash)])
    assert not result.ok
    status = {(r.mechanism, r.case): r.status for r in result.rows if r.backend == "wrong"}
    assert status == {
        ("sdpa", "full"): "mismatch",
        ("sdpa", "causal"): "mismatch",
        ("flash", "full"): "error",
        ("flash", "causal"): "error",
        ("rope", "queries"): "fallback",  # not implemented
        ("alibi", "as mask"): "fallback",  # declined: a mask
        ("sigmoid", "full"): "fallback",  # not implemented
        ("sigmoid", "alibi"): "fallback",
        ("agent", "hop 1"): "mismatch",  # the hops are sdpa calls
        ("agent", "hop 2"): "mismatch",
        ("selective", "beta 0"): "mismatch",
        ("gaussian", "values"): "fallback",  # not implemented
        ("tensor", "64 tokens"): "fallback",
        ("gqa", "G = 4"): "mismatch",  # an sdpa call
        ("rcmha", "conv + R"): "fallback",
        ("neighborhood", "window 13"): "fallback",
        ("neighborhood", "causal 13"): "fallback",
        ("sdim", "16 hashes"): "fallback",
        ("sparse_attention", "top 32"): "fallback",
        ("zipcache", "4-bit first half"): "fallback",
        ("leanvec", "8-bit codes"): "fallback",
    }
    assert all(r.status == "ok" for r in result.rows if r.backend == "reference")
    text = render(result)
    assert "kernel launch failed" in text and "declines these inputs" in text


def test_fallbacks_show_on_every_tour(small: None) -> None:
    """FallbackWarning is issued once per (backend, op); the tour must still see each one."""
    backend = toy_backend("sparse")
    for _ in range(2):
        result = tour.run(backends=[backend])
        assert result.ok
        assert {r.status for r in result.rows if r.backend == "sparse"} == {"fallback"}
        assert all(r.seconds is None for r in result.rows if r.status == "fallback")


def test_unavailable_backends_are_listed_with_the_reason(small: None) -> None:
    result = tour.run(backends=[toy_backend("absent", available=False)])
    assert result.skipped == {"absent": "no toy hardware"}
    assert {r.backend for r in result.rows} == {"reference"}
    assert "no toy hardware" in render(result)


@pytest.mark.parametrize("name", ["numba", "torch"])
def test_builtin_backends_pass_the_tour(name: str, small: None) -> None:
    ok, reason = _dispatch.availability(_dispatch.load(name))
    if not ok:
        pytest.skip(reason)
    result = tour.run(backends=[name])
    bad = [r for r in result.rows if r.status not in ("ok", "fallback")]
    assert result.ok, bad


def test_cli_tour_exit_codes(monkeypatch: pytest.MonkeyPatch, small: None) -> None:
    runner = CliRunner()
    passed = runner.invoke(app, ["tour", "--backend", "reference"])
    assert passed.exit_code == 0, passed.output
    assert "sdpa" in passed.output

    def sdpa(q, k, v, **kw):
        return -core.sdpa(q, k, v, **kw)

    monkeypatch.setitem(sys.modules, "qkv_test_toy.negated", toy_backend("negated", sdpa=sdpa))
    failed = runner.invoke(app, ["tour", "--backend", "qkv_test_toy.negated"])
    assert failed.exit_code == 1, failed.output
    assert "mismatch" in failed.output
