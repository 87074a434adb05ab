"""The kv-eval harness: rows per cell, baselines behave as the budget says, JSON and plots."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qkv.errors import ParameterError
from qkv.lab import decoder as dec
from qkv.lab import kv_eval as kv
from qkv.reference.kv import StreamingLLM


@pytest.fixture(scope="module")
def model():
    if dec.DEFAULT_PATH.is_file():
        return dec.load()
    return dec.init_weights(dec.DecoderConfig(), seed=0)


@pytest.fixture(scope="module")
def results(model):
    cfg = kv.EvalConfig(budgets=(16, 200), lengths=(40, 120), depths=(0.5, 1.0), per_cell=2)
    return kv.run(model, cfg)


def test_one_row_per_cell(results):
    rows = results["rows"]
    assert len(rows) == 4 + 2 * 4  # full once, streaming per budget
    assert {r["method"] for r in rows} == {"full", "streaming"}
    assert all(r["budget"] is None for r in rows if r["method"] == "full")
    for r in rows:
        assert 0 <= r["accuracy"] <= 1 and r["seconds_per_token"] > 0 and r["cache_bytes"] > 0


def test_budget_above_the_context_equals_full_and_cache_bytes_follow_the_budget(results, model):
    by = {(r["method"], r["budget"], r["length"], r["depth"]): r for r in results["rows"]}
    cfg = model.config
    per_token = cfg.n_layers * cfg.n_kv_heads * 2 * cfg.head_dim * 4  # k and v, float32
    for length in (40, 120):
        for depth in (0.5, 1.0):
            full = by[("full", None, length, depth)]
            big = by[("streaming", 200, length, depth)]
            small = by[("streaming", 16, length, depth)]
            assert big["accuracy"] == full["accuracy"]
            # after 5 answer digits the cache holds the prompt and 4 fed-back tokens
            assert full["cache_bytes"] == (length + 4) * per_token
            assert small["cache_bytes"] == 16 * per_token


@pytest.mark.skipif(not dec.DEFAULT_PATH.is_file(), reason="no shipped weights yet")
def test_streaming_loses_a_needle_outside_its_window(results):
    by = {(r["method"], r["budget"], r["length"], r["depth"]): r for r in results["rows"]}
    assert by[("full", None, 120, 0.5)]["accuracy"] == 1.0
    # the needle sits in the evicted middle: the first digit can still come from the prefill
    # (full attention), the whole passkey cannot
    assert by[("streaming", 16, 120, 0.5)]["accuracy"] <= 0.5


def test_save_summary_and_plots(results, tmp_path):
    path = kv.save(results, tmp_path / "r.json")
    back = json.loads(path.read_text())
    assert back["rows"] == results["rows"]
    summary = kv.summary(results)
    assert [s[:2] for s in summary] == [("full", "all"), ("streaming", "16"), ("streaming", "200")]
    grid, depths, lengths = kv.heat(results, "streaming", 16)
    assert grid.shape == (2, 2) and depths == [0.5, 1.0] and lengths == [40, 120]
    for p in kv.plot(results, tmp_path):
        assert p.stat().st_size > 1000


def test_register_a_method():
    kv.register("streaming8", lambda budget: StreamingLLM(n_sink=8, recent=budget - 8))
    try:
        assert kv.EvalConfig(methods=("streaming8",)).methods == ("streaming8",)
    finally:
        del kv.METHODS["streaming8"]


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"methods": ("nope",)}, "methods"),
        ({"budgets": (4,)}, "budgets"),
        ({"depths": (1.5,)}, "depths"),
        ({"per_cell": 0}, "per_cell"),
        ({"lengths": (5,)}, "lengths"),
    ],
)
def test_bad_config(kw, match):
    with pytest.raises(ParameterError, match=match):
        kv.EvalConfig(**kw)


def test_lengths_beyond_the_model_are_refused(model):
    with pytest.raises(ParameterError, match="lengths: expected prompts of at most"):
        kv.run(model, kv.EvalConfig(lengths=(model.config.max_len,), per_cell=1))


def test_parsers():
    assert kv.parse_ints("32, 64", "budgets") == (32, 64)
    assert kv.parse_floats("0,0.5", "depths") == (0.0, 0.5)
    with pytest.raises(ParameterError, match="budgets"):
        kv.parse_ints("a", "budgets")
    assert np.isclose(sum(kv.parse_floats("0.25,0.75", "d")), 1.0)


def test_cli_kv_eval_runs_and_reports_bad_input(tmp_path):
    from typer.testing import CliRunner

    from qkv.cli import app

    weights = dec.save(dec.init_weights(dec.DecoderConfig(), seed=0), tmp_path / "w.npz")
    runner = CliRunner()
    out = tmp_path / "r.json"
    args = ["lab", "kv-eval", "--weights", str(weights), "--out", str(out)]
    small = ["--budgets", "8", "--lengths", "20", "--depths", "0.5", "--per-cell", "1"]
    result = runner.invoke(app, args + small, terminal_width=150)
    assert result.exit_code == 0, result.output
    assert len(json.loads(out.read_text())["rows"]) == 2
    assert (tmp_path / "kv_eval_heatmap.png").is_file()
    result = runner.invoke(app, [*args, "--budgets", "3"], terminal_width=150)
    assert result.exit_code == 2 and "budgets: expected token counts >= 5" in result.output
    result = runner.invoke(
        app, ["lab", "kv-eval", "--weights", str(tmp_path / "no.npz")], terminal_width=150
    )
    assert result.exit_code == 2 and "qkv lab train-decoder" in result.output


@pytest.fixture(scope="module")
def both_tasks(model):
    cfg = kv.EvalConfig(
        tasks=("passkey", "recall"), budgets=(8, 300), lengths=(24, 60), depths=(0.5,), per_cell=3
    )
    return kv.run(model, cfg)


def test_recall_rows_carry_their_task_and_answers_of_two_digits(both_tasks, model):
    rows = both_tasks["rows"]
    assert {r["task"] for r in rows} == {"passkey", "recall"}
    for task in ("passkey", "recall"):
        mine = kv.task_rows(both_tasks, task)
        assert len(mine) == 2 + 2 * 2  # full per length, streaming per budget and length
        by = {(r["method"], r["budget"], r["length"]): r for r in mine}
        for length in (24, 60):  # a budget above the context is the full cache
            assert (
                by[("streaming", 300, length)]["accuracy"] == by[("full", None, length)]["accuracy"]
            )
    # the prompts are the task's own: rebuild one recall cell and decode it directly
    ex = [
        kv.example("recall", 60, 0.5, np.random.default_rng((2024, 1, 0, r, 1))) for r in range(3)
    ]
    assert all(len(e.answer) == 2 and e.prompt[-3] == kv.tasks.QUERY for e in ex)
    g = kv.engine.generate(model, np.stack([e.prompt for e in ex]), 2)
    hits = np.mean(np.all(g.tokens == np.stack([e.answer for e in ex]), axis=1))
    full = [r for r in kv.task_rows(both_tasks, "recall") if r["method"] == "full"]
    assert hits == next(r["accuracy"] for r in full if r["length"] == 60)


def test_summary_markdown_and_plots_per_task(both_tasks, tmp_path):
    assert kv.summary(both_tasks) == kv.summary(both_tasks, "passkey")
    assert [s[:2] for s in kv.summary(both_tasks, "recall")] == [
        ("full", "all"),
        ("streaming", "8"),
        ("streaming", "300"),
    ]
    page = kv.markdown(both_tasks)
    assert "passkey accuracy" in page and "recall accuracy" in page
    old = {
        **both_tasks,
        "rows": [{k: v for k, v in r.items() if k != "task"} for r in both_tasks["rows"]],
    }
    old["config"] = {k: v for k, v in both_tasks["config"].items() if k != "tasks"}
    assert len(kv.task_rows(old)) == len(both_tasks["rows"])  # results saved before tasks
    for p in kv.plot(both_tasks, tmp_path):
        assert p.stat().st_size > 1000


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"tasks": ("copy",)}, "tasks: expected names in"),
        ({"tasks": ()}, "tasks: expected names in"),
        ({"tasks": ("recall",), "lengths": (12,)}, "recall prompts need at least 20"),
    ],
)
def test_bad_tasks(kw, match):
    with pytest.raises(ParameterError, match=match):
        kv.EvalConfig(**kw)
