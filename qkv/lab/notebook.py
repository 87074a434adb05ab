"""Small helpers the tutorials share, so that each tutorial's code is about its paper.

They print plain text, so a tutorial reads the same as a script, a notebook and a docs page.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def rel_err(a: Any, b: Any) -> float:
    """Norm-wise relative error ``||a - b|| / ||b||``, in float64 (any array shapes, equal)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), np.finfo(float).tiny))


def show_table(header: Sequence[Any], rows: Sequence[Sequence[Any]]) -> None:
    """Print ``rows`` under ``header`` as an aligned plain-text table."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for i, row in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
