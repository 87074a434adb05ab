"""Small helpers the tutorials share, so that each tutorial's code is about its paper.

They print plain text, so a tutorial reads the same as a script, a notebook and a docs page.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def rel_err(a: Any, b: Any) -> float:
    """Norm-wise relative error ``||a - b|| / ||b||``, in float64 (any array shapes, equal)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), np.finfo(float).tiny))


def best_of(fn: Callable[..., Any], repeats: int, *args: Any, **kwargs: Any) -> float:
    """The fastest of ``repeats`` calls ``fn(*args, **kwargs)``, in seconds (no warm-up: make
    the first call yourself where a backend compiles on first use)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args, **kwargs)
        times.append(time.perf_counter() - start)
    return min(times)


def runnable_backends() -> tuple[list[str], list[tuple[str, str]]]:
    """The names of the known backends that run on this machine, and ``(name, reason)`` for
    each that does not (entering :func:`qkv.use_backend` raises at once for those)."""
    import qkv

    runnable, skipped = [], []
    for name in qkv.known_backends():
        try:
            with qkv.use_backend(name):
                pass
        except (qkv.BackendUnavailable, qkv.UnknownBackend) as why:
            skipped.append((name, str(why)))
            continue
        runnable.append(name)
    return runnable, skipped


def show_table(header: Sequence[Any], rows: Sequence[Sequence[Any]]) -> None:
    """Print ``rows`` under ``header`` as an aligned plain-text table."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for i, row in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def passkey_accuracy(
    weights: Any,
    length: int,
    depths: Sequence[float],
    per: int,
    *,
    seed: int,
    policy: Any = None,
    selector: Any = None,
) -> float:
    """Fraction of seeded passkey prompts whose 5 digits the lab engine decodes exactly.

    Prompt ``r`` at ``depths[i]`` is ``tasks.passkey(length, depths[i], rng)`` with
    ``rng = default_rng((seed, i, r))``, ``per`` prompts a depth, decoded as one batch per depth
    with the KV ``policy`` and/or decode-time ``selector`` (both ``None``: the full cache).
    """
    from qkv.lab import engine, tasks

    hits = []
    for i, depth in enumerate(depths):
        examples = [
            tasks.passkey(length, depth, np.random.default_rng((seed, i, r))) for r in range(per)
        ]
        prompts = np.stack([e.prompt for e in examples])  # (per, length)
        answers = np.stack([e.answer for e in examples])  # (per, 5)
        g = engine.generate(weights, prompts, answers.shape[1], policy=policy, selector=selector)
        hits += np.all(g.tokens == answers, axis=1).tolist()
    return float(np.mean(hits))
