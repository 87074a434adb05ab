"""Properties of the reference softmax attention, rope and alibi.

Each test compares with an independent computation (torch SDPA in float64, explicit loops,
``scipy.special.logsumexp``, complex multiplication for rope) or a property stated in a paper.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import logsumexp

from qkv.reference import core

torch = pytest.importorskip("torch")
F = torch.nn.functional


def qkv_arrays(rng, B=2, H=4, Hkv=2, N=7, M=9, D=8, Dv=None, dtype=np.float64):
    Dv = D if Dv is None else Dv
    q = rng.standard_normal((B, H, N, D)).astype(dtype)
    k = rng.standard_normal((B, Hkv, M, D)).astype(dtype)
    v = rng.standard_normal((B, Hkv, M, Dv)).astype(dtype)
    return q, k, v


def torch_attention(q, k, v, *, mask=None, causal=False, scale=None):
    """torch SDPA in float64, with the bottom-right causal rule spelled out as a bool mask."""
    N, M = q.shape[2], k.shape[2]
    t = [torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64)) for a in (q, k, v)]
    attn_mask = None if mask is None else torch.from_numpy(np.asarray(mask))
    if causal:
        lower_right = torch.ones(N, M, dtype=torch.bool).tril(diagonal=M - N)
        attn_mask = lower_right if attn_mask is None else (attn_mask & lower_right)
    out = F.scaled_dot_product_attention(*t, attn_mask=attn_mask, scale=scale, enable_gqa=True)
    return out.numpy()


def loop_attention(q, k, v, allowed, scale):
    """Attention by explicit loops over every (b, h, i): the equation, one row at a time."""
    B, H, N, _ = q.shape
    G = H // k.shape[1]
    out = np.zeros((B, H, N, v.shape[-1]))
    for b in range(B):
        for h in range(H):
            for i in range(N):
                keys = [j for j in range(k.shape[2]) if allowed[b, h, i, j]]
                if not keys:
                    continue
                s = np.array([scale * q[b, h, i] @ k[b, h // G, j] for j in keys])
                w = np.exp(s - s.max())
                w /= w.sum()
                out[b, h, i] = sum(wj * v[b, h // G, j] for wj, j in zip(w, keys, strict=True))
    return out


@pytest.mark.parametrize(
    ("B", "H", "Hkv", "N", "M", "D", "Dv"),
    [
        (1, 1, 1, 1, 1, 4, 4),
        (2, 4, 2, 7, 9, 8, 5),
        (1, 6, 3, 13, 5, 16, 16),
        (1, 8, 1, 3, 17, 3, 7),
    ],
)
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_matches_torch_sdpa(B, H, Hkv, N, M, D, Dv, causal):
    rng = np.random.default_rng(0)
    q, k, v = qkv_arrays(rng, B, H, Hkv, N, M, D, Dv)
    if causal and N > M:  # torch gives NaN for rows with no key; those are zeros here
        ours = core.sdpa(q, k, v, causal=True)
        assert np.all(ours[:, :, : N - M] == 0)
        np.testing.assert_allclose(
            ours[:, :, N - M :], torch_attention(q, k, v, causal=True)[:, :, N - M :], atol=1e-12
        )
        return
    np.testing.assert_allclose(
        core.sdpa(q, k, v, causal=causal), torch_attention(q, k, v, causal=causal), atol=1e-12
    )


def test_sdpa_matches_explicit_loops_with_mask_and_causal():
    rng = np.random.default_rng(1)
    q, k, v = qkv_arrays(rng, B=2, H=4, Hkv=2, N=5, M=8, D=4, Dv=3)
    mask = rng.random((2, 1, 5, 8)) > 0.4
    mask[1, 0, 2] = False  # a fully masked row
    allowed = mask & core.causal_allowed(5, 8)
    allowed = np.broadcast_to(allowed, (2, 4, 5, 8))
    ours = core.sdpa(q, k, v, mask=mask, causal=True, scale=0.3)
    np.testing.assert_allclose(ours, loop_attention(q, k, v, allowed, 0.3), atol=1e-12)


def test_additive_mask_matches_torch_and_minus_inf_masks():
    rng = np.random.default_rng(2)
    q, k, v = qkv_arrays(rng)
    bias = rng.standard_normal((1, 4, 7, 9))
    bias[..., 3] = -np.inf
    np.testing.assert_allclose(core.sdpa(q, k, v, mask=bias), torch_attention(q, k, v, mask=bias))
    w = core.sdpa(q, k, v, mask=bias, return_weights=True)[1]
    assert np.all(w[..., 3] == 0)


def test_grouped_heads_equal_repeated_kv_heads():
    rng = np.random.default_rng(3)
    q, k, v = qkv_arrays(rng, H=6, Hkv=2)
    repeated = core.sdpa(q, np.repeat(k, 3, axis=1), np.repeat(v, 3, axis=1))
    np.testing.assert_allclose(core.sdpa(q, k, v), repeated, atol=1e-14)


def test_weights_are_a_distribution_and_lse_is_logsumexp():
    rng = np.random.default_rng(4)
    q, k, v = qkv_arrays(rng, N=6, M=6)
    out, w, lse = core.sdpa(q, k, v, causal=True, scale=0.7, return_weights=True, return_lse=True)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-14)
    scores = 0.7 * np.einsum("bhnd,bhmd->bhnm", q, np.repeat(k, 2, axis=1))
    scores = np.where(core.causal_allowed(6, 6), scores, -np.inf)
    np.testing.assert_allclose(lse, logsumexp(scores, axis=-1), atol=1e-12)
    np.testing.assert_allclose(out, np.einsum("bhnm,bhmd->bhnd", w, np.repeat(v, 2, axis=1)))


def test_fully_masked_rows_give_zeros_not_nan():
    rng = np.random.default_rng(5)
    q, k, v = qkv_arrays(rng)
    mask = np.ones((7, 9), dtype=bool)
    mask[[0, 4]] = False
    for fn in (core.sdpa, core.flash):
        out, w, lse = fn(q, k, v, mask=mask, return_weights=True, return_lse=True)
        assert np.all(out[:, :, [0, 4]] == 0) and np.all(w[:, :, [0, 4]] == 0)
        assert np.all(np.isneginf(lse[:, :, [0, 4]]))
        assert np.isfinite(out).all() and np.isfinite(w).all()


def test_causal_with_more_queries_than_keys_aligns_bottom_right():
    rng = np.random.default_rng(6)
    q, k, v = qkv_arrays(rng, N=9, M=4)
    out = core.sdpa(q, k, v, causal=True)
    assert np.all(out[:, :, :5] == 0)  # queries 0..4 sit before the first key
    np.testing.assert_allclose(out[:, :, -1], core.sdpa(q[:, :, -1:], k, v)[:, :, 0])


@pytest.mark.parametrize("magnitude", [1e2, 1e4])
def test_large_logits_stay_finite(magnitude):
    rng = np.random.default_rng(7)
    q, k, v = qkv_arrays(rng, dtype=np.float32)
    q = q * np.float32(magnitude)
    for fn in (core.sdpa, core.flash):
        out, lse = fn(q, k, v, return_lse=True)
        assert np.isfinite(out).all() and np.isfinite(lse).all()
    golden = core.sdpa(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64))
    # at logits of 1e4 the softmax is one-hot: the output is the value of the arg-max key
    np.testing.assert_allclose(core.sdpa(q, k, v), golden, atol=1e-3 if magnitude > 1e3 else 1e-5)


@pytest.mark.parametrize(("block_q", "block_k"), [(1, 1), (3, 5), (64, 64), (100, 2)])
@pytest.mark.parametrize("causal", [False, True])
def test_flash_equals_sdpa_for_any_tiling(block_q, block_k, causal):
    rng = np.random.default_rng(8)
    q, k, v = qkv_arrays(rng, N=11, M=13, Dv=6)
    mask = rng.random((2, 4, 11, 13)) > 0.3
    kw = dict(mask=mask, causal=causal, return_weights=True, return_lse=True)
    want = core.sdpa(q, k, v, **kw)
    got = core.flash(q, k, v, block_q=block_q, block_k=block_k, **kw)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-13)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_dtype_is_kept_and_inputs_are_not_modified(dtype):
    rng = np.random.default_rng(9)
    q, k, v = qkv_arrays(rng, dtype=dtype)
    copies = [a.copy() for a in (q, k, v)]
    for fn in (core.sdpa, core.flash):
        out, w, lse = fn(q, k, v, causal=True, return_weights=True, return_lse=True)
        assert out.dtype == dtype and w.dtype == dtype
        assert lse.dtype == (np.float64 if dtype == np.float64 else np.float32)
    for a, c in zip((q, k, v), copies, strict=True):
        np.testing.assert_array_equal(a, c)


def test_nan_in_a_query_row_stays_in_that_row():
    rng = np.random.default_rng(10)
    q, k, v = qkv_arrays(rng)
    q[0, 1, 3, 2] = np.nan
    for fn in (core.sdpa, core.flash):
        nan_rows = np.isnan(fn(q, k, v)).any(-1)
        assert nan_rows[0, 1, 3] and nan_rows.sum() == 1


def test_nan_in_a_key_reaches_only_rows_that_see_it():
    rng = np.random.default_rng(11)
    q, k, v = qkv_arrays(rng, N=6, M=6, H=2, Hkv=1)
    k[0, 0, 4, 0] = np.nan
    for fn in (core.sdpa, core.flash):
        nan_rows = np.isnan(fn(q, k, v, causal=True)).any(-1)
        assert not nan_rows[0, :, :4].any() and nan_rows[0, :, 4:].all()
        assert not nan_rows[1].any()


def test_rope_equals_complex_rotation():
    """RoFormer eq. (34): pairs are complex numbers multiplied by exp(i p theta)."""
    rng = np.random.default_rng(12)
    x = rng.standard_normal((2, 3, 5, 8))
    positions = np.array([0, 3, 7, 8, 20])
    theta = 10000.0 ** (-np.arange(0, 8, 2) / 8)
    z = x[..., 0::2] + 1j * x[..., 1::2]
    rotated = z * np.exp(1j * positions[:, None] * theta)
    want = np.stack([rotated.real, rotated.imag], axis=-1).reshape(x.shape)
    np.testing.assert_allclose(core.rope(x, positions=positions), want, atol=1e-12)
    half = core.rope(x, positions=positions, pairing="half")
    zh = x[..., :4] + 1j * x[..., 4:]
    rh = zh * np.exp(1j * positions[:, None] * theta)
    np.testing.assert_allclose(half, np.concatenate([rh.real, rh.imag], -1), atol=1e-12)


@pytest.mark.parametrize("pairing", ["adjacent", "half"])
def test_rope_scores_depend_only_on_relative_position(pairing):
    rng = np.random.default_rng(13)
    q = rng.standard_normal((1, 1, 1, 16))
    k = rng.standard_normal((1, 1, 1, 16))

    def score(m, n):
        qm = core.rope(q, positions=np.array([m]), pairing=pairing)
        kn = core.rope(k, positions=np.array([n]), pairing=pairing)
        return float((qm * kn).sum())

    assert score(5, 2) == pytest.approx(score(103, 100), abs=1e-10)
    assert score(0, 0) == pytest.approx(float((q * k).sum()), abs=1e-12)
    x = rng.standard_normal((2, 2, 6, 16))
    np.testing.assert_allclose(
        np.linalg.norm(core.rope(x, offset=9, pairing=pairing), axis=-1),
        np.linalg.norm(x, axis=-1),
    )
    np.testing.assert_allclose(
        core.rope(x, offset=9, pairing=pairing),
        core.rope(x, positions=np.arange(9, 15), pairing=pairing),
    )


def test_rope_batch_positions_and_dtype():
    rng = np.random.default_rng(14)
    x = rng.standard_normal((2, 3, 4, 6)).astype(np.float32)
    positions = np.array([[0, 1, 2, 3], [5, 6, 7, 8]])
    out = core.rope(x, positions=positions)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[1:], core.rope(x[1:], offset=5), atol=1e-6)


def test_alibi_slopes_are_the_papers():
    """Press et al.: 8 heads get 1/2 ... 1/2^8; 16 heads get 1/2^0.5, 1/2, ..., 1/2^8."""
    np.testing.assert_allclose(core.alibi_slopes(8), 2.0 ** -np.arange(1, 9))
    np.testing.assert_allclose(core.alibi_slopes(16), 2.0 ** -np.arange(0.5, 8.5, 0.5))
    six = core.alibi_slopes(6)  # 4 of the 4-head sequence, then 2 from the 8-head one
    np.testing.assert_allclose(six, [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3])


def test_alibi_bias_penalises_distance_linearly():
    bias = core.alibi(4, 3, 5)
    slopes = core.alibi_slopes(4)
    for h in range(4):
        for i in range(3):
            for j in range(5):
                assert bias[h, i, j] == pytest.approx(-slopes[h] * ((i + 2) - j))
    sym = core.alibi(2, 4, 4, symmetric=True)
    np.testing.assert_allclose(sym, np.transpose(sym, (0, 2, 1)))
