"""Properties of the reference selective attention (Zhang et al., arXiv 2411.12892).

Independent computations: the tempered scores written out in NumPy (temperature times the
scaled dot products, then the mask, as the released code does) and vanilla attention from
:func:`qkv.reference.core.sdpa`; the properties the paper and the code state.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import qkv
from qkv import _dispatch
from qkv.reference import core
from qkv.reference.forms.selective_attention import (
    default_positions,
    dispatched_selective,
    position_temperature,
    selective,
    token_temperature,
)

BACKENDS = [
    name
    for name in ("reference", "numba", "torch", "cupy")
    if _dispatch.availability(_dispatch.load(name))[0]
]


def arrays(rng, B=2, H=4, Hkv=2, N=7, M=9, D=8, Dv=5):
    q = rng.standard_normal((B, H, N, D))
    k = rng.standard_normal((B, Hkv, M, D))
    v = rng.standard_normal((B, Hkv, M, Dv))
    return q, k, v


def explicit(q, k, v, beta, *, causal=True, tq=1.0, tv=1.0, positions=None):
    """Weights and output from the tempered scores, one formula per line of the paper."""
    B, H, N, D = q.shape
    G, M = H // k.shape[1], k.shape[2]
    k, v = np.repeat(k, G, axis=1), np.repeat(v * np.asarray(tv)[..., None], G, axis=1)
    p = np.arange(1, N + 1) + max(M - N, 0) if positions is None else positions
    t_pos = 1 + np.exp(-np.exp(beta)) * np.log(p)  # (N,)
    logits = np.einsum("bhnd,bhmd->bhnm", q, k) / np.sqrt(D)  # (B, H, N, M)
    s = logits * (t_pos * np.broadcast_to(tq, (B, H, N)))[..., None]
    if causal:
        s = np.where(core.causal_allowed(N, M), s, -np.inf)
    w = np.exp(s - s.max(axis=-1, keepdims=True))
    w /= w.sum(axis=-1, keepdims=True)
    return w, w @ v


@pytest.mark.parametrize("beta", [-2.0, 0.0, 1.5])
@pytest.mark.parametrize(("N", "M"), [(7, 9), (9, 9), (1, 5)])
def test_tempered_scores(beta, N, M):
    q, k, v = arrays(np.random.default_rng(0), N=N, M=M)
    w, o = explicit(q, k, v, beta)
    out, weights = selective(q, k, v, beta=beta, return_weights=True)
    np.testing.assert_allclose(weights, w, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out, o, rtol=1e-12, atol=1e-12)


def test_large_beta_recovers_vanilla_attention():
    q, k, v = arrays(np.random.default_rng(1))
    vanilla = core.sdpa(q, k, v, causal=True)
    np.testing.assert_allclose(selective(q, k, v, beta=np.inf), vanilla, rtol=0, atol=0)
    np.testing.assert_allclose(selective(q, k, v, beta=5.0), vanilla, rtol=1e-12, atol=1e-12)
    assert np.abs(selective(q, k, v, beta=-2.0) - vanilla).max() > 1e-2  # the term does act


def test_first_row_is_unaffected_by_the_position_term():
    q, k, v = arrays(np.random.default_rng(2), N=9, M=9)
    vanilla = core.sdpa(q, k, v)
    out = selective(q, k, v, beta=-3.0, causal=False)  # position 1 for row 0: log 1 = 0
    np.testing.assert_allclose(out[:, :, 0], vanilla[:, :, 0], rtol=1e-12, atol=1e-12)
    assert np.abs(out[:, :, 1:] - vanilla[:, :, 1:]).min(axis=-1).max() > 0


def test_temperatures_of_one_recover_vanilla():
    q, k, v = arrays(np.random.default_rng(3))
    ones = dict(query_temperature=np.ones((2, 4, 7)), value_temperature=np.ones((2, 2, 9)))
    for causal in (True, False):
        vanilla = core.sdpa(q, k, v, causal=causal)
        out = selective(q, k, v, beta=np.inf, causal=causal, **ones)
        np.testing.assert_allclose(out, vanilla, rtol=1e-12, atol=1e-12)


def test_query_and_value_temperatures():
    rng = np.random.default_rng(4)
    q, k, v = arrays(rng)
    tq = rng.uniform(0.2, 3.0, (2, 4, 7))
    tv = rng.uniform(0.0, 2.0, (9,))  # broadcast over batch and KV heads
    w, o = explicit(q, k, v, 0.5, tq=tq, tv=tv)
    out, weights = selective(
        q, k, v, beta=0.5, query_temperature=tq, value_temperature=tv, return_weights=True
    )
    np.testing.assert_allclose(weights, w, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out, o, rtol=1e-12, atol=1e-12)


def row_entropy(w):
    return -(w * np.log(np.where(w > 0, w, 1.0))).sum(-1)


def test_lower_query_temperature_flattens_the_row():
    q, k, v = arrays(np.random.default_rng(5))
    _, hot = selective(q, k, v, beta=np.inf, return_weights=True)
    _, cold = selective(q, k, v, beta=np.inf, query_temperature=np.zeros(7), return_weights=True)
    visible = core.causal_allowed(7, 9)  # temperature 0: uniform over the visible keys
    np.testing.assert_allclose(
        cold, np.broadcast_to(visible / visible.sum(-1, keepdims=True), cold.shape)
    )
    assert (row_entropy(hot) <= row_entropy(cold) + 1e-12).all()


def test_token_temperature_is_one_at_zero_weights_and_in_range():
    rng = np.random.default_rng(6)
    q = rng.standard_normal((2, 4, 7, 8))
    np.testing.assert_array_equal(token_temperature(q, np.zeros((4, 8))), np.ones((2, 4, 7)))
    w, b = rng.standard_normal((4, 8)), rng.standard_normal(4)
    t = token_temperature(q, w, b)
    np.testing.assert_allclose(t, 1 + np.tanh(np.einsum("bhnd,hd->bhn", q, w) + b[:, None]))
    assert ((t > 0) & (t < 2)).all()


def test_position_temperature_grows_with_log_position():
    p = np.arange(1, 1025)
    t = position_temperature(p, 0.0)
    np.testing.assert_allclose(t, 1 + np.exp(-1.0) * np.log(p))
    assert t[0] == 1.0 and (np.diff(t) > 0).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow warning for huge beta
        assert (position_temperature(p, 1e6) == 1.0).all()


def test_a_decode_step_gets_the_rows_of_the_full_pass():
    q, k, v = arrays(np.random.default_rng(7), N=9, M=9)
    full = selective(q, k, v, beta=-1.0)
    step = selective(q[:, :, -2:], k, v, beta=-1.0)  # the last 2 queries against the cache
    np.testing.assert_allclose(step, full[:, :, -2:], rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(default_positions(2, 9), [8, 9])


def test_explicit_positions_per_batch_and_per_head_beta():
    rng = np.random.default_rng(8)
    q, k, v = arrays(rng, N=5, M=5)
    positions = np.array([[1, 2, 3, 4, 5], [10, 20, 30, 40, 50]])
    beta = np.array([-1.0, 0.0, 1.0, np.inf])
    out = selective(q, k, v, beta=beta, positions=positions, causal=False)
    for b in range(2):
        for h in range(4):
            _, o = explicit(
                q[b : b + 1, h : h + 1],
                k[b : b + 1, h // 2 : h // 2 + 1],
                v[b : b + 1, h // 2 : h // 2 + 1],
                beta[h],
                causal=False,
                positions=positions[b],
            )
            np.testing.assert_allclose(out[b, h], o[0, 0], rtol=1e-12, atol=1e-12)


def test_masked_rows_are_zero_and_float32_stays_float32():
    q, k, v = (x.astype(np.float32) for x in arrays(np.random.default_rng(9), N=6, M=3))
    out = selective(q, k, v, beta=-1.0)  # N > M, causal: the first 3 rows see no key
    assert out.dtype == np.float32
    assert np.isfinite(out).all() and (out[:, :, :3] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_dispatched_matches_the_reference_on_every_backend(backend):
    rng = np.random.default_rng(10)
    q, k, v = arrays(rng, N=33, M=40)
    kwargs = dict(
        beta=-0.5,
        query_temperature=rng.uniform(0.5, 2, (2, 4, 33)),
        value_temperature=rng.uniform(0, 2, (2, 2, 40)),
    )
    golden = selective(q, k, v, **kwargs)
    f32 = {
        key: x.astype(np.float32) if isinstance(x, np.ndarray) else x for key, x in kwargs.items()
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error", qkv.FallbackWarning)  # sdpa runs natively
        out = dispatched_selective(
            *(x.astype(np.float32) for x in (q, k, v)), backend=backend, **f32
        )
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, golden, rtol=1e-5, atol=1e-5)


def test_dispatched_returns_the_callers_array_type():
    torch = pytest.importorskip("torch")
    q, k, v = arrays(np.random.default_rng(11))
    out, w = dispatched_selective(*(torch.from_numpy(x) for x in (q, k, v)), return_weights=True)
    assert isinstance(out, torch.Tensor) and isinstance(w, torch.Tensor)
    np.testing.assert_allclose(out.numpy(), selective(q, k, v), atol=1e-12)


BAD = {
    "NaN beta": (dict(beta=np.nan), qkv.ParameterError, "beta"),
    "beta of the wrong heads": (dict(beta=np.zeros(3)), qkv.ShapeError, r"\(4,\)"),
    "negative query temperature": (
        dict(query_temperature=-np.ones(7)),
        qkv.ParameterError,
        "query_temperature",
    ),
    "NaN value temperature": (
        dict(value_temperature=np.full(9, np.nan)),
        qkv.ParameterError,
        "value_temperature",
    ),
    "value temperature of the wrong length": (
        dict(value_temperature=np.ones(7)),
        qkv.ShapeError,
        "value_temperature",
    ),
    "position 0": (dict(positions=np.arange(7)), qkv.ParameterError, ">= 1"),
    "float positions": (dict(positions=np.ones(7)), qkv.ShapeError, "integers"),
    "rank 3 query": (dict(q=np.zeros((4, 7, 8))), qkv.ShapeError, "q: expected rank 4"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
@pytest.mark.parametrize("fn", [selective, dispatched_selective], ids=["reference", "dispatched"])
def test_bad_input(case, fn):
    kwargs, error, message = BAD[case]
    q, k, v = arrays(np.random.default_rng(12))
    kwargs = dict(kwargs)  # a copy: the table is shared by every run
    q = kwargs.pop("q", q)
    with pytest.raises(error, match=message):
        fn(q, k, v, **kwargs)
