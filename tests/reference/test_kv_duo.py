"""DuoAttention (arXiv 2410.10819): gated full/streaming heads, gate training, the KV policy.

Independent references: an explicit per-query loop over allowed keys in float64, the lab's torch
twin and NumPy forward (two implementations of the same model), and the full forward with each
streaming head's evicted keys masked.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qkv
from qkv.errors import ParameterError, ShapeError
from qkv.lab import decoder as dec
from qkv.lab import engine
from qkv.lab.train import to_torch
from qkv.reference.kv import DuoAttention, duo
from qkv.reference.kv.duo_attention import duo_attention, retrieval_heads, streaming_mask
from qkv.reference.kv.duo_training import gated_hidden, train_gates

SMALL = dec.DecoderConfig(n_layers=2, d_model=64, d_ff=96, max_len=128)


@pytest.fixture(scope="module")
def model():
    return dec.init_weights(SMALL, seed=5)


def loop_duo(q, k, v, gates, n_sink, recent):
    """Brute force: each query's softmax over its allowed keys, written as loops."""
    B, H, N, _ = q.shape
    M, group = k.shape[2], H // k.shape[1]
    out = np.zeros((B, H, N, v.shape[-1]))
    for b in range(B):
        for h in range(H):
            g = h // group
            for i in range(N):
                t = M - N + i
                both = []
                for streaming in (False, True):
                    keys = [
                        j for j in range(t + 1) if not streaming or j < n_sink or t - j < recent
                    ]
                    s = np.array([q[b, h, i] @ k[b, g, j] for j in keys]) / np.sqrt(q.shape[-1])
                    p = np.exp(s - s.max())
                    both.append((p / p.sum()) @ v[b, g, keys])
                out[b, h, i] = gates[g] * both[0] + (1 - gates[g]) * both[1]
    return out


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(1, 12),
    extra=st.integers(0, 4),
    hkv=st.sampled_from([1, 2]),
    n_sink=st.integers(0, 3),
    recent=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_gated_mix_matches_a_loop(n, extra, hkv, n_sink, recent, seed):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((1, 2 * hkv, n, 4))
    k = rng.standard_normal((1, hkv, n + extra, 4))
    v = rng.standard_normal((1, hkv, n + extra, 3))
    gates = rng.uniform(size=hkv)
    got = duo_attention(q, k, v, gates, n_sink=n_sink, recent=recent)
    want = loop_duo(q, k, v, gates, n_sink, recent)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    assert got.dtype == np.float64


def test_gates_one_is_full_attention_and_short_streaming_is_full():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 4, 9, 8)).astype(np.float32) for _ in range(3))
    full = qkv.sdpa(q, k, v, causal=True)
    np.testing.assert_allclose(duo_attention(q, k, v, np.ones(4)), full, atol=1e-6)
    # a streaming head over no more than sink + recent tokens sees everything anyway
    short = duo_attention(q, k, v, np.zeros(4), n_sink=4, recent=5)
    np.testing.assert_allclose(short, full, atol=1e-6)
    assert short.dtype == np.float32


def test_streaming_mask_is_sinks_and_window():
    m = streaming_mask(6, 6, n_sink=1, recent=2)
    rows = [np.flatnonzero(r).tolist() for r in m]
    assert rows == [[0], [0, 1], [0, 1, 2], [0, 2, 3], [0, 3, 4], [0, 4, 5]]


def test_retrieval_heads_by_threshold_and_sparsity():
    gates = np.array([[0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.7, 0.0]])
    assert (retrieval_heads(gates) == (gates >= 0.5)).all()
    for sparsity, n_streaming in [(0.0, 0), (0.25, 2), (0.5, 4), (0.75, 6), (1.0, 8)]:
        full = retrieval_heads(gates, sparsity=sparsity)
        assert (~full).sum() == n_streaming
        if 0 < n_streaming < 8:  # the streaming heads are the lowest gates
            assert gates[~full].max() < gates[full].min()
    tied = np.full((2, 2), 0.5)  # ties broken by noise, reproducibly
    a, b = retrieval_heads(tied, sparsity=0.5, seed=3), retrieval_heads(tied, sparsity=0.5, seed=3)
    assert a.sum() == 2 and (a == b).all()


def test_policy_keeps_full_retrieval_heads_and_window_elsewhere(model):
    policy = duo(gates=[[1.0, 0.0], [0.2, 0.7]], n_sink=2, recent=5)
    assert isinstance(policy, DuoAttention)
    prompt = np.random.default_rng(1).integers(0, SMALL.vocab, size=30)
    g = engine.generate(model, prompt, 4, policy=policy)
    n = 30 + 3
    window = [0, 1, *range(n - 5, n)]
    for layer, full in enumerate([[True, False], [False, True]]):
        c = g.cache.layers[layer]
        for h in range(2):
            kept = c.indices[0, h][c.indices[0, h] >= 0].tolist()
            assert kept == (list(range(n)) if full[h] else window)
            assert (c.positions[0, h][: len(kept)] == kept).all()  # no position shift


def test_all_retrieval_equals_full_cache(model):
    prompt = np.random.default_rng(2).integers(0, SMALL.vocab, size=40)
    full = engine.generate(model, prompt, 5)
    gated = engine.generate(model, prompt, 5, policy=DuoAttention(gates=np.ones((2, 2))))
    np.testing.assert_array_equal(full.logits, gated.logits)


def test_decode_step_equals_full_forward_with_streaming_keys_masked(model):
    p, new = np.random.default_rng(3).integers(0, SMALL.vocab, size=50), 11
    policy = DuoAttention(gates=[[0.0, 1.0], [1.0, 0.0]], n_sink=3, recent=6)
    _, cache = engine.prefill(model, p, policy=policy)
    logits, _ = engine.decode_step(model, cache, np.array([new]), policy=policy)
    streaming_rows = streaming_mask(51, 51, n_sink=3, recent=7)[-1]  # kept 6 + the new token

    def masked(layer, q, k, v):
        mask = np.broadcast_to(np.tril(np.ones((51, 51), dtype=bool)), (1, 8, 51, 51)).copy()
        streaming = [0] if layer == 0 else [1]
        for g in streaming:
            mask[0, 4 * g : 4 * g + 4, -1] = streaming_rows
        return qkv.sdpa(q, k, v, mask=mask)

    want = dec.forward(model, np.concatenate([p, [new]]), attention=masked)[0, -1]
    np.testing.assert_allclose(logits[0], want, rtol=1e-4, atol=1e-4)


def test_torch_gated_model_matches_numpy_forward(model):
    tokens = np.random.default_rng(4).integers(0, SMALL.vocab, size=(2, 24))
    gates = np.array([[0.3, 1.0], [0.0, 0.6]])
    tm = to_torch(model)
    with torch.no_grad():
        h = gated_hidden(
            tm, torch.from_numpy(tokens), torch.from_numpy(gates).float(), n_sink=2, recent=4
        )
        ones = gated_hidden(tm, torch.from_numpy(tokens), torch.ones(2, 2), n_sink=2, recent=4)
        np.testing.assert_allclose(
            (ones @ tm.p("embed").T).numpy(), tm(torch.from_numpy(tokens)).numpy(), atol=1e-4
        )
    attn = lambda i, q, k, v: duo_attention(q, k, v, gates[i], n_sink=2, recent=4)  # noqa: E731
    want = dec.forward(model, tokens, attention=attn)
    np.testing.assert_allclose((h @ tm.p("embed").T).detach().numpy(), want, rtol=1e-4, atol=1e-4)


def test_training_is_seeded_and_keeps_gates_in_range():
    weights = dec.load()
    a = train_gates(weights, steps=4, lengths=(32, 48), seed=7)
    b = train_gates(weights, steps=4, lengths=(32, 48), seed=7)
    assert a.gates.shape == (weights.config.n_layers, weights.config.n_kv_heads)
    np.testing.assert_array_equal(a.gates, b.gates)
    assert ((a.gates >= 0) & (a.gates <= 1)).all() and (a.gates < 1).any()
    assert a.loss[0] == pytest.approx(0.05, abs=1e-6)  # gates start at 1: no distance, reg 0.05


@pytest.mark.parametrize("gates", [[1.2, 0.5], [-0.1, 0.5], [np.nan, 0.5]])
def test_gates_outside_unit_interval_are_refused(gates):
    q = np.zeros((1, 2, 3, 4))
    with pytest.raises(ParameterError, match="gates"):
        duo_attention(q, q, q, np.array(gates))
    with pytest.raises(ParameterError, match="gates"):
        DuoAttention(gates=[gates])
    with pytest.raises(ParameterError, match="gates"):
        retrieval_heads(np.array([gates]))


@pytest.mark.parametrize("sparsity", [-0.1, 1.5, "half"])
def test_sparsity_outside_unit_interval_is_refused(sparsity):
    with pytest.raises(ParameterError, match="sparsity"):
        DuoAttention(gates=[[0.5, 0.5]], sparsity=sparsity)
    with pytest.raises(ParameterError, match="sparsity"):
        retrieval_heads(np.full((1, 2), 0.5), sparsity=sparsity)


def test_budget_below_sinks_is_refused_and_budget_sets_the_window():
    with pytest.raises(ParameterError, match="budget"):
        DuoAttention.for_budget([[0.5, 0.5]], 4, n_sink=4)
    p = DuoAttention.for_budget([[0.5, 0.5]], 32, n_sink=4)
    assert (p.n_sink, p.recent) == (4, 28)
    with pytest.raises(ParameterError, match="recent"):
        DuoAttention(gates=[[0.5]], recent=0)


def test_gate_table_of_the_wrong_layout_is_refused(model):
    prompt = np.arange(20) % SMALL.vocab
    with pytest.raises(ShapeError, match="gates"):
        engine.prefill(model, prompt, policy=DuoAttention(gates=[[1.0, 1.0, 1.0]] * 2))
    with pytest.raises(ShapeError, match="gates"):
        duo_attention(np.zeros((1, 2, 3, 4)), *[np.zeros((1, 2, 3, 4))] * 2, np.ones(3))
