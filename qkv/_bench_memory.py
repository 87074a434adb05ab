"""Peak extra memory of one attention call, each measured in a fresh process.

The parent (:func:`run`, called by :func:`qkv.bench.run`) starts ``python -m qkv._bench_memory``
once per (implementation, size). The child builds the inputs, warms up at a small size (Numba
compiles, thread pools start), resets the kernel's resident-set high-water mark by writing ``5``
to ``/proc/self/clear_refs``, runs one call and reports ``VmHWM - VmRSS`` (the peak resident
memory the call added, its output included). Where ``clear_refs`` cannot be written it reports
the rise of ``getrusage``'s ``ru_maxrss`` instead, a lower bound.

Implementations: ``numba flash``, ``reference flash`` and ``reference sdpa`` (through qkv's
dispatch, with ``QKV_STRICT=1`` so that a fallback is reported rather than measured) and
``torch SDPA`` (torch's own, called directly). Sizes that would take longer than the time budget,
or need more than half the free memory, going by the last size measured and a quadratic growth,
are skipped with the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from qkv.bench import Settings, _Progress

MIB = 2**20
B, H, D = 1, 8, 64
WARMUP_N = 256
#: implementation -> (backend, op); ``peer`` is torch's SDPA called directly.
IMPLS = {
    "numba flash": ("numba", "flash"),
    "torch SDPA": ("peer", "sdpa"),
    "reference flash": ("reference", "flash"),
    "reference sdpa": ("reference", "sdpa"),
}
METHODS = {
    "clear_refs": "VmHWM - VmRSS after resetting the high-water mark via /proc/self/clear_refs",
    "ru_maxrss": "rise of getrusage ru_maxrss across the call (a lower bound)",
}


# --------------------------------------------------------------------------- child process


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _maxrss_kib() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # bytes on macOS, KiB on Linux


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _caller(backend: str, op: str, threads: int) -> Any:
    """A function ``(q, k, v) -> output`` for the implementation, its threads set."""
    if backend == "peer":
        import torch
        import torch.nn.functional as F

        torch.set_num_threads(threads)

        def peer(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> Any:
            tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
            with torch.inference_mode():
                return F.scaled_dot_product_attention(tq, tk, tv).numpy()

        return peer
    import qkv

    if backend == "numba":
        import numba

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    with contextlib.suppress(ImportError):
        from threadpoolctl import threadpool_limits

        threadpool_limits(threads, user_api="blas")
    fn = getattr(qkv, op)

    def dispatched(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> Any:
        return fn(q, k, v, backend=backend)

    return dispatched


def _inputs(n: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(0)
    return tuple(rng.standard_normal((B, H, n, D), dtype=np.float32) for _ in range(3))


def child(backend: str, op: str, n: int, threads: int) -> dict[str, Any]:
    """Measure one call in this (fresh) process; the result is printed as JSON by :func:`main`."""
    from qkv.errors import MissingOp

    try:
        call = _caller(backend, op, threads)
        call(*_inputs(min(n, WARMUP_N)))
    except MissingOp as why:
        return {"status": "fallback", "reason": str(why)}
    q, k, v = _inputs(n)
    gc.collect()
    method = "clear_refs" if _reset_peak() else "ru_maxrss"
    before = _status_kib("VmRSS") if method == "clear_refs" else _maxrss_kib()
    start = time.perf_counter()
    out = call(q, k, v)
    seconds = time.perf_counter() - start
    after = _status_kib("VmHWM") if method == "clear_refs" else _maxrss_kib()
    del out
    return {
        "status": "ok",
        "method": method,
        "peak_extra_mib": (after - before) / 1024,
        "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> None:
    """``python -m qkv._bench_memory BACKEND OP N THREADS``: print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backend")
    parser.add_argument("op")
    parser.add_argument("n", type=int)
    parser.add_argument("threads", type=int)
    args = parser.parse_args(argv)
    print(json.dumps(child(args.backend, args.op, args.n, args.threads)))


# --------------------------------------------------------------------------- parent


def _available_mib() -> float:
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return float("inf")


def _torch_installed() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def plan(settings: Settings, modules: list[ModuleType]) -> list[tuple[str, int]]:
    """The (implementation, N) pairs to measure; a backend's only if it is compared and runs."""
    names = {m.NAME for m in modules}
    impls = [
        impl
        for impl in settings.memory_impls
        if (backend := IMPLS[impl][0]) == "reference"
        or (backend == "peer" and _torch_installed())
        or backend in names
    ]
    return [(impl, n) for impl in impls for n in settings.memory_sizes]


def _sizes(n: int) -> dict[str, float]:
    return {
        "input_mib": 3 * B * H * n * D * 4 / MIB,
        "output_mib": B * H * n * D * 4 / MIB,
        "score_matrix_head_mib": n * n * 4 / MIB,
        "score_matrices_all_heads_mib": B * H * n * n * 4 / MIB,
    }


def _skip_reason(last: dict[str, Any] | None, n: int, settings: Settings) -> str | None:
    """Why size ``n`` is skipped, judged from the last measured size assuming N² growth."""
    if last is None:
        return None
    growth = (n / last["N"]) ** 2
    seconds = last["seconds"] * growth
    if seconds > settings.memory_budget_s:
        return (
            f"would take about {seconds:.0f} s (from {last['seconds']:.1f} s at "
            f"N={last['N']}), over the {settings.memory_budget_s:.0f} s budget"
        )
    need = max(last["peak_extra_mib"], 1.0) * growth
    if need > _available_mib() / 2:
        return f"could need about {need / 1024:.1f} GiB, over half the free memory"
    return None


def measure(impl: str, n: int, threads: int, timeout_s: float) -> dict[str, Any]:
    """Run the child for one (implementation, N); the row it reports."""
    backend, op = IMPLS[impl]
    env = {**os.environ, "QKV_STRICT": "1"}
    command = [sys.executable, "-m", "qkv._bench_memory", backend, op, str(n), str(threads)]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout_s, env=env, check=False
        )
    except subprocess.TimeoutExpired:
        return {"status": "error", "reason": f"timed out after {timeout_s:.0f} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"status": "error", "reason": f"exit {done.returncode}: {tail}"}
    return json.loads(lines[-1])


def run(
    steps: list[tuple[str, int]], settings: Settings, threads: int, bar: _Progress
) -> dict[str, Any]:
    """Measure every planned (implementation, N); return the ``memory`` part of the results."""
    rows: list[dict[str, Any]] = []
    last: dict[str, dict[str, Any]] = {}
    for impl, n in steps:
        bar.step(f"memory: {impl} N=M={n}")
        backend, op = IMPLS[impl]
        row: dict[str, Any] = {"impl": impl, "backend": backend, "op": op, "N": n, "M": n}
        row.update(_sizes(n))
        row.update(status="ok", reason="", method=None, peak_extra_mib=None, seconds=None)
        reason = _skip_reason(last.get(impl), n, settings)
        if reason:
            row.update(status="skipped", reason=reason)
        else:
            row.update(measure(impl, n, threads, timeout_s=10 * settings.memory_budget_s + 60))
        if row["status"] == "ok":
            last[impl] = row
        rows.append(row)
        bar.done()
    methods = sorted({r["method"] for r in rows if r["method"]})
    return {
        "B": B,
        "H": H,
        "D": D,
        "dtype": "float32",
        "warmup_n": WARMUP_N,
        "methods": {m: METHODS[m] for m in methods},
        "rows": rows,
    }


def memory_target(memory: dict[str, Any], impl: str, n: int) -> dict[str, Any]:
    """The O(N·D) memory target: at N=M=``n``, well under one N×M matrix, growing linearly.

    Passes when the peak extra memory at ``n`` is under a quarter of one N×M fp32 matrix for one
    head, and grows with exponent at most 1.5 between the two largest sizes measured (2 is N²).
    """
    target = {
        "target": f"{impl} peak extra memory grows as O(N·D): shown at N=M={n}, where one "
        "N×M fp32 matrix per head needs "
        f"{_sizes(n)['score_matrix_head_mib'] / 1024:g} GiB",
        "status": "n/a",
    }
    rows = sorted(
        (r for r in memory["rows"] if r["impl"] == impl and r["status"] == "ok"),
        key=lambda r: r["N"],
    )
    at_n = next((r for r in memory["rows"] if r["impl"] == impl and r["N"] == n), None)
    if at_n is None:
        target["measured"] = f"{impl} at N={n} is not in this run"
        return target
    if at_n["status"] != "ok":
        target.update(measured=f"{at_n['status']}: {at_n['reason']}", status="miss")
        return target
    extra = at_n["peak_extra_mib"]
    text = (
        f"{extra:.0f} MiB at N={n} (output {at_n['output_mib']:.0f} MiB, inputs "
        f"{at_n['input_mib']:.0f} MiB; one N×M head matrix {at_n['score_matrix_head_mib']:.0f} MiB)"
    )
    small = extra < at_n["score_matrix_head_mib"] / 4
    linear = True
    if len(rows) >= 2 and rows[-1]["N"] == n and rows[-2]["peak_extra_mib"] > 0:
        lo, hi = rows[-2], rows[-1]
        exponent = np.log(hi["peak_extra_mib"] / lo["peak_extra_mib"]) / np.log(hi["N"] / lo["N"])
        text += f"; growth {lo['N']}→{hi['N']}: N^{exponent:.2f}"
        linear = bool(exponent <= 1.5)
    target.update(measured=text, status="pass" if small and linear else "miss")
    return target


if __name__ == "__main__":
    main()
