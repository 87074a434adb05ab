r"""In-context re-ranking with MiniLM as the attention source.

:func:`qkv.reference.retrieval.icr` needs the attention weights of a prompt that holds the
candidate documents and then the query. Here the prompt is one MiniLM input,

``[CLS] d_1 [SEP] d_2 [SEP] ... d_S [SEP] query [SEP]``,

run twice through :func:`qkv.lab.encoder.encode`: once with the query, once with the
content-free query "N/A". Every layer's attention is replaced (:class:`~qkv.lab.encoder.Swap`)
by the same softmax attention that also records its weights, so the encoder is not modified.

Two differences from the paper's decoder setting, both forced by the model: MiniLM reads at
most 512 word pieces, so each document is truncated to an equal share of what the query leaves
(the paper truncates to 300 words and uses far longer contexts); and MiniLM is bidirectional, so
document tokens also see the query, and the two runs differ in the documents' hidden states,
where a causal decoder would reuse them. As in the official code the documents are placed in
reverse order (``reverse=True``): the first-stage favourite sits next to the query.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from qkv.errors import ParameterError
from qkv.lab.encoder import Encoder, Swap, encode
from qkv.reference.core import sdpa
from qkv.reference.retrieval.attention_rerank import CONTENT_FREE, Span, icr

Array = np.ndarray

#: Word pieces kept of a query (the rest of the 512 go to the documents).
MAX_QUERY_TOKENS = 64


@dataclass(frozen=True)
class Prompt:
    """Token ids ``(N,)`` of one prompt with each document's and the query's span."""

    ids: Array
    documents: tuple[Span, ...]
    query: Span


def _pieces(encoder: Encoder, text: str) -> list[int]:
    pieces = encoder.tokenizer(text, add_special_tokens=False, verbose=False)  # cut below
    return list(pieces["input_ids"])


def build_prompts(
    encoder: Encoder,
    query: str,
    documents: Sequence[str],
    *,
    max_tokens: int = 512,
    reverse: bool = True,
    content_free: str = CONTENT_FREE,
) -> tuple[Prompt, Prompt]:
    """The prompt with the query and the one with the content-free query.

    Both hold the same documents at the same positions, each truncated to
    ``(max_tokens - query share - separators) // S`` word pieces. Spans are listed in the order of
    ``documents`` whatever their order in the prompt.

    Args:
        encoder: the MiniLM encoder.
        query: the search query.
        documents: the candidate documents.
        max_tokens: the prompt's length limit (MiniLM's 512 positions at most).
        reverse: write the documents in reverse order (the official code's default).
        content_free: the calibration query.

    Returns:
        ``(prompt, calibration_prompt)``.
    """
    if isinstance(documents, str) or len(documents) == 0:
        raise ParameterError(
            f"documents: expected a non-empty list of texts, got {documents!r:.60}"
        )
    tok = encoder.tokenizer
    q_ids = _pieces(encoder, query)[:MAX_QUERY_TOKENS]
    na_ids = _pieces(encoder, content_free)[:MAX_QUERY_TOKENS]
    share = (max_tokens - 2 - max(len(q_ids), len(na_ids)) - len(documents)) // len(documents)
    if share < 1:
        raise ParameterError(
            f"documents: expected at most {max_tokens // 3} documents in {max_tokens} tokens, "
            f"got {len(documents)}"
        )
    head: list[int] = [tok.cls_token_id]
    spans: dict[int, Span] = {}
    order = range(len(documents) - 1, -1, -1) if reverse else range(len(documents))
    for i in order:
        piece = _pieces(encoder, documents[i])[:share]
        spans[i] = (len(head), len(head) + len(piece))
        head += [*piece, tok.sep_token_id]
    doc_spans = tuple(spans[i] for i in range(len(documents)))

    def with_query(ids: list[int]) -> Prompt:
        return Prompt(
            np.asarray([*head, *ids, tok.sep_token_id], dtype=np.int64),
            doc_spans,
            (len(head), len(head) + len(ids)),
        )

    return with_query(q_ids), with_query(na_ids)


def attention_weights(encoder: Encoder, ids: Array) -> Array:
    """Every layer's softmax attention weights ``(L, H, N, N)`` for one prompt ``ids (N,)``."""
    maps: list[Array] = []

    def recorded(q: Array, k: Array, v: Array, *, mask: Array) -> Array:
        out, p = sdpa(q, k, v, mask=mask, return_weights=True)  # p (1, H, N, N)
        maps.append(p[0])
        return out

    swaps = [Swap(layer, recorded) for layer in range(encoder.weights.n_layers)]
    encode(encoder.weights, ids[None], swaps=swaps)
    return np.stack(maps)  # (L, H, N, N)


def rerank(
    encoder: Encoder,
    query: str,
    documents: Sequence[str],
    *,
    max_tokens: int = 512,
    reverse: bool = True,
    calibrate: bool = True,
) -> Array:
    """ICR scores ``(S,)`` of ``documents`` for ``query``, two MiniLM passes (one if uncalibrated).

    Args:
        encoder: the MiniLM encoder.
        query: the search query.
        documents: the candidates.
        max_tokens: the prompt's length limit.
        reverse: write the documents in reverse order (the official code's default).
        calibrate: subtract the content-free query's attention (the paper's method).

    Returns:
        One score per document, in the order given; larger is more relevant.
    """
    prompt, blank = build_prompts(encoder, query, documents, max_tokens=max_tokens, reverse=reverse)
    attention = attention_weights(encoder, prompt.ids)
    if not calibrate:
        return icr(attention, None, prompt.documents, prompt.query)
    calibration = attention_weights(encoder, blank.ids)
    return icr(attention, calibration, prompt.documents, prompt.query, blank.query)
