"""CPU benchmarks of softmax attention: every backend against the NumPy reference and torch SDPA.

:func:`run` times ``sdpa``, ``flash`` and ``sigmoid`` (fp32, ``B=1, H=8, D=64``) at ``N = M`` in
{512, 1024, 2048, 4096}, causal at 2048, and one decode shape (``N=1, M=16384``), on every
available backend, next to ``torch.nn.functional.scaled_dot_product_attention`` and the
machine's measured fp32 GEMM rate, all in one run. It then measures the peak extra memory of one
call in a fresh process (:mod:`qkv._bench_memory`), times triple-wise ``tensor`` attention
against its brute force and its near-linear approximation (:mod:`qkv._bench_tensor`), checks the
targets of the foundation and forms issues, and saves JSON, a PNG and (through
:func:`render_markdown`) a docs page.

A backend that falls back to the reference for an op is flagged ``"fallback"`` and not timed:
a fallback's time is never reported as the backend's. Timing is best/median of repeats after one
warm-up call (which is where Numba compiles), within a time budget per measurement.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import gc
import json
import math
import os
import platform
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

import qkv
from qkv import _bench_memory, _bench_report, _bench_tensor, _dispatch
from qkv.errors import FallbackWarning, MissingOp

if TYPE_CHECKING:
    from rich.table import Table

SCHEMA_VERSION = 1
#: The fixed part of every shape: batch, heads and head dim.
B, H, D = 1, 8, 64
DTYPE = "float32"
OPS = ("sdpa", "flash", "sigmoid")
#: Ops whose output is softmax attention, checked against torch SDPA; the others are checked
#: against the reference backend's output of the same op.
SOFTMAX_OPS = ("sdpa", "flash")
#: Name of the peer row: torch's own SDPA called directly on torch tensors.
PEER = _bench_report.PEER
#: A backend's output that differs from the peer's by more than this (norm-wise) is flagged.
MISMATCH = 1e-3


@dataclass(frozen=True)
class Shape:
    """One attention shape: ``N`` queries against ``M`` keys, causal or not."""

    N: int
    M: int
    causal: bool = False

    @property
    def label(self) -> str:
        """``"2048x2048"``, ``"2048x2048 causal"`` or ``"decode 1x16384"``."""
        base = f"{self.N}x{self.M}"
        if self.N == 1:
            return f"decode {base}"
        return f"{base} causal" if self.causal else base

    @property
    def flops(self) -> float:
        """``4·B·H·N·M·D`` (two matmuls), halved when causal."""
        total = 4.0 * B * H * self.N * self.M * D
        return total / 2 if self.causal else total

    @property
    def bytes(self) -> int:
        """The least traffic: read q, k, v once and write the output (fp32)."""
        return 4 * B * H * D * (2 * self.N + 2 * self.M)


@dataclass(frozen=True)
class Settings:
    """Sizes and time budget of a run."""

    squares: tuple[int, ...]
    causal_n: int
    decode_m: int
    budget_s: float
    max_repeats: int
    gemm_n: int
    memory_sizes: tuple[int, ...]
    memory_impls: tuple[str, ...]
    memory_budget_s: float

    @property
    def shapes(self) -> list[Shape]:
        """The benchmark shapes, in the order they run."""
        return [
            *(Shape(n, n) for n in self.squares),
            Shape(self.causal_n, self.causal_n, causal=True),
            Shape(1, self.decode_m),
        ]


FULL = Settings(
    squares=(512, 1024, 2048, 4096),
    causal_n=2048,
    decode_m=16384,
    budget_s=2.0,
    max_repeats=20,
    gemm_n=2048,
    memory_sizes=(2048, 4096, 8192, 16384),
    memory_impls=tuple(_bench_memory.IMPLS),
    memory_budget_s=40.0,
)
QUICK = Settings(
    squares=(64, 128),
    causal_n=128,
    decode_m=512,
    budget_s=0.0,
    max_repeats=1,
    gemm_n=256,
    memory_sizes=(256,),
    memory_impls=("numba flash", "reference flash"),
    memory_budget_s=10.0,
)


@dataclass
class Timing:
    """Wall times of one measurement, in seconds."""

    first: float
    repeats: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return float(np.median(self.repeats))

    @property
    def best(self) -> float:
        return min(self.repeats)


def measure(fn: Callable[[], Any], budget_s: float, max_repeats: int) -> tuple[Timing, Any]:
    """Time ``fn``: one warm-up call (excluded), then repeats until ``budget_s`` or ``max_repeats``.

    At least one repeat always runs. Returns the timing and the warm-up call's result.
    """
    gc.collect()
    start = time.perf_counter()
    result = fn()
    timing = Timing(first=time.perf_counter() - start)
    began = time.perf_counter()
    while len(timing.repeats) < max_repeats:
        start = time.perf_counter()
        fn()
        timing.repeats.append(time.perf_counter() - start)
        if time.perf_counter() - began >= budget_s:
            break
    return timing, result


@contextlib.contextmanager
def strict() -> Iterator[None]:
    """Turn every reference fallback into an error (``QKV_STRICT=1``, ``FallbackWarning``)."""
    before = os.environ.get("QKV_STRICT")
    os.environ["QKV_STRICT"] = "1"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FallbackWarning)
            yield
    finally:
        if before is None:
            del os.environ["QKV_STRICT"]
        else:
            os.environ["QKV_STRICT"] = before


# --------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return sorted(flags & {"avx2", "fma", "avx512f", "avx512_bf16", "amx_tile"})
    return []


def _memory_gib() -> float | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    return None


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parent.parent
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return done.stdout.strip() or None
    return None


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def set_threads(threads: int) -> dict[str, Any]:
    """Give torch, Numba and BLAS ``threads`` threads; return what each library reports."""
    info: dict[str, Any] = {"threads": threads}
    with contextlib.suppress(ImportError):
        import torch

        torch.set_num_threads(threads)
        info["torch_threads"] = torch.get_num_threads()
    with contextlib.suppress(ImportError):
        import numba

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        info["numba_threads"] = numba.get_num_threads()
    try:
        from threadpoolctl import threadpool_info, threadpool_limits
    except ImportError:
        info["blas"] = None
    else:
        threadpool_limits(threads, user_api="blas")
        info["blas"] = [
            {
                key: pool.get(key)
                for key in ("internal_api", "version", "num_threads", "architecture", "prefix")
            }
            for pool in threadpool_info()
            if pool.get("user_api") == "blas"
        ]
    return info


#: Environment variables that change what runs or how many threads it gets.
ENVIRONMENT = (
    "QKV_BACKEND",
    "TRITON_INTERPRET",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMBA_NUM_THREADS",
    "NUMBA_THREADING_LAYER",
)


def machine_info(threads: dict[str, Any]) -> dict[str, Any]:
    """CPU, memory, library versions, thread counts and relevant environment of this machine."""
    return {
        "cpu": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cores": cores(),
        "memory_gib": _memory_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": _version("torch"),
        "numba": _version("numba"),
        "qkv_git": _git_commit(),
        "loadavg_start": _load(),
        "environment": {name: os.environ[name] for name in ENVIRONMENT if name in os.environ},
        **threads,
    }


def _load() -> float | None:
    """The one-minute load average, where the system has one."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def _numba_threading_layer() -> str | None:
    """The threading layer Numba chose, once a parallel kernel has run (else None)."""
    try:
        import numba

        return numba.threading_layer()
    except (ImportError, ValueError):
        return None


def gemm_rate(n: int, budget_s: float, max_repeats: int) -> dict[str, Any]:
    """fp32 GEMM rate of ``n x n @ n x n`` with NumPy (its BLAS) and with ``torch.mm``.

    ``peak_gflops`` is the higher of the two: the rate the attention rows are compared with.
    """
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    flops = 2.0 * n**3
    candidates: dict[str, Callable[[], Any]] = {"numpy": lambda: a @ b}
    with contextlib.suppress(ImportError):
        import torch

        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        candidates["torch"] = lambda: torch.mm(ta, tb)
    out: dict[str, Any] = {"n": n, "flops": flops}
    for name, fn in candidates.items():
        timing, _ = measure(fn, budget_s, max_repeats)
        out[name] = {
            "ms_median": timing.median * 1e3,
            "ms_best": timing.best * 1e3,
            "gflops": flops / timing.median / 1e9,
        }
    source = max(candidates, key=lambda name: out[name]["gflops"])
    out["peak_source"] = source
    out["peak_gflops"] = out[source]["gflops"]
    return out


# --------------------------------------------------------------------------- timing rows


def _inputs(shape: Shape, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, H, shape.N, D), dtype=np.float32)  # (B, H, N, D)
    k = rng.standard_normal((B, H, shape.M, D), dtype=np.float32)  # (B, H, M, D)
    v = rng.standard_normal((B, H, shape.M, D), dtype=np.float32)  # (B, H, M, D)
    return q, k, v


def _peer(q: np.ndarray, k: np.ndarray, v: np.ndarray, causal: bool) -> Callable[[], Any] | None:
    """A call of torch's SDPA on (zero-copy) torch views of the inputs, or None without torch."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))

    def call() -> np.ndarray:
        with torch.inference_mode():
            return F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal).numpy()

    return call


def _row(shape: Shape, op: str, backend: str, kind: str) -> dict[str, Any]:
    return {
        "case": shape.label,
        "op": op,
        "backend": backend,
        "kind": kind,
        "N": shape.N,
        "M": shape.M,
        "causal": shape.causal,
        "flops": shape.flops,
        "bytes": shape.bytes,
        "status": "ok",
        "reason": "",
        "ms_median": None,
        "ms_best": None,
        "ms_first_call": None,
        "repeats": 0,
        "gflops": None,
        "gbytes_per_s": None,
        "gemm_fraction": None,
        "x_torch_sdpa": None,
        "x_reference": None,
        "rel_err": None,
    }


def _time_row(
    row: dict[str, Any],
    fn: Callable[[], Any],
    expected: np.ndarray | None,
    settings: Settings,
) -> np.ndarray | None:
    """Fill ``row`` with the timing of ``fn`` (run under :func:`strict`); return its output."""
    try:
        with strict():
            timing, out = measure(fn, settings.budget_s, settings.max_repeats)
    except (MissingOp, FallbackWarning) as why:
        row.update(status="fallback", reason=str(why))
        return None
    except Exception as why:  # a backend bug must not end the whole run
        row.update(status="error", reason=f"{type(why).__name__}: {why}")
        return None
    row.update(
        ms_median=timing.median * 1e3,
        ms_best=timing.best * 1e3,
        ms_first_call=timing.first * 1e3,
        repeats=len(timing.repeats),
        gflops=row["flops"] / timing.median / 1e9,
        gbytes_per_s=row["bytes"] / timing.median / 1e9,
    )
    out = np.asarray(out, dtype=np.float64)
    if expected is not None:
        err = float(np.linalg.norm(out - expected) / np.linalg.norm(expected))
        row["rel_err"] = err
        if not err <= MISMATCH:
            row.update(status="mismatch", reason=f"output differs from the check by {err:.2e}")
    return out


def _ratios(rows: list[dict[str, Any]], peak_gflops: float) -> None:
    """Fill the GEMM fraction, the ratio to torch SDPA and the speed-up over the reference."""
    peer = {r["case"]: r["ms_median"] for r in rows if r["backend"] == PEER}
    reference = {(r["case"], r["op"]): r["ms_median"] for r in rows if r["backend"] == "reference"}
    for r in rows:
        if r["ms_median"] is None:
            continue
        r["gemm_fraction"] = r["gflops"] / peak_gflops
        if peer.get(r["case"]):
            r["x_torch_sdpa"] = r["ms_median"] / peer[r["case"]]
        if r["kind"] != "peer" and reference.get((r["case"], r["op"])):
            r["x_reference"] = reference[(r["case"], r["op"])] / r["ms_median"]


# --------------------------------------------------------------------------- targets


def _find(rows: list[dict[str, Any]], case: str, op: str, backend: str) -> dict[str, Any] | None:
    return next(
        (r for r in rows if (r["case"], r["op"], r["backend"]) == (case, op, backend)), None
    )


def _not_measured(row: dict[str, Any] | None, what: str) -> str | None:
    """Why ``row`` has no usable time, or None when it has one."""
    if row is None:
        return f"{what} is not in this run"
    if row["status"] != "ok":
        return f"{what}: {row['status']} ({row['reason']})"
    return None


def check_targets(rows: list[dict[str, Any]], memory: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with what was measured and ``pass``, ``miss`` or ``n/a``."""
    case = Shape(2048, 2048).label
    numba = _find(rows, case, "flash", "numba")
    peer = _find(rows, case, "sdpa", PEER)
    refs = [
        r for op in SOFTMAX_OPS if (r := _find(rows, case, op, "reference")) and r["status"] == "ok"
    ]
    targets = []

    speed = {
        "target": "numba flash, fp32, N=M=2048, H=8, D=64: at most 1.25x the time of torch SDPA",
        "status": "n/a",
    }
    missing = _not_measured(numba, "numba flash") or _not_measured(peer, PEER)
    if missing:
        speed["measured"] = missing
        if numba is not None and numba["status"] != "ok":
            speed["status"] = "miss"
    else:
        ratio = numba["ms_median"] / peer["ms_median"]
        speed["measured"] = (
            f"{ratio:.2f}x ({numba['ms_median']:.1f} ms vs {peer['ms_median']:.1f} ms)"
        )
        speed["status"] = "pass" if ratio <= 1.25 else "miss"
    targets.append(speed)

    over = {
        "target": "numba flash, fp32, N=M=2048: at least 3x faster than the NumPy reference "
        "(the faster of reference sdpa and reference flash)",
        "status": "n/a",
    }
    missing = _not_measured(numba, "numba flash") or (None if refs else "no reference timed")
    if missing:
        over["measured"] = missing
        if numba is not None and numba["status"] != "ok":
            over["status"] = "miss"
    else:
        fastest = min(refs, key=lambda r: r["ms_median"])
        speedup = fastest["ms_median"] / numba["ms_median"]
        over["measured"] = (
            f"{speedup:.1f}x over reference {fastest['op']} "
            f"({fastest['ms_median']:.0f} ms vs {numba['ms_median']:.1f} ms)"
        )
        over["status"] = "pass" if speedup >= 3 else "miss"
    targets.append(over)

    targets.append(_bench_memory.memory_target(memory, impl="numba flash", n=16384))

    sigmoid = _find(rows, case, "sigmoid", "numba")
    versus = {
        "target": "numba sigmoid, fp32, N=M=2048, H=8, D=64: at most 1.1x the time of numba flash",
        "status": "n/a",
    }
    missing = _not_measured(sigmoid, "numba sigmoid") or _not_measured(numba, "numba flash")
    if missing:
        versus["measured"] = missing
        if sigmoid is not None and sigmoid["status"] != "ok":
            versus["status"] = "miss"
    else:
        ratio = sigmoid["ms_median"] / numba["ms_median"]
        versus["measured"] = (
            f"{ratio:.2f}x ({sigmoid['ms_median']:.1f} ms vs {numba['ms_median']:.1f} ms)"
        )
        versus["status"] = "pass" if ratio <= 1.1 else "miss"
    targets.append(versus)
    return targets


# --------------------------------------------------------------------------- the run


class _Progress:
    """A rich progress bar over the planned steps, or nothing when ``enabled`` is false."""

    def __init__(self, enabled: bool, total: int) -> None:
        self._bar = None
        if enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self._bar = Progress(
                TextColumn("{task.description:<40}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
            )
            self._task = self._bar.add_task("benchmark", total=total)

    def __enter__(self) -> _Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def step(self, description: str) -> None:
        """Show ``description`` as the current step (call before the step runs)."""
        if self._bar is not None:
            self._bar.update(self._task, description=description)

    def done(self) -> None:
        """Count one step as finished."""
        if self._bar is not None:
            self._bar.advance(self._task)


def _backends(
    names: Sequence[str | ModuleType] | None,
) -> tuple[list[ModuleType], dict[str, dict[str, Any]]]:
    """The runnable backends to compare (the reference first) and every one's availability."""
    modules = [_dispatch.load(n) for n in (names or _dispatch.known_backends())]
    reference = _dispatch.load("reference")
    modules = [reference] + [m for m in modules if m.NAME != "reference"]
    report, runnable = {}, []
    for module in modules:
        ok, reason = _dispatch.availability(module)
        report[module.NAME] = {
            "available": ok,
            "reason": reason,
            "provides": {op: _dispatch.provides(module, op) for op in OPS},
        }
        if ok:
            runnable.append(module)
    return runnable, report


@dataclass
class BenchResult:
    """What :func:`run` measured (``data``, the JSON payload) and where it was saved."""

    data: dict[str, Any]
    path: Path

    @property
    def plot_path(self) -> Path | None:
        """The PNG saved beside the JSON (None where matplotlib is not installed)."""
        return self.path.with_name(self.data["plot"]) if self.data["plot"] else None

    @property
    def rows(self) -> list[dict[str, Any]]:
        """One timing row per (case, op, backend)."""
        return self.data["rows"]

    def table(self) -> Table:
        """The timing table (and the targets) as a rich Table."""
        return _bench_report.rich_table(self.data)

    def markdown(self) -> str:
        """The docs page: see :func:`render_markdown`."""
        return _bench_report.markdown(self.data)


def run(
    quick: bool = False,
    out: Path | str = Path("benchmarks/results/cpu.json"),
    progress: bool = False,
    backends: Sequence[str | ModuleType] | None = None,
) -> BenchResult:
    """Run the CPU benchmark and save ``out`` (JSON) and a PNG beside it.

    ``backends`` are the qkv backends to compare (names or modules; default: every known one).
    The NumPy reference and torch's SDPA are always measured as the baselines; a backend that
    cannot run here is listed with its reason and skipped. ``quick`` uses tiny sizes and one
    repeat (a smoke run for tests), and measures memory at one small size only.
    """
    settings = QUICK if quick else FULL
    out = Path(out)
    threads = set_threads(cores())
    machine = machine_info(threads)
    modules, availability = _backends(backends)
    shapes = settings.shapes
    memory_plan = _bench_memory.plan(settings, modules)
    tensor_plan = _bench_tensor.plan(quick, modules)
    steps = 1 + len(shapes) * (1 + len(OPS) * len(modules)) + len(memory_plan) + len(tensor_plan)
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    with _Progress(progress, steps) as bar:
        bar.step(f"fp32 GEMM {settings.gemm_n}^3")
        gemm = gemm_rate(settings.gemm_n, settings.budget_s, settings.max_repeats)
        bar.done()
        for shape in shapes:
            q, k, v = _inputs(shape)
            row = _row(shape, "sdpa", PEER, "peer")
            rows.append(row)
            bar.step(f"{shape.label}: {PEER}")
            peer = _peer(q, k, v, shape.causal)
            if peer is None:
                row.update(status="skipped", reason="torch is not installed")
                expected = None
            else:
                expected = _time_row(row, peer, None, settings)
            bar.done()
            for op in OPS:
                check = expected if op in SOFTMAX_OPS else None
                for module in modules:
                    row = _row(shape, op, module.NAME, "backend")
                    rows.append(row)
                    bar.step(f"{shape.label}: {module.NAME} {op}")
                    if not _dispatch.provides(module, op):
                        row.update(
                            status="fallback",
                            reason=f"backend {module.NAME!r} does not implement {op!r}",
                        )
                    else:
                        call = functools.partial(
                            getattr(qkv, op), q, k, v, causal=shape.causal, backend=module
                        )
                        output = _time_row(row, call, check, settings)
                        if check is None and module.NAME == "reference":
                            check = output
                            if op in SOFTMAX_OPS:
                                expected = output
                    bar.done()
            del q, k, v, expected
        _ratios(rows, gemm["peak_gflops"])
        memory = _bench_memory.run(memory_plan, settings, threads["threads"], bar)
        tensor = _bench_tensor.run(tensor_plan, settings, bar)
    machine["loadavg_end"] = _load()
    machine["numba_threading_layer"] = _numba_threading_layer()
    data = {
        "schema_version": SCHEMA_VERSION,
        "kind": "qkv-cpu-bench",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": quick,
        "wall_s": round(time.perf_counter() - started, 1),
        "machine": machine,
        "config": {
            "dtype": DTYPE,
            "B": B,
            "H": H,
            "D": D,
            "budget_s": settings.budget_s,
            "max_repeats": settings.max_repeats,
            "mismatch_tolerance": MISMATCH,
            "timing": "median of repeats after one warm-up call; best also recorded",
        },
        "gemm": gemm,
        "backends": availability,
        "rows": rows,
        "memory": memory,
        "tensor": tensor,
        "targets": check_targets(rows, memory) + _bench_tensor.targets(tensor),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    picture = out.with_suffix(".png")
    data["plot"] = picture.name if _bench_report.plot(data, picture) else None
    data = _clean(data)
    out.write_text(json.dumps(data, indent=1) + "\n")
    return BenchResult(data=data, path=out)


def _clean(value: Any) -> Any:
    """JSON-safe copy: floats rounded to 6 significant digits, non-finite floats as null."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, float):
        return float(f"{value:.6g}") if math.isfinite(value) else None
    return value


def render_markdown(json_path: Path | str) -> str:
    """A markdown docs page from a saved result: tables, the plot, and the issue's targets.

    The plot is referenced by its file name (it lies beside the JSON); copy it next to the page.
    A JSON file of another benchmark (``kind`` other than ``"qkv-cpu-bench"``, such as the GPU
    benchmark's) is shown generically: its fields, and each list of records as a table.
    """
    path = Path(json_path)
    data = json.loads(path.read_text())
    if data.get("kind") == "qkv-cpu-bench":
        return _bench_report.markdown(data)
    return _bench_report.generic_markdown(data, title=path.stem)
