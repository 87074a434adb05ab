"""``check_backend``: run every op a backend provides against the float64 reference.

For each op the backend implements itself (never through the reference fallback, which would
pass by construction) and each dtype asked for, hypothesis draws calls of the op (see
:mod:`qkv.testing.strategies`). Each call is made as follows:

1. round the drawn float64 inputs to the dtype; the golden output is the reference on those
   rounded values in float64;
2. hand the inputs, in that dtype, to the backend through its ``asarray`` (bfloat16 arrays are
   built as torch tensors, the only bfloat16 arrays qkv knows);
3. call the backend's op directly inside :func:`qkv._outputs.poisoned`, so any output element
   it never writes is NaN;
4. check the result's structure (number of outputs, shapes, dtypes as the reference documents
   them), that no input was modified, and compare every output with
   :func:`qkv.testing.tolerances.compare`.

A backend may decline inputs by raising :class:`qkv.errors.Unsupported` (and, for dtypes other
than float32, by failing to convert them in ``asarray``); that example counts as *declined*, not
failed. An op whose every example was declined in every dtype is a problem: declining
everything is not conformance. The first failure stops an op's run; hypothesis then shrinks it
to a small reproducer (for at most ``shrink_budget`` seconds).
"""

from __future__ import annotations

import importlib.util
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import seed as hypothesis_seed

import qkv  # noqa: F401  (registers the dispatched ops)
from qkv import _arrays, _dispatch, _outputs
from qkv.errors import Unsupported
from qkv.testing.cases import Case, host
from qkv.testing.precision import as_tuple
from qkv.testing.specs import SPECS, compare_outputs, evaluate, output_names
from qkv.testing.tolerances import TOLERANCES

#: The dtypes checked by default: float32 first (every backend is expected to take it).
DTYPES = ("float32", "float16", "bfloat16")

_STYLE = {
    "passed": "green",
    "failed": "bold red",
    "declined": "yellow",
    "not provided": "dim",
    "skipped": "dim",
}


@dataclass(frozen=True)
class Failure:
    """The first (shrunk) failing call of an op.

    ``kind`` is ``"mismatch"`` (outside the tolerance), ``"error"`` (the op raised),
    ``"structure"`` (outputs of the wrong number or shape), ``"dtype"`` or ``"mutated input"``.
    """

    kind: str
    message: str
    case: Case
    dtype: str

    def reproducer(self) -> str:
        """The call that failed, with the dtype its inputs had."""
        return f"{self.case.describe()} in {self.dtype}"


@dataclass
class OpResult:
    """One row of the report: one op in one dtype (``dtype`` is ``None`` for rows about the op).

    ``status`` is ``"passed"``, ``"failed"``, ``"declined"`` (every example declined),
    ``"not provided"`` (the backend lacks the op) or ``"skipped"`` (the kit cannot test it here).
    """

    op: str
    dtype: str | None
    status: str
    examples: int = 0
    declined: int = 0
    seconds: float = 0.0
    failure: Failure | None = None
    decline_reasons: Counter[str] = field(default_factory=Counter)
    note: str = ""

    @property
    def detail(self) -> str:
        """The failure and its reproducer, the main reason for declining, or the note."""
        if self.failure is not None:
            return f"{self.failure.kind}: {self.failure.message}; {self.failure.reproducer()}"
        parts = [self.note] if self.note else []
        if self.decline_reasons:
            reason, count = self.decline_reasons.most_common(1)[0]
            parts.append(f"declined {count}x: {reason}")
        return "; ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        """The row as JSON-ready data."""
        failure = None
        if self.failure is not None:
            failure = {
                "kind": self.failure.kind,
                "message": self.failure.message,
                "case": self.failure.reproducer(),
            }
        return {
            "op": self.op,
            "dtype": self.dtype,
            "status": self.status,
            "examples": self.examples,
            "declined": self.declined,
            "seconds": round(self.seconds, 3),
            "failure": failure,
            "decline_reasons": dict(self.decline_reasons),
            "note": self.note,
        }


@dataclass
class Report:
    """The result of :func:`check_backend`: one :class:`OpResult` per (op, dtype)."""

    backend: str
    rows: list[OpResult]

    def problems(self) -> list[str]:
        """Why the backend does not conform (empty when it does)."""
        problems = [f"{r.op} [{r.dtype}]: {r.detail}" for r in self.rows if r.status == "failed"]
        checked = [r for r in self.rows if r.status in ("passed", "failed", "declined")]
        for op in dict.fromkeys(r.op for r in checked):
            mine = [r for r in checked if r.op == op]
            if all(r.status == "declined" for r in mine):
                problems.append(f"{op}: every example was declined, in every dtype")
        if not checked:
            problems.append(f"backend {self.backend!r} provides none of the checked ops")
        return problems

    @property
    def ok(self) -> bool:
        """Whether every provided op passed (and at least one op was checked)."""
        return not self.problems()

    def table(self) -> Any:
        """A ``rich`` table of the rows, with the verdict as its caption."""
        from rich.markup import escape
        from rich.table import Table

        problems = self.problems()
        verdict = (
            "[green]conforms"
            if not problems
            else f"[bold red]does not conform[/]: {len(problems)} problem(s)"
        )
        table = Table(
            title=f"qkv conformance: backend {self.backend!r}",
            title_justify="left",
            caption=verdict,
            caption_justify="left",
        )
        for column in ("op", "dtype", "result", "examples", "declined", "time"):
            table.add_column(column, no_wrap=True)
        table.add_column("details", overflow="fold")
        for r in self.rows:
            table.add_row(
                r.op,
                r.dtype or "",
                f"[{_STYLE[r.status]}]{r.status}",
                str(r.examples),
                str(r.declined),
                f"{r.seconds:.1f}s",
                escape(r.detail),
            )
        return table

    def text(self) -> str:
        """The rows and problems as plain text (for pytest messages and logs)."""
        lines = [f"qkv conformance of backend {self.backend!r}:"]
        for r in self.rows:
            lines.append(
                f"  {r.op:<8} {r.dtype or '':<9} {r.status:<12} examples={r.examples} "
                f"declined={r.declined} {r.seconds:.1f}s  {r.detail}".rstrip()
            )
        lines += [f"problem: {p}" for p in self.problems()]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data."""
        return {
            "backend": self.backend,
            "ok": self.ok,
            "problems": self.problems(),
            "rows": [r.as_dict() for r in self.rows],
        }


# --------------------------------------------------------------------------- one call


class _Found(Exception):
    """Raised inside hypothesis for a failing example, carrying its :class:`Failure`."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.message)
        self.failure = failure


def _typed(x: np.ndarray, dtype: str) -> Any:
    """A float64 array of ``dtype``-representable values as an array of ``dtype``."""
    if dtype == "bfloat16":
        import torch

        return torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16)
    return x.astype(dtype)


def _to_backend(module: ModuleType, value: Any, dtype: str) -> Any:
    if not isinstance(value, np.ndarray):
        return value
    if np.issubdtype(value.dtype, np.floating):
        value = _typed(value, dtype)
    return module.asarray(value)


def _expected_dtypes(case: Case, dtype: str) -> list[str]:
    """The dtypes the reference documents for the outputs, given inputs of ``dtype``.

    bfloat16 has no NumPy dtype, so the reference runs on float16 and float16 reads bfloat16.
    """
    proxy = "float16" if dtype == "bfloat16" else dtype
    names = [_arrays.dtype_name(o) for o in evaluate(case.astype(proxy))]
    return [dtype if name == proxy else name for name in names]


def _attempt(
    module: ModuleType, fn: Callable[..., Any], case: Case, dtype: str
) -> Failure | str | None:
    """Run one drawn call: ``None`` if it passed, the decline reason, or a :class:`Failure`."""
    case = case.rounded(dtype)

    def failed(kind: str, message: str) -> Failure:
        return Failure(kind, message, case, dtype)

    try:
        args = tuple(_to_backend(module, a, dtype) for a in case.args)
        kwargs = {k: _to_backend(module, v, dtype) for k, v in case.kwargs.items()}
    except Unsupported as why:
        return f"asarray: {why}"
    except Exception as exc:
        if dtype == "float32":
            return failed("error", f"asarray raised {type(exc).__name__}: {exc}")
        return f"asarray cannot take {dtype} ({type(exc).__name__})"
    try:
        with _outputs.poisoned():
            out = fn(*args, **kwargs)
    except Unsupported as why:
        return str(why) or "Unsupported"
    except Exception as exc:
        return failed("error", f"{type(exc).__name__}: {exc}")

    golden = evaluate(case)
    names = output_names(case, len(golden))
    got = as_tuple(out)
    if len(got) != len(golden):
        return failed(
            "structure", f"returned {len(got)} output(s), expected {len(golden)}: {names}"
        )
    actual = []
    for name, a, g, want in zip(names, got, golden, _expected_dtypes(case, dtype), strict=True):
        if not _arrays.is_array(a):
            return failed("structure", f"{name}: got {type(a).__name__}, expected an array")
        if _arrays.dtype_name(a) != want:
            return failed("dtype", f"{name}: dtype {_arrays.dtype_name(a)}, expected {want}")
        try:
            on_host = host(a, module.to_numpy)
        except Exception as exc:
            return failed("error", f"to_numpy({name}) raised {type(exc).__name__}: {exc}")
        if on_host.shape != np.shape(g):
            return failed("structure", f"{name}: shape {on_host.shape}, expected {np.shape(g)}")
        actual.append(on_host)
    passed = [*zip(range(len(args)), args, case.args, strict=True)]
    passed += [(key, kwargs[key], case.kwargs[key]) for key in kwargs]
    for where, handed, original in passed:
        if isinstance(original, np.ndarray) and not np.array_equal(
            host(handed, module.to_numpy), original, equal_nan=original.dtype.kind == "f"
        ):
            return failed("mutated input", f"argument {where!r} was modified in place")

    for name, result in compare_outputs(case, actual, dtype):
        if not result:
            return failed("mismatch", f"{name}: {result.reason}")
    return None


# --------------------------------------------------------------------------- one row


@dataclass
class _Run:
    """Book-keeping of one (op, dtype) run across hypothesis' calls."""

    examples: int = 0
    declined: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    first_failure_at: float | None = None
    failures: dict[str, Failure] = field(default_factory=dict)
    last: Failure | None = None
    out_of_time: bool = False


def _check_op(
    module: ModuleType,
    op: str,
    dtype: str,
    *,
    max_examples: int,
    seed: int | None,
    time_budget: float | None,
    shrink_budget: float,
    advance: Callable[[int], None],
) -> OpResult:
    """Explore one op in one dtype with hypothesis and summarise it as a row."""
    spec = SPECS[op]
    fn = _dispatch.implementation(module, op)
    run = _Run()
    start = time.perf_counter()

    def step(case: Case) -> Failure | None:
        """The failure this case shows, if any, with the row's counts kept up to date."""
        key = case.describe()
        if run.first_failure_at is None:  # still exploring
            if time_budget is not None and time.perf_counter() - start > time_budget:
                run.out_of_time = True
                return None
            outcome = _attempt(module, fn, case, dtype)
            advance(1)
            if isinstance(outcome, str):
                run.declined += 1
                run.reasons[outcome] += 1
                return None
            run.examples += 1
            if outcome is None:
                return None
            run.first_failure_at = time.perf_counter()
        elif key in run.failures:  # hypothesis replays a failure it saw
            return run.failures[key]
        elif time.perf_counter() - run.first_failure_at > shrink_budget:
            return None  # out of shrinking time: keep the smallest failure found so far
        else:  # shrinking
            outcome = _attempt(module, fn, case, dtype)
            if not isinstance(outcome, Failure):
                return None
        run.failures[key] = run.last = outcome
        return outcome

    def body(case: Case) -> None:
        failure = step(case)
        if failure is not None:  # one raise site: hypothesis tells failures apart by it
            raise _Found(failure)

    explore = settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        verbosity=Verbosity.quiet,
        phases=(Phase.explicit, Phase.generate, Phase.shrink),
        report_multiple_bugs=False,
        print_blob=False,
    )(given(spec.cases())(body))
    if seed is not None:
        explore = hypothesis_seed(seed)(explore)
    failure = None
    try:
        explore()
    except _Found as found:
        failure = found.failure
    except Exception as exc:  # hypothesis gave up (e.g. a flaky failure): report what we saw
        if run.last is None:
            raise
        message = f"{run.last.message} (then hypothesis raised {type(exc).__name__})"
        failure = Failure(run.last.kind, message, run.last.case, dtype)
    seen = run.examples + run.declined
    advance(max(0, max_examples - seen))
    if failure is not None:
        status = "failed"
    else:
        status = "passed" if run.examples else "declined"
    note = f"time budget of {time_budget:g}s reached" if run.out_of_time else ""
    return OpResult(
        op,
        dtype,
        status,
        examples=run.examples,
        declined=run.declined,
        seconds=time.perf_counter() - start,
        failure=failure,
        decline_reasons=run.reasons,
        note=note,
    )


# --------------------------------------------------------------------------- the check


def check_backend(
    backend: str | ModuleType,
    ops: Iterable[str] | None = None,
    *,
    max_examples: int = 50,
    dtypes: Sequence[str] = DTYPES,
    progress: bool = False,
    seed: int | None = None,
    time_budget: float | None = None,
    shrink_budget: float = 30.0,
) -> Report:
    """Check a backend's ops against the float64 reference with hypothesis-drawn inputs.

    Args:
        backend: a backend name (built-in, entry point or dotted module path) or module.
        ops: the ops to check (default: every op qkv dispatches).
        max_examples: hypothesis examples per op and dtype.
        dtypes: the input dtypes to try, among float64, float32, float16 and bfloat16.
        progress: show a ``rich`` progress bar.
        seed: draw the examples of this seed, the same on every run (default: fresh ones).
        time_budget: stop drawing new examples for an (op, dtype) after this many seconds.
        shrink_budget: seconds spent shrinking a failure to a smaller reproducer.

    Returns:
        a :class:`Report`; ``report.ok`` says whether the backend conforms.

    Raises:
        UnknownBackend: ``backend`` names no backend.
        BackendUnavailable: the backend cannot run here (with the reason).
        ValueError: an unknown op or dtype.
    """
    module = _dispatch.resolve(backend)
    known = list(_dispatch.OPS)
    names = known if ops is None else list(dict.fromkeys(ops))
    unknown = [name for name in names if name not in _dispatch.OPS]
    if unknown:
        raise ValueError(f"ops: unknown {unknown}; qkv's ops are {', '.join(known)}")
    bad = [d for d in dtypes if d not in TOLERANCES]
    if bad or not dtypes:
        raise ValueError(f"dtypes: expected some of {', '.join(TOLERANCES)}, got {list(dtypes)}")
    drawable = [op for op in names if op in SPECS and SPECS[op].cases is not None]
    todo = [op for op in drawable if _dispatch.provides(module, op)]
    bar = None
    if progress:
        from rich.progress import Progress

        bar = Progress(transient=True)
        task = bar.add_task(f"checking {module.NAME}", total=len(todo) * len(dtypes) * max_examples)
        bar.start()

    def advance(n: int) -> None:
        if bar is not None:
            bar.advance(task, n)

    rows: list[OpResult] = []
    try:
        for op in names:
            if op not in drawable:
                rows.append(OpResult(op, None, "skipped", note="qkv.testing has no strategy"))
                continue
            if op not in todo:
                rows.append(OpResult(op, None, "not provided", note="falls back to reference"))
                continue
            for dtype in dtypes:
                if bar is not None:
                    bar.update(task, description=f"{module.NAME}: {op} {dtype}")
                if dtype == "bfloat16" and importlib.util.find_spec("torch") is None:
                    rows.append(OpResult(op, dtype, "skipped", note="bfloat16 inputs need torch"))
                    advance(max_examples)
                    continue
                rows.append(
                    _check_op(
                        module,
                        op,
                        dtype,
                        max_examples=max_examples,
                        seed=seed,
                        time_budget=time_budget,
                        shrink_budget=shrink_budget,
                        advance=advance,
                    )
                )
    finally:
        if bar is not None:
            bar.stop()
    return Report(module.NAME, rows)
