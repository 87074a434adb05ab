r"""A cross-encoder score made from MiniLM: one joint pass over the query and the document.

A bi-encoder embeds the query and the document apart and scores $e_q^\top e_d$, a factorised
score: the score matrix of $Q$ queries and $M$ documents has rank at most $d$. A cross-encoder
reads both texts in one pass, so every token of one attends to every token of the other in
every layer, and its score is not a dot product of two separately computed vectors.

This module builds such a score from qkv's NumPy MiniLM (:mod:`qkv.lab.encoder`), **with no
training as a cross-encoder**: the pair is tokenised as ``[CLS] query [SEP] document [SEP]``
(segment 0 for the query part, segment 1 for the document part, with the model's segment
embeddings), run through the six layers once, and scored by the cosine of the two segments'
mean final states,

$$
\operatorname{CE}(q, d) = \cos\Big(\tfrac{1}{|S_q|}\textstyle\sum_{i \in S_q} h^{(6)}_i,\;
\tfrac{1}{|S_d|}\textstyle\sum_{i \in S_d} h^{(6)}_i\Big),
$$

where $h^{(6)}$ is the joint encoding and $S_q$, $S_d$ are the query and document tokens. Each
half has been contextualised by the other through 6 layers of attention, so $\operatorname{CE}$
is a real non-factorised score (each entry costs a full encoder pass over the pair), though not
a trained relevance model. It is what :func:`qkv.reference.retrieval.anncur` approximates.

:func:`build` (``qkv lab cross-scores``) scores a fixed subset of :mod:`qkv.lab.corpus` pairs
(every chosen query against every chosen document, texts truncated to :data:`MAX_TOKENS` word
pieces) and stores the matrix; :func:`load` reads it back with NumPy alone.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qkv.errors import ParameterError
from qkv.lab import corpus as corpus_mod
from qkv.lab import encoder as enc

COMMAND = "qkv lab cross-scores"
DEFAULT_PATH = Path(__file__).resolve().parent.parent / "data" / "minilm_cross_scores.npz"
#: Queries, documents and word pieces per pair of the stored matrix, and the subset's seed.
N_QUERIES = 48
N_DOCUMENTS = 160
MAX_TOKENS = 64
SEED = 0


def pair_scores(
    encoder: enc.Encoder,
    queries: Sequence[str],
    documents: Sequence[str],
    *,
    max_tokens: int = MAX_TOKENS,
    batch_size: int = 32,
) -> np.ndarray:
    r"""$\operatorname{CE}(q_i, d_i)$ for each pair ``(queries[i], documents[i])``: ``(n,)``.

    The longer text is truncated first so that the pair fits in ``max_tokens`` word pieces; pairs of
    similar length are batched together. Computed in the encoder's dtype.
    """
    if len(queries) != len(documents) or not queries:
        raise ParameterError(
            f"queries, documents: expected two non-empty lists of one length, "
            f"got {len(queries)} and {len(documents)}"
        )
    w = encoder.weights
    tok = encoder.tokenizer(
        list(queries),
        list(documents),
        padding=True,
        truncation="longest_first",
        max_length=max_tokens,
        return_tensors="np",
    )
    ids = tok["input_ids"].astype(np.int64)  # (n, N)
    segment = tok["token_type_ids"].astype(np.int64)  # (n, N)
    keep = tok["attention_mask"].astype(bool)  # (n, N)
    order = np.argsort(keep.sum(axis=1), kind="stable")
    out = np.empty(len(queries), dtype=w.dtype)
    for start in range(0, len(queries), batch_size):
        rows = order[start : start + batch_size]
        n = keep[rows].sum(axis=1).max()
        b_ids, b_seg, b_keep = ids[rows, :n], segment[rows, :n], keep[rows, :n]  # (b, n)
        x = w.word[b_ids] + w.position[:n] + w.token_type[b_seg]  # (b, n, d)
        h0 = enc.layer_norm(x, w.g_emb, w.s_emb, w.eps)  # (b, n, d)
        h = enc.run_layers(w, h0, b_keep, first=0)[-1]  # (b, n, d)
        on_query = enc.normalize(enc.mean_pool(h, b_keep & (b_seg == 0)))  # (b, d)
        on_doc = enc.normalize(enc.mean_pool(h, b_keep & (b_seg == 1)))  # (b, d)
        out[rows] = (on_query * on_doc).sum(axis=1)
    return out


def subset(
    n_queries: int = N_QUERIES, n_documents: int = N_DOCUMENTS, *, seed: int = SEED
) -> tuple[np.ndarray, np.ndarray]:
    """Corpus indices of the scored queries ``(n_queries,)`` and documents ``(n_documents,)``.

    The queries are drawn at random (``seed``); the documents are their own documents followed
    by other documents drawn at random, so every query has its relevant document in the set.
    """
    S = len(corpus_mod.pairs())
    if not 1 <= n_queries <= n_documents <= S:
        raise ParameterError(
            f"n_queries, n_documents: expected 1 <= n_queries <= n_documents <= {S}, "
            f"got {n_queries} and {n_documents}"
        )
    rng = np.random.default_rng(seed)
    queries = np.sort(rng.choice(S, n_queries, replace=False))
    others = rng.permutation(np.setdiff1d(np.arange(S), queries))[: n_documents - n_queries]
    return queries, np.concatenate([queries, np.sort(others)])


@dataclass(frozen=True, eq=False)
class CrossScores:
    """A stored cross-encoder score matrix.

    Attributes:
        scores: ``(Q, M)`` float32, ``scores[i, j] = CE(query query_ids[i], doc doc_ids[j])``.
        query_ids: ``(Q,)`` corpus indices of the queries.
        doc_ids: ``(M,)`` corpus indices of the documents (the first ``Q`` are the queries' own).
        max_tokens: word pieces per pair at most.
        seconds: wall time the matrix took when it was built.
        command: the command that regenerates the file.
    """

    scores: np.ndarray
    query_ids: np.ndarray
    doc_ids: np.ndarray
    max_tokens: int
    seconds: float
    command: str


def build(
    out: str | Path | None = None,
    *,
    n_queries: int = N_QUERIES,
    n_documents: int = N_DOCUMENTS,
    max_tokens: int = MAX_TOKENS,
    seed: int = SEED,
) -> Path:
    """Score every chosen query against every chosen document and save an npz (float32).

    ``n_queries * n_documents`` encoder passes: the defaults (7 680 pairs of at most 64 word
    pieces, about 10 TFLOP) take about 3 minutes on two idle cores, much longer on shared
    ones (the time is stored). Returns the path.
    """
    out = DEFAULT_PATH if out is None else Path(out)
    found = corpus_mod.pairs()
    query_ids, doc_ids = subset(n_queries, n_documents, seed=seed)
    encoder = enc.Encoder.load()
    q_text = [found[i][1] for i in query_ids for _ in doc_ids]
    d_text = [found[j][2] for _ in query_ids for j in doc_ids]
    start = time.perf_counter()
    flat = pair_scores(encoder, q_text, d_text, max_tokens=max_tokens)  # (Q * M,)
    seconds = time.perf_counter() - start
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out,
        scores=flat.reshape(len(query_ids), len(doc_ids)).astype(np.float32),  # (Q, M)
        query_ids=query_ids.astype(np.int32),
        doc_ids=doc_ids.astype(np.int32),
        max_tokens=np.array(max_tokens),
        seconds=np.array(seconds),
        command=np.array(COMMAND),
    )
    return out


def load(path: str | Path | None = None) -> CrossScores:
    """Read the stored matrix (default: the embedded :data:`DEFAULT_PATH`) with NumPy alone."""
    path = DEFAULT_PATH if path is None else Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; regenerate it with `{COMMAND}`")
    with np.load(path, allow_pickle=False) as data:
        return CrossScores(
            scores=data["scores"].astype(np.float32),
            query_ids=data["query_ids"].astype(np.int64),
            doc_ids=data["doc_ids"].astype(np.int64),
            max_tokens=int(data["max_tokens"]),
            seconds=float(data["seconds"]),
            command=str(data["command"]),
        )


__all__ = [
    "COMMAND",
    "DEFAULT_PATH",
    "MAX_TOKENS",
    "N_DOCUMENTS",
    "N_QUERIES",
    "CrossScores",
    "build",
    "load",
    "pair_scores",
    "subset",
]
