"""Run the tutorials: ``tutorials/<family>/<id>.py`` -> ``docs/tutorials/<family>/<id>.ipynb``.

Each tutorial is a jupytext percent-format script. Running one means: read it as a notebook,
execute every cell in a fresh kernel of *this* Python (the one running the tests or the docs
build, never whatever ``python3`` kernel a system Jupyter would pick), and store the notebook
with its outputs where the docs site picks it up. The kernel gets ``QKV_TUTORIAL_SMALL=1`` so
that tutorials can shrink their sizes; the code path stays the same.

Two callers share this module:

* the test suite (``tests/test_tutorials.py`` and ``tests/test_docs.py``), through
  :func:`run_once`: each tutorial runs at most once per process, whichever test asks first;
* the docs hook (``docs/hooks.py``), through :func:`ensure`: ``make docs`` on its own runs the
  tutorials whose stored notebook is missing or was made from a different source.

A stored notebook records the SHA-256 of the source it was executed from (notebook metadata
``qkv.source_sha256``), so "up to date" means "made from exactly this text".
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ROOT / "tutorials"
EXECUTED = ROOT / "docs" / "tutorials"

#: Seconds one cell may run before the execution is abandoned.
CELL_TIMEOUT = 600


def sources() -> list[Path]:
    """Every tutorial script, ``tutorials/<family>/<id>.py``, in a stable order."""
    return sorted(p for p in SOURCES.glob("*/*.py") if not p.name.startswith("_"))


def target(source: Path) -> Path:
    """Where the executed notebook of ``source`` is stored."""
    return EXECUTED / source.parent.name / f"{source.stem}.ipynb"


def key(source: Path) -> str:
    """``family/id`` of a tutorial: its test id and its place in the docs."""
    return f"{source.parent.name}/{source.stem}"


def digest(source: Path) -> str:
    return hashlib.sha256(source.read_bytes()).hexdigest()


def is_current(source: Path) -> bool:
    """Whether the stored notebook exists and was executed from this exact source."""
    import nbformat

    path = target(source)
    if not path.exists():
        return False
    try:
        nb = nbformat.read(path, as_version=4)
    except Exception:  # a truncated or foreign file: run again
        return False
    return nb.metadata.get("qkv", {}).get("source_sha256") == digest(source)


def _kernel_manager():
    """An async kernel manager whose kernel is ``sys.executable -m ipykernel_launcher``.

    The kernel talks to us over local TCP; where ZeroMQ has CurveZMQ (the usual pyzmq wheels
    do) the channel is encrypted, which also keeps the kernel from warning about it.
    """
    import zmq
    from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager

    curve = bool(zmq.has("curve"))

    class ThisPython(KernelSpecManager):
        def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
            return KernelSpec(
                argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                display_name=f"Python {sys.version_info.major}.{sys.version_info.minor} (qkv)",
                language="python",
                resource_dir="",
                metadata={"supported_encryption": ["curve"]} if curve else {},
            )

    return AsyncKernelManager(
        kernel_name="python3",
        kernel_spec_manager=ThisPython(),
        transport_encryption="auto" if curve else "disabled",
    )


def kernel_env() -> dict[str, str]:
    """The environment a tutorial runs in: ours, small sizes, and no Triton interpreter.

    The test suite switches the Triton interpreter on for its own kernel tests; a reader runs
    tutorials without it, so the tutorial does too (and its timings mean what they say).
    """
    env = dict(os.environ)
    env["QKV_TUTORIAL_SMALL"] = "1"
    env.pop("TRITON_INTERPRET", None)
    env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"  # figures into the notebook
    env["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"  # a debugger warning on stderr, not our concern
    return env


@dataclass
class Run:
    """One execution of one tutorial."""

    source: Path
    seconds: float
    error: BaseException | None = None

    def check(self) -> None:
        """Raise the tutorial's error, if it had one."""
        if self.error is not None:
            raise RuntimeError(
                f"tutorial {key(self.source)} failed after {self.seconds:.1f} s:\n{self.error}"
            ) from self.error


def execute(source: Path) -> Run:
    """Execute ``source`` top to bottom and store the notebook; never raises for the tutorial.

    On failure the stored notebook is removed, so that stale outputs never stand in for a
    tutorial that no longer runs; the error is in the returned :class:`Run`.
    """
    import jupytext
    import nbformat
    from nbclient import NotebookClient

    nb = jupytext.read(source, fmt="py:percent")
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    path = target(source)
    start = time.perf_counter()
    client = NotebookClient(
        nb,
        km=_kernel_manager(),
        timeout=CELL_TIMEOUT,
        allow_errors=False,
        resources={"metadata": {"path": str(source.parent)}},
    )
    try:
        client.execute(env=kernel_env(), cleanup_kc=True)  # shut the kernel down after
    except BaseException as exc:  # CellExecutionError, a timeout, a dead kernel
        path.unlink(missing_ok=True)
        return Run(source, time.perf_counter() - start, exc)
    seconds = time.perf_counter() - start
    nb.metadata["qkv"] = {
        "source": str(source.relative_to(ROOT)),
        "source_sha256": digest(source),
        "seconds": round(seconds, 2),
        "small": True,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".ipynb.tmp")
    nbformat.write(nb, tmp)
    tmp.replace(path)  # whole notebooks only: a reader never sees a half-written file
    return Run(source, seconds)


_runs: dict[Path, Run] = {}


def run_once(source: Path) -> Run:
    """Execute ``source`` unless it already ran in this process; the run either way."""
    source = source.resolve()
    if source not in _runs:
        _runs[source] = execute(source)
    return _runs[source]


def ensure(source: Path, log=print) -> Run | None:
    """Execute ``source`` if its stored notebook is missing or stale; ``None`` if it was fine."""
    if is_current(source):
        return None
    log(f"qkv docs: executing {key(source)} (no up-to-date notebook in docs/tutorials)")
    return run_once(source)
