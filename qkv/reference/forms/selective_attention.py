r"""Selective Self-Attention: temperature-scaled softmax (Zhang et al., arXiv 2411.12892).

*Selective Attention: Enhancing Transformer through Principled Context Control* (NeurIPS 2024).
Official code: `umich-sota/selective_attention <https://github.com/umich-sota/selective_attention>`_.

Softmax attention treats every query alike: how peaked a row is depends on the scores alone.
Selective Self-Attention (SSA) gives each query an **inverse temperature** that sets its
contextual sparsity, from its position and its content, and each value one that can mute
irrelevant tokens:

$$
O_i = \sum_j \operatorname{softmax}_j\!\Big(\tau^{\mathrm{pos}}_i\,\tau^{q}_i\; s\,q_i\!\cdot\!k_j
      + B_{ij}\Big)\;\tau^{v}_j\,v_j .
$$

* **Position** (the released code, ``lit_gpt/gpt_2_PTS.py`` and ``model_finetune_att.py``):
  $\tau^{\mathrm{pos}}_i = 1 + e^{-e^{\beta}} \log p_i$, with $p_i \ge 1$ the 1-based
  position of query $i$ and $\beta$ one learned scalar per layer (initialised at 1.5 for GPT-2
  pretraining, 2.0 for fine-tuning). The more keys a query may see, the colder (sharper) its
  softmax: the paper's remedy for *attention dilution*, the flattening of rows as the context
  grows. Row 1 is untouched ($\log 1 = 0$) and $\beta \to \infty$ recovers vanilla attention.
* **Token** (the paper's query selectivity; not in the released code): $\tau^q_i$ a function of
  the token. The paper gives it as a learned scalar function of the token computed with weights
  shared with the existing projections, for under 0.5% new parameters. The form chosen here,
  :func:`token_temperature`, reads the head's own projected query:
  $\tau(x) = 1 + \tanh(w_h \cdot x + b_h)$, $D + 1$ parameters per head, in $(0, 2)$ and exactly
  1 at $w = b = 0$, so a pretrained model starts from vanilla attention when fine-tuned.
* **Value** (the paper's value selectivity; not in the code): $\tau^v_j$ scales value $j$;
  the same form on the projected value.

Both temperatures are taken here as arrays (compute them with :func:`token_temperature` or any
other rule). The bias $B$ (a mask) is added after the temperature, as the code masks after
scaling.

**One sdpa call.** A per-query factor on the scores is a factor on the query,
$t_i\,(q_i \cdot k_j) = (t_i q_i) \cdot k_j$, and a per-value factor scales $v_j$. So SSA is
exactly ``sdpa(t * q, k, tau_v * v)``: the reference :func:`selective` calls
:func:`qkv.reference.core.sdpa` that way (and inherits its masks, causal rule, grouped heads and
zero rows), and :func:`dispatched_selective` (``qkv.selective``) calls the dispatched
``qkv.sdpa``, so every backend that runs ``sdpa`` runs SSA.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from qkv import _arrays, _checks
from qkv.errors import ParameterError, ShapeError
from qkv.reference import core

Array = np.ndarray
#: $\beta$ at initialisation in the released GPT-2 pretraining code.
DEFAULT_BETA = 1.5


def default_positions(n_queries: int, n_keys: int) -> Array:
    r"""1-based query positions $p_i = i + 1 + \max(M - N, 0)$, int64 ``(N,)``.

    With $N \le M$ query $i$ sits where the causal rule of :func:`qkv.sdpa` puts it (bottom-right:
    the last query is at the last key), so a decode step over a cache gets the same temperature
    as in the full pass. The released code numbers the rows of each call ``1 .. T`` instead,
    which agrees when $N = M$.
    """
    return np.arange(1, n_queries + 1) + max(n_keys - n_queries, 0)


def position_temperature(positions: Array, beta: float | Array = DEFAULT_BETA) -> Array:
    r"""$\tau^{\mathrm{pos}} = 1 + e^{-e^{\beta}} \log p$, float64.

    ``positions`` are integers $\ge 1$ of any shape; ``beta`` a float (``inf`` turns the
    term off) or an array broadcastable against ``positions``.
    """
    with np.errstate(over="ignore"):  # exp(beta) overflows to inf for large beta: factor 0
        slope = np.exp(-np.exp(np.asarray(beta, dtype=np.float64)))
    return 1.0 + slope * np.log(np.asarray(positions, dtype=np.float64))


def token_temperature(x: Array, weight: Array, bias: Array | None = None) -> Array:
    r"""The token-aware inverse temperature chosen here, $\tau(x) = 1 + \tanh(w_h \cdot x + b_h)$.

    Args:
        x: a head's projected queries (or values) ``(B, H, N, D)``: the weights are shared with
            the projection that made them, only $w_h$ and $b_h$ are new.
        weight: ``(H, D)``.
        bias: ``(H,)`` or ``None``.

    Returns:
        ``(B, H, N)`` in the arithmetic dtype, in $(0, 2)$; all ones when ``weight`` and
        ``bias`` are zero.
    """
    _checks.array("x", x, rank=4, layout="(B, H, N, D)")
    B, H, N, D = x.shape
    _checks.array("weight", weight, rank=2, layout="(H, D)")
    if tuple(weight.shape) != (H, D):
        raise ShapeError(f"weight: expected (H, D) = ({H}, {D}), got {tuple(weight.shape)}")
    work = core._work_dtype(x.dtype)
    logit = np.einsum("bhnd,hd->bhn", x.astype(work, copy=False), weight.astype(work))
    if bias is not None:
        _checks.array("bias", bias, rank=1, layout="(H,)")
        if tuple(bias.shape) != (H,):
            raise ShapeError(f"bias: expected (H,) = ({H},), got {tuple(bias.shape)}")
        logit = logit + bias.astype(work)[:, None]  # (B, H, N)
    return 1.0 + np.tanh(logit)  # (B, H, N)


def _check_temperature(name: str, t: Any, target: tuple[int, int, int], layout: str) -> None:
    """Non-negative finite inverse temperatures broadcastable to ``target``."""
    if not _arrays.is_array(t):
        raise TypeError(f"{name}: expected an array broadcastable to {layout}, got {type(t)}")
    _checks.array(name, t, rank=t.ndim, layout=layout)
    try:
        ok = t.ndim <= 3 and np.broadcast_shapes(t.shape, target) == target
    except ValueError:
        ok = False
    if not ok:
        raise ShapeError(
            f"{name}: expected a shape broadcastable to {layout}={target}, got {t.shape}"
        )
    if not (np.isfinite(t).all() and (t >= 0).all()):
        raise ParameterError(f"{name}: expected finite values >= 0, got a negative, NaN or inf")


def _check(
    q: Array,
    k: Array,
    v: Array,
    *,
    beta: Any,
    positions: Array | None,
    query_temperature: Array | None,
    value_temperature: Array | None,
    **kwargs: Any,
) -> None:
    """All argument checks of selective attention, on NumPy arrays."""
    B, H, Hkv, N, M, D, Dv = _checks.attention(q, k, v, **kwargs)
    try:
        b = None if isinstance(beta, bool) else np.asarray(beta, dtype=np.float64)
    except (TypeError, ValueError):
        b = None
    if b is None or np.isnan(b).any() or (b == -np.inf).any():
        raise ParameterError(f"beta: expected a number (inf turns the term off), got {beta!r}")
    if b.ndim > 1 or (b.ndim == 1 and b.shape != (H,)):
        raise ShapeError(f"beta: expected a scalar or one per head ({H},), got shape {b.shape}")
    if positions is not None:
        p = np.asarray(positions)
        if p.shape not in ((N,), (B, N)) or p.dtype.kind not in "iu":
            raise ShapeError(
                f"positions: expected integers of shape ({N},) or ({B}, {N}), "
                f"got {p.dtype} {p.shape}"
            )
        if (p < 1).any():
            raise ParameterError(f"positions: expected 1-based positions >= 1, got {p.min()}")
    if query_temperature is not None:
        _check_temperature("query_temperature", query_temperature, (B, H, N), "(B, H, N)")
    if value_temperature is not None:
        _check_temperature("value_temperature", value_temperature, (B, Hkv, M), "(B, Hkv, M)")


def _selective(
    q: Array,
    k: Array,
    v: Array,
    attend: Callable[..., Any],
    *,
    beta: float | Array,
    positions: Array | None,
    query_temperature: Array | None,
    value_temperature: Array | None,
    **kwargs: Any,
) -> Any:
    """SSA on checked NumPy arrays as one call of ``attend`` (an sdpa) on tempered q and v."""
    B, H, N, D = q.shape
    M = k.shape[2]
    work = core._work_dtype(q.dtype)
    p = default_positions(N, M) if positions is None else np.asarray(positions)  # (N,) | (B, N)
    beta_h = np.reshape(beta, (-1, 1))  # (1, 1) or (H, 1): broadcasts against (.., H, N)
    t = position_temperature(p[..., None, :], beta_h)  # (1 | H, N) or (B, 1 | H, N)
    t = np.broadcast_to(t, (B, H, N))  # (B, H, N)
    if query_temperature is not None:
        t = t * query_temperature  # (B, H, N)
    q_hot = q.astype(work, copy=False) * t[..., None].astype(work)  # (B, H, N, D): t_i q_i
    v_hot = v.astype(work, copy=False)  # (B, Hkv, M, Dv)
    if value_temperature is not None:
        v_hot = v_hot * np.asarray(value_temperature, dtype=work)[..., None]  # tau_j v_j
    scale = kwargs.pop("scale", None)
    scale = float(1.0 / math.sqrt(D) if scale is None else scale)  # of D, not of the tempered q
    out = attend(q_hot, k.astype(work, copy=False), v_hot, scale=scale, **kwargs)
    return (
        out.astype(q.dtype, copy=False)
        if not isinstance(out, tuple)
        else tuple(o.astype(q.dtype, copy=False) if o.ndim == 4 else o for o in out)
    )


def selective(
    q: Array,
    k: Array,
    v: Array,
    *,
    beta: float | Array = DEFAULT_BETA,
    causal: bool = True,
    mask: Array | None = None,
    scale: float | None = None,
    positions: Array | None = None,
    query_temperature: Array | None = None,
    value_temperature: Array | None = None,
    return_weights: bool = False,
    return_lse: bool = False,
) -> Array | tuple[Array, ...]:
    r"""Selective Self-Attention: softmax with position, query and value temperatures.

    $$
    S_{ij} = \tau^{\mathrm{pos}}_i\,\tau^q_i\; s\,q_i \cdot k_j + B_{ij},\qquad
    \tau^{\mathrm{pos}}_i = 1 + e^{-e^{\beta}}\log p_i,\qquad
    O_i = \sum_j \operatorname{softmax}_j(S_{ij})\;\tau^v_j v_j .
    $$

    Args:
        q: queries ``(B, H, N, D)``.
        k: keys ``(B, Hkv, M, D)``, ``H % Hkv == 0``.
        v: values ``(B, Hkv, M, Dv)``.
        beta: $\beta$, a float or one per head ``(H,)``; ``inf`` turns the position term off.
            Default 1.5, the released GPT-2 pretraining initialisation.
        causal: the released code is a causal language model, so ``True`` by default; same
            bottom-right rule as :func:`qkv.sdpa`.
        mask: bool (True = attend) or additive, broadcastable to ``(B, H, N, M)``, added after
            the temperature.
        scale: $s$, default $1/\sqrt D$.
        positions: 1-based positions $p_i \ge 1$, integers ``(N,)`` or ``(B, N)``; default
            :func:`default_positions`.
        query_temperature: $\tau^q$, broadcastable to ``(B, H, N)``, finite and $\ge 0$
            (e.g. :func:`token_temperature` of ``q``); ``None`` is all ones.
        value_temperature: $\tau^v$, broadcastable to ``(B, Hkv, M)``, finite and $\ge 0$;
            ``None`` is all ones.
        return_weights: also return the weights ``softmax(S) (B, H, N, M)``.
        return_lse: also return ``logsumexp_j S_ij (B, H, N)``.

    Returns:
        As :func:`qkv.reference.core.sdpa`: ``O (B, H, N, Dv)`` in the dtype of ``q``, or the
        tuple with the weights and/or the lse. A query that sees no key gets zeros.
    """
    _check(
        q,
        k,
        v,
        beta=beta,
        positions=positions,
        query_temperature=query_temperature,
        value_temperature=value_temperature,
        mask=mask,
        causal=causal,
        scale=scale,
    )
    return _selective(
        q,
        k,
        v,
        core.sdpa,
        beta=beta,
        positions=positions,
        query_temperature=query_temperature,
        value_temperature=value_temperature,
        mask=mask,
        causal=causal,
        scale=scale,
        return_weights=return_weights,
        return_lse=return_lse,
    )


def dispatched_selective(
    q: Any,
    k: Any,
    v: Any,
    *,
    beta: float | Any = DEFAULT_BETA,
    causal: bool = True,
    mask: Any = None,
    scale: float | None = None,
    positions: Any = None,
    query_temperature: Any = None,
    value_temperature: Any = None,
    return_weights: bool = False,
    return_lse: bool = False,
    backend: Any = None,
) -> Any:
    """Selective attention as one call of the dispatched ``qkv.sdpa`` (``qkv.selective``).

    Same arguments and results as :func:`selective`, plus ``backend=`` (a name or module;
    default: the backend of ``qkv.use_backend`` / ``QKV_BACKEND``). The temperatures are
    applied in NumPy; results have the array type of ``q`` (torch tensors are detached).
    """
    import qkv  # here, not at the top: qkv's __init__ imports this module

    def host(x: Any) -> Any:
        return _arrays.to_numpy(x) if _arrays.is_array(x) else x

    arrays = {
        "positions": host(positions),
        "query_temperature": host(query_temperature),
        "value_temperature": host(value_temperature),
        "beta": host(beta),
    }
    qn, kn, vn, mask = host(q), host(k), host(v), host(mask)
    _check(qn, kn, vn, mask=mask, causal=causal, scale=scale, **arrays)

    def attend(x: Array, keys: Array, values: Array, **kwargs: Any) -> Any:
        return qkv.sdpa(x, keys, values, backend=backend, **kwargs)

    out = _selective(
        qn,
        kn,
        vn,
        attend,
        mask=mask,
        causal=causal,
        scale=scale,
        return_weights=return_weights,
        return_lse=return_lse,
        **arrays,
    )
    if isinstance(out, tuple):
        return tuple(_arrays.from_numpy(o, q) for o in out)
    return _arrays.from_numpy(out, q)
