"""GPU benchmark of softmax attention: qkv's CuPy and Triton flash kernels against torch SDPA.

``make gpu-check`` runs it (through ``benchmarks/gpu_check.sh``) on a machine with an NVIDIA GPU,
after the GPU tests. For each case (prefill ``N = M`` and decode ``N = 1``, fp16, bf16 and fp32)
it times, on the same GPU and the same inputs:

* ``cupy``: ``qkv.flash(..., backend="cupy")`` on CuPy views of the tensors (no bf16 in CuPy);
* ``triton``: ``qkv.flash(..., backend="torch")`` on CUDA tensors (the torch backend's Triton
  kernel);
* ``torch-sdpa``: ``torch.nn.functional.scaled_dot_product_attention``, the peer to beat.

Each time is the median of several calls timed with CUDA events after warm-up calls. Achieved
rates count ``4 B H N M D`` FLOPs (halved for causal, where ``N = M``) and, for decode, the bytes
of ``q``, ``k``, ``v`` and the output. ``QKV_STRICT=1`` is set, so an op that would fall back to
the NumPy reference is reported as skipped instead of timed. Each result also carries the largest
absolute difference from torch SDPA's output, a cheap check that the timed kernel computed the
same thing. Results go to JSON (``--out``; ``$OUT/gpu.json`` when ``OUT`` is set, else
``benchmarks/results/gpu.json``) and a table is printed at the end. Exit status 1 if any qkv
kernel failed (raised, or disagreed with SDPA beyond the tolerance).

A second section times neighborhood attention (``qkv.neighborhood``; 1-D window 13 and 2-D
window 7 x 7, fp16 and fp32): the Triton kernel (``backend="torch"``) and the CuPy kernel
(``backend="cupy"``) against full attention under the neighbour mask (torch SDPA with a boolean
``(N, N)`` mask, only where that mask fits: up to 16k tokens). It gets its own share of the time
budget (``--neighborhood-budget-s``, taken out of ``--budget-s``), checks each kernel against
the torch backend's float32 gather form, and lands under ``"neighborhood"`` in the JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
IMPLS = ("cupy", "triton", "torch-sdpa")
#: Largest |output - SDPA output| accepted per dtype (outputs are convex combinations of
#: standard-normal values, so of order 1).
AGREEMENT = {"float16": 2e-2, "bfloat16": 6e-2, "float32": 2e-4}


@dataclass(frozen=True)
class Case:
    """One attention problem: ``q (B, H, N, D)``, ``k, v (B, H, M, D)``."""

    kind: str  # "prefill" (N = M) or "decode" (N = 1)
    dtype: str
    B: int
    H: int
    N: int
    M: int
    D: int
    causal: bool

    @property
    def flops(self) -> float:
        """``4 B H N M D`` (QK^T and PV, two FLOPs per multiply-add), halved for causal."""
        return 4.0 * self.B * self.H * self.N * self.M * self.D * (0.5 if self.causal else 1.0)

    @property
    def bytes(self) -> float:
        """Bytes of q, k, v read and the output written, the floor of memory traffic."""
        itemsize = 4 if self.dtype == "float32" else 2
        return float(itemsize * self.B * self.H * self.D * (2 * self.N + 2 * self.M))

    @property
    def label(self) -> str:
        mask = " causal" if self.causal else ""
        return f"{self.kind} B={self.B} H={self.H} N={self.N} M={self.M} D={self.D}{mask}"


@dataclass
class Result:
    case: Case
    impl: str
    status: str = "ok"  # "ok", "skipped: ...", "failed: ..."
    ms: float | None = None
    tflops: float | None = None
    gbps: float | None = None
    vs_sdpa: float | None = None  # SDPA time / this time (> 1: faster than SDPA)
    max_abs_diff: float | None = None  # against SDPA's output
    extra: dict[str, Any] = field(default_factory=dict)


def cases(quick: bool) -> list[Case]:
    """The benchmark grid, most important first (the time budget may cut the tail)."""
    lengths = (1024, 4096) if quick else (1024, 4096, 16384)
    grid: list[Case] = []
    for dtype in ("float16", "bfloat16"):
        for D in (128, 64):
            for causal in (False, True):
                grid += [Case("prefill", dtype, 4, 16, n, n, D, causal) for n in lengths]
        grid.append(Case("decode", dtype, 4, 16, 1, 16384 if quick else 65536, 128, False))
    for D in (64, 128):  # fp32 runs on CUDA cores: shorter sequences
        for causal in (False, True):
            grid += [Case("prefill", "float32", 4, 16, n, n, D, causal) for n in (1024, 4096)]
    grid.append(Case("decode", "float32", 4, 16, 1, 16384, 128, False))
    return grid


def median_ms(fn: Callable[[], Any], torch: Any, *, target_s: float = 0.25) -> float:
    """Median CUDA-event time of ``fn`` in ms: two warm-up calls, then 3 to 20 timed calls
    (as many as fit in about ``target_s``)."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()

    def once() -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    first = once()
    repeats = max(3, min(20, int(target_s * 1e3 / max(first, 1e-3))))
    return statistics.median([once() for _ in range(repeats)])


def _runners(case: Case, q: Any, k: Any, v: Any, torch: Any) -> dict[str, Callable[[], Any] | str]:
    """A zero-argument call per implementation, or the reason it cannot run (CuPy results are
    viewed as torch tensors, without a copy)."""
    import qkv

    def sdpa() -> Any:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=case.causal)

    def triton() -> Any:
        return qkv.flash(q, k, v, causal=case.causal, backend="torch")

    runners: dict[str, Callable[[], Any] | str] = {"torch-sdpa": sdpa, "triton": triton}
    if case.dtype == "bfloat16":
        runners["cupy"] = "CuPy has no bfloat16"
        return runners
    try:
        import cupy
    except ImportError as exc:
        runners["cupy"] = f"cupy not importable ({exc})"
        return runners
    cq, ck, cv = (cupy.asarray(x) for x in (q, k, v))

    def cupy_flash() -> Any:
        out = qkv.flash(cq, ck, cv, causal=case.causal, backend="cupy")
        return torch.as_tensor(out, device=q.device)

    runners["cupy"] = cupy_flash
    return runners


def run_case(case: Case, torch: Any) -> list[Result]:
    """Time every implementation on one case; the SDPA output is the agreement reference."""
    dtype = getattr(torch, case.dtype)
    generator = torch.Generator(device="cuda").manual_seed(0)
    shape_q, shape_kv = (case.B, case.H, case.N, case.D), (case.B, case.H, case.M, case.D)
    q = torch.randn(shape_q, device="cuda", dtype=dtype, generator=generator)
    k = torch.randn(shape_kv, device="cuda", dtype=dtype, generator=generator)
    v = torch.randn(shape_kv, device="cuda", dtype=dtype, generator=generator)
    runners = _runners(case, q, k, v, torch)
    expected = runners["torch-sdpa"]().float()  # type: ignore[operator]
    results = []
    for impl in IMPLS:
        result = Result(case, impl)
        results.append(result)
        runner = runners[impl]
        if isinstance(runner, str):
            result.status = f"skipped: {runner}"
            continue
        try:
            out = runner()
            result.max_abs_diff = float((out.float() - expected).abs().max())
            result.ms = median_ms(runner, torch)
        except Exception as exc:  # report and go on: one broken kernel must not hide the rest
            name = type(exc).__name__
            skipped = name in ("MissingOp", "Unsupported")
            result.status = f"{'skipped' if skipped else 'failed'}: {name}: {exc}"[:300]
            continue
        result.tflops = case.flops / (result.ms * 1e-3) / 1e12
        result.gbps = case.bytes / (result.ms * 1e-3) / 1e9
        if impl != "torch-sdpa" and result.max_abs_diff > AGREEMENT[case.dtype]:
            result.status = f"failed: max |out - sdpa| = {result.max_abs_diff:.3g}"
    sdpa_ms = results[IMPLS.index("torch-sdpa")].ms
    for result in results:
        if result.ms and sdpa_ms:
            result.vs_sdpa = sdpa_ms / result.ms
    return results


def environment(torch: Any) -> dict[str, Any]:
    info: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(),
        "capability": ".".join(map(str, torch.cuda.get_device_capability())),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    for name in ("cupy", "triton"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    return info


def print_table(results: list[Result]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="qkv GPU benchmark (median of CUDA-event timings)")
    for column in ("case", "dtype", "impl", "ms", "TFLOP/s", "GB/s", "x SDPA", "max|Δ|", "status"):
        table.add_column(
            column, justify="left" if column in ("case", "impl", "status") else "right"
        )

    def number(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    for r in results:
        table.add_row(
            r.case.label,
            r.case.dtype,
            r.impl,
            number(r.ms, ".3f"),
            number(r.tflops, ".1f"),
            number(r.gbps, ".0f"),
            number(r.vs_sdpa, ".2f"),
            number(r.max_abs_diff, ".1e"),
            r.status if r.status == "ok" else r.status[:60],
        )
    Console(width=200).print(table)


# --------------------------------------------------------------------------- neighborhood attention

NA_IMPLS = ("cupy", "triton", "sdpa+mask")
#: Largest token count given an (N, N) boolean mask (256 MB).
NA_MASK_MAX_TOKENS = 16384


@dataclass(frozen=True)
class NACase:
    """One neighborhood-attention problem: ``q, k, v (B, H, *spatial, D)``, one kernel size."""

    dtype: str
    B: int
    H: int
    spatial: tuple[int, ...]
    kernel: int
    D: int

    @property
    def tokens(self) -> int:
        return math.prod(self.spatial)

    @property
    def label(self) -> str:
        grid = "x".join(map(str, self.spatial))
        window = "x".join([str(self.kernel)] * len(self.spatial))
        return f"B={self.B} H={self.H} grid={grid} kernel={window} D={self.D}"


@dataclass
class NAResult:
    case: NACase
    impl: str
    status: str = "ok"
    ms: float | None = None
    vs_masked: float | None = None  # masked SDPA time / this time (> 1: faster)
    max_abs_diff: float | None = None  # against the torch backend's float32 gather form


def neighborhood_cases(quick: bool) -> list[NACase]:
    """1-D (window 13) and 2-D (window 7 x 7) grids from 4k to 64k tokens, fp16 then fp32."""
    lengths = (4096, 16384) if quick else (4096, 16384, 65536)
    sides = (64, 128) if quick else (64, 128, 256)
    grid: list[NACase] = []
    for dtype in ("float16", "float32"):
        grid += [NACase(dtype, 1, 8, (n,), 13, 64) for n in lengths]
        grid += [NACase(dtype, 1, 8, (n, n), 7, 64) for n in sides]
    return grid


def run_neighborhood_case(case: NACase, torch: Any) -> list[NAResult]:
    """Time the Triton and CuPy kernels and masked SDPA on one case."""
    import qkv

    dtype = getattr(torch, case.dtype)
    generator = torch.Generator(device="cuda").manual_seed(0)
    shape = (case.B, case.H, *case.spatial, case.D)
    q, k, v = (
        torch.randn(shape, device="cuda", dtype=dtype, generator=generator) for _ in range(3)
    )
    expected = qkv.neighborhood(
        q.float(), k.float(), v.float(), kernel_size=case.kernel, backend="torch",
        return_weights=True,
    )[0]  # fmt: skip  # the gather form (weights asked for)
    flat = [x.reshape(case.B, case.H, case.tokens, case.D) for x in (q, k, v)]
    runners: dict[str, Callable[[], Any] | str] = {
        "triton": lambda: qkv.neighborhood(q, k, v, kernel_size=case.kernel, backend="torch"),
    }
    try:
        import cupy

        cq, ck, cv = (cupy.asarray(x) for x in (q, k, v))
        runners["cupy"] = lambda: torch.as_tensor(
            qkv.neighborhood(cq, ck, cv, kernel_size=case.kernel, backend="cupy"),
            device=q.device,
        )
    except ImportError as exc:
        runners["cupy"] = f"cupy not importable ({exc})"
    if case.tokens <= NA_MASK_MAX_TOKENS:
        mask = torch.from_numpy(qkv.neighbor_mask(case.spatial, kernel_size=case.kernel))
        mask = mask.to("cuda")  # (N, N)
        runners["sdpa+mask"] = lambda: torch.nn.functional.scaled_dot_product_attention(
            *flat, attn_mask=mask
        ).reshape(shape)
    else:
        runners["sdpa+mask"] = f"an (N, N) mask of {case.tokens} tokens is too large"
    results = []
    for impl in NA_IMPLS:
        result = NAResult(case, impl)
        results.append(result)
        runner = runners[impl]
        if isinstance(runner, str):
            result.status = f"skipped: {runner}"
            continue
        try:
            out = runner()
            result.max_abs_diff = float((out.float() - expected).abs().max())
            result.ms = median_ms(runner, torch)
        except Exception as exc:  # report and go on: one broken kernel must not hide the rest
            name = type(exc).__name__
            skipped = name in ("MissingOp", "Unsupported")
            result.status = f"{'skipped' if skipped else 'failed'}: {name}: {exc}"[:300]
            continue
        if result.max_abs_diff > AGREEMENT[case.dtype]:
            result.status = f"failed: max |out - gather form| = {result.max_abs_diff:.3g}"
    masked_ms = results[NA_IMPLS.index("sdpa+mask")].ms
    for result in results:
        if result.ms and masked_ms:
            result.vs_masked = masked_ms / result.ms
    return results


def run_neighborhood(args: argparse.Namespace, torch: Any) -> list[NAResult]:
    """Every neighborhood case within ``args.neighborhood_budget_s`` (the rest: skipped)."""
    started = time.monotonic()
    results: list[NAResult] = []
    for case in neighborhood_cases(args.quick):
        if time.monotonic() - started > args.neighborhood_budget_s:
            results += [NAResult(case, impl, status="skipped: time budget") for impl in NA_IMPLS]
            continue
        print(f"... neighborhood {case.dtype} {case.label}", flush=True)
        try:
            results += run_neighborhood_case(case, torch)
        except torch.cuda.OutOfMemoryError as exc:
            results += [
                NAResult(case, impl, status=f"skipped: out of memory ({exc})"[:120])
                for impl in NA_IMPLS
            ]
        torch.cuda.empty_cache()
    return results


def print_neighborhood_table(results: list[NAResult]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="qkv GPU benchmark: neighborhood attention vs masked full attention")
    for column in ("case", "dtype", "impl", "ms", "x masked", "max|Δ|", "status"):
        table.add_column(
            column, justify="left" if column in ("case", "impl", "status") else "right"
        )
    for r in results:
        table.add_row(
            r.case.label,
            r.case.dtype,
            r.impl,
            "-" if r.ms is None else f"{r.ms:.3f}",
            "-" if r.vs_masked is None else f"{r.vs_masked:.1f}",
            "-" if r.max_abs_diff is None else f"{r.max_abs_diff:.1e}",
            r.status if r.status == "ok" else r.status[:60],
        )
    Console(width=200).print(table)


def default_out() -> Path:
    out = os.environ.get("OUT")
    return Path(out) / "gpu.json" if out else ROOT / "benchmarks" / "results" / "gpu.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="JSON output path")
    parser.add_argument("--quick", action="store_true", help="shorter sequences (a smoke run)")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=200.0,
        help="start no new case after this many seconds (the rest is reported as skipped)",
    )
    parser.add_argument(
        "--neighborhood-budget-s",
        type=float,
        default=30.0,
        help="the share of --budget-s kept for the neighborhood-attention section",
    )
    parser.add_argument("--dry-run", action="store_true", help="list the cases and exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    grid = cases(args.quick)
    if args.dry_run:
        for case in grid:
            print(f"{case.dtype:9} {case.label}  ({case.flops / 1e12:.3f} TFLOP)")
        for na_case in neighborhood_cases(args.quick):
            print(f"{na_case.dtype:9} {na_case.label}")
        return 0
    sys.path.insert(0, str(ROOT))  # qkv from this checkout when it is not installed
    import torch

    if not torch.cuda.is_available():
        print("gpu_bench: torch sees no CUDA device; run this on a machine with an NVIDIA GPU")
        return 2
    os.environ["QKV_STRICT"] = "1"  # a fallback to the NumPy reference is an error, not a timing
    started = time.monotonic()
    results: list[Result] = []
    for case in grid:
        if time.monotonic() - started > args.budget_s - args.neighborhood_budget_s:
            results += [Result(case, impl, status="skipped: time budget") for impl in IMPLS]
            continue
        print(f"... {case.dtype} {case.label}", flush=True)
        try:
            results += run_case(case, torch)
        except torch.cuda.OutOfMemoryError as exc:
            results += [
                Result(case, impl, status=f"skipped: out of memory ({exc})"[:120]) for impl in IMPLS
            ]
        torch.cuda.empty_cache()
    na_results = run_neighborhood(args, torch)
    out = args.out or default_out()
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "environment": environment(torch),
        "seconds": round(time.monotonic() - started, 1),
        "results": [{**asdict(r), "case": asdict(r.case)} for r in results],
        "neighborhood": [{**asdict(r), "case": asdict(r.case)} for r in na_results],
    }
    out.write_text(json.dumps(record, indent=2))
    print_table(results)
    print_neighborhood_table(na_results)
    print(f"results: {out}")
    failed = [r for r in results if r.status.startswith("failed") and r.impl != "torch-sdpa"]
    failed += [r for r in na_results if r.status.startswith("failed") and r.impl != "sdpa+mask"]
    for r in failed:
        print(f"FAILED {r.impl} {r.case.dtype} {r.case.label}: {r.status}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
