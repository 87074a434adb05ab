"""The lab engine hands a policy's per-slot logit bias to ``sparse_attention``.

RazorAttention stores ``log |D|`` on its compensation token (``extra["log_weight"]``); the
engine's decode attention must weigh that token ``|D|`` times. Reference: the policy module's own
:func:`~qkv.reference.kv.razor_policy.compensated_attention` (a dense ``qkv.sdpa`` with an
additive mask, written independently of the sparse op) on the same cache and queries.
"""

from __future__ import annotations

import numpy as np
import pytest

import qkv
from qkv.lab import decoder as dec
from qkv.lab import engine
from qkv.reference.kv import Razor
from qkv.reference.kv.policy import KeptCache
from qkv.reference.kv.razor_policy import compensated_attention

CONFIG = dec.DecoderConfig(n_layers=2, d_model=64, d_ff=96, max_len=96)


def decode_with_spy(monkeypatch, policy, steps=2):
    """Prefill with ``policy``, decode ``steps`` tokens; per step and layer the queries and the
    attention output the engine computed, and the caches after each step."""
    model = dec.init_weights(CONFIG, 1)
    prompt = np.random.default_rng(0).integers(0, 128, size=(1, 50))
    logits, cache = engine.prefill(model, prompt, policy=policy)
    calls = []
    real = qkv.sparse_attention

    def spy(q, k, v, indices, **kw):
        out = real(q, k, v, indices, **kw)
        calls.append((q, out))
        return out

    monkeypatch.setattr(qkv, "sparse_attention", spy)
    caches, token = [], logits[:, -1].argmax(-1)
    for _ in range(steps):
        nxt, cache = engine.decode_step(model, cache, token, policy=policy)
        caches.append(cache)
        token = nxt.argmax(-1)
    return calls, caches


def as_kept(c: engine.LayerCache) -> KeptCache:
    """A layer cache as the policy's result type, its bias padded with zeros for new slots."""
    log_weight = c.extra["log_weight"]
    grown = c.keys.shape[2] - log_weight.shape[-1]
    extra = {"log_weight": np.pad(log_weight, [(0, 0), (0, 0), (0, grown)])}
    return KeptCache(c.indices, c.keys, c.values, c.positions, c.next_position, extra)


@pytest.mark.parametrize("weighting", ["count", "mean"])
def test_decode_attention_with_razor_equals_compensated_attention(monkeypatch, weighting):
    policy = Razor(retrieval=((1, 0),), local_capacity=12, weighting=weighting)
    calls, caches = decode_with_spy(monkeypatch, policy)
    assert len(calls) == 4  # 2 steps x 2 layers
    layers = [c for cache in caches for c in cache.layers]
    for (q, out), c in zip(calls, layers, strict=True):
        want = compensated_attention(q, as_kept(c))
        np.testing.assert_allclose(out, want, rtol=2e-5, atol=2e-6)
    q, out = calls[0]  # layer 0 has no retrieval head: both KV heads hold a compensation token
    c = layers[0]
    plain = KeptCache(c.indices, c.keys, c.values, c.positions, c.next_position, {})
    unweighted = compensated_attention(q, plain)  # every slot counted once
    assert np.allclose(out, unweighted, rtol=2e-5, atol=2e-6) == (weighting == "mean")


def test_slots_added_after_compression_are_unbiased(monkeypatch):
    """The retrieval head of layer 1 keeps all 50 prompt tokens, so each step grows the cache
    past the policy's ``log_weight`` width; the new slots get bias 0."""
    calls, caches = decode_with_spy(monkeypatch, Razor(retrieval=((1, 0),), local_capacity=12))
    c = caches[-1].layers[1]
    assert c.keys.shape[2] == 52 and c.extra["log_weight"].shape[-1] == 50
    G = CONFIG.group
    idx = np.repeat(np.where(c.indices >= 0, np.arange(52), -1), G, axis=1)  # (B, H, C)
    bias = engine._slot_bias(c, idx, G)
    np.testing.assert_array_equal(bias[..., 50:], 0.0)
    np.testing.assert_array_equal(bias[:, ::G, :50], c.extra["log_weight"])
