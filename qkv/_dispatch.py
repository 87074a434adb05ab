"""Backend registry and dispatch.

A *backend* is a module exposing some of qkv's ops under the reference's names and signatures,
plus ``NAME``, ``available() -> (bool, reason)``, ``asarray(x)`` (any supported array to the
backend's own type) and ``to_numpy(x)``. The backend an op runs on is, first match wins:

1. the per-call ``backend=`` keyword (a name or a module);
2. the innermost ``with qkv.use_backend(...)`` block;
3. the ``QKV_BACKEND`` environment variable, read at each call;
4. ``"reference"``.

Names are the built-ins below, names registered in the ``qkv.backends`` entry-point group, or an
importable module path such as ``mypkg.qkv_backend``. The caller gets back the array type it passed in (the type of the first
array argument). An op the backend lacks, or inputs it declines by raising ``Unsupported``,
run on the reference with one ``FallbackWarning`` per (backend, op); ``QKV_STRICT=1`` turns
that into ``MissingOp``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import inspect
import os
import warnings
from collections.abc import Callable, Iterator
from importlib import metadata
from types import ModuleType
from typing import Any

from qkv import _arrays
from qkv.errors import BackendUnavailable, FallbackWarning, MissingOp, UnknownBackend, Unsupported

BUILTIN: dict[str, str] = {
    "reference": "qkv.backends.reference",
    "numba": "qkv.backends.numba",
    "torch": "qkv.backends.torch",
    "cupy": "qkv.backends.cupy",
}
ENTRY_POINT_GROUP = "qkv.backends"
PROTOCOL = ("NAME", "available", "asarray", "to_numpy")

#: Every dispatched op: name -> reference function. Filled by :func:`op`.
OPS: dict[str, Callable[..., Any]] = {}

_context: contextvars.ContextVar[ModuleType | None] = contextvars.ContextVar(
    "qkv_backend", default=None
)
_warned: set[tuple[str, str]] = set()
_availability: dict[str, tuple[bool, str]] = {}
_builtin_loaded: dict[str, ModuleType] = {}  # built-in name -> its module, once loaded


# --------------------------------------------------------------------------- registry


def _entry_points() -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def known_backends() -> list[str]:
    """Built-in names, then names registered through the ``qkv.backends`` entry points."""
    return list(BUILTIN) + sorted(set(_entry_points()) - set(BUILTIN))


def load(backend: str | ModuleType) -> ModuleType:
    """The backend module for a name, an entry-point name, a dotted path, or a module.

    Raises ``UnknownBackend`` (listing the known names) for anything else. Does not check that
    the backend can run here; :func:`resolve` does. A built-in name, once loaded, is looked up
    in a dict afterwards (a small decode call notices the microseconds of an import lookup).
    """
    if isinstance(backend, str) and backend in _builtin_loaded:
        return _builtin_loaded[backend]
    if isinstance(backend, ModuleType):
        module = backend
    elif not isinstance(backend, str) or not backend:
        raise UnknownBackend(
            f"backend: expected a backend name or module, got {backend!r}; "
            f"known names: {', '.join(known_backends())}"
        )
    elif backend in BUILTIN:
        module = importlib.import_module(BUILTIN[backend])
    elif backend in (eps := _entry_points()):
        module = eps[backend].load()
    else:
        try:
            module = importlib.import_module(backend)
        except ImportError as exc:
            raise UnknownBackend(
                f"backend: unknown name {backend!r} (not a built-in, not registered in the "
                f"{ENTRY_POINT_GROUP!r} entry points, and not an importable module: {exc}); "
                f"known names: {', '.join(known_backends())}"
            ) from exc
    missing = [attr for attr in PROTOCOL if not hasattr(module, attr)]
    if missing:
        raise UnknownBackend(
            f"backend: module {module.__name__!r} is not a qkv backend; "
            f"it lacks {', '.join(missing)} (see 'Writing and checking a backend' in the docs)"
        )
    if isinstance(backend, str) and backend in BUILTIN:
        _builtin_loaded[backend] = module
    return module


def availability(module: ModuleType) -> tuple[bool, str]:
    """``module.available()``, asked once per process (probing a GPU can be slow)."""
    key = module.__name__
    if key not in _availability:
        ok, reason = module.available()
        _availability[key] = (bool(ok), str(reason))
    return _availability[key]


def require(module: ModuleType) -> ModuleType:
    ok, reason = availability(module)
    if not ok:
        raise BackendUnavailable(f"backend {module.NAME!r} cannot run here: {reason}")
    return module


def resolve(backend: str | ModuleType | None = None) -> ModuleType:
    """The backend module an op would run on now, checked to be able to run here."""
    if backend is not None:
        return require(load(backend))
    active = _context.get()
    if active is not None:
        return active
    return require(load(os.environ.get("QKV_BACKEND", "").strip() or "reference"))


def current_backend() -> str:
    """The name of the backend that ops run on in this context."""
    return resolve().NAME


@contextlib.contextmanager
def use_backend(backend: str | ModuleType) -> Iterator[ModuleType]:
    """Run qkv ops on ``backend`` inside a ``with`` block (checked at once, on entry)."""
    token = _context.set(resolve(backend))
    try:
        yield _context.get()
    finally:
        _context.reset(token)


def implementation(module: ModuleType, name: str) -> Callable[..., Any] | None:
    """The function ``module`` implements op ``name`` with, or ``None`` (no fallback here)."""
    if module.NAME == "reference":
        return OPS.get(name)
    fn = getattr(module, name, None)
    return fn if callable(fn) else None


def provides(module: ModuleType, name: str) -> bool:
    """Whether ``module`` implements op ``name`` itself (the reference provides every op)."""
    return implementation(module, name) is not None


def reset_warnings() -> None:
    """Forget which fallbacks were warned about (for tests)."""
    _warned.clear()


# --------------------------------------------------------------------------- calling


def _convert(value: Any, to: Callable[[Any], Any]) -> Any:
    """Arrays (also inside tuples and keyword dicts) converted by ``to``; the rest as is."""
    if _arrays.is_array(value):
        return to(value)
    if isinstance(value, dict):
        return {key: _convert(v, to) for key, v in value.items()}
    if isinstance(value, tuple) and any(_arrays.is_array(v) for v in value):
        return tuple(_convert(v, to) for v in value)
    return value


def _restore(value: Any, module: ModuleType, like: Any) -> Any:
    """Give ``value`` the array type of ``like`` (the caller's first array argument)."""
    if isinstance(value, tuple):
        return tuple(_restore(v, module, like) for v in value)
    if not _arrays.is_array(value) or like is None or _arrays.kind(value) == _arrays.kind(like):
        return value
    return _arrays.from_numpy(module.to_numpy(value), like)


def _fallback(module: ModuleType, name: str, reason: str) -> None:
    message = f"backend {module.NAME!r} {reason}; running the NumPy reference"
    if os.environ.get("QKV_STRICT", "") not in ("", "0"):
        raise MissingOp(f"{message} is not allowed with QKV_STRICT=1")
    if (module.NAME, name) not in _warned:
        _warned.add((module.NAME, name))
        warnings.warn(message, FallbackWarning, stacklevel=4)


def call(name: str, args: tuple, kwargs: dict, backend: str | ModuleType | None) -> Any:
    """Run op ``name`` on the resolved backend, converting arrays in and out."""
    module = resolve(backend)
    like = next((a for a in (*args, *kwargs.values()) if _arrays.is_array(a)), None)
    fn = implementation(module, name)
    if fn is None:
        _fallback(module, name, f"does not implement op {name!r}")
    else:
        try:
            out = fn(*_convert(args, module.asarray), **_convert(kwargs, module.asarray))
        except Unsupported as why:
            _fallback(module, name, f"does not support these inputs to op {name!r} ({why})")
        else:
            return _restore(out, module, like)
    reference = importlib.import_module(BUILTIN["reference"])
    out = OPS[name](*_convert(args, reference.asarray), **_convert(kwargs, reference.asarray))
    return _restore(out, reference, like)


def op(
    reference_fn: Callable[..., Any], check: Callable[..., Any] | None = None
) -> Callable[..., Any]:
    """Register ``reference_fn`` as a dispatched op and return its public, dispatching form.

    The public form has the reference's signature and docstring plus a keyword ``backend=``.
    ``check`` (same arguments as the op) runs on the caller's arrays before any backend sees
    them, so every backend gets the reference's errors and only well-formed inputs.
    """
    name = reference_fn.__name__
    OPS[name] = reference_fn

    @functools.wraps(reference_fn)
    def dispatched(*args: Any, backend: str | ModuleType | None = None, **kwargs: Any) -> Any:
        if check is not None:
            check(*args, **kwargs)
        return call(name, args, kwargs, backend)

    signature = inspect.signature(reference_fn)
    backend_param = inspect.Parameter(
        "backend", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="str | None"
    )
    params = list(signature.parameters.values())
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        params.insert(len(params) - 1, backend_param)
    else:
        params.append(backend_param)
    dispatched.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    del dispatched.__wrapped__
    return dispatched
