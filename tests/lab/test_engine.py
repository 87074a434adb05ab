"""The KV-cache engine: with no policy it reproduces the torch model's logits; policies and
selectors are checked; per-head variable-length caches; bad input gets clear errors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from qkv.errors import ParameterError
from qkv.lab import decoder as dec
from qkv.lab import engine, tasks
from qkv.reference.kv import KVPolicy, KVSelector, StreamingLLM, keep_top
from qkv.reference.kv.policy import CacheView, KeptCache, gather

torch = pytest.importorskip("torch")
from qkv.lab import train  # noqa: E402

SMALL = dec.DecoderConfig(n_layers=2, d_model=64, d_ff=96, max_len=80)


@pytest.fixture(scope="module")
def model():
    """The shipped model where it exists (its attention is sharp), else random weights."""
    if dec.DEFAULT_PATH.is_file():
        return dec.load()
    return dec.init_weights(dec.DecoderConfig(), seed=0)


@pytest.fixture(scope="module")
def small():
    return dec.init_weights(SMALL, seed=1)


def test_no_policy_reproduces_torch_logits(model):
    ex = tasks.passkey(120, 0.3, np.random.default_rng(0))
    g = engine.generate(model, ex.prompt, 6)
    seq = np.concatenate([ex.prompt, g.tokens[0, :-1]])  # what was fed
    want = train.to_torch(model)(torch.from_numpy(seq[None])).detach().numpy()[0]
    want = want[len(ex.prompt) - 1 :]  # (6, vocab): the logits each new token came from
    scale = np.abs(want).max()
    np.testing.assert_allclose(g.logits[0], want, rtol=0, atol=2e-5 * scale)
    np.testing.assert_array_equal(g.tokens[0], want.argmax(-1))
    assert len(g.decode_seconds) == 5 and g.prefill_seconds > 0


def test_prefill_logits_equal_the_forward(small):
    tok = np.random.default_rng(1).integers(0, 64, size=(3, 30))
    logits, cache = engine.prefill(small, tok)
    np.testing.assert_array_equal(logits, dec.forward(small, tok))
    assert cache.n_tokens == 30 and (cache.lengths() == 30).all()
    assert cache.nbytes() == 2 * 3 * 2 * 30 * (8 + 8) * 4  # layers, B, Hkv, tokens, D+Dv, fp32


def test_batched_decode_equals_rowwise(small):
    tok = np.random.default_rng(2).integers(0, 64, size=(2, 20))
    both = engine.generate(small, tok, 4)
    for b in range(2):
        one = engine.generate(small, tok[b], 4)
        np.testing.assert_allclose(both.logits[b], one.logits[0], rtol=1e-5, atol=1e-5)


@dataclass(frozen=True)
class KeepFirst(KVPolicy):
    """A test policy: KV head h keeps its first ``sizes[h]`` tokens (variable per head)."""

    sizes: tuple[int, ...] = (5, 12)

    def score(self, layer, cache):
        return np.where(cache.valid, -cache.indices.astype(float), -np.inf)

    def compress(self, layer, cache):
        C = cache.keys.shape[2]
        slots = np.stack(
            [np.where(np.arange(C) < s, np.arange(C), -1) for s in self.sizes]
        )  # (Hkv, C)
        return gather(cache, np.broadcast_to(slots, cache.indices.shape))


def test_per_head_variable_length_cache_is_masked_attention(small):
    """Head 0 keeps 5 tokens, head 1 keeps 12: the next step equals the full forward whose
    last row is masked accordingly, per KV head (checked on a one-layer model)."""
    one = dec.DecoderConfig(n_layers=1, d_model=64, d_ff=96, max_len=80)
    w = dec.init_weights(one, seed=3)
    tok = np.random.default_rng(3).integers(0, 64, size=30)
    _, cache = engine.prefill(w, tok, policy=KeepFirst())
    assert cache.layers[0].lengths.tolist() == [[5, 12]]
    logits, after = engine.decode_step(w, cache, np.array([7]))
    assert after.layers[0].lengths.tolist() == [[6, 13]]
    import qkv

    def masked(layer, q, k, v):
        mask = np.tril(np.ones((31, 31), dtype=bool))[None, None].repeat(8, axis=1)
        for h, s in enumerate((5, 12)):
            heads = slice(4 * h, 4 * h + 4)
            mask[0, heads, -1, :-1] = np.arange(30) < s
        return qkv.sdpa(q, k, v, mask=mask)

    want = dec.forward(w, np.append(tok, 7), attention=masked)[0, -1]
    np.testing.assert_allclose(logits[0], want, rtol=1e-5, atol=1e-5)


@dataclass(frozen=True)
class Select(KVSelector):
    slots: tuple[int, ...] = ()

    def select(self, layer, cache):
        B, Hkv, C = cache.indices.shape
        if self.slots:
            return np.broadcast_to(np.array(self.slots), (B, 8, len(self.slots)))
        return np.broadcast_to(np.arange(C), (B, 8, C))


def test_selector_of_every_slot_equals_full_cache(small):
    tok = np.random.default_rng(4).integers(0, 64, size=25)
    a = engine.generate(small, tok, 4)
    b = engine.generate(small, tok, 4, selector=Select())
    np.testing.assert_allclose(a.logits, b.logits, rtol=1e-6, atol=1e-6)


def test_budget_larger_than_the_context_changes_nothing(model):
    ex = tasks.passkey(100, 0.5, np.random.default_rng(5))
    full = engine.generate(model, ex.prompt, 5)
    # 100 prompt tokens + 4 fed back: a budget of 104 never evicts
    for policy in (StreamingLLM(n_sink=4, recent=200), StreamingLLM(n_sink=4, recent=100)):
        kept = engine.generate(model, ex.prompt, 5, policy=policy)
        np.testing.assert_array_equal(kept.tokens, full.tokens)
        np.testing.assert_allclose(kept.logits, full.logits, rtol=0, atol=1e-6)


def test_keep_top_keeps_token_order_and_budget(small):
    tok = np.random.default_rng(6).integers(0, 64, size=12)
    _, cache = engine.prefill(small, tok)
    c = cache.layers[0]
    view = engine._view(small, c, 12, np.zeros((1, 8, 1, 8), np.float32))
    scores = np.random.default_rng(0).standard_normal(c.indices.shape)
    kept = keep_top(view, scores, 4)
    for h in range(2):
        want = np.sort(np.argsort(-scores[0, h], kind="stable")[:4])
        np.testing.assert_array_equal(kept.indices[0, h], want)
        np.testing.assert_array_equal(kept.keys[0, h], c.keys[0, h, want])
    assert (keep_top(view, scores, 50).indices == c.indices).all()


@dataclass(frozen=True)
class OutOfRange(KVPolicy):
    def compress(self, layer, cache: CacheView) -> KeptCache:
        kept = gather(cache, np.where(cache.valid, np.arange(cache.keys.shape[2]), -1))
        bad = kept.indices.copy()
        bad[..., 0] = cache.n_tokens + 3
        return KeptCache(bad, kept.keys, kept.values, kept.positions, kept.next_position)


def test_policy_indices_out_of_range_are_caught(small):
    with pytest.raises(ParameterError, match=r"policy OutOfRange\(\) \(layer 0\).*\[0, 10\)"):
        engine.prefill(small, np.arange(10), policy=OutOfRange())


def test_selector_slots_out_of_range_are_caught(small):
    with pytest.raises(ParameterError, match=r"selector Select.*slots in \[0, 11\)"):
        engine.generate(small, np.arange(10), 2, selector=Select(slots=(0, 11)))


def test_positions_beyond_the_trained_range_are_refused(small):
    with pytest.raises(ParameterError, match=r"prompt: expected at most max_len=80"):
        engine.generate(small, np.zeros(81, dtype=int), 1)
    with pytest.raises(ParameterError, match=r"position below max_len=80.*got position 80"):
        engine.generate(small, np.zeros(78, dtype=int), 4)
    # with StreamingLLM's position shift the stream may outgrow max_len
    g = engine.generate(small, np.zeros(78, dtype=int), 6, policy=StreamingLLM(n_sink=2, recent=8))
    assert g.tokens.shape == (1, 6)


def test_bad_arguments(small):
    with pytest.raises(ParameterError, match="n_new"):
        engine.generate(small, np.arange(5), 0)
    with pytest.raises(TypeError, match="policy: expected a KVPolicy"):
        engine.prefill(small, np.arange(5), policy="streaming")


@dataclass(frozen=True)
class _Quantised(KVPolicy):
    """Keeps every slot and says its quantised form takes ``bits`` bits (after the prefill)."""

    bits: int = 1001

    def compress(self, layer: int, cache: CacheView) -> KeptCache:
        kept = gather(cache, np.where(cache.valid, np.arange(cache.indices.shape[-1]), -1))
        return KeptCache(**{**kept.__dict__, "extra": {"quantized_bits": self.bits}})


def test_nbytes_counts_quantised_slots_at_their_exact_bits(small):
    """The prompt's slots count ``ceil(bits / 8)`` bytes; tokens decoded after the policy ran
    count as the floats held; SAQ (compressing every step) covers every slot."""
    from qkv.reference.kv import SAQ, ZipCache

    prompt = np.random.default_rng(7).integers(8, 64, size=(2, 20))
    g = engine.generate(small, prompt, 4, policy=_Quantised())
    floats = 2 * SMALL.n_kv_heads * 3 * 2 * SMALL.head_dim * 4  # rows, heads, 3 decoded, k+v
    assert all(c.nbytes() == 126 + floats for c in g.cache.layers)  # ceil(1001 / 8) = 126
    full = engine.generate(small, prompt, 4).cache
    zip_ = engine.generate(small, prompt, 4, policy=ZipCache()).cache
    for z, f in zip(zip_.layers, full.layers, strict=True):
        bits = z.extra["quantized_bits"]
        assert z.nbytes() == -(-bits // 8) + floats
        # at least 2 bits an element plus the scales: far below the float32 prompt
        assert 2 * 2 * SMALL.n_kv_heads * 20 * SMALL.head_dim * 2 / 8 < bits / 8 < f.nbytes() / 3
    saq = engine.generate(small, prompt, 4, policy=SAQ(segment=8, require_mqa=False)).cache
    for c in saq.layers:
        bits = c.extra["quantized_bits"]
        assert c.extra["quantized_tokens"] == 23  # compressed after the last step
        assert c.nbytes() == -(-bits // 8) + c.extra["saq_bits"].nbytes
