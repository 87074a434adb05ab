"""The pytest plugin of the conformance kit: ``pytest --qkv-backend=NAME``.

Installing qkv registers this plugin with pytest (entry point ``qkv`` in the ``pytest11``
group), so its options exist in every pytest run. To check a backend of your own, outside this
repository, with your module importable (installed, or its folder on ``PYTHONPATH``)::

    pytest -p qkv --qkv-backend=mypkg.backend --pyargs qkv.testing

That collects the kit's own test module and runs one test per (backend, op): the op's
conformance check in every dtype (see :func:`qkv.testing.check_backend`). An op the backend
does not provide, or a backend that cannot run on this machine, is skipped with the reason.
``-p qkv`` loads the plugin by its entry-point name and is only needed where plugin
auto-loading is off (``PYTEST_DISABLE_PLUGIN_AUTOLOAD=1``); do not pass
``-p qkv.testing.plugin`` as well as auto-loading, pytest would register it twice.

Options:
    ``--qkv-backend=NAME``: a backend name or dotted module path; repeat it or give a comma
        list to check several.
    ``--qkv-max-examples=N``: hypothesis examples per op and dtype (default 50).
    ``--qkv-dtypes=LIST``: comma list of input dtypes (default ``float32,float16,bfloat16``).
    ``--qkv-op=NAME``: only this op (repeatable, or a comma list).
    ``--qkv-seed=N``: the hypothesis seed (default 0).

The examples are drawn from a fixed seed (``--qkv-seed``, default 0): the same on every run, so
a CI failure reproduces locally; another seed explores other examples.

Any test module can use the same machinery: a test function taking the argument
``qkv_target`` is parametrized over (backend, op) pairs, from ``--qkv-backend`` when given,
else from the module's ``QKV_BACKENDS`` list; the module may also set ``QKV_MAX_EXAMPLES``,
``QKV_DTYPES`` and ``QKV_TIME_BUDGET`` (seconds of drawing, and of shrinking a failure, per op
and dtype). The body is one call::

    def test_conformance(qkv_target):
        qkv_target.check()

This module imports neither hypothesis nor any backend library until a check runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pytest

DEFAULT_MAX_EXAMPLES = 50
DEFAULT_DTYPES = ("float32", "float16", "bfloat16")


def _split(values: Sequence[str] | None) -> list[str]:
    """Repeated and comma-separated option values, flattened, in order, without repeats."""
    items = [part.strip() for value in values or () for part in value.split(",")]
    return list(dict.fromkeys(item for item in items if item))


def pytest_addoption(parser: pytest.Parser) -> None:
    """Register the ``--qkv-*`` options."""
    group = parser.getgroup("qkv", "qkv conformance kit")
    group.addoption(
        "--qkv-backend",
        action="append",
        default=None,
        metavar="NAME",
        help="check this qkv backend (name or dotted module path); repeatable or comma list",
    )
    group.addoption(
        "--qkv-max-examples",
        type=int,
        default=None,
        metavar="N",
        help=f"hypothesis examples per op and dtype (default {DEFAULT_MAX_EXAMPLES})",
    )
    group.addoption(
        "--qkv-dtypes",
        default=None,
        metavar="LIST",
        help=f"comma list of input dtypes (default {','.join(DEFAULT_DTYPES)})",
    )
    group.addoption(
        "--qkv-seed",
        type=int,
        default=0,
        metavar="N",
        help="hypothesis seed of the drawn examples (default 0)",
    )
    group.addoption(
        "--qkv-op",
        action="append",
        default=None,
        metavar="NAME",
        help="only check this op; repeatable or comma list",
    )


def pytest_configure(config: pytest.Config) -> None:
    """Fail at once, listing the known names, on a ``--qkv-*`` value that names nothing."""
    backends = _split(config.getoption("qkv_backend", None))
    ops = _split(config.getoption("qkv_op", None))
    dtypes = _split([config.getoption("qkv_dtypes", None) or ""])
    if not (backends or ops or dtypes):
        return
    from qkv import _dispatch  # importing qkv registers the dispatched ops
    from qkv.errors import UnknownBackend
    from qkv.testing.tolerances import TOLERANCES

    for name in backends:
        try:
            _dispatch.load(name)
        except UnknownBackend as exc:
            raise pytest.UsageError(f"--qkv-backend: {exc}") from exc
    for given, known, option in (
        (ops, _dispatch.OPS, "--qkv-op"),
        (dtypes, TOLERANCES, "--qkv-dtypes"),
    ):
        unknown = [value for value in given if value not in known]
        if unknown:
            raise pytest.UsageError(
                f"{option}: unknown {', '.join(unknown)}; expected some of {', '.join(known)}"
            )


@dataclass(frozen=True)
class Target:
    """One conformance test: an op of a backend, with the run's settings."""

    backend: str
    op: str
    max_examples: int
    dtypes: tuple[str, ...]
    seed: int = 0
    time_budget: float | None = None

    def check(self) -> None:
        """Run the check: skip if the backend cannot run here or lacks the op, else assert."""
        from qkv.errors import BackendUnavailable
        from qkv.testing.check import check_backend

        try:
            report = check_backend(
                self.backend,
                ops=[self.op],
                max_examples=self.max_examples,
                dtypes=self.dtypes,
                seed=self.seed,
                time_budget=self.time_budget,
                shrink_budget=self.time_budget or 30.0,
            )
        except BackendUnavailable as exc:
            pytest.skip(str(exc))
        if all(row.status in ("not provided", "skipped") for row in report.rows):
            pytest.skip(f"backend {self.backend!r}: {self.op} {report.rows[0].status}")
        if not report.ok:
            pytest.fail(report.text(), pytrace=False)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize ``qkv_target`` over (backend, op) pairs."""
    if "qkv_target" not in metafunc.fixturenames:
        return
    config = metafunc.config
    module = metafunc.module
    backends = _split(config.getoption("qkv_backend", None)) or list(
        getattr(module, "QKV_BACKENDS", ())
    )
    if not backends:
        metafunc.parametrize(
            "qkv_target",
            [pytest.param(None, marks=pytest.mark.skip(reason="no --qkv-backend=NAME given"))],
            ids=["no-backend"],
        )
        return
    from qkv import _dispatch
    from qkv.testing.specs import SPECS

    drawable = [op for op in _dispatch.OPS if op in SPECS and SPECS[op].cases is not None]
    ops = _split(config.getoption("qkv_op", None)) or drawable
    max_examples = config.getoption("qkv_max_examples", None) or getattr(
        module, "QKV_MAX_EXAMPLES", DEFAULT_MAX_EXAMPLES
    )
    dtypes = tuple(_split([config.getoption("qkv_dtypes", None) or ""])) or tuple(
        getattr(module, "QKV_DTYPES", DEFAULT_DTYPES)
    )
    budget = getattr(module, "QKV_TIME_BUDGET", None)
    seed = config.getoption("qkv_seed", 0)
    targets = [
        Target(backend, op, max_examples, dtypes, seed, budget)
        for backend in backends
        for op in ops
    ]
    metafunc.parametrize("qkv_target", targets, ids=[f"{t.backend}-{t.op}" for t in targets])
