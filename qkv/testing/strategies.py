"""Hypothesis strategies that draw calls of qkv's ops, each a :class:`qkv.testing.cases.Case`.

Hypothesis draws the *structure* of a call (sizes, flags, mask layout, magnitudes and a seed);
the array values then come from NumPy's generator seeded with the drawn seed. So a case is a
deterministic function of a few small numbers, shrinking works on those numbers (towards one
token, no mask, unit magnitudes), and a case's description names all of them (the case itself,
arrays included, is kept on a failure: ``report.rows[i].failure.case``).
Values are drawn in float64; :meth:`Case.rounded` rounds them to the dtype under test.

What the attention strategies cover: batch 1-2, 1-3 KV heads with 1-4 query heads each (GQA),
query and key counts 1-70 (one token, odd sizes, powers of two and their neighbours, ``N > M``
and ``N < M``), head dims 1-64 with rarer 128 and 256, value head dims that differ from the
key's, no mask, boolean masks and additive float masks (with ``-inf`` entries) of every
broadcastable layout, fully masked rows, ``causal``, an explicit ``scale``, the largest logit
``|scale * q . k|`` set to 1 up to 1e4, value magnitudes from 1e-3 to 1e3, ``return_lse`` and
``return_weights``, and for ``flash`` its block sizes. Rope: both pairings, offsets up to
65536, explicit positions ``(N,)`` and ``(B, N)`` (int32 or int64, unsorted, repeated), and
several frequency bases.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from hypothesis import strategies as st

from qkv.testing.cases import Case

#: The largest query or key count drawn.
MAX_TOKENS = 70
#: Token counts hypothesis is pushed towards (odd sizes and tile boundaries).
SPECIAL_TOKENS = (1, 2, 3, 5, 15, 16, 17, 31, 32, 33, 63, 64, 65)
#: Head dims drawn often, besides any in 1-64.
SPECIAL_DIMS = (1, 2, 3, 7, 8, 16, 31, 32, 33, 63, 64)
#: Mask layouts drawn (axes of size 1 broadcast), the full one first.
MASK_LAYOUTS = (
    "B H N M",
    "N M",
    "B 1 1 M",
    "1 H N M",
    "B 1 N M",
    "B H N 1",
    "1 1 N 1",
    "M",
    "1 1 1 1",
)
#: Head dims drawn rarely, for kernels that tile the head dim.
LARGE_DIMS = (128, 256)


def tokens() -> st.SearchStrategy[int]:
    """A query or key count in 1-70, often a tile boundary or an odd size."""
    return st.one_of(st.sampled_from(SPECIAL_TOKENS), st.integers(1, MAX_TOKENS))


@st.composite
def head_dims(draw: st.DrawFn, *, even: bool = False) -> int:
    """A head dim: mostly 1-64 (odd ones included), one draw in ten 128 or 256.

    The rare large dims sit at the high end of the choice, so shrinking moves away from them.
    """
    if draw(st.integers(0, 9)) == 9:
        return draw(st.sampled_from(LARGE_DIMS))
    if even:
        return 2 * draw(st.integers(1, 32))
    return draw(st.one_of(st.sampled_from(SPECIAL_DIMS), st.integers(1, 64)))


def _mask(
    rng: np.random.Generator,
    kind: str,
    shape: tuple[int, ...],
    keep: float,
    dead_rows: int,
    magnitude: float,
) -> tuple[np.ndarray, int]:
    """A boolean (True = attend) or additive mask with ``dead_rows`` fully masked query rows
    (when ``shape`` has a query axis).

    ``keep`` is the fraction of entries left attendable; additive masks hold normal values of
    ``magnitude`` and ``-inf`` elsewhere. Returns the mask and how many rows it masks fully.
    """
    attend = rng.random(shape) < keep
    if dead_rows and len(shape) >= 2:
        dead = rng.choice(shape[-2], size=min(dead_rows, shape[-2]), replace=False)
        attend[..., dead, :] = False
    if kind == "bool":
        mask = attend
    else:
        mask = np.where(attend, magnitude * rng.standard_normal(shape), -np.inf)
    masked_rows = int((~attend.reshape(-1, shape[-1])).all(axis=-1).sum())  # of the mask's rows
    return mask, masked_rows


@st.composite
def attention_cases(draw: st.DrawFn, op: str = "sdpa", *, blocks: bool = False) -> Case:
    """A call of an attention op with the reference's signature (``sdpa``, ``flash``).

    ``blocks`` also draws ``block_q`` and ``block_k`` (for ``flash``).
    """
    B = draw(st.integers(1, 2))
    Hkv = draw(st.integers(1, 3))
    G = draw(st.integers(1, 4))
    H = Hkv * G
    N, M = draw(tokens()), draw(tokens())
    D = draw(head_dims())
    Dv = D if draw(st.integers(0, 4)) < 4 else draw(head_dims())
    seed = draw(st.integers(0, 2**32 - 1))
    logits = draw(st.sampled_from([1.0, 10.0, 100.0, 1e3, 1e4]))
    values = draw(st.sampled_from([1.0, 1e-3, 1e3]))
    scale = draw(st.sampled_from([None, 1.0, 0.5, 0.125, 0.3, 2.0, 7.5]))
    causal = draw(st.booleans())
    # Half the calls have no mask and three in four no weights: the paths kernels take most.
    mask_kind = draw(st.sampled_from(["none", "none", "bool", "additive"]))

    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, H, N, D))  # (B, H, N, D)
    k = rng.standard_normal((B, Hkv, M, D))  # (B, Hkv, M, D)
    v = values * rng.standard_normal((B, Hkv, M, Dv))  # (B, Hkv, M, Dv)
    # Rescale q and k so that the largest |scale * q . k| is exactly `logits`.
    s = np.einsum("bhgnd,bhmd->bhgnm", q.reshape(B, Hkv, G, N, D), k)  # (B, Hkv, G, N, M)
    effective = 1.0 / math.sqrt(D) if scale is None else scale
    factor = math.sqrt(logits / (effective * float(np.abs(s).max())))
    q, k = q * factor, k * factor

    kwargs: dict[str, Any] = {}
    notes: dict[str, Any] = {"seed": seed, "max|logit|": f"{logits:g}", "|v|": f"~{values:g}"}
    if mask_kind != "none":
        layout = draw(st.sampled_from(MASK_LAYOUTS))
        sizes = {"B": B, "H": H, "N": N, "M": M, "1": 1}
        shape = tuple(sizes[axis] for axis in layout.split())
        keep = draw(st.sampled_from([0.8, 0.5, 0.1]))
        dead_rows = draw(st.integers(0, 3))
        magnitude = draw(st.sampled_from([1.0, 10.0]))
        kwargs["mask"], masked = _mask(rng, mask_kind, shape, keep, dead_rows, magnitude)
        notes["mask drawn"] = f"keep {keep:g}, {dead_rows} dead rows, magnitude {magnitude:g}"
        notes["fully masked mask rows"] = masked
    if causal:
        kwargs["causal"] = True
        if N > M:
            notes["rows causal masks fully"] = N - M
    if scale is not None:
        kwargs["scale"] = scale
    if draw(st.integers(0, 3)) == 3:
        kwargs["return_weights"] = True
    if draw(st.booleans()):
        kwargs["return_lse"] = True
    if blocks:
        block = st.sampled_from([64, 16, 32, 128, 1, 3, 17])
        kwargs["block_q"], kwargs["block_k"] = draw(block), draw(block)
    return Case(op, (q, k, v), kwargs, notes)


@st.composite
def rope_cases(draw: st.DrawFn, op: str = "rope") -> Case:
    """A call of ``rope``: offsets or explicit positions, both pairings, several bases."""
    B = draw(st.integers(1, 2))
    H = draw(st.integers(1, 4))
    N = draw(tokens())
    D = draw(head_dims(even=True))
    seed = draw(st.integers(0, 2**32 - 1))
    values = draw(st.sampled_from([1.0, 1e-3, 1e3]))
    pairing = draw(st.sampled_from(["adjacent", "half"]))
    where = draw(st.sampled_from(["offset", "positions (N,)", "positions (B, N)"]))
    base = draw(st.sampled_from([10000.0, 500000.0, 10.0]))

    rng = np.random.default_rng(seed)
    x = values * rng.standard_normal((B, H, N, D))  # (B, H, N, D)
    kwargs: dict[str, Any] = {}
    if where == "offset":
        offset = draw(st.sampled_from([0, 1, 7, 100, 2047, 65536]))
        if offset:
            kwargs["offset"] = offset
    else:
        highest = draw(st.sampled_from([N, 4096, 65536]))
        dtype = draw(st.sampled_from(["int64", "int32"]))
        shape = (N,) if where == "positions (N,)" else (B, N)
        kwargs["positions"] = rng.integers(0, highest, size=shape).astype(dtype)
    if base != 10000.0:
        kwargs["base"] = base
    kwargs["pairing"] = pairing
    return Case(op, (x,), kwargs, {"seed": seed, "|x|": f"~{values:g}"})
