"""``qkv tour``: every implemented mechanism, on real MiniLM data, through every backend.

Each implemented catalog mechanism that has a *tour case* (a dispatched op and a way to build
its inputs from the embedded MiniLM capture, see :func:`tour_case`) runs through every backend
that can run here. Each run is compared with the NumPy reference evaluated in float64 on the
same inputs and timed against the reference in float32. A backend that lacks the op, or
declines the inputs, falls back to the reference with a ``FallbackWarning``: the tour shows
such a run as ``fallback`` and does not time it as if the backend had done the work.

Errors are reported two ways, both relative to the float64 result ``R`` of the same case:
norm-wise ``||Y - R||_F / ||R||_F`` and elementwise relative to the output's scale
``max|Y - R| / max|R|``. Both must stay within :data:`TOUR_RTOL_FP32`.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from types import ModuleType
from typing import Any, Literal

import numpy as np

import qkv
from qkv import _dispatch, catalog
from qkv.errors import FallbackWarning
from qkv.lab.minilm import MiniLMCapture, load
from qkv.reference import core
from qkv.reference.forms import agent_attention, selective_attention
from qkv.reference.heads import grouped_query, relative_conv
from qkv.reference.kv import quantization
from qkv.reference.recsys import sdim_hashing
from qkv.reference.retrieval import leanvec_projection

TOUR_RTOL_FP32 = 1e-4
"""Largest relative error a float32 run may show in the tour, norm-wise and elementwise.

Measured against the float64 reference on the same inputs. The attention of a real encoder
at this size (softmax rows over a few hundred keys, head dim 32) rounds to about ``1e-7``
relative in float32; ``1e-4`` leaves room for any summation order and flags a real bug (a wrong
mask, scale or head) by orders of magnitude.
"""

TIMING_REPEATS = 5
"""Timed runs per (case, backend) at most, after one untimed warm-up (which compiles)."""

TIMING_BUDGET_S = 1.0
"""Stop timing a (case, backend) once its timed runs have taken this many seconds."""

Status = Literal["ok", "mismatch", "error", "fallback"]
Inputs = tuple[tuple[Any, ...], dict[str, Any]]


@dataclass(frozen=True)
class TourCase:
    """One tour run: dispatched op ``op`` on inputs built from the MiniLM capture.

    ``inputs(data, dtype)`` returns the positional and keyword arguments of the op, with every
    floating array in ``dtype`` (the tour calls it with float32 for the backends and float64
    for the reference result they are compared with).
    """

    mechanism: str
    label: str
    op: str
    inputs: Callable[[MiniLMCapture, type[np.floating]], Inputs]


#: Tour cases by mechanism id, in registration order.
CASES: dict[str, list[TourCase]] = {}


def tour_case(
    mechanism: str, label: str, *, op: str | None = None
) -> Callable[[Callable[[MiniLMCapture, type[np.floating]], Inputs]], TourCase]:
    """Register the decorated input builder as a tour case of ``mechanism``.

    ``op`` is the dispatched op to run (default: the mechanism id). The builder takes the
    capture and a float dtype and returns ``(args, kwargs)`` for the op.
    """

    def register(inputs: Callable[[MiniLMCapture, type[np.floating]], Inputs]) -> TourCase:
        case = TourCase(mechanism, label, op or mechanism, inputs)
        CASES.setdefault(mechanism, []).append(case)
        return case

    return register


def _qkv(data: MiniLMCapture, dtype: type[np.floating]) -> tuple[np.ndarray, ...]:
    """All six layers as a batch: ``q, k, v`` each ``(B, H, N, D) = (6, 12, N, 32)``."""
    return data.q.astype(dtype), data.k.astype(dtype), data.v.astype(dtype)


@tour_case("sdpa", "full")
def _sdpa(data: MiniLMCapture, dtype: type[np.floating]) -> Inputs:
    """Bidirectional attention, as the encoder computes it."""
    return _qkv(data, dtype), {}


@tour_case("sdpa", "causal")
def _sdpa_causal(data: MiniLMCapture, dtype: type[np.floating]) -> Inputs:
    """The same scores with the causal mask of a decoder."""
    return _qkv(data, dtype), {"causal": True}


@tour_case("flash", "full")
def _flash(data: MiniLMCapture, dtype: type[np.floating]) -> Inputs:
    """Bidirectional attention, tile by tile."""
    return _qkv(data, dtype), {}


@tour_case("flash", "causal")
def _flash_causal(data: MiniLMCapture, dtype: type[np.floating]) -> Inputs:
    """Causal attention, tile by tile (key tiles above the diagonal are skipped)."""
    return _qkv(data, dtype), {"causal": True}


@tour_case("rope", "queries")
def _rope(data: MiniLMCapture, dtype: type[np.floating]) -> Inputs:
    """The captured queries rotated at their positions ``0 .. N-1``."""
    return (data.q.astype(dtype),), {"positions": np.arange(data.n_tokens)}


@tour_case("alibi", "as mask", op="sdpa")
def _alibi(data: MiniLMCapture, dtype: type[np.floating]) -> Inputs:
    """Causal attention with ALiBi's biases (the paper's decoder form) as the additive mask."""
    bias = qkv.alibi(data.n_heads, data.n_tokens, data.n_tokens, dtype=dtype)  # (H, N, N)
    return _qkv(data, dtype), {"mask": bias, "causal": True}


@tour_case("sigmoid", "full")
def _sigmoid(data: MiniLMCapture, dtype: type[np.floating]) -> Inputs:
    """Sigmoid attention with the default bias -log N on the encoder's scores."""
    return _qkv(data, dtype), {}


@tour_case("sigmoid", "alibi")
def _sigmoid_causal_alibi(data: MiniLMCapture, dtype: type[np.floating]) -> Inputs:
    """Causal sigmoid attention with ALiBi biases, FlashSigmoid's decoder setting."""
    return _qkv(data, dtype), {"causal": True, "alibi": True}


@tour_case("agent", "hop 1", op="sdpa")
def _agent_aggregate(data: MiniLMCapture, dtype: type[np.floating]) -> Inputs:
    """Hop 1 of agent attention: 16 agents pooled from the queries read every key and value."""
    q, k, v = _qkv(data, dtype)
    return (agent_attention.agent_tokens(q, 16).astype(dtype), k, v), {}


@tour_case("agent", "hop 2", op="sdpa")
def _agent_broadcast(data: MiniLMCapture, dtype: type[np.floating]) -> Inputs:
    """Hop 2 of agent attention: every query reads the 16 agents' aggregates."""
    q, k, v = _qkv(data, dtype)
    agents = agent_attention.agent_tokens(q, 16).astype(dtype)  # (6, 12, 16, 32)
    return (q, agents, core.sdpa(agents, k, v)), {}


@tour_case("selective", "beta 0", op="sdpa")
def _selective(data: MiniLMCapture, dtype: type[np.floating]) -> Inputs:
    """Selective attention's position temperature as one causal sdpa on tempered queries."""
    q, k, v = _qkv(data, dtype)
    t = selective_attention.position_temperature(np.arange(1, data.n_tokens + 1), 0.0)  # (N,)
    return (q * t[:, None].astype(dtype), k, v), {"causal": True}


@tour_case("gaussian", "values")
def _gaussian(data: MiniLMCapture, dtype: type[np.floating]) -> Inputs:
    """GAAM along the head features of the captured values: 4 heads of 3 Gaussians."""
    offsets = np.repeat(np.array([[0.0], [1.0], [-1.0], [2.0]]), 3, axis=1).astype(dtype)
    scales = np.full((4, 3), 1.5, dtype=dtype)
    return (data.v.astype(dtype), offsets, scales), {"axis": -1}


@tour_case("tensor", "64 tokens")
def _tensor(data: MiniLMCapture, dtype: type[np.floating]) -> Inputs:
    """Triple-wise attention over the first 64 tokens of layer 0: key pairs from the captured
    keys (K1 = K2), value pairs from the captured values (V1 = V2); queries and keys normalised
    to unit length, so every score lies within +-1 before ``scale``."""

    def unit(x: np.ndarray) -> np.ndarray:
        x = x[:1, :, :64].astype(np.float64)  # (1, 12, 64, 32)
        return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(dtype)

    q, k, v = unit(data.q), unit(data.k), data.v[:1, :, :64].astype(dtype)
    return (q, k, k, v, v), {"scale": 8.0}


@tour_case("gqa", "G = 4", op="sdpa")
def _gqa(data: MiniLMCapture, dtype: type[np.floating]) -> Inputs:
    """The 12 heads converted to 4 KV groups by mean-pooling keys and values (no uptraining)."""
    q, k, v = _qkv(data, dtype)
    pooled = (grouped_query.pool_heads(x, 4).astype(dtype) for x in (k, v))  # (6, 4, N, 32)
    return (q, *pooled), {}


@tour_case("rcmha", "conv + R", op="relative_attention")
def _rcmha(data: MiniLMCapture, dtype: type[np.floating]) -> Inputs:
    """RCMHA's fused op on the captured heads: identity-plus-neighbour depth-wise kernels on
    Q, K and V, sinusoidal relative keys, a content bias and a distance penalty; causal."""
    q, k, v = _qkv(data, dtype)
    n, d, heads = data.n_tokens, q.shape[-1], data.n_heads
    r = np.broadcast_to(0.5 * relative_conv.sinusoids(n, d), (heads, n, d))  # (H, N, D)
    u = np.full((heads, d), 0.1)  # (H, D)
    b = -0.05 * np.arange(n) * np.ones((heads, 1))  # (H, N): a linear distance penalty
    kernel = relative_conv.identity_kernel(d) + 0.25  # (D, 3): each token mixes in its past
    tables = (x.astype(dtype) for x in (r, u, b))
    conv = {f"conv_{x}": kernel.astype(dtype) for x in "qkv"}
    return (q, k, v, *tables), conv


@tour_case("neighborhood", "window 13", op="neighborhood")
def _neighborhood(data: MiniLMCapture, dtype: type[np.floating]) -> Inputs:
    """1-D neighborhood attention over the token axis: each token sees its 13 neighbours."""
    return _qkv(data, dtype), {"kernel_size": 13}


@tour_case("neighborhood", "causal 13", op="neighborhood")
def _neighborhood_causal(data: MiniLMCapture, dtype: type[np.floating]) -> Inputs:
    """The causal form: each token sees itself and the 12 tokens before it."""
    return _qkv(data, dtype), {"kernel_size": 13, "causal": True}


@tour_case("sparse_attention", "top 32")
def _sparse_attention(data: MiniLMCapture, dtype: type[np.floating]) -> Inputs:
    """Every query row reads only the 32 keys it scores highest (per head, ties to the lower
    position), the selection a decode-time sparse method hands to the shared op."""
    q, k, v = _qkv(data, dtype)
    scores = np.einsum("bhnd,bhmd->bhnm", q.astype(np.float64), k)  # (6, 12, N, N)
    top = np.argsort(-scores, axis=-1, kind="stable")[..., :32]  # (6, 12, N, 32)
    return (q, k, v, top), {}


@tour_case("sdim", "16 hashes")
def _sdim(data: MiniLMCapture, dtype: type[np.floating]) -> Inputs:
    """Layer 0's queries as candidates, its keys as one user's behaviours (head features as
    the embedding), 16 hashes of 4 bits, seeded hyperplanes."""
    targets = data.q[0].astype(dtype)  # (12, N, 32): a batch of 12 users, one per head
    behaviours = data.k[0].astype(dtype)  # (12, N, 32)
    planes = sdim_hashing.random_planes(targets.shape[-1], 16, 4, rng=0)  # (32, 16, 4)
    return (targets, behaviours, planes), {}


@tour_case("zipcache", "4-bit first half", op="mixed_attention")
def _mixed_attention(data: MiniLMCapture, dtype: type[np.floating]) -> Inputs:
    """The last token's query of every layer over a cache whose first half is held as 4-bit
    codes (keys per channel, values per token) and the rest as floats. The codes are made
    once from float64, so every dtype reads the same cache."""
    q, k, v = _qkv(data, np.float64)
    half = k.shape[2] // 2
    k_codes, k_scale, k_zero = quantization.quantize(k[:, :, :half], bits=4, axis="channel")
    v_codes, v_scale, v_zero = quantization.quantize(v[:, :, :half], bits=4, axis="token")
    floats = (q[:, :, -1:], k[:, :, half:], v[:, :, half:])  # (6, 12, 1 | N - half, 32)
    codes = (k_codes, k_scale, k_zero, v_codes, v_scale, v_zero)
    args = [x.astype(dtype) if x.dtype == np.float64 else x for x in (*floats, *codes)]
    return tuple(args), {"bits": 4}


@tour_case("leanvec", "8-bit codes", op="lvq_dot")
def _lvq_dot(data: MiniLMCapture, dtype: type[np.floating]) -> Inputs:
    """Layer 5's queries (all heads' tokens as rows) against its keys stored as 8-bit codes
    with a step and an offset per vector, LeanVec's first-stage scan."""
    queries = data.q[5].reshape(-1, data.head_dim).astype(np.float64)  # (12 N, 32)
    keys = data.k[5].reshape(-1, data.head_dim).astype(np.float64)  # (12 N, 32)
    codes, scales, offsets = leanvec_projection.lvq_encode(keys)
    return (queries.astype(dtype), codes, scales.astype(dtype), offsets.astype(dtype)), {}


@dataclass(frozen=True)
class TourRow:
    """The outcome of one case on one backend.

    ``err_norm`` is ``||Y - R||_F / ||R||_F`` and ``err_max`` is ``max|Y - R| / max|R|``
    against the float64 reference ``R``; ``seconds`` is the best timed run (``None`` for a
    fallback or an error) and ``speedup`` the reference's time over this one.
    """

    mechanism: str
    case: str
    backend: str
    status: Status
    err_norm: float | None = None
    err_max: float | None = None
    seconds: float | None = None
    speedup: float | None = None
    note: str = ""


@dataclass(frozen=True)
class TourResult:
    """All rows of a tour, the backends it skipped (name -> reason) and untoured mechanisms."""

    rows: list[TourRow]
    skipped: dict[str, str] = field(default_factory=dict)
    untoured: tuple[str, ...] = ()
    data: str = ""
    tolerance: float = TOUR_RTOL_FP32

    @property
    def ok(self) -> bool:
        """True when no run mismatched or failed (fallbacks are fine: they are the reference)."""
        return all(row.status in ("ok", "fallback") for row in self.rows)

    def table(self) -> Any:
        """The rows as a ``rich.table.Table``; notes, skipped backends and untoured ids below."""
        from rich import box
        from rich.table import Table

        table = Table(
            box=box.SIMPLE_HEAD,
            pad_edge=False,
            title="qkv tour: real MiniLM queries, keys and values",
            title_justify="left",
            caption=self._caption(),
            caption_justify="left",
        )
        table.add_column("mechanism")  # the one column that wraps on a narrow terminal
        for name in ("backend", "status"):
            table.add_column(name, no_wrap=True)
        for name in ("err norm", "err max", "time", "vs ref"):
            table.add_column(name, justify="right", no_wrap=True)
        colours = {"ok": "green", "fallback": "yellow", "mismatch": "red", "error": "red"}
        for row in self.rows:
            status = f"[{colours[row.status]}]{row.status}"
            table.add_row(
                f"{row.mechanism} [dim]{row.case}",
                row.backend,
                status,
                _number(row.err_norm, "{:.1e}"),
                _number(row.err_max, "{:.1e}"),
                _duration(row.seconds),
                _number(row.speedup, "{:.2f}x"),
            )
        return table

    def _caption(self) -> str:
        lines = [
            f"Data: {self.data}." if self.data else "",
            "Inputs float32; errors against the NumPy reference in float64 R: "
            "err norm = ||Y-R|| / ||R||, err max = max|Y-R| / max|R|; "
            f"tolerance {self.tolerance:g} for both. Time: best of up to {TIMING_REPEATS} runs "
            "after a warm-up; vs ref: speed-up over the reference in float32.",
        ]
        notes = dict.fromkeys(
            f"{row.backend} {row.status} on {row.mechanism}/{row.case}: {row.note}"
            if row.status != "fallback"
            else f"{row.backend} falls back: {row.note}"
            for row in self.rows
            if row.note
        )
        lines += notes
        lines += [f"skipped {name}: {reason}" for name, reason in self.skipped.items()]
        if self.untoured:
            lines.append(f"no tour case yet: {', '.join(self.untoured)}")
        from rich.markup import escape  # reasons hold text like "pip install 'qkv[cupy]'"

        return "\n".join(escape(line) for line in lines if line)


def _number(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1e3:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"


def relative_errors(out: np.ndarray, golden: np.ndarray) -> tuple[float, float]:
    """``(||out - golden||_F / ||golden||_F, max|out - golden| / max|golden|)`` in float64.

    Any shapes, equal between the two. A NaN anywhere makes both NaN. An all-zero ``golden``
    measures absolute error instead.
    """
    diff = out.astype(np.float64) - golden  # same shape as golden
    norm = float(np.linalg.norm(golden)) or 1.0
    scale = float(np.abs(golden).max(initial=0.0)) or 1.0
    return float(np.linalg.norm(diff)) / norm, float(np.abs(diff).max(initial=0.0)) / scale


def _best_time(fn: Callable[[], Any]) -> float:
    """The fastest of up to :data:`TIMING_REPEATS` calls, within :data:`TIMING_BUDGET_S`."""
    best, spent, runs = float("inf"), 0.0, 0
    while runs < TIMING_REPEATS and (runs == 0 or spent < TIMING_BUDGET_S):
        start = time.perf_counter()
        fn()
        took = time.perf_counter() - start
        best, spent, runs = min(best, took), spent + took, runs + 1
    return best


def _run_case(case: TourCase, module: ModuleType, inputs: Inputs, golden: np.ndarray) -> TourRow:
    """Warm up (and check) then time ``case`` on ``module``; never raises for the backend."""
    args, kwargs = inputs
    row = {"mechanism": case.mechanism, "case": case.label, "backend": module.NAME}

    def call() -> Any:
        return _dispatch.call(case.op, args, kwargs, module)

    try:
        _dispatch.reset_warnings()  # so that a fallback warned before this tour still shows
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = call()
        fell_back = [w for w in caught if issubclass(w.category, FallbackWarning)]
        for w in caught:  # pass the other warnings on to the caller
            if not issubclass(w.category, FallbackWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        out = np.asarray(out)
        if out.shape != golden.shape or out.dtype != np.float32:
            note = f"returned {out.dtype} {out.shape}, expected float32 {golden.shape}"
            return TourRow(**row, status="mismatch", note=note)
        err_norm, err_max = relative_errors(out, golden)
        errors = {"err_norm": err_norm, "err_max": err_max}
        if not (err_norm <= TOUR_RTOL_FP32 and err_max <= TOUR_RTOL_FP32):
            return TourRow(**row, status="mismatch", **errors)
        if fell_back:
            note = (
                f"{case.op} is not implemented"
                if not _dispatch.provides(module, case.op)
                else f"{case.op} declines these inputs ({fell_back[0].message})"
            )
            return TourRow(**row, status="fallback", note=note, **errors)
        return TourRow(**row, status="ok", seconds=_best_time(call), **errors)
    except Exception as exc:  # a failing backend is a row of the table, not a crash of the tour
        return TourRow(**row, status="error", note=f"{type(exc).__name__}: {exc}"[:200])


def _backends(
    backends: Sequence[str | ModuleType] | None,
) -> tuple[list[ModuleType], dict[str, str]]:
    """The reference first, then the other backends that can run here; the rest with reasons.

    Names given explicitly must be known (``UnknownBackend`` otherwise); with ``None`` every
    known backend is tried and one that fails to import is skipped with the reason.
    """
    chosen: list[str | ModuleType] = list(
        _dispatch.known_backends() if backends is None else backends
    )
    modules, skipped = [_dispatch.load("reference")], {}
    for backend in chosen:
        if backends is None:
            try:
                module = _dispatch.load(backend)
            except Exception as exc:
                skipped[str(backend)] = f"cannot be loaded: {exc}"
                continue
        else:
            module = _dispatch.load(backend)
        if module.NAME in (m.NAME for m in modules):
            continue
        available, reason = _dispatch.availability(module)
        if available:
            modules.append(module)
        else:
            skipped[module.NAME] = reason
    return modules, skipped


def run(backends: Sequence[str | ModuleType] | None = None, progress: bool = False) -> TourResult:
    """Run every implemented mechanism's tour cases through the backends and compare.

    Args:
        backends: backend names or modules to tour (default: every known backend). The
            reference always runs, first: it is what the speed-ups are measured against.
            Backends that cannot run here are skipped and listed with the reason.
        progress: show a rich progress bar.

    Each run first clears the dispatcher's memory of which fallbacks it has warned about
    (:func:`qkv._dispatch.reset_warnings`), so that every fallback shows in the table.

    Returns:
        A :class:`TourResult`: ``.rows``, ``.ok`` (no mismatch and no error) and ``.table()``.
    """
    data = load()
    modules, skipped = _backends(backends)
    implemented = [m.id for m in catalog.implemented()]
    cases = [case for mechanism in implemented for case in CASES.get(mechanism, ())]
    untoured = tuple(m for m in implemented if m not in CASES)
    rows: list[TourRow] = []
    bar: Any = None
    if progress:
        from rich.progress import Progress

        bar = Progress(transient=True)
        task = bar.add_task("tour", total=len(cases) * len(modules))
        bar.start()
    try:
        for case in cases:
            args64, kwargs64 = case.inputs(data, np.float64)
            golden = np.asarray(_dispatch.OPS[case.op](*args64, **kwargs64))
            inputs = case.inputs(data, np.float32)
            reference_time = None
            for module in modules:
                if bar is not None:
                    bar.update(task, description=f"{case.mechanism} on {module.NAME}")
                row = _run_case(case, module, inputs, golden)
                if module.NAME == "reference":
                    reference_time = row.seconds
                if row.seconds and reference_time:
                    row = replace(row, speedup=reference_time / row.seconds)
                rows.append(row)
                if bar is not None:
                    bar.advance(task)
    finally:
        if bar is not None:
            bar.stop()
    described = (
        f"{data.model} on {data.n_tokens} tokens of Python's docs: "
        f"(layers, heads, tokens, head dim) = {data.q.shape}, the layers as the batch"
    )
    return TourResult(rows=rows, skipped=skipped, untoured=untoured, data=described)
