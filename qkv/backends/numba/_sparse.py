r"""Numba ``sparse_attention``: one pass over the selected keys, shared by a KV group's heads.

A *task* is one list of slots $t = 0 \dots S-1$ holding key indices $j_t$ ($-1$ = empty) and
the query rows that read it: one query head (and one query, or up to :data:`QUERY_BLOCK`
queries when the list is per head), or all the ``G = H / H_kv`` query heads of a KV head when
their lists are equal (the lab engine's case: a cache whose KV heads each keep their own
tokens). Walking the slots once, the task reads each selected key row and value row once for
all of its query rows and runs the online softmax, with the slot's bias $b_t$ ($-\infty$ =
dropped) added to the score:

$$
s_t = \text{scale}\cdot q\cdot k_{j_t} + b_t,\quad m' = \max(m, s_t),\quad
\ell' = e^{m - m'}\ell + e^{s_t - m'},\quad a' = e^{m - m'}a + e^{s_t - m'}\, v_{j_t},
$$

(the rescale only when the maximum grows); at the end $o = a / \ell$ and
$\mathrm{lse} = m + \log \ell$. The rows of the slot :data:`AHEAD` places further on are
requested with a prefetch hint, so several gathers from memory are in flight at once. Nothing
of size ``M`` is touched and nothing is gathered into a copy. Small calls (below
:data:`PARALLEL_WORK` multiply-adds) run serially, with no thread dispatch; larger ones spread
the tasks over threads (``prange``). A row whose slots are all empty (or all ``-inf``-biased)
gives zeros and ``lse = -inf``; an index present twice is counted twice, as in the reference.
Computes in the input dtype (float32 or float64); sums may be reassociated (vectorised), never
assumed free of infinities.
"""

from __future__ import annotations

import math

import numpy as np

from qkv.errors import Unsupported

#: How many slots ahead the rows of a key and its value are requested (prefetched).
AHEAD = 8
#: Query rows of one task when a head's list serves all of its queries.
QUERY_BLOCK = 8
#: Multiply-adds (rows x slots x (D + Dv)) below which a call runs on one thread: on the 2-core
#: development machine the threaded driver was slower below about 3e4 (8 heads x 32 slots,
#: D = Dv = 64: 12 us either way) and faster above (64 slots: 17 vs 19 us; 512: 78 vs 114 us).
PARALLEL_WORK = 1 << 15
#: Reassociation and contraction only: infinities and NaN keep their IEEE meaning.
FASTMATH = {"reassoc", "contract", "nsz", "arcp"}

_KERNELS: dict[str, object] = {}


def _prefetch_intrinsic():
    """``prefetch(a, row, col)``: hint the CPU to load ``a[row, col]``'s cache line (LLVM's
    ``llvm.prefetch``: read, keep in all levels). A gather's next rows are requested while the
    current ones are scored, so many loads from memory are in flight at once."""
    from llvmlite import ir
    from numba.core import cgutils, types
    from numba.extending import intrinsic

    @intrinsic
    def prefetch(typingctx, a, row, col):  # pragma: no cover - compiled
        def codegen(context, builder, sig, args):
            ary = context.make_array(sig.args[0])(context, builder, args[0])
            at = [
                context.cast(builder, x, t, types.intp)
                for x, t in zip(args[1:], sig.args[1:], strict=True)
            ]
            ptr = cgutils.get_item_pointer(context, builder, sig.args[0], ary, at)
            i32 = ir.IntType(32)
            fnty = ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32])
            fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
            flags = [ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)]
            builder.call(fn, [ptr, *flags])
            return context.get_dummy_value()

        return types.void(a, row, col), codegen

    return prefetch


def _compile() -> dict[str, object]:
    """The jitted task, group test and serial/parallel drivers (numba imported on first use)."""
    import numba

    prefetch = _prefetch_intrinsic()

    @numba.njit(fastmath=FASTMATH, cache=True)
    def shared_lists(idx, group):  # pragma: no cover - compiled
        """Whether every KV group's query heads hold equal lists (``idx (B, H, Ni, S)``)."""
        B, H, Ni, S = idx.shape
        if group == 1:
            return False
        for b in range(B):
            for h in range(H):
                h0 = h - h % group
                if h == h0:
                    continue
                for i in range(Ni):
                    for t in range(S):
                        if idx[b, h, i, t] != idx[b, h0, i, t]:
                            return False
        return True

    @numba.njit(fastmath=FASTMATH, cache=True)
    def task(
        q, k, v, idx, bias, has_bias, scale, group, heads, q_block, n, out, lse
    ):  # pragma: no cover
        """Task ``n``: rows ``heads`` query heads x ``q_block`` queries sharing one list."""
        B, H, N, D = q.shape
        Dv = v.shape[3]
        Ni, S = idx.shape[2], idx.shape[3]
        Hb, Nb = bias.shape[1], bias.shape[2]
        n_qb = (N + q_block - 1) // q_block
        qb = n % n_qb
        h0 = (n // n_qb) % (H // heads) * heads
        b = n // n_qb // (H // heads)
        g = h0 // group
        i0 = qb * q_block
        ni = min(q_block, N - i0)
        R = heads * ni
        dt = q.dtype
        qs = np.empty((R, D), dtype=dt)  # scaled query rows of the task
        acc = np.zeros((R, Dv), dtype=dt)  # unnormalised outputs
        br = np.zeros((R, S if has_bias else 1), dtype=dt)  # the rows' slot biases
        m = np.full(R, -np.inf, dtype=dt)
        ell = np.zeros(R, dtype=dt)
        for r in range(R):
            h, i = h0 + r // ni, i0 + r % ni
            for d in range(D):
                qs[r, d] = q[b, h, i, d] * scale
            if has_bias:
                br[r] = bias[b, h if Hb == H else g, i if Nb > 1 else 0]
        ix = idx[b, h0, i0 if Ni > 1 else 0]  # (S,)
        kg, vg = k[b, g], v[b, g]  # (M, D), (M, Dv)
        lk, lv = max(1, 64 // kg.itemsize), max(1, 64 // vg.itemsize)
        for t in range(min(AHEAD, S)):
            if ix[t] >= 0:
                for c in range(0, D, lk):
                    prefetch(kg, ix[t], c)
                for c in range(0, Dv, lv):
                    prefetch(vg, ix[t], c)
        for t in range(S):
            if t + AHEAD < S and ix[t + AHEAD] >= 0:  # ask for a later slot's rows now
                for c in range(0, D, lk):
                    prefetch(kg, ix[t + AHEAD], c)
                for c in range(0, Dv, lv):
                    prefetch(vg, ix[t + AHEAD], c)
            j = ix[t]
            if j < 0:
                continue
            kj, vj = kg[j], vg[j]  # each selected row read once for all the task's rows
            for r in range(R):
                sc = dt.type(0.0)
                for d in range(D):
                    sc += qs[r, d] * kj[d]
                sc += br[r, t if has_bias else 0]
                if sc == -np.inf:  # a dropped slot
                    continue
                if sc > m[r]:  # a new maximum: rescale what was summed
                    alpha = np.exp(m[r] - sc)
                    ell[r] *= alpha
                    for e in range(Dv):
                        acc[r, e] *= alpha
                    m[r] = sc
                w = np.exp(sc - m[r])
                ell[r] += w
                for e in range(Dv):
                    acc[r, e] += w * vj[e]
        for r in range(R):
            h, i = h0 + r // ni, i0 + r % ni
            inv = 1.0 / ell[r] if ell[r] > 0 else 0.0
            for e in range(Dv):
                out[b, h, i, e] = acc[r, e] * inv
            lse[b, h, i] = m[r] + np.log(ell[r]) if ell[r] > 0 else -np.inf

    @numba.njit(fastmath=FASTMATH, cache=True)
    def serial(
        q, k, v, idx, bias, has_bias, scale, group, heads, q_block, tasks, out, lse
    ):  # pragma: no cover
        for n in range(tasks):
            task(q, k, v, idx, bias, has_bias, scale, group, heads, q_block, n, out, lse)

    @numba.njit(fastmath=FASTMATH, cache=True, parallel=True)
    def parallel(
        q, k, v, idx, bias, has_bias, scale, group, heads, q_block, tasks, out, lse
    ):  # pragma: no cover
        for n in numba.prange(tasks):
            task(q, k, v, idx, bias, has_bias, scale, group, heads, q_block, n, out, lse)

    return {"shared": shared_lists, "serial": serial, "parallel": parallel}


def kernels() -> dict[str, object]:
    """The compiled kernels (compiled, or loaded from numba's cache, on first use)."""
    if not _KERNELS:
        _KERNELS.update(_compile())
    return _KERNELS


_NO_BIAS = {np.dtype(np.float32): np.zeros((1, 1, 1, 1), np.float32),
            np.dtype(np.float64): np.zeros((1, 1, 1, 1), np.float64)}  # fmt: skip


def sparse_attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    indices: np.ndarray,
    *,
    scale: float | None,
    bias: np.ndarray | None = None,
    return_lse: bool,
    parallel: bool | None = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """``sparse_attention`` on validated NumPy inputs of one dtype (float32 or float64).

    ``q (B, H, N, D)``, ``k (B, Hkv, M, D)``, ``v (B, Hkv, M, Dv)``, integer ``indices``
    ``(B, H, S)`` or ``(B, H, N, S)``, optional ``bias`` ``(B, H, S)``, ``(B, Hkv, S)`` or
    ``(B, H, N, S)``. Returns ``O (B, H, N, Dv)`` in the input dtype and, with ``return_lse``,
    ``lse (B, H, N)`` in the same dtype. ``parallel`` forces the threaded (``True``) or serial
    (``False``) driver; by default calls above :data:`PARALLEL_WORK` multiply-adds use threads.
    """
    dtype = q.dtype
    if dtype not in _NO_BIAS:
        raise Unsupported(f"dtype {dtype}: the numba kernels take float32 and float64")
    run = kernels()
    B, H, N, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[3]
    group = H // Hkv
    idx = indices if indices.dtype in (np.int32, np.int64) else indices.astype(np.int64)
    idx = idx[:, :, None] if idx.ndim == 3 else idx  # (B, H, Ni, S), Ni in {1, N}
    idx = np.ascontiguousarray(idx)
    S = idx.shape[3]
    if bias is None:
        b_rows, has_bias = _NO_BIAS[dtype], False
    else:
        b_rows = bias[:, :, None] if bias.ndim == 3 else bias  # (B, H or Hkv, 1 or N, S)
        b_rows, has_bias = np.ascontiguousarray(b_rows, dtype=dtype), True
    heads = group if run["shared"](idx, group) else 1
    q_block = QUERY_BLOCK if idx.shape[2] == 1 else 1
    tasks = B * (H // heads) * -(-N // q_block)
    out = np.empty((B, H, N, Dv), dtype=dtype)  # (B, H, N, Dv)
    lse = np.empty((B, H, N), dtype=dtype)  # (B, H, N)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if parallel is None:
        parallel = B * H * N * S * (D + Dv) >= PARALLEL_WORK
    driver = run["parallel"] if parallel else run["serial"]
    driver(
        np.ascontiguousarray(q),
        np.ascontiguousarray(k, dtype=dtype),
        np.ascontiguousarray(v, dtype=dtype),
        idx, b_rows, has_bias, dtype.type(scale), group, heads, q_block, tasks, out, lse,
    )  # fmt: skip
    return (out, lse) if return_lse else out
