"""StreamingLLM (arXiv 2309.17453): sinks + recent window, positions shifted into the cache.

Independent references: the forward of a *fresh* sequence made of the kept tokens (what the
paper's position shift is equivalent to, exact for a one-layer model whose keys depend on the
token alone) and the full forward with the evicted keys masked (the no-re-rotation variant).
"""

from __future__ import annotations

import numpy as np
import pytest

import qkv
from qkv.errors import ParameterError
from qkv.lab import decoder as dec
from qkv.lab import engine
from qkv.reference.kv import StreamingLLM, streaming
from qkv.reference.kv.streaming_llm import shift_positions

ONE_LAYER = dec.DecoderConfig(n_layers=1, d_model=64, d_ff=96, max_len=128)


@pytest.fixture(scope="module")
def model():
    return dec.init_weights(ONE_LAYER, seed=3)


def prompt(n, seed=0):
    return np.random.default_rng(seed).integers(0, ONE_LAYER.vocab, size=n)


def test_catalog_id_is_the_policy():
    assert streaming is StreamingLLM
    p = StreamingLLM()
    assert (p.n_sink, p.recent, p.rerotate) == (4, 512, True)  # the official class defaults


def test_kept_indices_are_sinks_and_recent_window(model):
    _, cache = engine.prefill(model, prompt(40), policy=StreamingLLM(n_sink=4, recent=10))
    for layer in cache.layers:
        want = [0, 1, 2, 3, *range(30, 40)]
        assert (layer.indices == np.array(want)).all()
        assert (layer.positions == np.arange(14)).all()  # shifted into the cache
        assert (layer.next_position == 14).all()


def test_no_eviction_when_everything_fits(model):
    p = prompt(20)
    full, c_full = engine.prefill(model, p)
    kept, c_kept = engine.prefill(model, p, policy=StreamingLLM(n_sink=4, recent=16))
    np.testing.assert_array_equal(full, kept)
    for a, b in zip(c_full.layers, c_kept.layers, strict=True):
        np.testing.assert_array_equal(a.keys, b.keys)
        np.testing.assert_array_equal(a.indices, b.indices)


def test_shifted_cache_equals_a_fresh_sequence_of_the_kept_tokens(model):
    p, new = prompt(50, seed=1), 7
    policy = StreamingLLM(n_sink=2, recent=12)
    _, cache = engine.prefill(model, p, policy=policy)
    logits, _ = engine.decode_step(model, cache, np.array([new]), policy=policy)
    kept = cache.layers[0].indices[0, 0]
    fresh = dec.forward(model, np.concatenate([p[kept], [new]]))[0, -1]  # positions 0..K
    np.testing.assert_allclose(logits[0], fresh, rtol=1e-4, atol=1e-4)


def test_without_rerotation_equals_full_forward_with_evicted_keys_masked(model):
    p, new = prompt(50, seed=2), 9
    policy = StreamingLLM(n_sink=3, recent=10, rerotate=False)
    _, cache = engine.prefill(model, p, policy=policy)
    assert (cache.layers[0].positions[0, 0] == cache.layers[0].indices[0, 0]).all()
    logits, _ = engine.decode_step(model, cache, np.array([new]), policy=policy)
    seen = np.zeros(51, dtype=bool)
    seen[cache.layers[0].indices[0, 0]] = True
    seen[50] = True  # the new token attends to itself

    def masked(layer, q, k, v):
        mask = np.tril(np.ones((51, 51), dtype=bool))
        mask[-1] = seen
        return qkv.sdpa(q, k, v, mask=mask)

    want = dec.forward(model, np.concatenate([p, [new]]), attention=masked)[0, -1]
    np.testing.assert_allclose(logits[0], want, rtol=1e-4, atol=1e-4)


def test_every_step_keeps_the_window_sliding(model):
    policy = StreamingLLM(n_sink=4, recent=8)
    g = engine.generate(model, prompt(30), 12, policy=policy)
    n = 30 + 11
    for layer in g.cache.layers:
        assert (layer.indices == np.array([0, 1, 2, 3, *range(n - 8, n)])).all()
        assert (layer.next_position == 12).all()


def test_score_is_recency_with_sinks_first(model):
    _, cache = engine.prefill(model, prompt(12))
    c = cache.layers[0]
    view = engine._view(model, c, 12, np.zeros((1, 8, 1, 8), np.float32))
    s = StreamingLLM(n_sink=2, recent=4).score(0, view)
    assert np.isposinf(s[..., :2]).all()
    assert (np.diff(s[..., 2:], axis=-1) > 0).all()


def test_shift_rotation_composes(model):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 1, 6, 8)).astype(np.float64)
    pos = np.array([0, 3, 9, 20, 21, 22])
    from qkv.reference.kv.policy import KeptCache

    kept = KeptCache(
        indices=pos[None, None],
        keys=qkv.rope(x, positions=pos),
        values=x,
        positions=pos[None, None],
        next_position=np.array([[23]]),
    )
    out = shift_positions(kept)
    np.testing.assert_allclose(out.keys, qkv.rope(x, positions=np.arange(6)), atol=1e-12)
    assert (out.next_position == 6).all()


@pytest.mark.parametrize(
    ("kw", "match"),
    [({"n_sink": -1}, "n_sink"), ({"recent": 0}, "recent"), ({"recent": 2.5}, "recent")],
)
def test_bad_hyperparameters(kw, match):
    with pytest.raises(ParameterError, match=match):
        StreamingLLM(**kw)
