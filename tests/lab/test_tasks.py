"""The synthetic long-context tasks: exact layout, determinism, depth placement, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qkv.errors import ParameterError
from qkv.lab import tasks


@settings(max_examples=25, deadline=None)
@given(length=st.integers(12, 600), depth=st.floats(0, 1), seed=st.integers(0, 2**31))
def test_passkey_layout(length, depth, seed):
    ex = tasks.passkey(length, depth, np.random.default_rng(seed))
    p = ex.prompt
    assert len(p) == length and p.dtype == np.int64
    assert p[0] == tasks.BOS and list(p[-2:]) == [tasks.QUERY, tasks.PASS]
    (where,) = np.nonzero(p == tasks.PASS)
    assert len(where) == 2  # the needle's marker and the query's
    start = where[0]
    np.testing.assert_array_equal(p[start + 1 : start + 6], ex.answer)
    assert p[start + 6] == tasks.END and ex.needle == start + 1
    place, value = np.divmod(ex.answer - tasks.DIGIT0, 10)
    np.testing.assert_array_equal(place, np.arange(5))  # digit k carries place k
    assert np.all((value >= 0) & (value < 10))
    filler = length - 10
    assert start - 1 == round(depth * filler)  # filler tokens before the needle
    rest = np.delete(p, [0, *range(start, start + 7), length - 2, length - 1])
    assert np.all(rest >= tasks.FILLER0)


def test_depth_extremes():
    rng = np.random.default_rng(0)
    assert tasks.passkey(50, 0.0, rng).needle == 2  # right after BOS PASS
    ex = tasks.passkey(50, 1.0, rng)
    assert ex.prompt[ex.needle + 5] == tasks.END and ex.needle + 6 == 50 - 2


@settings(max_examples=25, deadline=None)
@given(
    length=st.integers(28, 400),
    depth=st.floats(0, 1),
    seed=st.integers(0, 2**31),
    pairs=st.integers(1, 6),
)
def test_recall_answer_follows_the_asked_key(length, depth, seed, pairs):
    ex = tasks.recall(length, depth, np.random.default_rng(seed), pairs=pairs)
    p = ex.prompt
    assert len(p) == length and list(p[-3:-1]) == [tasks.QUERY, tasks.KEY]
    asked = p[-1]
    starts = np.nonzero(p[:-3] == tasks.KEY)[0]
    assert len(starts) == pairs
    words = p[starts + 1]
    assert len(set(words.tolist())) == pairs and asked in words
    at = starts[list(words).index(asked)]
    np.testing.assert_array_equal(p[at + 2 : at + 4], ex.answer)
    assert ex.needle == at + 2


def test_copy_answer_is_the_rest_of_the_segment():
    ex = tasks.copy(30, np.random.default_rng(0), shown=3, segment=10)
    assert len(ex.prompt) + len(ex.answer) == 30
    c = int(np.nonzero(ex.prompt == tasks.COPY)[0][0])
    s = ex.prompt[c - 10 : c]
    np.testing.assert_array_equal(ex.prompt[-3:], s[:3])
    np.testing.assert_array_equal(ex.answer, s[3:])
    assert ex.prompt[ex.needle] == ex.answer[0]


def test_copy_distance_varies():
    gaps = {len(tasks.copy(40, np.random.default_rng(i)).answer) for i in range(30)}
    assert len(gaps) > 5  # the segment length (so the copy offset) is drawn at random


def test_generate_is_deterministic_and_cells_are_independent():
    a = list(tasks.generate("passkey", lengths=[64, 128], depths=[0.0, 0.5], per_cell=2, seed=3))
    b = list(tasks.generate("passkey", lengths=[64, 128], depths=[0.0, 0.5], per_cell=2, seed=3))
    c = list(tasks.generate("passkey", lengths=[64], depths=[0.0, 0.5], per_cell=2, seed=3))
    assert len(a) == 8
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.tokens, y.tokens)
    for x, y in zip(a[:4], c, strict=True):  # adding a length leaves the first cells alone
        np.testing.assert_array_equal(x.tokens, y.tokens)
    d = list(tasks.generate("passkey", lengths=[64], depths=[0.0], per_cell=1, seed=4))
    assert not np.array_equal(d[0].tokens, a[0].tokens)


def test_training_batch_masks_exactly_the_targets():
    rng = np.random.default_rng(0)
    tok, mask = tasks.training_batch(16, 80, rng, mix={"passkey": 1, "recall": 1, "copy": 1})
    assert tok.shape == (16, 80) and mask.shape == (16, 79)
    seen = set()
    for row, m in zip(tok, mask, strict=True):
        targets = row[1:][m]
        (where,) = np.nonzero(m)
        if row[-6] == tasks.PASS:  # passkey: the 5 digits after the final QUERY PASS
            seen.add("passkey")
            assert m.sum() == 5 and np.all(targets == row[-5:])
        elif tasks.COPY in row:  # copy: every token after the shown first one
            seen.add("copy")
            c = int(np.nonzero(row == tasks.COPY)[0][0])
            assert where[0] == c + 1 and where[-1] == 78
            segment = row[c + 1 :]
            np.testing.assert_array_equal(row[c - len(segment) : c], segment)
        else:  # recall: the two value digits
            seen.add("recall")
            assert row[-4] == tasks.KEY and m.sum() == 2
    assert seen == {"passkey", "recall", "copy"}


def test_render_and_names():
    tokens = [tasks.BOS, tasks.DIGIT0 + 7, tasks.DIGIT0 + 13, tasks.FILLER0 + 2, tasks.PASS]
    assert tasks.render(tokens) == "<s> 7_1 3_2 w2 PASS"


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda r: tasks.passkey(5, 0.5, r), "length"),
        (lambda r: tasks.passkey(50, 1.5, r), "depth"),
        (lambda r: tasks.passkey(50, 0.5, r, digits=0), "digits"),
        (lambda r: tasks.recall(50, 0.5, r, pairs=0), "pairs"),
        (lambda r: tasks.recall(50, 0.5, r, value_digits=6), "value_digits"),
        (lambda r: tasks.passkey(50, 0.5, r, digits=6), "digits"),
        (lambda r: tasks.copy(20, r, shown=9), "shown"),
        (lambda r: tasks.copy(20, r, segment=10), "segment"),
        (lambda r: tasks.make("sort", 50, 0.5, r), "task"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ParameterError, match=match):
        call(np.random.default_rng(0))
