r"""Numba ``sparse_attention``: one pass over the selected keys, shared by a KV group's heads.

A *task* is one list of slots $t = 0 \dots S-1$ holding key indices $j_t$ ($-1$ = empty) and
the ``R`` query rows that read it: one query head (and one query, or up to
:data:`QUERY_BLOCK` queries when the list is per head), or all the ``G = H / H_kv`` query
heads of a KV head when their lists are equal (the lab engine's case: a cache whose KV heads
each keep their own tokens). The task walks its slots once, in tiles of ``T`` (:data:`TILE`)
slots, reading each selected key and value row once for all of its rows. For one tile the
scores, with the slot's bias $b_t$ ($-\infty$ = dropped, an empty slot scores $-\infty$), are

$$
S_{rt} = \text{scale}\cdot q_r \cdot k_{j_t} + b_{rt},
$$

and the online softmax of the dense kernel (:mod:`qkv.backends.numba._attention`) runs on them:
$m' = \max(m, \operatorname{rowmax} S)$, $P = e^{S - m'}$ (the vectorised float32
exponential), $\ell' = e^{m - m'}\ell + \operatorname{rowsum} P$,
$A' = e^{m - m'} A + P V_{j}$; at the end $o = A / \ell$ and $\mathrm{lse} = m + \log \ell$.

Two ways to form the tile's products, chosen by ``R``:

* **gathered** (``R >=`` :data:`GATHER_ROWS`, e.g. a KV group's four heads): the tile's key and
  value rows are copied into contiguous ``T x D`` and ``T x Dv`` buffers and both products go to
  BLAS, $(q\,\text{scale}) K_t^\top$ and $P V_t$, as in the dense kernel. The copy is paid once
  per slot and shared by the ``R`` rows.
* **direct** (fewer rows, e.g. per-head lists at decode): each slot's dot products and its
  value's weighted add are computed in place from the cache rows, with no copy; a single
  row would leave BLAS with matrix-vector products too small to pay for the copy.

The rows of the slot :data:`AHEAD` places further on are requested with a prefetch hint, so
that several gathers from memory are in flight at once. Nothing of size ``M`` is touched.
Small calls (below :data:`PARALLEL_WORK` multiply-adds) run serially, with no thread dispatch;
larger ones spread the tasks over threads (``prange``), with BLAS held to one thread inside
them. When there are fewer tasks than threads (one KV head shared by all query heads, a single
sequence) each list is cut into parts of whole tiles, one a thread, and the parts $p$ are
joined by their log-sum-exp: $m = \max_p m_p$, $\ell = \sum_p e^{m_p - m} \ell_p$,
$o = \sum_p e^{m_p - m} A_p / \ell$. A row whose slots are all empty (or all
``-inf``-biased) gives zeros and ``lse = -inf``; an empty slot contributes nothing, whatever
its value row holds; an index present twice is counted twice, as in the reference. Computes in the input dtype (float32 or
float64); sums may be reassociated (vectorised), never assumed free of infinities.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np

from qkv.backends.numba._attention import _one_blas_thread, fast_exp, num_threads, row_max
from qkv.errors import Unsupported

#: How many slots ahead the rows of a key and its value are requested (prefetched).
AHEAD = 8
#: Slots scored together before their softmax step (one tile).
TILE = 128
#: Rows sharing a list from which the gathered (BLAS) path is taken. On the 2-core development
#: machine (D = Dv = 64, fp32, 64k keys) four rows ran 1.6-1.9x faster gathered than direct and
#: one row 1.1-1.2x slower.
GATHER_ROWS = 4
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

    @numba.njit(fastmath=FASTMATH, cache=True, inline="always")
    def gathered_tile(qs, kg, vg, ix, t0, end, first, s, kt, vt):  # pragma: no cover
        """Copy the rows of slots ``t0 ... t0 + nt - 1`` (zeros for an empty slot), then
        ``s = qs K^T`` by BLAS; the values wait in ``vt`` for ``P V``. The ``first`` tile starts
        its prefetches ``AHEAD`` slots early; none reaches ``end``. Returns whether a slot of
        the tile was empty."""
        nt, D, Dv = s.shape[1], kg.shape[1], vg.shape[1]
        line = 64 // kg.itemsize  # elements per 64-byte cache line
        empty = False
        for t in range(-AHEAD if first else 0, nt):
            if t0 + t + AHEAD < end and ix[t0 + t + AHEAD] >= 0:  # ask for a later slot's rows
                for c in range(0, D, line):
                    prefetch(kg, ix[t0 + t + AHEAD], c)
                for c in range(0, Dv, line):
                    prefetch(vg, ix[t0 + t + AHEAD], c)
            if t < 0:
                continue
            j = ix[t0 + t]
            if j >= 0:
                for d in range(D):
                    kt[t, d] = kg[j, d]
                for e in range(Dv):
                    vt[t, e] = vg[j, e]
            else:
                empty = True
                for d in range(D):
                    kt[t, d] = 0.0
                for e in range(Dv):
                    vt[t, e] = 0.0
        np.dot(qs, kt[:nt].T, s)
        return empty

    @numba.njit(fastmath=FASTMATH, cache=True, inline="always")
    def bias_tile(s, ix, t0, bias, has_bias, b, g, h0, i0, ni, H):  # pragma: no cover
        """Empty slots to ``-inf``; with ``has_bias``, each row's slot bias added."""
        Hb, Nb = bias.shape[1], bias.shape[2]
        for r in range(s.shape[0]):
            h, i = h0 + r // ni, i0 + r % ni
            br = bias[b, h if Hb == H else g, i if Nb > 1 else 0]  # (S,)
            for t in range(s.shape[1]):
                if ix[t0 + t] < 0:
                    s[r, t] = -np.inf
                elif has_bias:
                    s[r, t] += br[t0 + t]

    @numba.njit(fastmath=FASTMATH, cache=True, inline="always")
    def softmax_step(s, m, ell, acc):  # pragma: no cover - compiled
        """One tile's online-softmax step: the scores ``s (R, nt)`` become weights in place;
        the running ``m``, ``ell (R,)`` and ``acc (R, Dv)`` move to the new maximum."""
        zero = s.dtype.type(0.0)
        for r in range(s.shape[0]):
            row = s[r]
            m_new = row_max(row, m[r])
            shift = m_new if m_new != -np.inf else zero  # an all-empty row stays at 0 weight
            total = zero
            for t in range(row.shape[0]):
                p = fast_exp(row[t] - shift)
                row[t] = p
                total += p
            alpha = fast_exp(m[r] - shift)
            ell[r] = alpha * ell[r] + total
            m[r] = m_new
            if alpha != 1.0:
                for e in range(acc.shape[1]):
                    acc[r, e] *= alpha

    @numba.njit(fastmath=FASTMATH, cache=True)
    def locate(n, H, N, group, heads, q_block):  # pragma: no cover - compiled
        """Task ``n``'s batch entry ``b``, first query head ``h0``, KV head ``g``, first query
        ``i0`` and number of queries ``ni`` (tasks run over batch, head block, query block)."""
        n_qb = (N + q_block - 1) // q_block
        h0 = (n // n_qb) % (H // heads) * heads
        i0 = n % n_qb * q_block
        return n // n_qb // (H // heads), h0, h0 // group, i0, min(q_block, N - i0)

    @numba.njit(fastmath=FASTMATH, cache=True)
    def scaled_rows(q, b, h0, i0, heads, ni, scale):  # pragma: no cover - compiled
        """``(heads * ni, D)``: the task's query rows times ``scale``, row ``r`` being query
        head ``h0 + r // ni`` and query ``i0 + r % ni``."""
        qs = np.empty((heads * ni, q.shape[3]), dtype=q.dtype)
        for r in range(qs.shape[0]):
            for d in range(qs.shape[1]):
                qs[r, d] = q[b, h0 + r // ni, i0 + r % ni, d] * scale
        return qs

    @numba.njit(fastmath=FASTMATH, cache=True)
    def finish(acc, m, ell, b, h0, i0, ni, out, lse):  # pragma: no cover - compiled
        """``o = A / ell`` and ``lse = m + log ell`` of each row (0 and ``-inf`` if empty)."""
        for r in range(acc.shape[0]):
            h, i = h0 + r // ni, i0 + r % ni
            inv = 1.0 / ell[r] if ell[r] > 0 else 0.0
            for e in range(acc.shape[1]):
                out[b, h, i, e] = acc[r, e] * inv
            lse[b, h, i] = m[r] + np.log(ell[r]) if ell[r] > 0 else -np.inf

    @numba.njit(fastmath=FASTMATH, cache=True)
    def settle(acc, m, ell, b, h0, i0, ni, split, dest):  # pragma: no cover - compiled
        """A task's rows: finished into ``out``/``lse`` when its list was walked whole
        (``split < 0``), else kept unnormalised as part ``split`` for :func:`merge`."""
        out, lse, parts, m_parts, l_parts = dest
        if split < 0:
            finish(acc, m, ell, b, h0, i0, ni, out, lse)
            return
        for r in range(acc.shape[0]):
            h, i = h0 + r // ni, i0 + r % ni
            m_parts[split, b, h, i] = m[r]
            l_parts[split, b, h, i] = ell[r]
            for e in range(acc.shape[1]):
                parts[split, b, h, i, e] = acc[r, e]

    @numba.njit(fastmath=FASTMATH, cache=True, parallel=True)
    def merge(parts, m_parts, l_parts, out, lse):  # pragma: no cover - compiled
        r"""Join the parts $p$ of each row: $m = \max_p m_p$, $w_p = e^{m_p - m}$,
        $\ell = \sum_p w_p \ell_p$, $o = \sum_p w_p A_p / \ell$, $\mathrm{lse} = m + \log \ell$."""
        P, B, H, N, Dv = parts.shape
        for row in numba.prange(B * H * N):
            b, h, i = row // (H * N), row // N % H, row % N
            top = -np.inf
            for p in range(P):
                top = max(top, m_parts[p, b, h, i])
            ell = 0.0
            for e in range(Dv):
                out[b, h, i, e] = 0.0
            if top == -np.inf:  # no key in any part
                lse[b, h, i] = -np.inf
                continue
            for p in range(P):
                w = np.exp(m_parts[p, b, h, i] - top)
                ell += w * l_parts[p, b, h, i]
                for e in range(Dv):
                    out[b, h, i, e] += w * parts[p, b, h, i, e]
            for e in range(Dv):
                out[b, h, i, e] /= ell
            lse[b, h, i] = top + np.log(ell)

    @numba.njit(fastmath=FASTMATH, cache=True)
    def slot_range(S, split, splits):  # pragma: no cover - compiled
        """Slots ``[begin, end)`` of part ``split`` of ``splits`` (whole tiles; the list when
        ``split < 0``)."""
        if split < 0:
            return 0, S
        chunk = (S + splits - 1) // splits
        chunk = (chunk + TILE - 1) // TILE * TILE
        return min(split * chunk, S), min((split + 1) * chunk, S)

    @numba.njit(fastmath=FASTMATH, cache=True)
    def direct_task(data, plan, n, split, splits, dest):  # pragma: no cover - compiled
        """Task ``n`` slot by slot: each key's dot products, then at once the online softmax
        update (rescaling only when the maximum grows) and the value's weighted add."""
        q, k, v, idx, bias = data  # the inputs, the bias (a dummy without has_bias)
        has_bias, scale, group, heads, q_block = plan
        H, N, D, Dv = q.shape[1], q.shape[2], q.shape[3], v.shape[3]
        Ni, S = idx.shape[2], idx.shape[3]
        Hb, Nb = bias.shape[1], bias.shape[2]
        b, h0, g, i0, ni = locate(n, H, N, group, heads, q_block)
        R = heads * ni
        dt = q.dtype
        qs = scaled_rows(q, b, h0, i0, heads, ni, scale)  # (R, D)
        acc = np.zeros((R, Dv), dtype=dt)  # unnormalised outputs A
        br = np.zeros((R, S if has_bias else 1), dtype=dt)  # the rows' slot biases
        m = np.full(R, -np.inf, dtype=dt)
        ell = np.zeros(R, dtype=dt)
        for r in range(R if has_bias else 0):
            br[r] = bias[b, h0 + r // ni if Hb == H else g, i0 + r % ni if Nb > 1 else 0]
        ix = idx[b, h0, i0 if Ni > 1 else 0]  # (S,)
        kg, vg = k[b, g], v[b, g]  # (M, D), (M, Dv)
        line = 64 // kg.itemsize  # elements per 64-byte cache line
        begin, end = slot_range(S, split, splits)
        for t in range(begin - AHEAD, end):
            if t + AHEAD < end and ix[t + AHEAD] >= 0:  # ask for a later slot's rows now
                for c in range(0, D, line):
                    prefetch(kg, ix[t + AHEAD], c)
                for c in range(0, Dv, line):
                    prefetch(vg, ix[t + AHEAD], c)
            if t < begin:
                continue
            j = ix[t]
            if j < 0:
                continue
            kj, vj = kg[j], vg[j]  # (D,), (Dv,): read once for all the rows
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
        settle(acc, m, ell, b, h0, i0, ni, split, dest)

    @numba.njit(fastmath=FASTMATH, cache=True)
    def gathered_task(data, plan, n, split, splits, dest):  # pragma: no cover - compiled
        """Task ``n`` a tile at a time: the tile's rows gathered, both products by BLAS."""
        q, k, v, idx, bias = data  # the inputs, the bias (a dummy without has_bias)
        has_bias, scale, group, heads, q_block = plan
        H, N, D, Dv = q.shape[1], q.shape[2], q.shape[3], v.shape[3]
        Ni, S = idx.shape[2], idx.shape[3]
        b, h0, g, i0, ni = locate(n, H, N, group, heads, q_block)
        R = heads * ni
        dt = q.dtype
        qs = scaled_rows(q, b, h0, i0, heads, ni, scale)  # (R, D)
        acc = np.zeros((R, Dv), dtype=dt)  # unnormalised outputs A
        m = np.full(R, -np.inf, dtype=dt)
        ell = np.zeros(R, dtype=dt)
        s_buf = np.empty(R * TILE, dtype=dt)
        kt = np.empty((TILE, D), dtype=dt)  # the tile's keys, gathered
        vt = np.empty((TILE, Dv), dtype=dt)  # and its values
        pv = np.empty((R, Dv), dtype=dt)
        ix = idx[b, h0, i0 if Ni > 1 else 0]  # (S,)
        kg, vg = k[b, g], v[b, g]  # (M, D), (M, Dv)
        begin, end = slot_range(S, split, splits)
        for t0 in range(begin, end, TILE):
            nt = min(TILE, end - t0)
            s = s_buf[: R * nt].reshape(R, nt)  # (R, nt) scores of the tile
            empty = gathered_tile(qs, kg, vg, ix, t0, end, t0 == begin, s, kt, vt)
            if empty or has_bias:  # else the scores stand as they are
                bias_tile(s, ix, t0, bias, has_bias, b, g, h0, i0, ni, H)
            softmax_step(s, m, ell, acc)
            np.dot(s, vt[:nt], pv)  # (R, Dv): P V of the tile
            for r in range(R):
                for e in range(Dv):
                    acc[r, e] += pv[r, e]
        settle(acc, m, ell, b, h0, i0, ni, split, dest)

    @numba.njit(fastmath=FASTMATH, cache=True)
    def task(data, plan, n, split, splits, dest):  # pragma: no cover - compiled
        """Task ``n`` (part ``split`` of ``splits`` of its list, or all of it if ``split < 0``):
        ``heads`` query heads x up to ``q_block`` queries sharing one list, gathered when they
        are at least :data:`GATHER_ROWS` rows."""
        q, heads, q_block = data[0], plan[3], plan[4]
        ni = min(q_block, q.shape[2] - n % ((q.shape[2] + q_block - 1) // q_block) * q_block)
        if heads * ni >= GATHER_ROWS:
            gathered_task(data, plan, n, split, splits, dest)
        else:
            direct_task(data, plan, n, split, splits, dest)

    @numba.njit(fastmath=FASTMATH, cache=True)
    def serial(data, plan, tasks, out, lse):  # pragma: no cover - compiled
        """Every task in turn, each list walked whole."""
        dest = (out, lse, out[None], lse[None], lse[None])  # no parts are kept
        for n in range(tasks):
            task(data, plan, n, -1, 1, dest)

    @numba.njit(fastmath=FASTMATH, cache=True, parallel=True)
    def parallel_whole(data, plan, tasks, out, lse):  # pragma: no cover - compiled
        """Every task on the threads, each list walked whole."""
        dest = (out, lse, out[None], lse[None], lse[None])  # no parts are kept
        for n in numba.prange(tasks):
            task(data, plan, n, -1, 1, dest)

    @numba.njit(fastmath=FASTMATH, cache=True, parallel=True)
    def parallel(data, plan, tasks, splits, dest):  # pragma: no cover - compiled
        """Every task on the threads; with ``splits > 1`` each task's list in that many parts,
        their unnormalised results kept in ``dest``'s parts for :func:`merge`."""
        for w in numba.prange(tasks * splits):
            n, split = w // splits, (w % splits if splits > 1 else -1)
            task(data, plan, n, split, splits, dest)

    return {
        "shared": shared_lists,
        "serial": serial,
        "parallel": parallel,
        "parallel_whole": parallel_whole,
        "merge": merge,
    }


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
    rows = heads * min(q_block, N)  # query rows of a task
    splits = 1
    if parallel and tasks < (threads := num_threads()):  # idle threads: cut lists in parts
        splits = max(1, min(-(-threads // tasks), S // TILE))  # of whole tiles, one a thread
    data = (
        np.ascontiguousarray(q),
        np.ascontiguousarray(k, dtype=dtype),
        np.ascontiguousarray(v, dtype=dtype),
        idx,
        b_rows,
    )
    plan = (has_bias, dtype.type(scale), group, heads, q_block)
    if not parallel:
        run["serial"](data, plan, tasks, out, lse)
        return (out, lse) if return_lse else out
    threads_call_blas = rows >= GATHER_ROWS  # else BLAS cannot oversubscribe
    with _one_blas_thread() if threads_call_blas else contextlib.nullcontext():
        if splits == 1:
            run["parallel_whole"](data, plan, tasks, out, lse)
        else:
            parts = np.empty((splits, B, H, N, Dv), dtype=dtype)  # (P, B, H, N, Dv)
            m_parts = np.empty((splits, B, H, N), dtype=dtype)  # (P, B, H, N)
            l_parts = np.empty((splits, B, H, N), dtype=dtype)  # (P, B, H, N)
            run["parallel"](data, plan, tasks, splits, (out, lse, parts, m_parts, l_parts))
            run["merge"](parts, m_parts, l_parts, out, lse)
    return (out, lse) if return_lse else out
