r"""The next-token distribution as attention over vocabulary keys: key-similarity bias and
navigation away from explored keys.

Paper: *Correlation and Navigation in the Vocabulary Key Representation Space of Language
Models* (Peng, An, Shang, ICLR 2025, arXiv 2410.02284). The paper's method works through the
prompt; this module states its query/key geometry directly on the lab decoder
(:mod:`qkv.lab.decoder`).

**Query and keys.** The last hidden state after the final norm is the *query*
$q = \operatorname{RMSNorm}(x_L)$ and the unembedding rows $E_v$ are fixed, context-free *keys*;
the next-token distribution is one attention row over the vocabulary,

$$
p(v \mid \text{context}) = \operatorname{softmax}_v(q \cdot E_v) ,
$$

(no $1/\sqrt d$: the logits are the raw dot products; the lab decoder ties $E$ to its input
embedding).

**Key-similarity bias.** Because the keys do not depend on the context, a token whose key is
close to the top-1 key $E_{v_1}$ gets a logit close to the top one, whether or not it fits:
$q \cdot E_v = q \cdot E_{v_1} - q \cdot (E_{v_1} - E_v)$. The paper finds that middle-ranked
tokens are those similar to the top ones. We measure it as the Spearman correlation, over the
tokens ranked inside a middle band, between rank and the cosine similarity of each key to the
top-1 key: strongly negative means "the higher the rank, the more it looks like the top token".

**Navigation.** The paper's in-context navigation (ICN) puts the results explored so far in the
prompt and asks for something else, so that the model produces "a query representation that has
small dot products with explored keys". Here that aim is applied to the query itself. The
smallest change $\Delta$ (in norm) with $(q + \Delta) \cdot E_e = (1 - \alpha)\, q \cdot E_e$ for
every explored token $e$ is minus $\alpha$ times the orthogonal projection of $q$ onto the span
of the explored keys, so

$$
q' = q - \alpha\, P_{\mathcal E}\, q, \qquad P_{\mathcal E} = K_{\mathcal E}^\top
(K_{\mathcal E} K_{\mathcal E}^\top)^{+} K_{\mathcal E}
$$

(``rule="project"``; $\alpha = 1$ makes every explored logit zero and leaves the rest of $q$
untouched). The literal form $q' = q - \alpha \sum_{e} E_e / |\mathcal E|$ is offered as
``rule="subtract"``; it lowers the explored logits only to the extent the explored keys are
similar to each other and also moves $q$ along directions that have nothing to do with them.
Each round proposes the top-$k$ tokens of the navigated query; diversity is the number of
distinct tokens proposed over all rounds (plain top-$k$ of the same query proposes the same
$k$ every round).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qkv.errors import ParameterError, ShapeError
from qkv.lab import decoder as dec
from qkv.reference.analysis.circuit_tools import check_position, check_prompt, trace

Array = np.ndarray


@dataclass(frozen=True, eq=False)
class VocabKeys:
    """The next-token distribution read as attention of one query over the vocabulary keys.

    Attributes:
        query: the final query ``RMSNorm(x_L)`` at the read position ``(B, d)``.
        keys: the vocabulary keys, the unembedding rows ``(V, d)``.
        logits: ``query @ keys.T`` ``(B, V)``.
        probs: the softmax of ``logits`` ``(B, V)``.
    """

    query: Array
    keys: Array
    logits: Array
    probs: Array


def softmax(x: Array) -> Array:
    """Softmax over the last axis, with the row max subtracted first."""
    z = np.exp(x - x.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def vocab_keys(weights: dec.DecoderWeights, tokens: Array, *, position: int = -1) -> VocabKeys:
    """The final query of the lab decoder at ``position`` and the vocabulary keys.

    Args:
        weights: the lab decoder.
        tokens: token ids ``(B, N)`` or ``(N,)``.
        position: the position whose next token is predicted (default: the last).

    Returns:
        The :class:`VocabKeys`; ``logits`` equal the model's logits at ``position``.
    """
    config = weights.config
    tokens = check_prompt(config, tokens)
    p = check_position(position, tokens.shape[1])
    final = trace(weights, tokens).final[:, p]  # (B, d)
    query = dec.rms_norm(final, weights.final_norm, config.eps)  # (B, d)
    logits = query @ weights.embed.T  # (B, V)
    return VocabKeys(query, weights.embed, logits, softmax(logits))


def _check_query_keys(query: Array, keys: Array) -> tuple[Array, Array]:
    query, keys = np.asarray(query), np.asarray(keys)
    if keys.ndim != 2 or query.ndim not in (1, 2) or query.shape[-1] != keys.shape[1]:
        raise ShapeError(
            f"query, keys: expected (d,) or (B, d) and (V, d) with equal d, got {query.shape} "
            f"and {keys.shape}"
        )
    return query, keys


def _check_band(band: tuple[float, float]) -> tuple[float, float]:
    if len(band) != 2 or not 0.0 < band[0] < band[1] < 1.0:
        raise ParameterError(f"band: expected fractions 0 < lo < hi < 1, got {band!r}")
    return float(band[0]), float(band[1])


def rank_of(logits: Array) -> Array:
    """The rank of every token (0 = top), ties by lower id ``(..., V)``."""
    order = np.argsort(-logits, axis=-1, kind="stable")  # (..., V)
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(logits.shape[-1]), axis=-1)
    return ranks


def _spearman(a: Array, b: Array) -> float:
    ra, rb = rank_of(-a).astype(float), rank_of(-b).astype(float)  # ascending ranks
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float(ra @ rb / np.sqrt((ra @ ra) * (rb @ rb)))


@dataclass(frozen=True, eq=False)
class KeyBias:
    """What :func:`key_similarity_bias` measured.

    Attributes:
        ranks: rank of every token (0 = top) ``(B, V)``.
        similarity: cosine similarity of every key to the top-1 token's key ``(B, V)``.
        correlation: Spearman correlation of rank and similarity inside the band ``(B,)``.
        band: the ranks ``[lo, hi)`` counted as middle.
    """

    ranks: Array
    similarity: Array
    correlation: Array
    band: tuple[int, int]


def key_similarity_bias(
    query: Array, keys: Array, *, band: tuple[float, float] = (0.05, 0.5)
) -> KeyBias:
    """How much middle-ranked tokens resemble the top token in key space.

    Args:
        query: final queries ``(B, d)`` or ``(d,)``.
        keys: vocabulary keys ``(V, d)``.
        band: the middle ranks as fractions of the vocabulary ``(lo, hi)``, ``0 < lo < hi < 1``.

    Returns:
        The :class:`KeyBias`.
    """
    query, keys = _check_query_keys(query, keys)
    lo_f, hi_f = _check_band(band)
    query = np.atleast_2d(query)  # (B, d)
    V = keys.shape[0]
    lo, hi = max(1, int(np.floor(lo_f * V))), int(np.ceil(hi_f * V))
    if hi - lo < 3:
        raise ParameterError(f"band: expected at least 3 middle ranks, got [{lo}, {hi}) of {V}")
    ranks = rank_of(query @ keys.T)  # (B, V)
    unit = keys / np.maximum(np.linalg.norm(keys, axis=1, keepdims=True), np.finfo(keys.dtype).tiny)
    top = np.argmin(ranks, axis=1)  # (B,)
    similarity = unit[top] @ unit.T  # (B, V)
    correlation = np.array(
        [
            _spearman(r[(r >= lo) & (r < hi)], s[(r >= lo) & (r < hi)])
            for r, s in zip(ranks, similarity, strict=True)
        ]
    )
    return KeyBias(ranks, similarity, correlation, (lo, hi))


def navigate(query: Array, explored: Array, *, alpha: float = 1.0, rule: str = "project") -> Array:
    r"""Push ``query`` away from the ``explored`` keys (see the module docstring).

    Args:
        query: the query ``(d,)``.
        explored: keys of the tokens explored so far ``(E, d)`` (``E = 0`` leaves ``query``).
        alpha: strength in ``[0, 1]``; ``rule="project"`` scales every explored logit by
            ``1 - alpha``.
        rule: ``"project"`` ($q - \alpha P_{\mathcal E} q$) or ``"subtract"``
            ($q - \alpha \sum_e E_e / |\mathcal E|$).

    Returns:
        The navigated query ``(d,)``.
    """
    query, explored = np.asarray(query), np.asarray(explored)
    if query.ndim != 1 or explored.ndim != 2 or explored.shape[1] != query.shape[0]:
        raise ShapeError(
            f"query, explored: expected (d,) and (E, d), got {query.shape} and {explored.shape}"
        )
    if not isinstance(alpha, int | float | np.floating) or not 0.0 <= float(alpha) <= 1.0:
        raise ParameterError(f"alpha: expected a number in [0, 1], got {alpha!r}")
    if rule not in ("project", "subtract"):
        raise ParameterError(f"rule: expected 'project' or 'subtract', got {rule!r}")
    if explored.shape[0] == 0:
        return query.copy()
    if rule == "subtract":
        return query - alpha * explored.mean(0)
    coef = np.linalg.lstsq(explored.T, query, rcond=None)[0]  # (E,): P q = explored.T @ coef
    return query - alpha * (explored.T @ coef)


def check_count(value: int, name: str, high: int) -> int:
    """``value`` as an int in ``[1, high]``."""
    if not isinstance(value, int | np.integer) or not 1 <= int(value) <= high:
        raise ParameterError(f"{name}: expected an int in [1, {high}], got {value!r}")
    return int(value)


def explore(
    query: Array,
    keys: Array,
    *,
    rounds: int,
    k: int,
    alpha: float = 1.0,
    rule: str = "project",
) -> Array:
    """Propose ``k`` tokens per round, navigating the query away from all tokens proposed so far.

    Round 0 is plain top-``k``; round ``t`` ranks the vocabulary by the query navigated (from
    the original query) away from the keys of every token proposed in rounds ``< t``. Tokens may
    be proposed again: the count of distinct ones is the measure.

    Args:
        query: the query ``(d,)``.
        keys: vocabulary keys ``(V, d)``.
        rounds: rounds of proposals.
        k: tokens proposed per round.
        alpha: see :func:`navigate`.
        rule: see :func:`navigate`.

    Returns:
        The proposals ``(rounds, k)``, best first within a round.
    """
    query, keys = _check_query_keys(query, keys)
    if query.ndim != 1:
        raise ShapeError(f"query: expected one query (d,), got {query.shape}")
    rounds = check_count(rounds, "rounds", 10_000)
    k = check_count(k, "k", keys.shape[0])
    proposals: list[Array] = []
    seen: list[int] = []
    for _ in range(rounds):
        q = navigate(query, keys[seen], alpha=alpha, rule=rule)  # (d,)
        top = np.argsort(-(keys @ q), kind="stable")[:k]  # (k,)
        proposals.append(top)
        seen.extend(int(t) for t in top if int(t) not in seen)
    return np.stack(proposals)


def diversity(proposals: Array) -> int:
    """Number of distinct tokens in ``proposals`` (any shape)."""
    return int(np.unique(np.asarray(proposals)).size)
