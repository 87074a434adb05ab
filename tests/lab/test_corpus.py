"""The embedded retrieval corpus: its layout, that its embeddings are what the encoder computes."""

from __future__ import annotations

import numpy as np
import pytest

from qkv.errors import ParameterError
from qkv.lab import corpus


@pytest.fixture(scope="module")
def data() -> corpus.Corpus:
    return corpus.load()


def test_layout(data: corpus.Corpus) -> None:
    S, T = len(data), len(data.sentences)
    assert S >= 300 and T >= 4 * S
    assert len(data.queries) == len(data.topics) == S
    assert data.doc_embeddings.shape == data.query_embeddings.shape == (S, 384)
    assert data.sentence_embeddings.shape == (T, 384) and data.sentence_doc.shape == (T,)
    for e in (data.doc_embeddings, data.query_embeddings, data.sentence_embeddings):
        assert e.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-6)
    assert data.command == corpus.COMMAND == "qkv lab embed-corpus"


def test_pairs_split_each_paragraph_without_copying_the_query(data: corpus.Corpus) -> None:
    for q, d in zip(data.queries, data.documents, strict=True):
        assert q not in d
        assert len(q.split()) >= corpus.MIN_QUERY_WORDS
        assert len(d.split()) >= corpus.MIN_DOCUMENT_WORDS


def test_sentences_lie_in_their_documents(data: corpus.Corpus) -> None:
    tagged = data.sentence_doc >= 0
    assert tagged.sum() >= len(data)  # every document has at least one sentence
    for s, i in zip(np.array(data.sentences)[tagged], data.sentence_doc[tagged], strict=True):
        assert s in data.documents[i]
    assert set(data.queries) <= set(data.sentences)  # a query is a sentence of no document


def test_sentence_split_keeps_abbreviations_together() -> None:
    text = 'Use it, e.g. as a key. The "else" clause runs! (See below.) Done? yes.'
    assert corpus.split_sentences(text) == [
        "Use it, e.g. as a key.",
        'The "else" clause runs!',
        "(See below.) Done? yes.",  # no split after ")" or before lower case
    ]


def test_stored_embeddings_are_what_the_encoder_computes(data: corpus.Corpus) -> None:
    """Re-embed a few texts with qkv's NumPy MiniLM: equal up to float16 storage."""
    encoder = pytest.importorskip("qkv.lab.encoder").Encoder.load()
    rows = [0, len(data) // 2, len(data) - 1]
    fresh = encoder.embed([data.documents[i] for i in rows] + [data.queries[i] for i in rows])
    stored = np.concatenate([data.doc_embeddings[rows], data.query_embeddings[rows]])
    np.testing.assert_allclose(fresh, stored, atol=2e-3)


def test_retrieval_is_real_but_not_trivial(data: corpus.Corpus) -> None:
    """Each query's own document ranks high far more often than chance, but not always first."""
    sim = data.query_embeddings @ data.doc_embeddings.T  # (S, S)
    own = np.diag(sim)[:, None]
    rank = (sim > own).sum(axis=1)  # documents above the query's own
    assert 0.2 < np.mean(rank == 0) < 0.9
    assert np.mean(rank < 10) > 10 * 10 / len(data)


def test_relevant_and_same_topic(data: corpus.Corpus) -> None:
    np.testing.assert_array_equal(data.relevant(3), [3])
    same = data.same_topic(3)
    assert 3 in same and all(data.topics[j] == data.topics[3] for j in same)
    for bad in (-1, len(data), 1.5, True):
        with pytest.raises(ParameterError, match="i: expected"):
            data.relevant(bad)


def test_load_names_the_command_when_the_file_is_missing(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="qkv lab embed-corpus"):
        corpus.load(tmp_path / "absent.npz")
