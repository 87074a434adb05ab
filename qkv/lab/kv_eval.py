"""The KV-cache evaluation harness (``qkv lab kv-eval``): needle retrieval under a cache budget.

For each task, method, budget, prompt length and needle depth, the harness runs the lab decoder
(:mod:`qkv.lab.engine`) on seeded held-out prompts (:mod:`qkv.lab.tasks`), decodes the answer
greedily and records

* **accuracy**: the fraction of prompts whose whole answer is decoded exactly;
* **cache bytes**: the bytes the cache holds after the last step (keys, values and any extra
  state the method keeps), averaged over the prompts;
* **time per decoded token**: wall time of a decode step divided by the rows of the batch.

A method is a name bound to a factory ``budget -> KVPolicy | None`` in :data:`METHODS`; the two
baselines are ``full`` (no compression, the budget is ignored) and ``streaming`` (4 sinks and
``budget - 4`` recent tokens, :class:`~qkv.reference.kv.StreamingLLM`). Other KV methods join
with :func:`register`.

Tasks (:data:`TASKS`): ``passkey`` (a 5-digit key, the task the lab decoder was trained on)
and ``recall`` (multi-key associative recall: 4 ``KEY w v1 v2`` records, one asked for; 15% of
the training rows). The shipped decoder is weak at recall even with the full cache: on held-out
prompts it decodes the asked value about as often as it would by copying the value of a
*random* record of the four (whole-answer accuracy near 0.1, first digit near 1/4), so recall
rows measure how a method changes a model that mostly fails, not retrieval under a budget. Results are a JSON-ready dict (:func:`run`) and two plots
(:func:`plot`): accuracy against budget per method, and a depth x length heat map per method,
like the needle-in-a-haystack figures.
"""

from __future__ import annotations

import functools
import json
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from qkv.errors import ParameterError
from qkv.lab import decoder as dec
from qkv.lab import engine, tasks
from qkv.reference import kv, sparse
from qkv.reference.kv import KVPolicy, KVSelector, StreamingLLM

Method = KVPolicy | KVSelector | None
#: The tasks the harness runs (generators of :mod:`qkv.lab.tasks` with their default settings).
TASKS = ("passkey", "recall")
#: ``name -> (budget -> method)``: a cache policy (the budget is the tokens kept per KV head),
#: a decode-time selector (the budget is the keys read per step), or ``None`` (the full cache).
METHODS: dict[str, Callable[[int], Method]] = {
    "full": lambda budget: None,
    "streaming": lambda budget: StreamingLLM(n_sink=4, recent=budget - 4),
}


def register(name: str, factory: Callable[[int], Method]) -> None:
    """Add a method to the harness: ``factory(budget)`` builds its policy or selector for one
    budget (a fresh one per cell, so a selector's per-sequence state never leaks)."""
    if not isinstance(name, str) or not name:
        raise ParameterError(f"name: expected a non-empty str, got {name!r}")
    METHODS[name] = factory


#: The shortest recall prompt: BOS, 4 records of 4 tokens, ``QUERY KEY w``.
RECALL_SHORTEST = 1 + 4 * 4 + 3


def example(task: str, length: int, depth: float, rng: np.random.Generator) -> tasks.Example:
    """One prompt of ``task`` (passkey: 5 digits; recall: 4 records, 2-digit values)."""
    if task == "passkey":
        return tasks.passkey(length, depth, rng)
    return tasks.recall(length, depth, rng)


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate.

    Attributes:
        methods: names in :data:`METHODS`.
        budgets: cache budgets in tokens per head (each ``>= 5``).
        lengths: prompt lengths (at most the model's ``max_len`` minus the answer).
        depths: needle depths in ``[0, 1]``.
        per_cell: prompts per (length, depth) cell, decoded as one batch.
        seed: seed of the prompts (held out: the training stream uses other seeds).
        tasks: task names in :data:`TASKS`.
    """

    methods: tuple[str, ...] = ("full", "streaming")
    budgets: tuple[int, ...] = (32, 64, 128, 256, 512)
    lengths: tuple[int, ...] = (64, 128, 256, 512)
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    per_cell: int = 4
    seed: int = 2024
    extra: dict = field(default_factory=dict)
    tasks: tuple[str, ...] = ("passkey",)

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ParameterError(f"methods: expected names in {sorted(METHODS)}, got {unknown}")
        bad = [b for b in self.budgets if not isinstance(b, int) or b < 5]
        if bad or not self.budgets:
            raise ParameterError(f"budgets: expected token counts >= 5, got {list(self.budgets)}")
        if not self.lengths or min(self.lengths) < 10:
            raise ParameterError(f"lengths: expected prompt lengths >= 10, got {self.lengths}")
        if not self.depths or not all(0 <= d <= 1 for d in self.depths):
            raise ParameterError(f"depths: expected fractions in [0, 1], got {self.depths}")
        if not isinstance(self.per_cell, int) or self.per_cell < 1:
            raise ParameterError(f"per_cell: expected an int >= 1, got {self.per_cell!r}")
        if not self.tasks or any(t not in TASKS for t in self.tasks):
            raise ParameterError(f"tasks: expected names in {TASKS}, got {list(self.tasks)}")
        if "recall" in self.tasks and min(self.lengths) < RECALL_SHORTEST:
            raise ParameterError(
                f"lengths: recall prompts need at least {RECALL_SHORTEST} tokens, got "
                f"{min(self.lengths)}"
            )


def _cell(
    weights: dec.DecoderWeights,
    method: Method,
    task: str,
    length: int,
    depth: float,
    cfg: EvalConfig,
    i: int,
    j: int,
) -> dict:
    # passkey keeps the seeds it always had; other tasks add their index to them
    tag = () if task == "passkey" else (TASKS.index(task),)
    exs = [
        example(task, length, depth, np.random.default_rng((cfg.seed, i, j, r, *tag)))
        for r in range(cfg.per_cell)
    ]
    prompts = np.stack([e.prompt for e in exs])  # (per_cell, length)
    answers = np.stack([e.answer for e in exs])  # (per_cell, digits)
    policy = method if isinstance(method, KVPolicy) else None
    selector = method if isinstance(method, KVSelector) else None
    g = engine.generate(weights, prompts, answers.shape[1], policy=policy, selector=selector)
    return {
        "accuracy": float(np.mean(np.all(g.tokens == answers, axis=1))),
        "cache_bytes": g.cache.nbytes() / len(exs),
        "seconds_per_token": float(np.mean(g.decode_seconds)) / len(exs),
    }


def run(
    weights: dec.DecoderWeights | None = None,
    cfg: EvalConfig | None = None,
    *,
    progress: bool = False,
) -> dict:
    """Evaluate every (method, budget, length, depth) cell.

    Args:
        weights: the model (default: the shipped one).
        cfg: what to evaluate (default :class:`EvalConfig`).
        progress: show a rich progress bar.

    Returns:
        ``{"config": ..., "machine": ..., "rows": [...]}``; each row has ``task``,
        ``method``, ``budget`` (``None`` for ``full``), ``length``, ``depth``, ``accuracy``,
        ``cache_bytes`` and ``seconds_per_token``.
    """
    weights = weights or dec.load()
    cfg = cfg or EvalConfig()
    longest = weights.config.max_len - 5
    if max(cfg.lengths) > longest:
        raise ParameterError(
            f"lengths: expected prompts of at most {longest} tokens (max_len "
            f"{weights.config.max_len} minus the 5-digit answer), got {max(cfg.lengths)}"
        )
    jobs = [(m, b) for m in cfg.methods for b in ((None,) if m == "full" else cfg.budgets)]
    from qkv.lab.train import _progress

    rows = []
    start = time.perf_counter()
    with _progress(progress) as bar:
        cells = len(cfg.tasks) * len(jobs) * len(cfg.lengths) * len(cfg.depths)
        progress_task = bar.add_task("kv-eval", total=cells, loss=float("nan"))
        for task, (method, budget) in ((t, job) for t in cfg.tasks for job in jobs):
            for i, length in enumerate(cfg.lengths):
                for j, depth in enumerate(cfg.depths):
                    built = METHODS[method](budget)
                    cell = _cell(weights, built, task, length, depth, cfg, i, j)
                    rows.append(
                        {
                            "task": task,
                            "method": method,
                            "budget": budget,
                            "length": length,
                            "depth": depth,
                            **cell,
                        }
                    )
                    bar.update(progress_task, advance=1, loss=cell["accuracy"])
    return {
        "config": asdict(cfg),
        "machine": {"platform": platform.platform(), "processor": platform.machine()},
        "seconds": time.perf_counter() - start,
        "rows": rows,
    }


def save(results: dict, path: str | Path) -> Path:
    """Write the results as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    return path


def task_rows(results: dict, task: str | None = None) -> list[dict]:
    """The rows of one task (default: the first the config names; rows written before tasks
    existed are passkey rows)."""
    task = task or results["config"].get("tasks", ("passkey",))[0]
    return [r for r in results["rows"] if r.get("task", "passkey") == task]


def summary(results: dict, task: str | None = None) -> list[tuple[str, str, float, float, float]]:
    """``(method, budget, accuracy, cache KiB, ms per token)`` of one task (default: the first
    evaluated) averaged over lengths and depths."""
    out = []
    mine = task_rows(results, task)
    keys = sorted({(r["method"], r["budget"] or 0) for r in mine})
    for method, budget in keys:
        rows = [r for r in mine if r["method"] == method and (r["budget"] or 0) == budget]
        out.append(
            (
                method,
                "all" if budget == 0 else str(budget),
                float(np.mean([r["accuracy"] for r in rows])),
                float(np.mean([r["cache_bytes"] for r in rows])) / 1024,
                1e3 * float(np.mean([r["seconds_per_token"] for r in rows])),
            )
        )
    return out


def heat(
    results: dict, method: str, budget: int | None, task: str | None = None
) -> tuple[np.ndarray, list, list]:
    """Accuracy ``(depths, lengths)`` of one method and budget on one task (default: the
    first evaluated), with the axes' values."""
    rows = [r for r in task_rows(results, task) if r["method"] == method and r["budget"] == budget]
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    grid = np.full((len(depths), len(lengths)), np.nan)
    for r in rows:
        grid[depths.index(r["depth"]), lengths.index(r["length"])] = r["accuracy"]
    return grid, depths, lengths


def plot(results: dict, out_dir: str | Path, *, heat_budget: int | None = None) -> list[Path]:
    """Save ``kv_eval_accuracy.png`` (accuracy vs budget, one panel per task) and
    ``kv_eval_heatmap.png``.

    The heat maps show, per method, accuracy over depth x length on the first task at
    ``heat_budget`` (default: the second-smallest budget evaluated, or the smallest if there
    is one).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    budgets = results["config"]["budgets"]
    methods = results["config"]["methods"]
    names = results["config"].get("tasks", ("passkey",))
    fig, panels = plt.subplots(
        1, len(names), figsize=(5.5 * len(names) + 2.2, 4.2), squeeze=False, layout="constrained"
    )
    colours = plt.get_cmap("tab20").colors
    styles = ("o-", "s--", "^-.", "D:")
    for ax, task in zip(panels[0], names, strict=True):
        rows = task_rows(results, task)
        others = [m for m in methods if m != "full"]
        for method in methods:
            if method == "full":
                acc = np.mean([r["accuracy"] for r in rows if r["method"] == "full"])
                ax.axhline(acc, color="k", ls="--", label="full cache")
                continue
            ys = [
                np.mean([r["accuracy"] for r in rows if r["method"] == method and r["budget"] == b])
                for b in budgets
            ]
            j = others.index(method)  # a colour each; the style tells the 20+ apart
            ax.plot(budgets, ys, styles[(j // 10) % 4], color=colours[(2 * j) % 20 + (j // 10) % 2],
                    ms=4, label=method)  # fmt: skip
        ax.set(
            xscale="log",
            xlabel="cache budget (tokens per head)",
            ylabel=f"{task} accuracy",
            ylim=(-0.02, 1.02),
            title=f"{task} (mean over lengths and depths)",
        )
        ax.minorticks_off()
        ax.set_xticks(budgets, [str(b) for b in budgets])
    handles, labels = panels[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize="small")
    acc_path = out_dir / "kv_eval_accuracy.png"
    fig.savefig(acc_path, dpi=100)
    plt.close(fig)

    if heat_budget is None:
        heat_budget = sorted(budgets)[min(1, len(budgets) - 1)]
    columns = min(len(methods), 6)
    grid_rows = -(-len(methods) // columns)
    fig, axes = plt.subplots(
        grid_rows,
        columns,
        figsize=(3.0 * columns + 1, 2.8 * grid_rows),
        squeeze=False,
        layout="constrained",
    )
    for ax in axes.flat[len(methods) :]:
        ax.axis("off")
    for ax, method in zip(axes.flat, methods, strict=False):
        grid, depths, lengths = heat(results, method, None if method == "full" else heat_budget)
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths])
        ax.set(
            xlabel="prompt length",
            ylabel="needle depth",
            title=method if method == "full" else f"{method}, budget {heat_budget}",
        )
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6, label="accuracy")
    heat_path = out_dir / "kv_eval_heatmap.png"
    fig.savefig(heat_path, dpi=100)
    plt.close(fig)
    return [acc_path, heat_path]


def parse_ints(text: str, name: str) -> tuple[int, ...]:
    """``"32,64"`` -> ``(32, 64)``, with a clear error naming the option."""
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise ParameterError(f"{name}: expected comma-separated integers, got {text!r}") from None


def parse_floats(text: str, name: str) -> tuple[float, ...]:
    """``"0,0.5"`` -> ``(0.0, 0.5)``, with a clear error naming the option."""
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise ParameterError(f"{name}: expected comma-separated numbers, got {text!r}") from None


def names(text: str | Sequence[str]) -> tuple[str, ...]:
    """Method names from ``"full,streaming"`` or a sequence."""
    parts = text.split(",") if isinstance(text, str) else list(text)
    return tuple(p.strip() for p in parts if p.strip())


def markdown(results: dict) -> str:
    """The summary (:func:`summary`) of each task as a Markdown table for the docs page.

    One row per method: its accuracy at each budget, then the cache size from the smallest to
    the largest budget and the time per decoded token averaged over the budgets.
    """
    tables = []
    for task in results["config"].get("tasks", ("passkey",)):
        by_method: dict[str, list[tuple[str, float, float, float]]] = {}
        for method, budget, acc, kib, ms in summary(results, task):
            by_method.setdefault(method, []).append((budget, acc, kib, ms))
        budgets = sorted({int(b) for rows in by_method.values() for b, *_ in rows if b != "all"})
        lines = [
            f"**{task} accuracy** at each budget (tokens per head), cache KiB and ms per "
            "decoded token:",
            "",
            "| method | " + " | ".join(str(b) for b in budgets) + " | cache KiB | ms / token |",
            "|---|" + "---|" * (len(budgets) + 2),
        ]
        for method, rows in by_method.items():
            acc = {b: a for b, a, _, _ in rows}
            cells = [f"{acc.get(str(b), acc.get('all', float('nan'))):.2f}" for b in budgets]
            kib = sorted({f"{k:.0f}" for _, _, k, _ in rows}, key=float)
            size = kib[0] if len(kib) == 1 else f"{kib[0]}–{kib[-1]}"
            ms = float(np.mean([m for *_, m in rows]))
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {size} | {ms:.2f} |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


# --------------------------------------------------------------------------- the catalog's methods
# Each KV or sparse method of the catalog, with the settings the harness runs it at.


@functools.cache
def _razor_heads() -> tuple[tuple[int, int], ...]:
    """Retrieval heads of the shipped lab decoder (RazorAttention's echo/induction search)."""
    from qkv.reference.kv import razor_policy as rp

    weights = dec.load()
    probe = rp.repeated_tokens(
        np.random.default_rng(0), period=128, repeats=4, low=tasks.FILLER0, high=128, bos=1
    )
    _, maps = dec.forward(weights, probe, return_attention=True)  # (L, 1, H, S, S)
    echo, induction = rp.head_scores(maps[:, 0].astype(np.float64), 128)  # (L, H) each
    n_kv = weights.config.n_kv_heads
    return rp.retrieval_heads(rp.per_kv_head(echo, n_kv), rp.per_kv_head(induction, n_kv))


def _duo(budget: int) -> KVPolicy:
    from qkv.reference.kv.duo_training import lab_gates  # trains the gates once (torch)

    return kv.DuoAttention.for_budget(lab_gates(), budget, n_sink=4, sparsity=0.5)


# cache policies: the budget is the tokens each KV head keeps (the KVCache-Factory settings for
# SnapKV; half the heads streaming for DuoAttention)
register(
    "snapkv",
    lambda budget: kv.SnapKV(
        budget=budget, window=min(8, budget - 1), kernel=7, pooling="maxpool", gqa="mean"
    ),
)
register("razor", lambda budget: kv.Razor(retrieval=_razor_heads(), local_capacity=budget))
register("duo", _duo)
register(
    "taskkv", lambda budget: kv.TaskKV(budget=budget, n_sink=4, recent=max(1, budget // 2 - 4))
)
# quantisers keep every token (the budget is SAQ's full-precision segment); the engine holds
# dequantised floats and the exact quantised size is in extra["quantized_bits"]
register("zipcache", lambda budget: kv.ZipCache())
register("saq", lambda budget: kv.SAQ(segment=budget, require_mqa=False))
# decode-time selectors: the budget is the keys each query head reads per step
register("tokenselect", lambda budget: sparse.TokenSelect(n_init=4, n_local=8, top_k=budget - 12))
register(
    "tidaldecode",
    lambda budget: sparse.TidalDecode(top_k=budget, sparse_layer_start=1, correction_layer=2),
)
register("hip", lambda budget: sparse.HiP(mask_k=max(budget - 8, 1), sliding_window=8))
# ActQKV: sinks 4, local 8, blocks of 4 tokens; the entropy cut-off reads between half the
# blocks the budget allows and all of them
register(
    "actqkv",
    lambda budget: sparse.ActQKV(
        n_init=4,
        n_local=8,
        block_size=4,
        top_k=max((budget - 12) // 4, 1),
        min_k=max((budget - 12) // 8, 1),
        repr_topk=2,
    ),
)
# CRITIC and QuoTA: the budget is the tokens each KV head keeps (window 8; CRITIC 4 sinks,
# QuoTA segments of 16 tokens); ZipVL sizes each layer from its attention (tau 0.97), so the
# budget is ignored, dropping (zipvl) or storing at 2 bits (zipvl-mixed) the rest
register("critic", lambda budget: kv.Critic(budget=budget, window=min(8, budget - 5), n_sink=4))
register("quota", lambda budget: kv.QuoTA(budget=budget, window=min(8, budget - 1), segment=16))
register("zipvl", lambda budget: kv.ZipVL(tau=0.97))
register("zipvl-mixed", lambda budget: kv.ZipVL(tau=0.97, rest="quantize"))
# A2ATS: 4 sinks and 8 local tokens; each of the 4 query heads of a KV group retrieves
# (budget - 12) // 4 keys by its codebook scores, so the group's union reads at most the budget
# (codebooks calibrated once per process on held-out passkey prompts, 128 words per KV head)
register(
    "a2ats",
    lambda budget: sparse.A2ATS(
        sparse.a2ats_retrieval.lab_codebooks(),
        n_sink=4,
        window=8,
        top_k=max((budget - 12) // 4, 1),
    ),
)
