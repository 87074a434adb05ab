"""How benchmark results are shown: a rich table, a markdown docs page and a PNG plot.

Everything here reads the JSON payload that :func:`qkv.bench.run` saves, so a page can be
rebuilt from a saved file without running anything. rich and matplotlib are imported only by
the functions that need them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.table import Table

TIME_COLUMNS = (
    "case",
    "op",
    "backend",
    "ms",
    "GFLOP/s",
    "% of GEMM",
    "× torch SDPA",
    "× reference",
    "note",
)
MEMORY_COLUMNS = (
    "implementation",
    "N = M",
    "inputs q, k, v (MiB)",
    "one N×M head matrix (MiB)",
    "peak extra (MiB)",
    "time (s)",
    "note",
)
TENSOR_COLUMNS = ("n", "op", "backend", "ms", "× brute force", "rel. error", "note")
TARGET_COLUMNS = ("target", "measured", "result")
#: Name of the peer rows (as in :data:`qkv.bench.PEER`) and the memory plot's reference line.
PEER = "torch SDPA"
HEAD = "one N×M fp32 head matrix"


def _ms(value: float | None) -> str:
    if value is None:
        return "–"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}" if value >= 0.1 else f"{value:.3f}"


def _fixed(value: float | None, digits: int, suffix: str = "") -> str:
    return "–" if value is None else f"{value:.{digits}f}{suffix}"


def _mib(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.0f}" if abs(value) >= 10 else f"{value:.2f}"


def _percent(fraction: float | None) -> str:
    if fraction is None:
        return "–"
    return f"{100 * fraction:.1f}%" if fraction < 0.1 else f"{100 * fraction:.0f}%"


def _note(row: dict[str, Any], width: int | None = None) -> str:
    if row["status"] == "ok":
        return ""
    text = f"{row['status']}: {row['reason']}"
    return text if width is None or len(text) <= width else text[: width - 1] + "…"


def time_cells(row: dict[str, Any], width: int | None = None) -> list[str]:
    """One timing row as table cells, in :data:`TIME_COLUMNS` order."""
    return [
        row["case"],
        row["op"],
        row["backend"],
        _ms(row["ms_median"]),
        _fixed(row["gflops"], 1),
        _percent(row["gemm_fraction"]),
        _fixed(row["x_torch_sdpa"], 2, "x"),
        _fixed(row["x_reference"], 1, "x"),
        _note(row, width),
    ]


def memory_cells(row: dict[str, Any], width: int | None = None) -> list[str]:
    """One memory row as table cells, in :data:`MEMORY_COLUMNS` order."""
    return [
        row["impl"],
        str(row["N"]),
        _mib(row["input_mib"]),
        _mib(row["score_matrix_head_mib"]),
        _mib(row["peak_extra_mib"]),
        _fixed(row["seconds"], 2),
        _note(row, width),
    ]


def tensor_cells(row: dict[str, Any], width: int | None = None) -> list[str]:
    """One tensor-attention row as table cells, in :data:`TENSOR_COLUMNS` order."""
    err = row["rel_err"]
    return [
        str(row["n"]),
        row["op"],
        row["backend"],
        _ms(row["ms_median"]),
        _fixed(row["x_brute_force"], 1, "x"),
        "–" if err is None else f"{err:.1e}",
        _note(row, width),
    ]


def target_cells(target: dict[str, Any]) -> list[str]:
    """One target as table cells, in :data:`TARGET_COLUMNS` order."""
    return [target["target"], target["measured"], target["status"]]


def _gemm_line(data: dict[str, Any]) -> str:
    gemm = data["gemm"]
    rates = ", ".join(
        f"{name} {gemm[name]['gflops']:.0f} GFLOP/s" for name in ("numpy", "torch") if name in gemm
    )
    return (
        f"fp32 GEMM {gemm['n']}³: {rates}; '% of GEMM' is of the higher "
        f"({gemm['peak_source']}, {gemm['peak_gflops']:.0f} GFLOP/s)"
    )


def _machine_line(data: dict[str, Any]) -> str:
    m = data["machine"]
    blas = ", ".join(
        f"{b['internal_api']} {b['version']} ({b['architecture']}, {b['num_threads']} threads)"
        for b in m.get("blas") or []
    )
    parts = [
        f"{m['cpu']} ({', '.join(m['cpu_flags']) or 'no AVX flags read'})",
        f"{m['cores']} cores",
        f"{m['memory_gib']} GiB" if m.get("memory_gib") else None,
        f"Python {m['python']}",
        f"NumPy {m['numpy']}" + (f" (BLAS: {blas})" if blas else ""),
        f"torch {m['torch']} ({m.get('torch_threads')} threads)" if m.get("torch") else None,
        f"Numba {m['numba']} ({m.get('numba_threads')} threads, "
        f"threading layer {m.get('numba_threading_layer') or 'not started'})"
        if m.get("numba")
        else None,
        f"load average {m['loadavg_start']} at start, {m['loadavg_end']} at end",
        f"qkv {m['qkv_git']}" if m.get("qkv_git") else None,
        ", ".join(f"{k}={v}" for k, v in m["environment"].items()) or None,
    ]
    return "; ".join(p for p in parts if p)


def _backends_line(data: dict[str, Any]) -> str:
    return "; ".join(
        name + ("" if info["available"] else f" (not run: {info['reason']})")
        for name, info in data["backends"].items()
    )


def rich_table(data: dict[str, Any]) -> Table:
    """Timing, memory and targets as rich tables, stacked in one grid."""
    from rich.markup import escape
    from rich.table import Table

    config = data["config"]
    times = Table(
        title=f"qkv bench: {config['dtype']}, B={config['B']} H={config['H']} D={config['D']}"
        + (" (quick run)" if data["quick"] else ""),
        caption=escape(
            f"{_machine_line(data)}\n{_gemm_line(data)}\nbackends: {_backends_line(data)}"
        ),
        title_justify="left",
        caption_justify="left",
    )
    for column in TIME_COLUMNS:
        right = column not in ("case", "op", "backend", "note")
        times.add_column(
            column,
            justify="right" if right else "left",
            no_wrap=column != "note",
            overflow="fold" if column == "note" else "ellipsis",
        )
    rows = data["rows"]
    for i, row in enumerate(rows):
        last_of_case = i + 1 == len(rows) or rows[i + 1]["case"] != row["case"]
        times.add_row(*map(escape, time_cells(row, width=60)), end_section=last_of_case)
    memory = Table(title="peak extra memory of one call (fresh process)", title_justify="left")
    for column in MEMORY_COLUMNS:
        memory.add_column(column, overflow="fold")
    for row in data["memory"]["rows"]:
        memory.add_row(*map(escape, memory_cells(row, width=60)))
    tensor = Table(title="tensor attention, one head (fp32)", title_justify="left")
    for column in TENSOR_COLUMNS:
        tensor.add_column(column, overflow="fold")
    for row in data.get("tensor", {}).get("rows", []):
        tensor.add_row(*map(escape, tensor_cells(row, width=60)))
    targets = Table(title="targets", title_justify="left")
    for column in TARGET_COLUMNS:
        targets.add_column(column, overflow="fold")
    style = {"pass": "[green]pass", "miss": "[red]miss", "n/a": "[dim]n/a"}
    for target in data["targets"]:
        cells = target_cells(target)
        targets.add_row(*map(escape, cells[:2]), style[cells[2]])
    grid = Table.grid(padding=(1, 0))
    for part in (times, memory, tensor, targets):
        grid.add_row(part)
    return grid


def _markdown_table(columns: tuple[str, ...], rows: list[list[str]]) -> list[str]:
    def line(cells: list[str] | tuple[str, ...]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return [line(columns), "|" + "---|" * len(columns), *(line(r) for r in rows)]


def markdown(data: dict[str, Any]) -> str:
    """The docs page for one result: machine, timing table, plot, memory table, targets."""
    config = data["config"]
    memory = data["memory"]
    result = {"pass": "pass", "miss": "**miss**", "n/a": "n/a"}
    lines = [
        "# CPU benchmarks",
        "",
        f"Softmax attention (`sdpa` and `flash`), {config['dtype']}, B={config['B']}, "
        f"H={config['H']}, D={config['D']}: every qkv backend against the NumPy reference and "
        "`torch.nn.functional.scaled_dot_product_attention`, measured in the same run by "
        f"`qkv bench` on {data['date']} ({data['wall_s']:.0f} s).",
    ]
    if data["quick"]:
        lines += ["", "!!! warning", "    A quick smoke run: tiny sizes and one repeat."]
    if data["machine"]["environment"].get("TRITON_INTERPRET", "0") not in ("", "0"):
        lines += [
            "",
            "!!! warning",
            "    `TRITON_INTERPRET` was set: the torch backend's `flash` ran the Triton "
            "interpreter, so its times are not kernel times.",
        ]
    lines += [
        "",
        f"**Machine.** {_machine_line(data)}.",
        "",
        f"**GEMM rate.** {_gemm_line(data)}.",
        "",
        f"**Backends.** {_backends_line(data)}.",
        "",
        "## Time",
        "",
        "Times are the median of repeats after one warm-up call, which is excluded (Numba "
        f"compiles there); each measurement repeats for up to {config['budget_s']:g} s "
        f"and at most {config['max_repeats']} times. FLOPs are 4·B·H·N·M·D, halved when "
        "causal. '× torch SDPA' is the time over torch SDPA's time (below 1 is faster); "
        "'× reference' is the speed-up over the NumPy reference of the same op. A row marked "
        "fallback would have run the reference, so it is not timed; every timed output is "
        "checked against torch SDPA (norm-wise relative error at most "
        f"{config['mismatch_tolerance']:g}).",
        "",
        *_markdown_table(TIME_COLUMNS, [time_cells(r) for r in data["rows"]]),
        "",
    ]
    if data.get("plot"):
        lines += [f"![Time and peak extra memory against N]({data['plot']})", ""]
    lines += ["## Memory", ""]
    if memory["rows"]:
        methods = "; ".join(memory["methods"].values()) or "no size was measured"
        lines += [
            f"Peak extra resident memory of one call at B={memory['B']}, H={memory['H']}, "
            f"D={memory['D']}, {memory['dtype']}, each in a fresh process after a warm-up call "
            f"at N=M={memory['warmup_n']}: {methods}. It includes the output; the inputs are "
            "allocated before and not counted.",
            "",
            *_markdown_table(MEMORY_COLUMNS, [memory_cells(r) for r in memory["rows"]]),
            "",
        ]
    else:
        lines += ["Not measured in this run.", ""]
    tensor = data.get("tensor")
    if tensor and tensor["rows"]:
        lines += [
            "## Tensor attention",
            "",
            "Triple-wise attention D⁻¹ exp(Q (K1 ⊘ K2)ᵀ) (V1 ⊘ V2) of "
            f"one head, head dim {tensor['D']}, {tensor['dtype']}, entries of Q, K1, K2 uniform "
            "in [-1, 1] with scale 1/d (every score in [-1, 1]). `brute force` builds the "
            "n×n² score matrix and uses BLAS; `tensor` is each backend's exact streaming op; "
            f"`tensor_approx` is the degree-{tensor['degree']} polynomial method. Errors are "
            "against a float64 brute force; '× brute force' is the speed-up over it.",
            "",
            *_markdown_table(TENSOR_COLUMNS, [tensor_cells(r) for r in tensor["rows"]]),
            "",
        ]
    lines += [
        "## Targets",
        "",
        "The targets of the foundation and forms issues, checked against the numbers above.",
        "",
        *_markdown_table(
            TARGET_COLUMNS,
            [[*target_cells(t)[:2], result[t["status"]]] for t in data["targets"]],
        ),
        "",
    ]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(map(_cell, value))
    return str(value)


def _flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts become dotted keys: ``{"case": {"N": 1}}`` -> ``{"case.N": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def generic_markdown(data: dict[str, Any], title: str) -> str:
    """A page for another benchmark's JSON: each field, and each list of records as a table."""
    lines = [f"# Benchmark results: {title}", ""]
    for key, value in data.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            records = [_flatten(v) for v in value]
            columns = tuple(dict.fromkeys(k for r in records for k in r))
            cells = [[_cell(r.get(c)) for c in columns] for r in records]
            lines += [f"## {key}", "", *_markdown_table(columns, cells), ""]
        elif isinstance(value, dict):
            fields = "; ".join(f"{k} {_cell(v)}" for k, v in _flatten(value).items())
            lines += [f"**{key}.** {fields}.", ""]
        else:
            lines += [f"**{key}.** {_cell(value)}", ""]
    return "\n".join(lines)


def plot(data: dict[str, Any], path: Path) -> bool:
    """Save time against N (one panel per op) and peak extra memory against N as a PNG.

    Each backend keeps its colour across the panels (torch SDPA is the ``peer`` in the memory
    panel); in the memory panel ``flash`` is drawn with circles and ``sdpa`` with squares.
    Returns False, saving nothing, where matplotlib is not installed.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    squares = [
        r
        for r in data["rows"]
        if r["N"] == r["M"] and not r["causal"] and r["status"] == "ok" and r["ms_median"]
    ]
    names = list(dict.fromkeys(r["backend"] for r in data["rows"]))
    colour = {name: f"C{i % 10}" for i, name in enumerate(names)}
    colour["peer"] = colour.get(PEER, "C0")
    fig = Figure(figsize=(15, 4.6), layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, op in zip(axes[:2], ("sdpa", "flash"), strict=True):
        for name in names:
            points = [
                (r["N"], r["ms_median"])
                for r in squares
                if r["backend"] == name and (r["op"] == op or r["kind"] == "peer")
            ]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", color=colour[name], label=name)
        ax.set(ylabel="ms (median)", title=f"{op}, fp32, non-causal: time")
    rows = data["memory"]["rows"]
    ax = axes[2]
    for impl in dict.fromkeys(r["impl"] for r in rows):
        mine = [r for r in rows if r["impl"] == impl]
        points = [
            (r["N"], r["peak_extra_mib"])
            for r in mine
            if r["status"] == "ok" and r["peak_extra_mib"] > 0
        ]
        if points:
            marker = "o" if mine[0]["op"] == "flash" else "s"
            ax.plot(
                *zip(*points, strict=True),
                marker=marker,
                color=colour.get(mine[0]["backend"]),
                label=impl,
            )
    sizes = sorted({r["N"] for r in rows})
    if sizes:
        first = {r["N"]: r for r in reversed(rows)}
        ax.plot(sizes, [first[n]["score_matrix_head_mib"] for n in sizes], "k--", label=HEAD)
        ax.plot(sizes, [first[n]["input_mib"] for n in sizes], "k:", label="inputs q, k, v")
    ax.set(ylabel="MiB", title="peak extra memory of one call")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N = M")
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    fig.suptitle(f"qkv CPU benchmark: {data['machine']['cpu']}, {data['machine']['cores']} cores")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return True
