r"""Retrieval heads: the heads that copy a needle out of a long context, found and ablated.

Paper: *Retrieval Head Mechanistically Explains Long-Context Factuality* (Wu, Wang, Xiao, Peng,
Fu, arXiv 2404.15574). Official code: https://github.com/nightdessert/Retrieval_Head.

While the model decodes the answer of a needle-in-a-haystack prompt, a head *copies and pastes*
at step $t$ when the key its query attends to most is inside the needle and carries the very
token being generated:

$$
\operatorname{argmax}_j\, a^{(\ell, h)}_{t j} \in \mathcal N
\quad\text{and}\quad x_{\operatorname{argmax}_j a_{tj}} = w_t .
$$

With $g_h$ the set of needle positions so copied, the **retrieval score** of the head on one
test is $|g_h| / |\mathcal N|$, and its score is the mean over tests (needle depths and context
lengths). The paper calls a head with score above $0.1$ a retrieval head, and shows the causal
role: masking the top retrieval heads makes the model miss the needle, masking as many random
heads does not.

Where the official code differs: it adds $1/|\mathcal N|$ for every copying *step*, without
deduplicating positions (``dedupe=False`` here; the paper's set is ``dedupe=True``), and it only
accumulates tests whose response recalls more than half of the needle (ROUGE-1 recall above 50;
``min_recall`` here, measured as the fraction of needle tokens found in the response). Masking
a head is done here by zeroing its attention output (head ablation) on the lab decoder
(:mod:`qkv.lab.decoder`); the paper masks the head's attention in the model's own code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from qkv.errors import ParameterError, ShapeError
from qkv.lab import decoder as dec
from qkv.lab.tasks import Example

Array = np.ndarray
Head = tuple[int, int]


def check_threshold(threshold: float, name: str = "threshold") -> float:
    """``threshold`` as a float strictly inside (0, 1)."""
    if not isinstance(threshold, int | float | np.floating) or not 0.0 < float(threshold) < 1.0:
        raise ParameterError(f"{name}: expected a number in (0, 1), got {threshold!r}")
    return float(threshold)


def check_heads(config: dec.DecoderConfig, heads: Sequence[Head]) -> tuple[Head, ...]:
    """``heads`` as ``(layer, head)`` int pairs inside the model."""
    out = []
    for item in heads:
        if len(item) != 2:
            raise ParameterError(f"heads: expected (layer, head) pairs, got {item!r}")
        layer, head = (int(i) for i in item)
        if not (0 <= layer < config.n_layers and 0 <= head < config.n_heads):
            raise ParameterError(
                f"heads: expected (layer, head) with layer in [0, {config.n_layers}) and head in "
                f"[0, {config.n_heads}), got {tuple(item)!r}"
            )
        out.append((layer, head))
    return tuple(out)


def needle_span(example: Example) -> tuple[int, int]:
    """Prompt positions ``[start, stop)`` of the answer's source tokens (the needle).

    Raises:
        ParameterError: the answer is not found at ``example.needle`` in the prompt.
    """
    start, stop = example.needle, example.needle + len(example.answer)
    if stop > len(example.prompt) or not np.array_equal(example.prompt[start:stop], example.answer):
        raise ParameterError(
            f"example: expected the answer {example.answer.tolist()} at prompt positions "
            f"[{start}, {stop}), but the needle is absent from the prompt there"
        )
    return start, stop


def retrieval_score(
    attention: Array,
    context: Array,
    generated: Array,
    span: tuple[int, int],
    *,
    dedupe: bool = True,
) -> Array:
    r"""Retrieval score of every head on one test: $|g_h| / |\mathcal N|$.

    Args:
        attention: the attention rows of the decoding queries ``(L, H, T, N)``: row ``t`` is the
            query whose output generated ``generated[t]``, over the ``N`` tokens it could see
            (positions it could not see carry zero). Rows must sum to one.
        context: the token at every key position ``(N,)`` (prompt, then the generated tokens).
        generated: the ``T`` generated tokens ``(T,)``.
        span: the needle's positions ``[start, stop)`` in ``context``.
        dedupe: count each needle position once (the paper's set); ``False`` counts every
            copying step, as the official code does.

    Returns:
        The scores ``(L, H)`` in ``[0, 1]`` (``dedupe=True``).
    """
    attention = np.asarray(attention)
    if attention.ndim != 4:
        raise ShapeError(f"attention: expected (L, H, T, N), got shape {attention.shape}")
    L, H, T, N = attention.shape
    context, generated = np.asarray(context), np.asarray(generated)
    if context.shape != (N,) or generated.shape != (T,):
        raise ShapeError(
            f"context, generated: expected shapes ({N},) and ({T},) to match attention "
            f"{attention.shape}, got {context.shape} and {generated.shape}"
        )
    if not np.allclose(attention.sum(-1), 1.0, atol=1e-3) or attention.min() < 0:
        raise ParameterError("attention: expected non-negative rows summing to one")
    start, stop = span
    if not 0 <= start < stop <= N:
        raise ParameterError(f"span: expected 0 <= start < stop <= {N}, got {span!r}")
    top = attention.argmax(-1)  # (L, H, T)
    copies = (top >= start) & (top < stop) & (context[top] == generated)  # (L, H, T)
    if not dedupe:
        return copies.sum(-1) / (stop - start)
    scores = np.zeros((L, H))
    for layer, head in np.ndindex(L, H):
        scores[layer, head] = len(set(top[layer, head][copies[layer, head]].tolist()))
    return scores / (stop - start)


def zero_heads(heads: Sequence[Head]) -> dec.AttentionFn:
    """An attention for :func:`qkv.lab.decoder.forward` whose listed heads output zero."""
    by_layer: dict[int, set[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, set()).add(head)
    return dec.replace_heads(by_layer, lambda layer, q, k, v: np.zeros_like(q))


def greedy(
    weights: dec.DecoderWeights, prompts: Array, n_new: int, *, attention: dec.AttentionFn | None
) -> Array:
    """Greedy continuation ``(B, n_new)`` of ``prompts (B, P)`` through ``attention``."""
    tokens = dec.check_tokens(weights.config, prompts, name="prompts")
    for _ in range(n_new):
        nxt = dec.forward(weights, tokens, attention=attention)[:, -1].argmax(-1)  # (B,)
        tokens = np.concatenate([tokens, nxt[:, None]], axis=1)  # (B, P + t)
    return tokens[:, tokens.shape[1] - n_new :]


def stack_examples(examples: Sequence[Example]) -> tuple[Array, Array]:
    """Prompts ``(B, P)`` and answers ``(B, T)`` of examples that share both lengths."""
    if not examples:
        raise ParameterError("examples: expected at least one example, got none")
    shapes = {(len(e.prompt), len(e.answer)) for e in examples}
    if len(shapes) != 1:
        raise ShapeError(f"examples: expected one prompt and answer length, got {sorted(shapes)}")
    return np.stack([e.prompt for e in examples]), np.stack([e.answer for e in examples])


def answer_accuracy(
    weights: dec.DecoderWeights,
    examples: Sequence[Example],
    *,
    masked: Sequence[Head] = (),
) -> float:
    """Fraction of answer tokens the greedy decoder gets right, with ``masked`` heads zeroed."""
    masked = check_heads(weights.config, masked)
    prompts, answers = stack_examples(examples)  # (B, P), (B, T)
    attention = zero_heads(masked) if masked else None
    out = greedy(weights, prompts, answers.shape[1], attention=attention)  # (B, T)
    return float((out == answers).mean())


@dataclass(frozen=True, eq=False)
class RetrievalHeads:
    """What :func:`retrieval_heads` measured.

    Attributes:
        scores: mean retrieval score of every head ``(L, H)`` over the accumulated tests.
        heads: the heads scoring above the threshold, best first.
        accumulated: how many tests passed the recall gate and were averaged.
    """

    scores: Array
    heads: tuple[Head, ...]
    accumulated: int

    def top(self, k: int) -> tuple[Head, ...]:
        """The ``k`` best-scoring heads, best first."""
        return ranked(self.scores)[:k]


def ranked(scores: Array) -> tuple[Head, ...]:
    """Every ``(layer, head)`` of ``scores (L, H)``, highest score first (ties by index)."""
    order = np.argsort(-scores, axis=None, kind="stable")  # (L * H,)
    return tuple(
        (int(i), int(j)) for i, j in zip(*np.unravel_index(order, scores.shape), strict=True)
    )


def retrieval_heads(
    weights: dec.DecoderWeights,
    examples: Sequence[Example],
    *,
    threshold: float = 0.1,
    min_recall: float = 0.5,
    dedupe: bool = True,
) -> RetrievalHeads:
    """Retrieval scores of every head of the lab decoder on needle ``examples``.

    Each prompt is decoded greedily for ``len(answer)`` steps; the causal attention of the whole
    sequence is then read at the decoding queries (a causal model's rows equal the incremental
    ones) and scored by :func:`retrieval_score`.

    Args:
        weights: the lab decoder.
        examples: needle tests (:func:`qkv.lab.tasks.passkey` or ``recall``) of one length.
        threshold: score above which a head counts as a retrieval head (paper: 0.1).
        min_recall: tests whose response holds at most this fraction of the needle tokens are
            skipped (the official code's ROUGE-1 recall > 50 gate).
        dedupe: see :func:`retrieval_score`.

    Returns:
        The scores and the retrieval heads.
    """
    threshold = check_threshold(threshold)
    if not 0.0 <= float(min_recall) < 1.0:
        raise ParameterError(f"min_recall: expected a fraction in [0, 1), got {min_recall!r}")
    spans = [needle_span(e) for e in examples]
    prompts, answers = stack_examples(examples)  # (B, P), (B, T)
    P, T = prompts.shape[1], answers.shape[1]
    out = greedy(weights, prompts, T, attention=None)  # (B, T)
    seq = np.concatenate([prompts, out[:, :-1]], axis=1)  # (B, P + T - 1)
    _, maps = dec.forward(weights, seq, return_attention=True)  # (L, B, H, N, N)
    total, used = np.zeros(maps.shape[0:3:2]), 0
    for b, span in enumerate(spans):
        recall = np.isin(answers[b], out[b]).mean()
        if recall <= min_recall:
            continue
        rows = maps[:, b, :, P - 1 :]  # (L, H, T, N)
        total += retrieval_score(rows, seq[b], out[b], span, dedupe=dedupe)
        used += 1
    scores = total / max(used, 1)
    heads = tuple(h for h in ranked(scores) if scores[h] > threshold)
    return RetrievalHeads(scores, heads, used)


def causal_test(
    weights: dec.DecoderWeights,
    examples: Sequence[Example],
    found: RetrievalHeads,
    *,
    k: int,
    draws: int = 3,
    seed: int = 0,
) -> dict[str, float]:
    """The paper's causal test: answer accuracy clean, with the top ``k`` heads masked, and with
    ``k`` random heads masked (mean over ``draws`` draws that avoid the top ``k``).

    Args:
        weights: the lab decoder.
        examples: needle tests of one length.
        found: the scores from :func:`retrieval_heads`.
        k: heads to mask.
        draws: random head sets to average.
        seed: seed of the random head sets.

    Returns:
        ``{"clean": ..., "top": ..., "random": ...}`` accuracies.
    """
    L, H = found.scores.shape
    if not isinstance(k, int) or not 1 <= k < L * H:
        raise ParameterError(f"k: expected an int in [1, {L * H}), got {k!r}")
    top = found.top(k)
    pool = [(i, j) for i in range(L) for j in range(H) if (i, j) not in top]
    rng = np.random.default_rng(seed)
    random_acc = [
        answer_accuracy(
            weights, examples, masked=[pool[i] for i in rng.choice(len(pool), k, replace=False)]
        )
        for _ in range(draws)
    ]
    return {
        "clean": answer_accuracy(weights, examples),
        "top": answer_accuracy(weights, examples, masked=top),
        "random": float(np.mean(random_acc)),
    }
