"""Circuit tools: logit attribution sums to the logit, patching restores, low rank is exact at
the ends (full rank, rank 0), all on a small random decoder in float64."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qkv.errors import DTypeError, ParameterError, ShapeError
from qkv.lab import decoder as dec
from qkv.lab import tasks
from qkv.reference.analysis import circuits
from qkv.reference.analysis.circuit_tools import (
    Patching,
    activation_patching,
    head_subspaces,
    lowrank_accuracy,
    qk_ov_lowrank,
    trace,
)
from qkv.reference.analysis.retrieval_score import zero_heads

TINY = dec.DecoderConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_len=64)
WEIGHTS = dec.init_weights(TINY, seed=1).astype(np.float64)


def _prompts(seed: int, b: int = 2, n: int = 12) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, TINY.vocab, (b, n))


def _corrupt(clean: np.ndarray, seed: int) -> np.ndarray:
    """The same prompts with every position but the last redrawn."""
    out = clean.copy()
    out[:, :-1] = np.random.default_rng(seed + 100).integers(0, TINY.vocab, out[:, :-1].shape)
    return out


# --------------------------------------------------------------------------- attribution


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 2**31 - 1), st.booleans())
def test_direct_effects_sum_to_the_models_logit(seed, with_foil):
    tokens = _prompts(seed)
    rng = np.random.default_rng(seed)
    target, foil = (int(t) for t in rng.choice(TINY.vocab, 2, replace=False))
    position = int(rng.integers(-tokens.shape[1], tokens.shape[1]))
    got = circuits(WEIGHTS, tokens, target, foil=foil if with_foil else None, position=position)
    logits = dec.forward(WEIGHTS, tokens)[:, position]  # (B, V): the model itself
    expected = logits[:, target] - (logits[:, foil] if with_foil else 0.0)
    np.testing.assert_allclose(got.logit, expected, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(got.total(), expected, rtol=1e-9, atol=1e-9)
    assert got.heads.shape == (2, TINY.n_layers, TINY.n_heads)
    assert got.mlps.shape == (2, TINY.n_layers)


def test_one_target_per_prompt_equals_one_call_per_prompt():
    tokens = _prompts(4, b=3)
    target, foil = np.array([3, 50, 7]), np.array([9, 9, 100])
    got = circuits(WEIGHTS, tokens, target, foil=foil)
    for b in range(3):
        alone = circuits(WEIGHTS, tokens[b], int(target[b]), foil=int(foil[b]))
        np.testing.assert_allclose(got.heads[b], alone.heads[0], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(got.logit[b], alone.logit[0], rtol=1e-10)


def test_a_heads_direct_effect_is_what_removing_it_from_the_last_stream_changes():
    # Zero the last layer's MLP so that ablating a last-layer head changes the final residual
    # stream by exactly that head's output; read it with the frozen scale of the clean run.
    arrays = WEIGHTS.to_arrays()
    arrays["layers.1.w2"] = np.zeros_like(arrays["layers.1.w2"])
    weights = dec.from_arrays(TINY, arrays)
    tokens = _prompts(3)
    target = 7
    got = circuits(weights, tokens, target)
    full = trace(weights, tokens).final[:, -1]  # (B, d)
    for head in range(TINY.n_heads):
        ablated = trace(weights, tokens, attention=zero_heads([(1, head)])).final[:, -1]
        scale = np.sqrt(np.mean(full**2, axis=-1) + TINY.eps)  # (B,)
        effect = ((full - ablated) * weights.final_norm) @ weights.embed[target] / scale
        np.testing.assert_allclose(got.heads[:, 1, head], effect, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------- patching


def test_patching_every_head_restores_the_clean_difference_when_the_last_token_is_shared():
    clean = _prompts(5)
    corrupted = _corrupt(clean, 5)
    result = activation_patching(WEIGHTS, clean, corrupted, 3, 9, together=True)
    np.testing.assert_allclose(result.restored, 1.0, rtol=1e-9)


def test_patching_one_head_matches_a_forward_with_that_heads_clean_output():
    clean = _prompts(6, b=1)
    corrupted = _corrupt(clean, 6)
    captured = {}

    def record(layer, q, k, v):
        captured[layer] = dec.causal_attention(layer, q, k, v)
        return captured[layer]

    clean_logits = dec.forward(WEIGHTS, clean, attention=record)[0, -1]
    corrupt_logits = dec.forward(WEIGHTS, corrupted)[0, -1]
    result = activation_patching(WEIGHTS, clean, corrupted, 3, 9)
    for layer, head in [(0, 1), (1, 3)]:

        def patched(i, q, k, v, layer=layer, head=head):
            out = dec.causal_attention(i, q, k, v).copy()
            if i == layer:
                out[:, head] = captured[layer][:, head]
            return out

        logits = dec.forward(WEIGHTS, corrupted, attention=patched)[0, -1]
        diff = logits[3] - logits[9]
        expected = (diff - (corrupt_logits[3] - corrupt_logits[9])) / (
            (clean_logits[3] - clean_logits[9]) - (corrupt_logits[3] - corrupt_logits[9])
        )
        assert result.restored[layer, head] == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_heads_above_a_threshold_are_ranked():
    result = Patching(np.array([[0.5, np.nan], [0.05, 0.9]]), clean=1.0, corrupted=0.0)
    assert result.heads(0.1) == ((1, 1), (0, 0))


# --------------------------------------------------------------------------- low rank


def test_bases_are_orthonormal_with_decreasing_singular_values():
    sub = head_subspaces(WEIGHTS, _prompts(7), (1, 2))
    for basis in (sub.q, sub.k, sub.v):
        np.testing.assert_allclose(basis.T @ basis, np.eye(TINY.head_dim), atol=1e-10)
    assert np.all(np.diff(sub.singular, axis=1) <= 1e-12)


@pytest.mark.parametrize("head", [(0, 0), (1, 3)])
def test_full_rank_leaves_the_model_unchanged(head):
    tokens = _prompts(8)
    sub = head_subspaces(WEIGHTS, tokens, head)
    full = TINY.head_dim
    fn = qk_ov_lowrank(WEIGHTS, sub, qk_rank=full, ov_rank=full)
    np.testing.assert_allclose(
        dec.forward(WEIGHTS, tokens, attention=fn), dec.forward(WEIGHTS, tokens), rtol=1e-9
    )


def test_value_rank_zero_zeroes_the_head():
    tokens = _prompts(9)
    sub = head_subspaces(WEIGHTS, tokens, (0, 2))
    fn = qk_ov_lowrank(WEIGHTS, sub, qk_rank=TINY.head_dim, ov_rank=0)
    expected = dec.forward(WEIGHTS, tokens, attention=zero_heads([(0, 2)]))
    np.testing.assert_allclose(dec.forward(WEIGHTS, tokens, attention=fn), expected, rtol=1e-9)


def test_value_rank_zero_on_several_heads_zeroes_them_all():
    tokens = _prompts(12)
    heads = [(0, 1), (0, 3), (1, 0)]
    subs = [head_subspaces(WEIGHTS, tokens, h) for h in heads]
    fn = qk_ov_lowrank(WEIGHTS, subs, qk_rank=2, ov_rank=0)
    expected = dec.forward(WEIGHTS, tokens, attention=zero_heads(heads))
    np.testing.assert_allclose(dec.forward(WEIGHTS, tokens, attention=fn), expected, rtol=1e-9)


def test_query_key_rank_zero_makes_the_heads_attention_uniform():
    tokens = _prompts(10)
    layer, head = 1, 1
    sub = head_subspaces(WEIGHTS, tokens, (layer, head))
    fn = qk_ov_lowrank(WEIGHTS, sub, qk_rank=0, ov_rank=TINY.head_dim)
    out = trace(WEIGHTS, tokens, attention=fn).attn[layer, :, head]  # (B, N, Dh)
    v = trace(WEIGHTS, tokens).v[layer, :, head // TINY.group]  # (B, N, Dh)
    n = np.arange(1, tokens.shape[1] + 1)[:, None]
    np.testing.assert_allclose(out, np.cumsum(v, axis=1) / n, rtol=1e-9, atol=1e-12)


def test_compressed_queries_have_the_requested_rank():
    tokens = _prompts(11)
    sub = head_subspaces(WEIGHTS, tokens, (0, 1))
    q = trace(WEIGHTS, tokens).q[0, :, 1].reshape(-1, TINY.head_dim)
    for r in (1, 3):
        projected = q @ sub.q[:, :r] @ sub.q[:, :r].T
        assert np.linalg.matrix_rank(projected, tol=1e-8) == r


def test_lowrank_accuracy_is_the_clean_accuracy_at_full_rank():
    weights = dec.init_weights(dataclasses.replace(TINY, vocab=tasks.VOCAB_SIZE), seed=0)
    rng = np.random.default_rng(0)
    examples = [tasks.passkey(24, d, rng, digits=2) for d in (0.0, 1.0)]
    prompts = np.stack([e.prompt for e in examples])
    sub = head_subspaces(weights, prompts, (0, 0))
    acc = lowrank_accuracy(weights, examples, sub, [0, TINY.head_dim])
    answers = np.stack([e.answer for e in examples])
    tokens = np.stack([e.tokens[:-1] for e in examples])  # prompt + answer but its last
    predicted = dec.forward(weights, tokens)[:, -2:].argmax(-1)  # (B, 2)
    clean = float((predicted == answers).mean())
    assert acc.shape == (2,)
    assert acc[1] == clean


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("head", [(2, 0), (0, 4), (-1, 0)])
def test_head_indices_out_of_range_are_refused(head):
    with pytest.raises(ParameterError, match="heads"):
        head_subspaces(WEIGHTS, _prompts(0), head)
    with pytest.raises(ParameterError, match="heads"):
        activation_patching(WEIGHTS, _prompts(0), _corrupt(_prompts(0), 0), 1, 2, heads=[head])


@pytest.mark.parametrize("kw", [{"qk_rank": 9}, {"ov_rank": 9}, {"qk_rank": -1}, {"ov_rank": 1.5}])
def test_ranks_outside_the_head_dimension_are_refused(kw):
    sub = head_subspaces(WEIGHTS, _prompts(0), (0, 0))
    ranks = {"qk_rank": 8, "ov_rank": 8, **kw}
    with pytest.raises(ParameterError, match="head dim"):
        qk_ov_lowrank(WEIGHTS, sub, **ranks)


@pytest.mark.parametrize("threshold", [0.0, 1.0, -0.1, 2.0])
def test_thresholds_outside_the_open_unit_interval_are_refused(threshold):
    with pytest.raises(ParameterError, match="threshold"):
        Patching(np.zeros((2, 4)), clean=1.0, corrupted=0.0).heads(threshold)


def test_prompts_of_different_lengths_are_refused():
    clean = _prompts(0)
    with pytest.raises(ShapeError, match="corrupted"):
        activation_patching(WEIGHTS, clean, clean[:, :-1], 1, 2)


def test_prompts_of_a_float_dtype_are_refused():
    clean = _prompts(0)
    with pytest.raises(DTypeError, match="corrupted"):
        activation_patching(WEIGHTS, clean, clean.astype(float), 1, 2)
    with pytest.raises(DTypeError, match="tokens"):
        circuits(WEIGHTS, clean.astype(np.float32), 1)


def test_identical_clean_and_corrupted_prompts_are_refused():
    clean = _prompts(0)
    with pytest.raises(ParameterError, match="nothing to restore"):
        activation_patching(WEIGHTS, clean, clean, 1, 2)


@pytest.mark.parametrize("kw", [{"target": 128}, {"target": -1}, {"foil": 200}, {"position": 12}])
def test_tokens_and_positions_out_of_range_are_refused(kw):
    args = {"target": 1, **kw}
    target = args.pop("target")
    with pytest.raises(ParameterError, match=next(iter(kw))):
        circuits(WEIGHTS, _prompts(0), target, **args)


def test_a_target_list_of_the_wrong_length_is_refused():
    with pytest.raises(ParameterError, match="target"):
        circuits(WEIGHTS, _prompts(0), np.array([1, 2, 3]))
    with pytest.raises(ParameterError, match="foil"):
        activation_patching(WEIGHTS, _prompts(0), _corrupt(_prompts(0), 0), 1, [2.0, 3.0])


def test_an_unknown_side_is_refused():
    weights = dec.init_weights(dataclasses.replace(TINY, vocab=tasks.VOCAB_SIZE), seed=0)
    example = tasks.passkey(24, 0.5, np.random.default_rng(0), digits=2)
    sub = head_subspaces(weights, example.prompt, (0, 0))
    with pytest.raises(ParameterError, match="side"):
        lowrank_accuracy(weights, [example], sub, [1], side="kv")
