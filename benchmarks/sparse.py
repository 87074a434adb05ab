"""``sparse_attention`` at decode: 64k cached keys, 1-10% of them selected, against full attention.

One decode step (``N = 1`` query per head), fp32, ``B = 1``, ``H = 8`` query heads over
``Hkv = 2`` KV heads, ``D = 64``, ``M = 65536`` cached keys. Each head selects ``budget * M``
distinct keys at random (sorted, as a selection method hands them over); a second set of rows
("group lists") gives the query heads of each KV head one shared list, as a KV cache that keeps
its own tokens per KV head does (the lab engine), so each gathered row serves the whole group.
Full attention reads each key and value row once for the ``H / Hkv = 4`` query heads of its
group; with per-head lists the four heads read different rows, so the sparse op moves about
``4 * budget`` of full attention's bytes and the 1.5x target is out of reach by memory traffic
alone; the group-list rows are the like-for-like comparison.
Per backend, in the same run: full decode attention over all ``M`` keys (``qkv.sdpa``) and
``qkv.sparse_attention`` at each budget, plus the time of the public boundary's argument check
alone (``check_ms``, part of every ``sparse_attention`` time). The issue's target: the sparse time within 1.5x of ``budget`` times the full
time (the gather costs little), reported as ``x_target = ms / (budget * full_ms)`` (<= 1.5
meets it).

The selection each method makes before the op is timed apart (``selection`` in the JSON), at the
5% budget on the same cache (NumPy reference selectors, one decode step of one layer, a fresh
selector per call so that no selection cache is reused): TokenSelect, TidalDecode (a selection
layer), HiP, ActQKV and A²ATS (codebooks of 256 words fitted on the cache's own keys with 512
calibration queries, fitting not timed), next to the time of ``sparse_attention`` over what was
selected and of full attention on the reference backend. A²ATS is timed twice: coding every
cached key at each call (what a stateless selector does), and with the codes computed once
beforehand (``a2ats, keys coded once``: the paper codes each key when it enters the cache, so
a decode step pays the lookup and the top-k only).

Each time is taken twice. *Warm*: the fastest of repeated calls, as usual; the selected rows
(0.7 to 6.7 MB at the group-list budgets) then stay in the 32 MB last-level cache between
calls, while full attention's 64 MB of keys and values cannot. *Cold*: before each timed call the
key and value rows it reads are flushed from every cache level (untimed; x86 ``clflush``),
while its code, queries and indices stay cached, as a decode step finds the KV cache after the
other layers have run (off x86 a 128 MiB buffer is written instead, which evicts everything:
an upper bound); the fastest cold call is kept and compared with full attention timed the same
way, all of its rows flushed (``x_target_cold``). A third row per budget and list kind, backend
``floor``, is a numba loop that only reads every selected key and value row once (with the
same prefetching) and sums them: no kernel that gathers those rows can beat it, so where the
floor itself is above the target, the target is out of reach on this machine by memory traffic
alone.

Backends: ``numba`` (the fused gather-and-attend kernel against numba's flash kernel),
``torch`` (CPU tensors: gather + softmax ops against ``torch.nn.functional``'s fused attention
via ``qkv.sdpa``), ``reference`` (NumPy). The Triton interpreter is switched off here (it
emulates a GPU; its times mean nothing). Each time is the fastest of repeated calls after a
warm-up (the load average is recorded); full attention, the baseline of every ratio, is timed
twice, before and after the backend's sparse rows, and the faster kept, so that a busy second
on the shared machine cannot inflate (or deflate) every ratio of the backend at once. The JSON (``--out``, default ``benchmarks/results/sparse_cpu.json``) holds every timing
and the environment; the PNG next to it plots time against budget per backend with the
``budget * full`` line. ``--quick`` runs tiny sizes (a smoke run; its numbers mean nothing).
"""

from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: CPU timings only

import functools
import json
import platform
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
from qkv.reference.sparse.selected_keys import check_sparse_attention  # noqa: E402

B, H, HKV, D = 1, 8, 2, 64
BUDGETS = (0.01, 0.02, 0.05, 0.10)
TARGET = 1.5


def best_ms(
    fn: Callable[[], Any],
    *,
    budget_s: float,
    max_repeats: int = 50,
    before: Callable[[], Any] | None = None,
) -> float:
    """Fastest wall time of ``fn`` in ms: one warm-up call, then repeats within ``budget_s``
    (at least 5), each after ``before()`` if given (untimed). The minimum, not the median: on a
    shared machine the slow calls measure the other processes."""
    fn()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < 5 or (time.perf_counter() - started < budget_s and len(times) < max_repeats):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return min(times)


def warm_and_cold(
    fn: Callable[[], Any], budget_s: float, flush: Callable[[], Any]
) -> tuple[float, float]:
    """``(warm, cold)``: the fastest call of ``fn`` in ms, then the fastest after ``flush()``
    (untimed, half the budget, at most 15 calls)."""
    warm = best_ms(fn, budget_s=budget_s)
    return warm, best_ms(fn, budget_s=budget_s / 2, max_repeats=15, before=flush)


class Evictor:
    """Writes one float per 64-byte line of a buffer larger than the last-level cache, so that
    the next call finds its data in memory (everything evicted, its code and indices too)."""

    def __init__(self, mib: int) -> None:
        self.buffer = np.zeros(mib << 18, np.float32)  # (mib MiB,)

    def __call__(self) -> None:
        self.buffer[::16] += 1.0


@functools.cache
def flush_kernel() -> Callable[..., Any] | None:
    """A numba loop flushing listed key and value rows from every cache level (x86 ``clflush``
    per 64-byte line, then ``mfence``), or ``None`` off x86."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    import numba
    from llvmlite import ir
    from numba.core import cgutils, types
    from numba.extending import intrinsic

    @intrinsic
    def clflush(typingctx, a, row, col):  # pragma: no cover - compiled
        def codegen(context, builder, sig, args):
            ary = context.make_array(sig.args[0])(context, builder, args[0])
            at = [context.cast(builder, x, t, types.intp)
                  for x, t in zip(args[1:], sig.args[1:], strict=True)]  # fmt: skip
            ptr = cgutils.get_item_pointer(context, builder, sig.args[0], ary, at)
            i8p = ir.IntType(8).as_pointer()
            fnty = ir.FunctionType(ir.VoidType(), [i8p])
            fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.sse2.clflush")
            builder.call(fn, [builder.bitcast(ptr, i8p)])
            return context.get_dummy_value()

        return types.void(a, row, col), codegen

    @intrinsic
    def mfence(typingctx):  # pragma: no cover - compiled
        def codegen(context, builder, sig, args):
            fnty = ir.FunctionType(ir.VoidType(), [])
            builder.call(
                cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.sse2.mfence"), []
            )
            return context.get_dummy_value()

        return types.void(), codegen

    @numba.njit
    def flush_rows(k, v, lists):  # pragma: no cover - compiled
        B, L, S = lists.shape
        line = 64 // k.itemsize
        for n in range(B * L):
            b, ell = n // L, n % L
            kg, vg = k[b, ell * k.shape[1] // L], v[b, ell * k.shape[1] // L]  # (M, D), (M, Dv)
            for t in range(S):
                for c in range(0, kg.shape[1], line):
                    clflush(kg, lists[b, ell, t], c)
                for c in range(0, vg.shape[1], line):
                    clflush(vg, lists[b, ell, t], c)
        mfence()

    return flush_rows


def cold_start(
    k: np.ndarray, v: np.ndarray, lists: np.ndarray, evict: Evictor
) -> Callable[[], Any]:
    """What runs, untimed, before each cold call. On x86 the listed key and value rows
    (``lists (B, L, S)``, list ``l`` on KV head ``l Hkv / L``) are flushed from the caches: the
    call fetches them from memory while its code, queries and indices stay cached, as in a
    decode step that finds the KV cache cold after the other layers ran. Elsewhere ``evict``
    (everything evicted: an upper bound)."""
    flush = flush_kernel()
    if flush is None:
        return evict
    return lambda: flush(k, v, lists)


def read_rows_kernel() -> Callable[..., Any]:
    """A numba loop reading each listed key and value row once (summed, so that the loads
    happen), one list per thread, prefetching as the sparse kernel does: the memory floor."""
    import numba

    from qkv.backends.numba._sparse import AHEAD, _prefetch_intrinsic

    prefetch = _prefetch_intrinsic()

    @numba.njit(parallel=True, fastmath={"reassoc"})
    def read_rows(k, v, lists, total):  # pragma: no cover - compiled
        B, L, S = lists.shape
        line = 64 // k.itemsize
        for n in numba.prange(B * L):
            b, ell = n // L, n % L
            kg, vg = k[b, ell * k.shape[1] // L], v[b, ell * k.shape[1] // L]  # (M, D), (M, Dv)
            ix = lists[b, ell]  # (S,)
            acc = kg.dtype.type(0.0)
            for t in range(-AHEAD, S):
                if t + AHEAD < S:
                    for c in range(0, kg.shape[1], line):
                        prefetch(kg, ix[t + AHEAD], c)
                    for c in range(0, vg.shape[1], line):
                        prefetch(vg, ix[t + AHEAD], c)
                if t >= 0:
                    for d in range(kg.shape[1]):
                        acc += kg[ix[t], d]
                    for e in range(vg.shape[1]):
                        acc += vg[ix[t], e]
            total[n] = acc

    return read_rows


def selection(M: int, budget: float, rng: np.random.Generator, *, lists: int = B * H) -> np.ndarray:
    """``(B, H, S)`` int64: ``S = budget * M`` distinct sorted keys per head; with
    ``lists = B * HKV`` the heads of a KV group share one list."""
    S = max(1, round(budget * M))
    own = np.stack([np.sort(rng.choice(M, size=S, replace=False)) for _ in range(lists)])
    return np.repeat(own.reshape(B, -1, S), B * H // lists, axis=1)  # (B, H, S)


def backends() -> dict[str, Callable[[Any], Any]]:
    """Backend name -> how its inputs are handed over (NumPy, or CPU torch tensors)."""
    import torch

    return {"numba": np.asarray, "torch": torch.from_numpy, "reference": np.asarray}


def run(M: int, budget_s: float, rng: np.random.Generator, evict: Evictor) -> list[dict[str, Any]]:
    q = rng.standard_normal((B, H, 1, D)).astype(np.float32)  # (B, H, 1, D)
    k = rng.standard_normal((B, HKV, M, D)).astype(np.float32)  # (B, Hkv, M, D)
    v = rng.standard_normal((B, HKV, M, D)).astype(np.float32)  # (B, Hkv, M, D)
    picks = {(budget, "per head"): selection(M, budget, rng) for budget in BUDGETS}
    picks |= {(b, "group lists"): selection(M, b, rng, lists=B * HKV) for b in BUDGETS}
    q64, k64, v64 = (x.astype(np.float64) for x in (q, k, v))
    golden = {key: qkv.sparse_attention(q64, k64, v64, idx) for key, idx in picks.items()}
    full_golden = qkv.sdpa(q64, k64, v64)
    every = np.broadcast_to(np.arange(M), (B, HKV, M)).copy()  # (B, Hkv, M): all the rows
    flush_all = cold_start(k, v, every, evict)
    flushes = {key: cold_start(k, v, distinct(idx), evict) for key, idx in picks.items()}
    rows = []
    fulls = {}
    for name, wrap in backends().items():
        args = [wrap(x) for x in (q, k, v)]
        full_call = lambda a=args, n=name: qkv.sdpa(*a, backend=n)  # noqa: E731
        full, full_cold = warm_and_cold(full_call, budget_s, flush_all)
        err = float(np.abs(np.asarray(qkv.sdpa(*args, backend=name)) - full_golden).max())
        index = wrap(picks[(BUDGETS[0], "per head")])
        check = best_ms(lambda a=args, i=index: check_sparse_attention(*a, i), budget_s=budget_s)
        full_row = {"backend": name, "impl": "full sdpa", "M": M, "budget": 1.0,
                    "selected": M, "max_abs_err": err,
                    "x_target": None, "x_target_cold": None, "check_ms": check}  # fmt: skip
        rows.append(full_row)
        sparse_rows = []
        for (budget, lists), idx in picks.items():
            index = wrap(idx)
            call = lambda a=args, i=index, n=name: qkv.sparse_attention(*a, i, backend=n)  # noqa: E731
            ms, cold = warm_and_cold(call, budget_s, flushes[(budget, lists)])
            got = np.asarray(qkv.sparse_attention(*args, index, backend=name))
            impl = "sparse_attention" + ("" if lists == "per head" else " (group lists)")
            sparse_rows.append({
                "backend": name, "impl": impl, "M": M, "budget": budget,
                "selected": int(idx.shape[-1]), "ms": ms, "ms_cold": cold,
                "max_abs_err": float(np.abs(got - golden[(budget, lists)]).max()),
            })  # fmt: skip
            print(f"  {name} {lists} {budget:.0%}: {ms:.3f} ms, cold {cold:.3f} ms", flush=True)
        again, again_cold = warm_and_cold(full_call, budget_s, flush_all)  # the faster is kept
        full, full_cold = min(full, again), min(full_cold, again_cold)
        print(f"  {name} full: {full:.3f} ms, cold {full_cold:.3f} ms", flush=True)
        full_row |= {"ms": full, "ms_cold": full_cold}
        fulls[name] = (full, full_cold)
        for row in sparse_rows:
            row["x_target"] = row["ms"] / (row["budget"] * full)
            row["x_target_cold"] = row["ms_cold"] / (row["budget"] * full_cold)
        rows.extend(sparse_rows)
    read_rows = read_rows_kernel()
    full, full_cold = fulls["numba"]
    for (budget, lists), idx in picks.items():
        own = distinct(idx)  # (B, L, S)
        total = np.empty(own.shape[0] * own.shape[1], np.float32)
        call = lambda i=own, t=total: read_rows(k, v, i, t)  # noqa: E731
        ms, cold = warm_and_cold(call, budget_s, flushes[(budget, lists)])
        rows.append({
            "backend": "floor", "impl": "read the selected rows" + (
                "" if lists == "per head" else " (group lists)"),
            "M": M, "budget": budget, "selected": int(idx.shape[-1]), "ms": ms, "ms_cold": cold,
            "max_abs_err": 0.0, "x_target": ms / (budget * full),
            "x_target_cold": cold / (budget * full_cold),
        })  # fmt: skip
    return rows


def distinct(idx: np.ndarray) -> np.ndarray:
    """``(B, L, S)``: the distinct lists of ``idx (B, H, S)``, one per query head, or one per
    KV head where the heads of each group share theirs."""
    shared = bool((idx.reshape(B, HKV, H // HKV, -1) == idx[:, :: H // HKV, None]).all())
    return np.ascontiguousarray(idx[:, :: H // HKV] if shared else idx)


SELECTION_BUDGET = 0.05


def selectors(M: int, k: np.ndarray, rng: np.random.Generator) -> dict[str, Callable[[], Any]]:
    """A fresh selector of each method per call, configured to read ``SELECTION_BUDGET * M``
    keys per query head (4 sinks and 8 recent tokens included)."""
    from qkv.reference import sparse

    budget = int(SELECTION_BUDGET * M)
    calibration = rng.standard_normal((HKV, 512, D))  # (Hkv, n, D) synthetic queries
    codebook = sparse.a2ats_retrieval.QueryAwareCodebook.fit(calibration, k[0], 256)
    return {
        "tokenselect": lambda: sparse.TokenSelect(n_init=4, n_local=8, top_k=budget - 12),
        "tidaldecode": lambda: sparse.TidalDecode(
            top_k=budget, sparse_layer_start=0, correction_layer=None
        ),
        "hip": lambda: sparse.HiP(mask_k=budget - 8, sliding_window=8),
        "actqkv": lambda: sparse.ActQKV(
            n_init=4, n_local=8, block_size=32, top_k=(budget - 12) // 32, min_k=(budget - 12) // 64
        ),
        "a2ats": lambda: sparse.A2ATS((codebook,), n_sink=4, window=8, top_k=(budget - 12) // 4),
    }


def selection_rows(M: int, budget_s: float, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Time each method's ``select`` on one layer of a synthetic ``M``-key cache."""
    from qkv.reference.kv.policy import CacheView

    q = rng.standard_normal((B, H, 1, D)).astype(np.float32)  # (B, H, 1, D)
    k = rng.standard_normal((B, HKV, M, D)).astype(np.float32)  # (B, Hkv, M, D)
    v = rng.standard_normal((B, HKV, M, D)).astype(np.float32)  # (B, Hkv, M, D)
    slots = np.broadcast_to(np.arange(M), (B, HKV, M)).copy()  # (B, Hkv, M)
    view = CacheView(keys=k, values=v, indices=slots, positions=slots.copy(),
                     next_position=np.full((B, HKV), M), n_tokens=M, queries=q)  # fmt: skip
    full = best_ms(lambda: qkv.sdpa(q, k, v, backend="reference"), budget_s=budget_s)
    rows = []
    made = selectors(M, k.astype(np.float64), rng)
    codes = made["a2ats"]().codes(0, view)  # (B, Hkv, M): A2ATS codes each key once, on insertion
    runs = {name: lambda m=make: m().select(0, view) for name, make in made.items()}
    runs["a2ats, keys coded once"] = lambda: made["a2ats"]().select(0, view, codes)
    for name, run_select in runs.items():
        ms = best_ms(run_select, budget_s=budget_s, max_repeats=10)
        idx = run_select()  # (B, H, S) cache slots
        attend = best_ms(
            lambda i=idx: qkv.sparse_attention(q, k, v, i, backend="reference"), budget_s=budget_s
        )
        read = float(np.mean(np.sum(idx >= 0, axis=-1))) / M
        rows.append({"method": name, "M": M, "budget": SELECTION_BUDGET, "keys_read": read,
                     "select_ms": ms, "sparse_attention_ms": attend, "full_sdpa_ms": full})  # fmt: skip
        print(f"  select {name}: {ms:.2f} ms, reads {read:.1%} of the keys", flush=True)
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Time against budget, warm cache (left) and cold KV rows (right): each backend's
    per-head and group-list rows, its ``budget x full`` line (dotted) and the 1.5x target
    (dashed), and the memory floor (grey)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    for ax, key, title in zip(axes, ("ms", "ms_cold"), ("warm cache", "KV rows flushed from the caches before each call"), strict=True):  # fmt: skip
        for color, name in zip(("C0", "C1", "C2"), backends(), strict=True):
            full = next(r[key] for r in rows if r["backend"] == name and r["impl"] == "full sdpa")
            own = [(r["budget"], r[key]) for r in rows
                   if r["backend"] == name and r["impl"] == "sparse_attention"]  # fmt: skip
            shared = [(r["budget"], r[key]) for r in rows
                      if r["backend"] == name and r["impl"].endswith("(group lists)")]  # fmt: skip
            budgets = np.array([b for b, _ in own])
            ax.loglog(*zip(*own, strict=True), "o-", color=color, label=f"{name} per-head lists")
            ax.loglog(*zip(*shared, strict=True), "s-.", color=color, alpha=0.6,
                      label=f"{name} group lists")  # fmt: skip
            ax.loglog(budgets, budgets * full, ":", color=color, label=f"{name} budget x full")
            ax.loglog(budgets, TARGET * budgets * full, "--", color=color, alpha=0.4, lw=0.8)
        for marker, suffix in (("o", ""), ("s", " (group lists)")):
            floor = [(r["budget"], r[key]) for r in rows
                     if r["backend"] == "floor" and r["impl"].endswith(suffix or "rows")]  # fmt: skip
            ax.loglog(*zip(*floor, strict=True), marker + ":", color="0.5", ms=4,
                      label="floor: read the rows" + suffix)  # fmt: skip
        ax.set_xlabel("budget (fraction of the M keys selected)")
        ax.set_title(title)
    axes[0].set_ylabel("time per decode step (ms)")
    axes[0].legend(fontsize=6.5, ncol=2)
    M = rows[0]["M"]
    fig.suptitle(f"sparse_attention, fp32, M={M}, B={B} H={H} Hkv={HKV} D={D}, N=1 "
                 f"(dashed: the 1.5x target)")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = arguments(__doc__, ROOT / "benchmarks" / "results" / "sparse_cpu.json", argv)
    M = 2048 if args.quick else 65536
    budget_s = 0.05 if args.quick else 1.0
    started = time.monotonic()
    evict = Evictor(8 if args.quick else 128)  # MiB: above the 32 MiB last-level cache here
    rows = run(M, budget_s, np.random.default_rng(0), evict)
    picked = selection_rows(M, budget_s, np.random.default_rng(1))
    record = {
        "environment": environment(),
        "config": {"B": B, "H": H, "Hkv": HKV, "D": D, "N": 1, "M": M, "dtype": "float32",
                   "budgets": list(BUDGETS), "target_x": TARGET, "quick": args.quick},
        "seconds": round(time.monotonic() - started, 1),
        "timings": rows,
        "selection": picked,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    plot(rows, args.out.with_suffix(".png"))
    print()
    print("check of the public boundary alone (ms):",
          {r["backend"]: round(r["check_ms"], 4) for r in rows if "check_ms" in r})  # fmt: skip
    show_table(
        ("backend", "impl", "budget", "keys", "ms", "x (budget*full)", "cold ms", "x cold",
         "max |err|"),
        [(r["backend"], r["impl"], f"{r['budget']:.0%}", r["selected"], f"{r['ms']:.3f}",
          "-" if r["x_target"] is None else f"{r['x_target']:.2f}", f"{r['ms_cold']:.3f}",
          "-" if r["x_target_cold"] is None else f"{r['x_target_cold']:.2f}",
          f"{r['max_abs_err']:.1e}")
         for r in rows],
    )  # fmt: skip
    print(f"\nselection at {SELECTION_BUDGET:.0%} (reference backend):")
    show_table(
        ("method", "keys read", "select ms", "sparse_attention ms", "full sdpa ms"),
        [(r["method"], f"{r['keys_read']:.1%}", f"{r['select_ms']:.2f}",
          f"{r['sparse_attention_ms']:.2f}", f"{r['full_sdpa_ms']:.2f}") for r in picked],
    )  # fmt: skip
    print(f"\nresults: {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
