"""The ``qkv`` command: ``list``, ``check``, ``tour``, ``bench`` and ``lab``.

Each command is a thin layer over a library function (the catalog, :mod:`qkv.testing`,
:mod:`qkv.tour`, :mod:`qkv.bench`, :mod:`qkv.lab`) that prints with ``rich``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from qkv import _dispatch, catalog

app = typer.Typer(
    help="qkv: queries, keys and values from recent attention research.",
    no_args_is_help=True,
    add_completion=False,
)
lab_app = typer.Typer(help="Real data and the lab model.", no_args_is_help=True)
app.add_typer(lab_app, name="lab")
console = Console()


def coverage() -> dict[str, dict[str, str]]:
    """op -> backend -> ``"yes"`` (implemented), ``"fallback"`` or ``"unavailable: reason"``.

    Read from the registry itself: an op is covered by a backend when the backend module
    defines a callable of that name.
    """
    table: dict[str, dict[str, str]] = {}
    modules = {name: _dispatch.load(name) for name in _dispatch.known_backends()}
    for op in _dispatch.OPS:
        row = {}
        for name, module in modules.items():
            ok, reason = _dispatch.availability(module)
            has = _dispatch.provides(module, op)
            row[name] = ("yes" if has else "fallback") + ("" if ok else " (unavailable here)")
        table[op] = row
    return table


@app.command("list")
def list_(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """The catalog (every mechanism id, its paper and status) and the op x backend matrix."""
    import qkv  # noqa: F401  (registers the dispatched ops)

    cover = coverage()
    if as_json:
        payload = {
            "mechanisms": [
                {
                    "id": m.id,
                    "family": m.family,
                    "what": m.what,
                    "paper": m.paper,
                    "arxiv": m.arxiv,
                    "status": m.status,
                    "reference": m.reference,
                    "tutorial": m.tutorial,
                    "ops": list(m.ops),
                    "backends": {op: cover.get(op, {}) for op in m.ops},
                }
                for m in catalog.MECHANISMS
            ],
            "papers_without_mechanism": [
                {"title": p.title, "reason": p.reason} for p in catalog.PAPERS_WITHOUT_MECHANISM
            ],
            "coverage": cover,
            "backends": {
                name: dict(
                    zip(
                        ("available", "reason"),
                        _dispatch.availability(_dispatch.load(name)),
                        strict=True,
                    )
                )
                for name in _dispatch.known_backends()
            },
        }
        typer.echo(json.dumps(payload, indent=2))
        return
    for family, members in catalog.by_family().items():
        table = Table(title=f"{family}: {catalog.FAMILIES[family]}", title_justify="left")
        table.add_column("id", no_wrap=True)  # an id is a name to copy: never folded
        table.add_column("status", no_wrap=True)
        for column in ("what", "paper"):
            table.add_column(column, overflow="fold")
        for m in members:
            status = "[green]implemented" if m.status == "implemented" else "[dim]planned"
            table.add_row(m.id, status, m.what, m.paper)
        console.print(table)
    backends = _dispatch.known_backends()
    matrix = Table(title="op x backend coverage", title_justify="left")
    matrix.add_column("op")
    for name in backends:
        ok, _ = _dispatch.availability(_dispatch.load(name))
        matrix.add_column(name if ok else f"{name} (n/a here)")
    for op, row in cover.items():
        cells = [
            "[green]yes" if row[b].startswith("yes") else "[yellow]reference" for b in backends
        ]
        matrix.add_row(op, *cells)
    console.print(matrix)
    done = len(catalog.implemented())
    console.print(f"{done} of {len(catalog.MECHANISMS)} mechanisms implemented.")


@app.command()
def check(
    backend: Annotated[str, typer.Argument(help="A backend name or dotted module path.")],
    ops: Annotated[
        list[str] | None, typer.Option("--op", help="Only this op (repeatable).")
    ] = None,
    max_examples: Annotated[int, typer.Option(help="Hypothesis examples per op.")] = 50,
    dtypes: Annotated[
        list[str] | None,
        typer.Option("--dtype", help="Only this input dtype (repeatable; default fp32/fp16/bf16)."),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Draw the same examples on every run.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Run the conformance suite on a backend: every op it provides against the reference."""
    from qkv.testing import check_backend

    options = {"dtypes": tuple(dtypes)} if dtypes else {}
    report = check_backend(
        backend, ops=ops, max_examples=max_examples, seed=seed, progress=not as_json, **options
    )
    if as_json:
        typer.echo(json.dumps(report.as_dict(), indent=2))
    else:
        console.print(report.table())
    raise typer.Exit(0 if report.ok else 1)


@app.command()
def tour(
    backends: Annotated[
        list[str] | None, typer.Option("--backend", help="Only this backend (repeatable).")
    ] = None,
) -> None:
    """Every implemented mechanism on real MiniLM data through every available backend."""
    from qkv.tour import run

    result = run(backends=backends, progress=True)
    console.print(result.table())
    raise typer.Exit(0 if result.ok else 1)


@app.command()
def bench(
    quick: Annotated[bool, typer.Option(help="Small sizes and few repeats (a smoke run).")] = False,
    out: Annotated[Path, typer.Option(help="Where the JSON results go.")] = Path(
        "benchmarks/results/cpu.json"
    ),
    backends: Annotated[
        list[str] | None, typer.Option("--backend", help="Only this backend (repeatable).")
    ] = None,
) -> None:
    """Time each backend against the NumPy reference and torch SDPA, in one run."""
    from qkv.bench import run

    result = run(quick=quick, out=out, progress=True, backends=backends)
    console.print(result.table())


@lab_app.command("capture-minilm")
def capture_minilm(
    out: Annotated[Path | None, typer.Option(help="Where the npz goes.")] = None,
) -> None:
    """Capture real queries, keys and values of the MiniLM encoder into qkv/data."""
    from qkv.lab.minilm import capture

    path = capture(out=out, progress=True)
    console.print(f"wrote {path}")


@lab_app.command("embed-corpus")
def embed_corpus(
    out: Annotated[Path | None, typer.Option(help="Where the npz goes.")] = None,
) -> None:
    """Embed the help-page retrieval corpus with qkv's NumPy MiniLM into qkv/data."""
    from qkv.lab.corpus import build

    path = build(out=out, progress=True)
    console.print(f"wrote {path}")


@lab_app.command("cross-scores")
def cross_scores(
    out: Annotated[Path | None, typer.Option(help="Where the npz goes.")] = None,
) -> None:
    """Score corpus queries against documents with the joint MiniLM cross-encoder into qkv/data."""
    from qkv.lab.cross_encoder import build

    console.print(f"wrote {build(out=out)}")


@lab_app.command("train-decoder")
def train_decoder(
    out: Annotated[
        Path | None, typer.Option(help="Where the weights npz goes (default qkv/data).")
    ] = None,
    steps: Annotated[int, typer.Option(help="Optimiser steps.")] = 2000,
    seed: Annotated[int, typer.Option(help="Seed of the weights and the data.")] = 0,
    threads: Annotated[int, typer.Option(help="torch CPU threads.")] = 1,
) -> None:
    """Train the lab decoder on the synthetic tasks (CPU, torch) and save weights + loss curve."""
    from qkv.lab.train import TrainConfig, run

    try:
        cfg = TrainConfig(steps=steps, seed=seed, threads=threads)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    path, info = run(out, cfg, progress=True)
    console.print(f"wrote {path} (and its _loss.json/_loss.png) in {info['seconds']:.0f} s")
    acc = info["passkey"]
    table = Table("length", *[f"depth {d:g}" for d in acc["depths"]], title="passkey accuracy")
    for length, row in zip(acc["lengths"], acc["accuracy"], strict=True):
        table.add_row(str(length), *[f"{a:.2f}" for a in row])
    console.print(table)


@lab_app.command("kv-eval")
def kv_eval(
    methods: Annotated[str, typer.Option(help="Comma-separated method names.")] = "full,streaming",
    budgets: Annotated[
        str, typer.Option(help="Comma-separated cache budgets (tokens per head).")
    ] = "32,64,128,256,512",
    lengths: Annotated[
        str, typer.Option(help="Comma-separated prompt lengths.")
    ] = "64,128,256,512",
    depths: Annotated[
        str, typer.Option(help="Comma-separated needle depths.")
    ] = "0,0.25,0.5,0.75,1",
    per_cell: Annotated[int, typer.Option(help="Prompts per (length, depth) cell.")] = 4,
    tasks: Annotated[str, typer.Option(help="Comma-separated tasks: passkey, recall.")] = "passkey",
    weights: Annotated[
        Path | None, typer.Option(help="Decoder weights npz (default: the shipped model).")
    ] = None,
    out: Annotated[Path, typer.Option(help="Where the JSON results go.")] = Path(
        "benchmarks/kv_eval/kv_eval.json"
    ),
    plots: Annotated[
        Path | None, typer.Option(help="Folder for the plots (default: next to --out).")
    ] = None,
) -> None:
    """Needle retrieval under KV-cache budgets: accuracy, cache bytes, time per token."""
    from qkv.errors import ParameterError
    from qkv.lab import decoder
    from qkv.lab import kv_eval as kv

    try:
        cfg = kv.EvalConfig(
            methods=kv.names(methods),
            budgets=kv.parse_ints(budgets, "budgets"),
            lengths=kv.parse_ints(lengths, "lengths"),
            depths=kv.parse_floats(depths, "depths"),
            per_cell=per_cell,
            tasks=kv.names(tasks),
        )
        model = decoder.load(weights)
    except (ParameterError, FileNotFoundError) as exc:
        raise typer.BadParameter(str(exc)) from None
    results = kv.run(model, cfg, progress=True)
    kv.save(results, out)
    paths = kv.plot(results, plots or out.parent)
    for task in cfg.tasks:
        table = Table(
            "method", "budget", "accuracy", "cache KiB", "ms / token", title=f"kv-eval: {task}"
        )
        for method, budget, acc, kib, ms in kv.summary(results, task):
            table.add_row(method, budget, f"{acc:.2f}", f"{kib:.1f}", f"{ms:.2f}")
        console.print(table)
    console.print(f"wrote {out}, " + ", ".join(str(p) for p in paths))


def main() -> None:
    """Entry point: a backend or input problem ends with its message, not a traceback."""
    from qkv.errors import BackendUnavailable, UnknownBackend

    try:
        app()
    except (BackendUnavailable, UnknownBackend) as exc:
        console.print(f"[bold red]{type(exc).__name__}:[/] {escape(str(exc))}")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
