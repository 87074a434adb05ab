"""The benchmark harness, smoke-run at tiny sizes: structure of its results, never its speed."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from qkv import _bench_memory, _bench_tensor, _dispatch, bench
from qkv.errors import Unsupported

ROW_KEYS = {
    "case",
    "op",
    "backend",
    "kind",
    "N",
    "M",
    "causal",
    "flops",
    "bytes",
    "status",
    "reason",
    "ms_median",
    "ms_best",
    "ms_first_call",
    "repeats",
    "gflops",
    "gbytes_per_s",
    "gemm_fraction",
    "x_torch_sdpa",
    "x_reference",
    "rel_err",
}
STATUSES = {"ok", "fallback", "error", "mismatch", "skipped"}


def _toy(name: str, **ops: Any) -> ModuleType:
    """A minimal backend module with only the given ops."""
    module = ModuleType(name)
    module.NAME = name
    module.available = lambda: (True, "always")
    module.asarray = np.asarray
    module.to_numpy = np.asarray
    for op, fn in ops.items():
        setattr(module, op, fn)
    return module


def _declines(*args: Any, **kwargs: Any) -> Any:
    raise Unsupported("the toy declines every input")


TOY_MISSING = _toy("qkv_test_toy_missing")
TOY_DECLINES = _toy("qkv_test_toy_declines", sdpa=_declines, flash=_declines)


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> bench.BenchResult:
    out = tmp_path_factory.mktemp("bench") / "cpu.json"
    strict_before = os.environ.get("QKV_STRICT")
    res = bench.run(
        quick=True, out=out, backends=[*_dispatch.known_backends(), TOY_MISSING, TOY_DECLINES]
    )
    assert os.environ.get("QKV_STRICT") == strict_before
    return res


@pytest.fixture(scope="module")
def saved(result: bench.BenchResult) -> dict[str, Any]:
    return json.loads(result.path.read_text())


def test_json_has_the_documented_keys(saved: dict[str, Any], result: bench.BenchResult) -> None:
    assert saved["schema_version"] == bench.SCHEMA_VERSION
    assert saved["kind"] == "qkv-cpu-bench"
    assert saved["quick"] is True
    for key in ("date", "wall_s", "machine", "config", "gemm", "backends", "rows", "memory"):
        assert key in saved
    machine = saved["machine"]
    for key in ("cpu", "cores", "threads", "numpy", "torch", "numba", "blas", "loadavg_start"):
        assert key in machine
    assert machine["threads"] == bench.cores()
    assert saved["config"] | {"dtype": "float32", "B": 1, "H": 8, "D": 64} == saved["config"]
    assert saved["gemm"]["peak_gflops"] > 0
    assert saved["gemm"]["peak_source"] in ("numpy", "torch")
    assert {t["status"] for t in saved["targets"]} <= {"pass", "miss", "n/a"}
    assert len(saved["targets"]) == 6
    assert result.plot_path is not None and result.plot_path.is_file()
    assert result.plot_path.parent == result.path.parent


def test_rows_have_positive_times_or_a_reason(saved: dict[str, Any]) -> None:
    rows = saved["rows"]
    assert rows
    for row in rows:
        assert set(row) == ROW_KEYS
        assert row["status"] in STATUSES
        if row["status"] in ("ok", "mismatch"):
            assert row["ms_median"] > 0 and row["ms_best"] > 0 and row["ms_first_call"] > 0
            assert row["repeats"] >= 1 and row["gflops"] > 0
        else:
            assert row["reason"] and row["ms_median"] is None
    cases = {(r["case"], r["op"]) for r in rows if r["kind"] == "backend"}
    reference_ok = {
        (r["case"], r["op"]) for r in rows if r["backend"] == "reference" and r["status"] == "ok"
    }
    assert cases == reference_ok
    assert {r["case"] for r in rows if r["backend"] == bench.PEER} == {r["case"] for r in rows}
    assert any(r["case"].startswith("decode") for r in rows)
    assert any(r["causal"] for r in rows)


def test_fallbacks_are_flagged_not_timed(saved: dict[str, Any]) -> None:
    rows = saved["rows"]
    for name, why in ((TOY_MISSING.NAME, "does not implement"), (TOY_DECLINES.NAME, "declines")):
        mine = [r for r in rows if r["backend"] == name]
        assert len(mine) == len({(r["case"], r["op"]) for r in rows if r["kind"] == "backend"})
        assert all(r["status"] == "fallback" and why in r["reason"] for r in mine)
    numba = _dispatch.load("numba")
    for row in (r for r in rows if r["backend"] == "numba"):
        assert (row["status"] == "fallback") == (not _dispatch.provides(numba, row["op"]))


def test_unavailable_backends_are_listed_with_a_reason(saved: dict[str, Any]) -> None:
    for name, info in saved["backends"].items():
        assert set(info) == {"available", "reason", "provides"}
        if not info["available"]:
            assert info["reason"]
            assert not [r for r in saved["rows"] if r["backend"] == name]


def test_memory_rows(saved: dict[str, Any]) -> None:
    memory = saved["memory"]
    assert memory["rows"]
    for row in memory["rows"]:
        assert row["impl"] in _bench_memory.IMPLS
        assert row["score_matrix_head_mib"] == pytest.approx(row["N"] * row["M"] * 4 / 2**20)
        if row["status"] == "ok":
            assert row["peak_extra_mib"] is not None and row["seconds"] > 0
            assert row["method"] in memory["methods"]
        else:
            assert row["reason"]


def test_tensor_rows_match_a_float64_brute_force(saved: dict[str, Any]) -> None:
    tensor = saved["tensor"]
    assert tensor["D"] == _bench_tensor.D and tensor["degree"] == _bench_tensor.DEGREE
    rows = tensor["rows"]
    assert {r["n"] for r in rows} == set(_bench_tensor.QUICK_NS)
    for n in _bench_tensor.QUICK_NS:
        done = {(r["op"], r["backend"]) for r in rows if r["n"] == n and r["status"] == "ok"}
        assert {("brute force", "reference"), ("tensor", "reference")} <= done
        assert ("tensor_approx", "reference") in done
    for row in rows:
        if row["status"] != "ok":
            assert row["reason"]
            continue
        assert row["ms_median"] > 0 and row["x_brute_force"] > 0
        # exact forms agree to fp32 rounding; the degree-2 polynomial to its Taylor error
        assert row["rel_err"] < (1e-2 if row["op"] == "tensor_approx" else 1e-5)


def _tensor_row(n: int, op: str, backend: str, ms: float) -> dict[str, Any]:
    return {"n": n, "op": op, "backend": backend, "ms_median": ms, "status": "ok"}


def test_tensor_targets_read_the_rows() -> None:
    """The speed-up is brute force over numba at n=256; the crossover is where approx stays ahead."""
    rows = [
        _tensor_row(64, "tensor", "numba", 1.0),
        _tensor_row(64, "tensor_approx", "reference", 3.0),
        _tensor_row(128, "tensor", "numba", 8.0),
        _tensor_row(128, "tensor", "torch", 4.0),
        _tensor_row(128, "tensor_approx", "reference", 5.0),  # slower than torch's 4.0
        _tensor_row(256, "brute force", "reference", 300.0),
        _tensor_row(256, "tensor", "numba", 10.0),
        _tensor_row(256, "tensor_approx", "reference", 6.0),
    ]
    speed, crossover = _bench_tensor.targets({"rows": rows})
    assert speed["status"] == "pass" and speed["measured"].startswith("30.0x")
    assert crossover["status"] == "pass" and crossover["measured"].startswith("from n=256 on")
    rows[-1]["ms_median"] = 20.0
    rows[5]["ms_median"] = 100.0
    speed, crossover = _bench_tensor.targets({"rows": rows})
    assert speed["status"] == "miss" and crossover["status"] == "miss"
    assert _bench_tensor.targets({"rows": rows[:2]})[0]["status"] == "n/a"


def test_render_markdown(result: bench.BenchResult) -> None:
    page = bench.render_markdown(result.path)
    assert page.startswith("# CPU benchmarks")
    assert "| case | op | backend | ms | GFLOP/s | % of GEMM | × torch SDPA | × reference |" in page
    assert "## Memory" in page and "## Targets" in page and "## Tensor attention" in page
    assert "| target | measured | result |" in page
    assert f"]({result.plot_path.name})" in page
    assert page == result.markdown()


def test_render_markdown_of_another_benchmark(tmp_path: Path) -> None:
    """The docs render every JSON in benchmarks/results, the GPU benchmark's included."""
    path = tmp_path / "gpu.json"
    record = {
        "environment": {"gpu": "NVIDIA H200", "torch": "2.13.0"},
        "seconds": 12.5,
        "results": [
            {"case": {"dtype": "float16", "N": 1024}, "impl": "cupy", "ms": 0.25, "status": "ok"},
            {"case": {"dtype": "float16", "N": 1024}, "impl": "triton", "ms": None},
        ],
    }
    path.write_text(json.dumps(record))
    page = bench.render_markdown(path)
    assert page.startswith("# Benchmark results: gpu")
    assert "| case.dtype | case.N | impl | ms | status |" in page
    assert "| float16 | 1024 | triton | – | – |" in page
    assert "NVIDIA H200" in page


def test_rich_table(result: bench.BenchResult) -> None:
    from rich.console import Console

    console = Console(record=True, width=240)
    console.print(result.table())
    text = console.export_text()
    assert bench.PEER in text and "targets" in text and "fallback" in text


def test_cli_quick_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The command's wiring; the sizes shrink further (one shape each, no memory) to save time."""
    from typer.testing import CliRunner

    from qkv.cli import app

    tiny = dataclasses.replace(bench.QUICK, squares=(32,), causal_n=32, decode_m=64)
    monkeypatch.setattr(bench, "QUICK", dataclasses.replace(tiny, memory_sizes=()))
    out = tmp_path / "cli.json"
    done = CliRunner().invoke(app, ["bench", "--quick", "--out", str(out)])
    assert done.exit_code == 0, done.output
    saved = json.loads(out.read_text())
    assert saved["schema_version"] == bench.SCHEMA_VERSION and saved["memory"]["rows"] == []
    assert out.with_suffix(".png").is_file()
    assert "Not measured in this run." in bench.render_markdown(out)


def test_measure_excludes_the_warm_up() -> None:
    calls = []
    timing, first = bench.measure(lambda: calls.append(1) or len(calls), 0.0, 5)
    assert first == 1 and len(timing.repeats) == 1 and len(calls) == 2
    timing, _ = bench.measure(lambda: None, 10.0, 3)
    assert len(timing.repeats) == 3 and timing.best <= timing.median


# --------------------------------------------------------------------------- targets, synthetic


def _timed(backend: str, op: str, ms: float, status: str = "ok") -> dict[str, Any]:
    row = bench._row(bench.Shape(2048, 2048), op, backend, "peer" if backend == bench.PEER else "")
    row.update(status=status, ms_median=None if status != "ok" else ms, reason="why")
    return row


def _memory(extras: dict[int, float]) -> dict[str, Any]:
    rows = []
    for n, extra in extras.items():
        row = {"impl": "numba flash", "N": n, "status": "ok", "reason": ""}
        row.update(_bench_memory._sizes(n), peak_extra_mib=extra)
        rows.append(row)
    return {"rows": rows}


@pytest.mark.parametrize(
    ("numba_ms", "expected"),
    [(100.0, ["pass", "pass"]), (130.0, ["miss", "pass"]), (500.0, ["miss", "miss"])],
)
def test_speed_targets(numba_ms: float, expected: list[str]) -> None:
    rows = [
        _timed(bench.PEER, "sdpa", 100.0),
        _timed("reference", "sdpa", 3000.0),
        _timed("reference", "flash", 1200.0),
        _timed("numba", "flash", numba_ms),
    ]
    targets = bench.check_targets(rows, _memory({}))
    assert [t["status"] for t in targets[:2]] == expected


def test_speed_targets_miss_when_numba_falls_back() -> None:
    rows = [_timed(bench.PEER, "sdpa", 100.0), _timed("numba", "flash", 0, status="fallback")]
    targets = bench.check_targets(rows, _memory({}))
    assert [t["status"] for t in targets[:2]] == ["miss", "miss"]
    assert "fallback" in targets[0]["measured"]


@pytest.mark.parametrize(
    ("extras", "status"),
    [
        ({8192: 17.0, 16384: 33.0}, "pass"),  # linear, far below one N×M matrix
        ({8192: 68.0, 16384: 272.0}, "miss"),  # quadratic
        ({16384: 2048.0}, "miss"),  # two N×M matrices
        ({4096: 9.0}, "n/a"),  # the size is not in the run
    ],
)
def test_memory_target(extras: dict[int, float], status: str) -> None:
    target = _bench_memory.memory_target(_memory(extras), impl="numba flash", n=16384)
    assert target["status"] == status
