r"""RoPE x ALiBi with harmonic-series slopes (Fulu Li, arXiv 2410.18441).

*The Nature of Mathematical Modeling and Probabilistic Optimization Engineering in Generative
AI* proposes "a factored combination of rotary positional encoding (RoPE) and attention with
linear biases (ALiBi) with a harmonic series". No official code is known, and only that
sentence of the paper was available when this module was written, so the formulation below is
**derived from it** and every choice is named.

**The score.** Rotate queries and keys by their positions (RoPE, arXiv 2104.09864) and add a
linear distance penalty per head (ALiBi, arXiv 2108.12409) whose slopes follow the harmonic
series instead of ALiBi's geometric one:

$$
S_{hij} = \underbrace{\text{scale}\,\big\langle R_{p_i} q_{hi},\, R_{p_j} k_{hj}\big\rangle}_{\text{RoPE}}
\;-\; \underbrace{m_h\,\lvert p_i - p_j\rvert}_{\text{ALiBi}},
\qquad m_h = \frac{1}{h},\quad h = 1, \dots, H,
$$

and $O = \operatorname{softmax}_j(S)\,V$. $R_p$ is the block-diagonal rotation by the angles
$p\,\theta_t$, $\theta_t = \text{base}^{-2t/D}$, so the first term depends on $p_i - p_j$ only.

**Why "factored".** The two positional terms add in the exponent, so the unnormalised weight is
a product of a RoPE factor and an ALiBi factor,

$$
e^{S_{hij}} = e^{\text{scale}\,\langle R_{p_i} q_{hi}, R_{p_j} k_{hj}\rangle}
\cdot r_h^{\lvert p_i - p_j\rvert}, \qquad r_h = e^{-m_h} = e^{-1/h},
$$

a rotation-dependent content match times a per-head geometric decay with distance: head 1
decays by $e^{-1}$ per token, head 2 by $e^{-1/2}$, head $h$ by $e^{-1/h}$. Each factor can be
switched off (``use_rope``, ``use_alibi``), which gives the two limits the tests check: without
ALiBi it is plain RoPE attention, without RoPE it is ALiBi attention with harmonic slopes (and
with ``slopes=qkv.alibi_slopes(H)`` exactly ALiBi).

**Choices where the paper's text is silent.**

* The slopes are $m_h = 1/h$, the harmonic series itself (pass ``slopes`` for any other
  non-negative finite values, for example a scaled series $c/h$). Another reading, a penalty
  $m_h\,H_{\lvert p_i - p_j\rvert}$ with the harmonic numbers $H_n = \sum_{t \le n} 1/t$ (a
  logarithmic decay), is not implemented.
* The penalty uses $\lvert p_i - p_j\rvert$: with ``causal=True`` (the default; ALiBi is a
  decoder scheme) only $p_j \le p_i$ is seen and this is ALiBi's $-m_h(p_i - p_j)$; without the
  mask it is the symmetric bidirectional form.
* Positions default to the bottom-right alignment of :func:`qkv.reference.core.sdpa`: key $j$ at
  $j$, query $i$ at $i + (M - N)$. ``causal`` masks by token index as ``sdpa`` does, which is
  masking by position whenever positions increase along the sequence.

**Backends.** Rotation and bias are linear-time NumPy; the attention is one softmax call with
the bias as an additive ``mask``. :func:`rope_alibi_harmonic` (the reference) calls
:func:`qkv.reference.core.sdpa`; :func:`dispatched_rope_alibi_harmonic` (``qkv.rope_alibi_harmonic``)
calls the dispatched ``qkv.sdpa``, so every backend that runs ``sdpa`` runs this mechanism.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from qkv import _arrays, _checks
from qkv.errors import ParameterError, ShapeError
from qkv.reference import core

Array = np.ndarray


def harmonic_slopes(n_heads: int) -> Array:
    r"""The harmonic series of slopes $m_h = 1/h$, $h = 1, \dots, H$, float64 ``(n_heads,)``."""
    n_heads = _checks.positive_int("n_heads", n_heads)
    return 1.0 / np.arange(1, n_heads + 1, dtype=np.float64)


def default_positions(n_queries: int, n_keys: int) -> tuple[Array, Array]:
    """Query positions ``arange(N) + (M - N)`` and key positions ``arange(M)``, int64.

    The bottom-right alignment of :func:`qkv.reference.core.sdpa`'s ``causal`` (and of
    :func:`qkv.reference.core.alibi`): the last query sits at the last key.
    """
    return np.arange(n_queries) + (n_keys - n_queries), np.arange(n_keys)


def harmonic_bias(slopes: Array, q_positions: Array, k_positions: Array) -> Array:
    r"""The ALiBi factor's additive bias $B_{hij} = -m_h\,\lvert p_i - p_j\rvert$.

    Args:
        slopes: $m_h$, ``(H,)``.
        q_positions: integer query positions ``(N,)``.
        k_positions: integer key positions ``(M,)``.

    Returns:
        float64 ``(H, N, M)``, broadcastable to the ``(B, H, N, M)`` scores.
    """
    distance = np.abs(q_positions[:, None] - k_positions[None, :])  # (N, M)
    return -np.asarray(slopes, dtype=np.float64)[:, None, None] * distance  # (H, N, M)


def _check_positions(name: str, positions: Any, length: int, axis: str) -> Array:
    positions = np.asarray(positions)
    if positions.shape != (length,) or positions.dtype.kind not in "iu":
        raise ShapeError(
            f"{name}: expected integer positions of shape ({length},), one per {axis}, "
            f"got {positions.dtype} {positions.shape}"
        )
    return positions.astype(np.int64)


def check_rope_alibi_harmonic(
    q: Any,
    k: Any,
    v: Any,
    *,
    slopes: Any = None,
    q_positions: Any = None,
    k_positions: Any = None,
    use_rope: bool = True,
    use_alibi: bool = True,
    causal: bool = True,
    scale: float | None = None,
    base: float = 10000.0,
    **_: Any,
) -> tuple[Array, Array, Array]:
    """Check every argument; return the slopes ``(H,)`` and the positions ``(N,)``, ``(M,)``.

    Raises ``ShapeError`` for the attention shapes of :func:`qkv.reference.core.sdpa`, an odd
    head dim with RoPE on (rotation needs feature pairs), slopes not of shape ``(H,)`` and
    positions of the wrong length or not integers; ``ParameterError`` for non-finite or negative
    slopes, a non-bool switch, or a base that is not a finite number > 1.
    """
    B, H, Hkv, N, M, D, Dv = _checks.attention(q, k, v, causal=causal, scale=scale)
    for name, flag in (("use_rope", use_rope), ("use_alibi", use_alibi)):
        if not isinstance(flag, (bool, np.bool_)):
            raise ParameterError(f"{name}: expected a bool, got {flag!r}")
    if use_rope and D % 2:
        raise ShapeError(
            f"q, k: expected an even head dim D (RoPE rotates feature pairs), got D={D}; "
            "pass use_rope=False for an odd D"
        )
    if not (isinstance(base, (int, float, np.integer, np.floating)) and np.isfinite(base)):
        raise ParameterError(f"base: expected a finite number > 1, got {base!r}")
    if base <= 1:
        raise ParameterError(f"base: expected a finite number > 1, got {base!r}")
    if slopes is None:
        slopes = harmonic_slopes(H)
    else:
        slopes = np.asarray(_arrays.to_numpy(slopes) if _arrays.is_array(slopes) else slopes)
        if slopes.shape != (H,) or slopes.dtype.kind not in "iuf":
            raise ShapeError(
                f"slopes: expected {H} real numbers, one per query head (H,), "
                f"got {slopes.dtype} {slopes.shape}"
            )
        slopes = slopes.astype(np.float64)
        if not np.isfinite(slopes).all() or (slopes < 0).any():
            raise ParameterError(f"slopes: expected finite values >= 0, got {slopes.tolist()}")
    qp, kp = default_positions(N, M)
    if q_positions is not None:
        qp = _check_positions("q_positions", q_positions, N, "query")
    if k_positions is not None:
        kp = _check_positions("k_positions", k_positions, M, "key")
    return slopes, qp, kp


def _rope_alibi(
    q: Array,
    k: Array,
    v: Array,
    attend: Callable[..., Any],
    slopes: Array,
    q_positions: Array,
    k_positions: Array,
    *,
    use_rope: bool,
    use_alibi: bool,
    causal: bool,
    scale: float | None,
    base: float,
    **kwargs: Any,
) -> Any:
    """The mechanism on checked NumPy arrays, with the softmax attention done by ``attend``."""
    if use_rope:
        q = core.rope(q, positions=q_positions, base=base)  # (B, H, N, D)
        k = core.rope(k, positions=k_positions, base=base)  # (B, Hkv, M, D)
    bias = None
    if use_alibi:
        # In the arithmetic dtype of the scores: float64 for float64, float32 otherwise.
        bias = harmonic_bias(slopes, q_positions, k_positions).astype(core._work_dtype(q.dtype))
    return attend(q, k, v, mask=bias, causal=causal, scale=scale, **kwargs)


def rope_alibi_harmonic(
    q: Array,
    k: Array,
    v: Array,
    *,
    slopes: Array | None = None,
    q_positions: Array | None = None,
    k_positions: Array | None = None,
    use_rope: bool = True,
    use_alibi: bool = True,
    causal: bool = True,
    scale: float | None = None,
    base: float = 10000.0,
    return_weights: bool = False,
) -> Array | tuple[Array, Array]:
    r"""Attention with RoPE-rotated queries and keys and a harmonic-slope ALiBi bias.

    $O = \operatorname{softmax}\big(\text{scale}\,\langle R_{p_i} q_i, R_{p_j} k_j\rangle
    - m_h \lvert p_i - p_j\rvert\big)\,V$ with $m_h = 1/h$ (see the module docstring for the
    derivation and the choices made).

    Args:
        q: queries ``(B, H, N, D)``; ``D`` even unless ``use_rope=False``.
        k: keys ``(B, Hkv, M, D)``, ``H % Hkv == 0`` (grouped heads as in ``sdpa``).
        v: values ``(B, Hkv, M, Dv)``.
        slopes: $m_h$ per query head ``(H,)``, finite and >= 0; default the harmonic series
            ``1, 1/2, ..., 1/H``.
        q_positions: integer query positions ``(N,)``; default ``arange(N) + (M - N)``.
        k_positions: integer key positions ``(M,)``; default ``arange(M)``.
        use_rope: apply the rotation factor (``False``: ALiBi attention alone).
        use_alibi: apply the distance-decay factor (``False``: RoPE attention alone).
        causal: query ``i`` sees key ``j`` only if ``j <= i + (M - N)`` (as ``sdpa``).
        scale: multiplies the rotated dot products; default $1/\sqrt D$.
        base: RoPE's frequency base (10000 as in RoFormer).
        return_weights: also return the attention weights ``(B, H, N, M)``.

    Returns:
        ``O (B, H, N, Dv)`` in the dtype of ``q`` (float64 arithmetic for float64), or
        ``(O, P)`` with ``return_weights``. A query that sees no key gets zeros.
    """
    slopes, qp, kp = check_rope_alibi_harmonic(
        q,
        k,
        v,
        slopes=slopes,
        q_positions=q_positions,
        k_positions=k_positions,
        use_rope=use_rope,
        use_alibi=use_alibi,
        causal=causal,
        scale=scale,
        base=base,
    )
    return _rope_alibi(
        q,
        k,
        v,
        core.sdpa,
        slopes,
        qp,
        kp,
        use_rope=use_rope,
        use_alibi=use_alibi,
        causal=causal,
        scale=scale,
        base=base,
        return_weights=return_weights,
    )


def dispatched_rope_alibi_harmonic(
    q: Any,
    k: Any,
    v: Any,
    *,
    slopes: Any = None,
    q_positions: Any = None,
    k_positions: Any = None,
    use_rope: bool = True,
    use_alibi: bool = True,
    causal: bool = True,
    scale: float | None = None,
    base: float = 10000.0,
    backend: Any = None,
) -> Any:
    """RoPE x harmonic ALiBi with the attention run by the dispatched ``qkv.sdpa``.

    Same arguments and result as :func:`rope_alibi_harmonic` (without ``return_weights``),
    plus ``backend=`` (a name or module; default: the backend of ``qkv.use_backend`` /
    ``QKV_BACKEND``). Rotation and bias are computed in NumPy and the bias reaches ``sdpa`` as
    an additive ``mask``. Arrays of any kind are accepted and the result has the type of ``q``
    (torch tensors are detached: no gradient flows through this form).
    """
    import qkv  # here, not at the top: qkv's __init__ imports this module

    qn, kn, vn = (_arrays.to_numpy(x) for x in (q, k, v))
    host = {
        name: _arrays.to_numpy(x) if _arrays.is_array(x) else x
        for name, x in (("q_positions", q_positions), ("k_positions", k_positions))
    }
    options = dict(use_rope=use_rope, use_alibi=use_alibi, causal=causal, scale=scale, base=base)
    slopes, qp, kp = check_rope_alibi_harmonic(qn, kn, vn, slopes=slopes, **host, **options)

    def attend(*args: Any, **kwargs: Any) -> Any:
        return qkv.sdpa(*args, backend=backend, **kwargs)

    out = _rope_alibi(qn, kn, vn, attend, slopes, qp, kp, **options)
    return _arrays.from_numpy(out, q)
