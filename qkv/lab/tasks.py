r"""Synthetic long-context tasks for the lab decoder: passkey, associative recall, copy.

All three are retrieval by *induction*: the prompt ends with a token that occurred once before,
and the answer is what followed it there. That is the mechanism a needle-in-a-haystack test
probes in large models (a head that finds the earlier occurrence and copies what came next), so
a model small enough to train on a laptop CPU shows the same retrieval heads, sinks and failure
modes under KV-cache compression.

The vocabulary (:data:`VOCAB_SIZE` tokens) has a few marker tokens, digits and a block of filler
"words". A digit token carries its place in the number (digit ``v`` in place ``k`` is its own
token, written ``v_k``), as a tokenizer with place-aware number tokens would give: the model
then finds the ``k``-th digit of a key by what the token *is*, a single attention step, and a
4-layer model learns the tasks in minutes of CPU instead of waiting for the two-step induction
circuit (previous-token head, then matching head) that unmarked digits need.

* **passkey** — ``BOS filler... PASS d1..dk END filler... QUERY PASS`` → ``d1..dk``. The needle
  (``PASS d1..dk END``) sits at a chosen *depth*: the fraction of the filler that comes before it.
* **recall** (multi-key associative recall) — ``BOS (KEY w v1 v2)... filler... QUERY KEY w`` →
  ``v1 v2``: several key/value pairs, one of them asked for.
* **copy** — ``BOS filler s1..sm COPY s1..s_j`` → ``s_{j+1}..s_m``: repeat a random segment of
  random length (the classic induction-head task). In training the second copy is a target.

Everything is a pure function of its arguments and an ``np.random.Generator``; :func:`generate`
derives one generator per example from a seed, so any example can be regenerated on its own.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from qkv.errors import ParameterError

#: Token ids of the markers.
PAD, BOS, PASS, END, QUERY, KEY, COPY = 0, 1, 2, 3, 4, 5, 6
#: Digits carry their place in the key: digit ``v`` in slot ``k`` is token
#: ``DIGIT0 + 10 * k + v`` (``k < SLOTS``).
DIGIT0 = 8
SLOTS = 5
#: Filler words are tokens ``FILLER0 .. VOCAB_SIZE - 1``.
FILLER0 = DIGIT0 + 10 * SLOTS + 2
VOCAB_SIZE = 128
N_FILLER = VOCAB_SIZE - FILLER0

TASKS = ("passkey", "recall", "copy")
_NAMES = {PAD: "<pad>", BOS: "<s>", PASS: "PASS", END: "END", QUERY: "QUERY", KEY: "KEY"}
_NAMES[COPY] = "COPY"


@dataclass(frozen=True, eq=False)
class Example:
    """One prompt and its answer.

    ``prompt`` and ``answer`` are int64 token ids. ``needle`` is the index in ``prompt`` of the
    first answer token's source (the token the retrieving head must read); ``depth`` is the
    needle's depth in the filler (``None`` for copy).
    """

    task: str
    prompt: np.ndarray
    answer: np.ndarray
    needle: int
    depth: float | None

    @property
    def tokens(self) -> np.ndarray:
        """Prompt followed by answer, the sequence a model is trained on ``(len(prompt) + k,)``."""
        return np.concatenate([self.prompt, self.answer])


def token_name(t: int) -> str:
    """Readable name of a token id (markers by name, digits as ``0..9``, filler as ``w<i>``)."""
    t = int(t)
    if t in _NAMES:
        return _NAMES[t]
    if DIGIT0 <= t < DIGIT0 + 10 * SLOTS:
        slot, value = divmod(t - DIGIT0, 10)
        return f"{value}_{slot + 1}"
    if FILLER0 <= t < VOCAB_SIZE:
        return f"w{t - FILLER0}"
    return f"<{t}>"


def render(tokens: Sequence[int]) -> str:
    """Tokens as a space-separated string."""
    return " ".join(token_name(t) for t in tokens)


def _filler(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(FILLER0, VOCAB_SIZE, size=n)


def _digits(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` random digits in slots ``0..n-1``."""
    return DIGIT0 + 10 * np.arange(n) + rng.integers(0, 10, size=n)


def _check_length(length: int, shortest: int) -> int:
    if not isinstance(length, int | np.integer) or length < shortest:
        raise ParameterError(f"length: expected an int >= {shortest}, got {length!r}")
    return int(length)


def _check_depth(depth: float) -> float:
    if not 0.0 <= float(depth) <= 1.0:
        raise ParameterError(f"depth: expected a fraction in [0, 1], got {depth!r}")
    return float(depth)


def passkey(length: int, depth: float, rng: np.random.Generator, *, digits: int = 5) -> Example:
    """A passkey prompt of exactly ``length`` tokens with the needle at ``depth``.

    Args:
        length: prompt tokens, ``BOS`` and the final ``QUERY PASS`` included.
        depth: fraction of the filler placed before the needle, in ``[0, 1]``.
        rng: the random generator (filler words and the passkey digits).
        digits: passkey length in digits (at most :data:`SLOTS`).

    Returns:
        The example; its answer is the ``digits`` digit tokens.
    """
    if not isinstance(digits, int) or not 1 <= digits <= SLOTS:
        raise ParameterError(f"digits: expected an int in [1, {SLOTS}], got {digits!r}")
    fixed = 1 + (digits + 2) + 2  # BOS, PASS d.. END, QUERY PASS
    length = _check_length(length, fixed)
    depth = _check_depth(depth)
    n_fill = length - fixed
    before = round(depth * n_fill)
    key = _digits(digits, rng)
    fill = _filler(n_fill, rng)
    prompt = np.concatenate(
        [[BOS], fill[:before], [PASS], key, [END], fill[before:], [QUERY, PASS]]
    ).astype(np.int64)
    return Example("passkey", prompt, key.astype(np.int64), needle=1 + before + 1, depth=depth)


def recall(
    length: int, depth: float, rng: np.random.Generator, *, pairs: int = 4, value_digits: int = 2
) -> Example:
    """A multi-key associative-recall prompt of exactly ``length`` tokens.

    ``pairs`` records ``KEY w v..`` (distinct filler words ``w``) are spread through the filler;
    the asked one sits at ``depth``, the others at random places.

    Args:
        length: prompt tokens.
        depth: fraction of the filler before the asked record.
        rng: the random generator.
        pairs: number of key/value records.
        value_digits: digits per value.

    Returns:
        The example; its answer is the asked record's ``value_digits`` digits.
    """
    if not isinstance(pairs, int) or not 1 <= pairs <= N_FILLER:
        raise ParameterError(f"pairs: expected an int in [1, {N_FILLER}], got {pairs!r}")
    record = 2 + value_digits
    fixed = 1 + pairs * record + 3  # BOS, records, QUERY KEY w
    length = _check_length(length, fixed)
    depth = _check_depth(depth)
    n_fill = length - fixed
    words = FILLER0 + rng.choice(N_FILLER, size=pairs, replace=False)
    if not isinstance(value_digits, int) or not 1 <= value_digits <= SLOTS:
        raise ParameterError(f"value_digits: expected an int in [1, {SLOTS}], got {value_digits!r}")
    values = np.stack([_digits(value_digits, rng) for _ in range(pairs)])  # (pairs, k)
    cuts = np.sort(rng.integers(0, n_fill + 1, size=pairs - 1))
    cuts = np.concatenate([[round(depth * n_fill)], cuts])  # the asked record first
    order = np.argsort(cuts, kind="stable")
    fill = _filler(n_fill, rng)
    pieces, start, needle = [np.array([BOS])], 0, 0
    for i in order:
        pieces.append(fill[start : cuts[i]])
        if i == 0:
            needle = sum(len(p) for p in pieces) + 2
        pieces.append(np.concatenate([[KEY, words[i]], values[i]]))
        start = cuts[i]
    pieces += [fill[start:], np.array([QUERY, KEY, words[0]])]
    prompt = np.concatenate(pieces).astype(np.int64)
    return Example("recall", prompt, values[0].astype(np.int64), needle=needle, depth=depth)


def copy(
    length: int, rng: np.random.Generator, *, shown: int = 1, segment: int | None = None
) -> Example:
    """A copy prompt: ``BOS filler s COPY s[:shown]`` with the rest of ``s`` as answer.

    The segment length is drawn at random (or given), so the distance between the two copies
    varies and only content (induction), not a fixed offset, finds the source.

    Args:
        length: prompt plus answer tokens.
        rng: the random generator.
        shown: tokens of the second copy already in the prompt (``>= 1``).
        segment: length of ``s``; default uniform in ``[shown + 1, (length - 2) // 2]``.

    Returns:
        The example; its answer is ``s[shown:]``.
    """
    length = _check_length(length, 6)
    longest = (length - 2) // 2
    if not isinstance(shown, int) or not 1 <= shown < longest:
        raise ParameterError(f"shown: expected an int in [1, {longest}), got {shown!r}")
    m = int(rng.integers(shown + 1, longest + 1)) if segment is None else segment
    if not isinstance(m, int) or not shown < m <= longest:
        raise ParameterError(f"segment: expected an int in ({shown}, {longest}], got {m!r}")
    s = _filler(m, rng)
    pad = _filler(length - 2 - 2 * m, rng)
    prompt = np.concatenate([[BOS], pad, s, [COPY], s[:shown]]).astype(np.int64)
    return Example(
        "copy", prompt, s[shown:].astype(np.int64), needle=1 + len(pad) + shown, depth=None
    )


def make(task: str, length: int, depth: float, rng: np.random.Generator) -> Example:
    """One example of ``task`` (one of :data:`TASKS`) with default task settings."""
    if task == "passkey":
        return passkey(length, depth, rng)
    if task == "recall":
        return recall(length, depth, rng)
    if task == "copy":
        return copy(length, rng)
    raise ParameterError(f"task: expected one of {TASKS}, got {task!r}")


def generate(
    task: str,
    *,
    lengths: Sequence[int],
    depths: Sequence[float],
    per_cell: int = 1,
    seed: int = 0,
) -> Iterator[Example]:
    """Examples for every (length, depth) cell, ``per_cell`` each, deterministic given ``seed``.

    Example ``r`` of cell ``(i, j)`` uses ``np.random.default_rng((seed, i, j, r))``, so a cell
    does not change when other lengths or depths are added.

    Args:
        task: one of :data:`TASKS`.
        lengths: prompt lengths.
        depths: needle depths in ``[0, 1]``.
        per_cell: examples per cell.
        seed: the seed.

    Yields:
        Examples, length-major then depth then repeat.
    """
    for i, length in enumerate(lengths):
        for j, depth in enumerate(depths):
            for r in range(per_cell):
                rng = np.random.default_rng((seed, i, j, r))
                yield make(task, int(length), float(depth), rng)


def training_batch(
    batch: int,
    length: int,
    rng: np.random.Generator,
    *,
    mix: dict[str, float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A batch of equal-length training sequences and their loss mask.

    Each row is one example's ``prompt + answer`` cut to exactly ``length`` tokens (the prompt
    is sized so that it fits). The mask marks the *input* positions whose next token is a
    target: the answer tokens, and for copy the whole second copy.

    Args:
        batch: rows.
        length: tokens per row.
        rng: the random generator.
        mix: task probabilities, default ``{"passkey": 0.5, "recall": 0.25, "copy": 0.25}``.

    Returns:
        ``tokens (batch, length)`` int64 and ``mask (batch, length - 1)`` bool.
    """
    mix = mix or {"passkey": 0.5, "recall": 0.25, "copy": 0.25}
    names = list(mix)
    p = np.array([mix[n] for n in names], dtype=np.float64)
    tokens = np.zeros((batch, length), dtype=np.int64)
    mask = np.zeros((batch, length - 1), dtype=bool)
    for b in range(batch):
        task = names[rng.choice(len(names), p=p / p.sum())]
        if task == "copy":
            ex = copy(length, rng)
            first = len(ex.prompt) - 1  # the shown s[0] predicts s[1], and so on
        else:
            answer_len = 5 if task == "passkey" else 2
            ex = make(task, length - answer_len, float(rng.uniform()), rng)
            first = len(ex.prompt) - 1
        seq = ex.tokens
        tokens[b, : len(seq)] = seq
        mask[b, first : len(seq) - 1] = True
    return tokens, mask
