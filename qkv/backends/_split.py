"""How the GPU ``sparse_attention`` kernels cut each row's slot list into splits.

A decode step has few query rows (``B * H`` with ``N = 1``), each with thousands of selected
keys; one program per row would leave most of a GPU idle. The Triton and CuPy kernels therefore
give each row several programs over consecutive slot ranges and merge the parts by their
log-sum-exps (flash-decoding). Plain Python, shared by both launchers.
"""

from __future__ import annotations


def split_slots(
    rows: int, slots: int, *, programs: int, min_chunk: int, multiple: int
) -> tuple[int, int]:
    """``(chunk, n_splits)``: slots per program and programs per row.

    Rows times splits aims at ``programs``; every split but the last holds ``chunk`` slots, a
    multiple of ``multiple`` and at least ``min_chunk`` (one split when the list is that short).
    """
    if slots <= min_chunk:
        return max(slots, 1), 1
    want = max(1, min(-(-programs // max(rows, 1)), slots // min_chunk))
    chunk = -(-slots // want)
    chunk = -(-chunk // multiple) * multiple
    return chunk, -(-slots // chunk)
