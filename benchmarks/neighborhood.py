"""Neighborhood attention on the CPU: linear scaling in tokens, and the fused kernel against a
masked full attention.

Two measurements, in one run, fp32, ``B = 1``, ``H = 4``, ``D = 32``:

* **scaling**: ``qkv.neighborhood(..., backend="numba")`` at a fixed window (1-D kernel 13,
  2-D kernel 7 x 7) from 1k to 64k tokens (1-D sequences and square 2-D images), and full
  attention under the neighbour mask (``qkv.sdpa(..., mask=neighbor_mask, backend="numba")``)
  on the sizes where an ``N x N`` mask is still small; the log-log slope of each curve is fitted
  (1 = linear, 2 = quadratic);
* **versus masked** (the issue's target): 4096 tokens, 1-D window 13: the fused kernel against
  ``qkv.sdpa`` with the mask on numba and ``torch.nn.functional.scaled_dot_product_attention``
  with the same boolean mask, as ratios of median times.

Each time is the median of repeated calls after one warm-up call (Numba compiles there). The
JSON (``--out``, default ``benchmarks/results/neighborhood_cpu.json``) holds every timing and the
environment; the PNG next to it plots time against tokens on log-log axes with a linear
reference slope. ``--quick`` runs tiny sizes (a smoke run; its numbers mean nothing).
"""

from __future__ import annotations

import functools
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # qkv from this checkout when it is not installed

from _common import arguments, environment  # noqa: E402  (this folder is on sys.path)

import qkv  # noqa: E402
from qkv.lab.notebook import show_table  # noqa: E402

B, H, D = 1, 4, 32
KERNEL_1D, KERNEL_2D = 13, 7
#: Largest token count timed with an N x N mask (64 MB of booleans).
MASKED_MAX_TOKENS = 8192


def median_ms(fn: Callable[[], Any], *, budget_s: float, max_repeats: int = 15) -> float:
    """Median wall time of ``fn`` in ms: one warm-up call, then repeats within ``budget_s``
    (at least 3)."""
    fn()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - started < budget_s and len(times) < max_repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def inputs(spatial: tuple[int, ...], rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """fp32 ``q, k, v (B, H, *spatial, D)``."""
    return tuple(rng.standard_normal((B, H, *spatial, D)).astype(np.float32) for _ in range(3))


def layouts(quick: bool) -> dict[str, tuple[list[tuple[int, ...]], int]]:
    """Grids per layout (1-D lengths, 2-D squares) from 1k to 64k tokens, and the kernel size."""
    if quick:
        return {"1d": ([(256,), (1024,)], KERNEL_1D), "2d": ([(16, 16), (32, 32)], KERNEL_2D)}
    return {
        "1d": ([(n,) for n in (1024, 4096, 16384, 65536)], KERNEL_1D),
        "2d": ([(n, n) for n in (32, 64, 128, 256)], KERNEL_2D),
    }


def slope(tokens: list[int], ms: list[float]) -> float | None:
    """Least-squares slope of log(ms) against log(tokens)."""
    if len(tokens) < 2:
        return None
    return float(np.polyfit(np.log(tokens), np.log(ms), 1)[0])


def scaling(quick: bool, rng: np.random.Generator, budget_s: float) -> list[dict[str, Any]]:
    rows = []
    for layout, (grids, kernel) in layouts(quick).items():
        for spatial in grids:
            q, k, v = inputs(spatial, rng)
            N = int(np.prod(spatial))
            runs = {
                "numba neighborhood": functools.partial(
                    qkv.neighborhood, q, k, v, kernel_size=kernel, backend="numba"
                )
            }
            if N <= MASKED_MAX_TOKENS:
                mask = qkv.neighbor_mask(spatial, kernel_size=kernel)  # (N, N)
                flat = [x.reshape(B, H, N, D) for x in (q, k, v)]  # (B, H, N, D) each
                runs["numba sdpa+mask"] = functools.partial(
                    qkv.sdpa, *flat, mask=mask, backend="numba"
                )
            for impl, fn in runs.items():
                ms = median_ms(fn, budget_s=budget_s)
                rows.append(
                    {"layout": layout, "shape": list(spatial), "tokens": N, "kernel": kernel,
                     "impl": impl, "ms": ms}
                )  # fmt: skip
                print(f"  {layout} {spatial} {impl}: {ms:.2f} ms", flush=True)
    return rows


def versus_masked(quick: bool, rng: np.random.Generator, budget_s: float) -> list[dict[str, Any]]:
    """The issue's target case: 4096 tokens (1-D), window 13; ratios against the fused kernel."""
    import torch

    N = 512 if quick else 4096
    q, k, v = inputs((N,), rng)
    mask = qkv.neighbor_mask((N,), kernel_size=KERNEL_1D)  # (N, N)
    tq, tk, tv, tmask = (torch.from_numpy(x) for x in (q, k, v, mask))
    runs = {
        "numba neighborhood": lambda: qkv.neighborhood(q, k, v, kernel_size=KERNEL_1D,
                                                       backend="numba"),
        "numba sdpa+mask": lambda: qkv.sdpa(q, k, v, mask=mask, backend="numba"),
        "torch SDPA+mask": lambda: torch.nn.functional.scaled_dot_product_attention(
            tq, tk, tv, attn_mask=tmask),
    }  # fmt: skip
    reference = qkv.neighborhood(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64),
                                 kernel_size=KERNEL_1D)  # fmt: skip
    rows = []
    for impl, fn in runs.items():
        out = np.asarray(fn())
        ms = median_ms(fn, budget_s=budget_s)
        error = float(np.abs(out - reference).max())
        rows.append(
            {"impl": impl, "tokens": N, "kernel": KERNEL_1D, "ms": ms, "max_abs_err": error}
        )
    fused = rows[0]["ms"]
    for row in rows:
        row["x_slower_than_fused"] = row["ms"] / fused
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for (layout, impl), style in {
        ("1d", "numba neighborhood"): "o-",
        ("2d", "numba neighborhood"): "s-",
        ("1d", "numba sdpa+mask"): "o--",
        ("2d", "numba sdpa+mask"): "s--",
    }.items():
        pts = [(r["tokens"], r["ms"]) for r in rows if r["layout"] == layout and r["impl"] == impl]
        if pts:
            kernel = KERNEL_1D if layout == "1d" else f"{KERNEL_2D}x{KERNEL_2D}"
            ax.loglog(*zip(*pts, strict=True), style, label=f"{impl}, {layout} (kernel {kernel})")
    first = next(r for r in rows if r["impl"] == "numba neighborhood" and r["layout"] == "1d")
    tokens = np.array(sorted({r["tokens"] for r in rows}))
    ax.loglog(tokens, first["ms"] * tokens / first["tokens"], "k:", label="linear (slope 1)")
    ax.set_xlabel("tokens N")
    ax.set_ylabel("time per call (ms)")
    ax.set_title(f"Neighborhood attention, numba, fp32, B={B} H={H} D={D}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = arguments(__doc__, ROOT / "benchmarks" / "results" / "neighborhood_cpu.json", argv)
    budget_s = 0.05 if args.quick else 1.0
    rng = np.random.default_rng(0)
    started = time.monotonic()
    print("scaling (numba, fixed window):", flush=True)
    rows = scaling(args.quick, rng, budget_s)
    print("versus masked full attention:", flush=True)
    versus = versus_masked(args.quick, rng, budget_s)
    slopes = {
        f"{layout} {impl}": slope(
            [r["tokens"] for r in rows if r["layout"] == layout and r["impl"] == impl],
            [r["ms"] for r in rows if r["layout"] == layout and r["impl"] == impl],
        )
        for layout in ("1d", "2d")
        for impl in ("numba neighborhood", "numba sdpa+mask")
    }
    record = {
        "environment": environment(),
        "config": {
            "B": B,
            "H": H,
            "D": D,
            "dtype": "float32",
            "kernel_1d": KERNEL_1D,
            "kernel_2d": [KERNEL_2D, KERNEL_2D],
            "quick": args.quick,
        },
        "seconds": round(time.monotonic() - started, 1),
        "scaling": rows,
        "slopes": slopes,
        "versus_masked": versus,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    plot(rows, args.out.with_suffix(".png"))
    print()
    show_table(
        ("layout", "shape", "tokens", "impl", "ms"),
        [(r["layout"], "x".join(map(str, r["shape"])), r["tokens"], r["impl"], f"{r['ms']:.2f}")
         for r in rows],
    )  # fmt: skip
    print()
    show_table(("curve", "log-log slope"),
               [(name, "-" if s is None else f"{s:.2f}") for name, s in slopes.items()])  # fmt: skip
    print()
    show_table(
        ("impl", "tokens", "kernel", "ms", "x fused", "max |err|"),
        [(r["impl"], r["tokens"], r["kernel"], f"{r['ms']:.2f}", f"{r['x_slower_than_fused']:.1f}",
          f"{r['max_abs_err']:.1e}") for r in versus],
    )  # fmt: skip
    print(f"\nresults: {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
