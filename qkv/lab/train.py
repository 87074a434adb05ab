r"""Training the lab decoder with torch (``qkv lab train-decoder``).

:class:`TorchDecoder` is the torch twin of :func:`qkv.lab.decoder.forward`: the same equations,
the same weight names and layout (``x @ W``), so that weights move between the two by
:func:`to_torch` / :func:`from_torch` with no transposition. Training minimises the
cross-entropy of the *target* tokens only (the answers of passkey and recall, the second copy
of copy; see :func:`qkv.lab.tasks.training_batch`) with AdamW, a linear warm-up and a cosine
decay, on a fixed token budget per step. A length curriculum holds sequences at 64-128 tokens
for the first tenth of the steps, then widens the ceiling to the full length over the next
four tenths; a tenth of the later steps stay short.

The default mix leaves copy out: its targets (half of every copy row) need the two-step
induction circuit, which did not form within this CPU budget and whose loss then drowned the
passkey signal; passkey (85%) and recall (15%) rows train the retrieval heads the lab needs.
A next-token loss over *every* position, weighted 0.3, is added: most positions hold random
filler that no head can predict, and learning to leave the residual stream alone there is what
makes heads park their attention on the first token, the attention sink of large models
(without it the trained model shows no sink).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qkv.errors import ParameterError
from qkv.lab import decoder as dec
from qkv.lab import tasks


def _rope(x: torch.Tensor, base: float) -> torch.Tensor:
    """Adjacent-pair RoPE at positions ``0..N-1`` of ``x (B, H, N, D)`` (as :func:`qkv.rope`)."""
    B, H, N, D = x.shape
    inv = base ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)  # (D/2,)
    angle = torch.arange(N, dtype=torch.float64)[:, None] * inv  # (N, D/2)
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    a, b = x[..., 0::2], x[..., 1::2]  # (B, H, N, D/2) each
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).reshape(B, H, N, D)


def _rms(x: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * gain


class TorchDecoder(nn.Module):
    """The decoder of :mod:`qkv.lab.decoder` in torch, parameters named as the npz keys."""

    def __init__(self, config: dec.DecoderConfig, init: dec.DecoderWeights | None = None):
        super().__init__()
        self.config = config
        init = init or dec.init_weights(config)
        self.params = nn.ParameterDict(
            {
                k.replace(".", "__"): nn.Parameter(torch.from_numpy(np.array(v, np.float32)))
                for k, v in init.to_arrays().items()
            }
        )

    def p(self, name: str) -> torch.Tensor:
        return self.params[name.replace(".", "__")]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, N, vocab)`` of token ids ``(B, N)``."""
        c = self.config
        B, N = tokens.shape
        x = self.p("embed")[tokens]  # (B, N, d)
        for i in range(c.n_layers):
            w = lambda n, i=i: self.p(f"layers.{i}.{n}")  # noqa: E731
            xn = _rms(x, w("attn_norm"), c.eps)
            q = (xn @ w("wq")).view(B, N, c.n_heads, c.head_dim).transpose(1, 2)  # (B, H, N, Dh)
            k = (xn @ w("wk")).view(B, N, c.n_kv_heads, c.head_dim).transpose(1, 2)
            v = (xn @ w("wv")).view(B, N, c.n_kv_heads, c.head_dim).transpose(1, 2)
            q, k = _rope(q, c.rope_base), _rope(k, c.rope_base)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            h = x + a.transpose(1, 2).reshape(B, N, c.d_model) @ w("wo")  # (B, N, d)
            hn = _rms(h, w("mlp_norm"), c.eps)
            x = h + (F.silu(hn @ w("w1")) * (hn @ w("w3"))) @ w("w2")
        return _rms(x, self.p("final_norm"), c.eps) @ self.p("embed").T


def to_torch(weights: dec.DecoderWeights) -> TorchDecoder:
    """A :class:`TorchDecoder` (float32) holding ``weights``."""
    return TorchDecoder(weights.config, weights)


def from_torch(model: TorchDecoder) -> dec.DecoderWeights:
    """The float32 NumPy weights of ``model``."""
    arrays = {
        k.replace("__", "."): v.detach().cpu().numpy().astype(np.float32)
        for k, v in model.params.items()
    }
    return dec.from_arrays(model.config, arrays)


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe.

    Attributes:
        steps: optimiser steps.
        tokens_per_step: batch rows times sequence length, about constant.
        min_len: shortest training sequence.
        max_len: longest training sequence (prompt plus answer).
        warmup_len: the curriculum's longest sequence during the first ``hold`` of the steps.
        hold: fraction of the steps at ``warmup_len``.
        ramp: fraction of the steps over which the ceiling then grows to ``max_len``.
        anchor: probability that a step after the hold still uses ``warmup_len`` tokens.
        lm_weight: weight of the next-token loss over every position, added to the answer loss.
        lr: peak learning rate.
        warmup: linear warm-up steps.
        weight_decay: AdamW weight decay (matrices only).
        seed: the seed of the weights and the data.
        threads: torch CPU threads (1 is fastest on a shared 2-core machine).
        mix: task probabilities.
    """

    steps: int = 2000
    tokens_per_step: int = 2048
    min_len: int = 64
    max_len: int = 517
    warmup_len: int = 128
    hold: float = 0.1
    ramp: float = 0.4
    anchor: float = 0.1
    lm_weight: float = 0.3
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.01
    seed: int = 0
    threads: int = 1
    mix: dict[str, float] = field(
        default_factory=lambda: {"passkey": 0.85, "recall": 0.15, "copy": 0.0}
    )

    def __post_init__(self) -> None:
        for f in ("steps", "tokens_per_step", "min_len", "max_len", "warmup_len", "threads"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
                raise ParameterError(f"{f}: expected a positive int, got {getattr(self, f)!r}")
        if not 16 <= self.min_len <= self.max_len:
            raise ParameterError(
                f"min_len: expected 16 <= min_len <= max_len={self.max_len}, got {self.min_len}"
            )


def _length(cfg: TrainConfig, step: int, rng: np.random.Generator) -> int:
    if cfg.anchor and rng.uniform() < cfg.anchor:
        return cfg.warmup_len
    held = int(cfg.hold * cfg.steps)
    ramp = min(1.0, max(0, step - held) / max(1, cfg.ramp * cfg.steps))
    top = int(cfg.warmup_len + ramp * (cfg.max_len - cfg.warmup_len))
    return int(rng.integers(cfg.min_len, max(cfg.min_len, min(top, cfg.max_len)) + 1))


def _lr(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train(
    model_config: dec.DecoderConfig | None = None,
    cfg: TrainConfig | None = None,
    *,
    progress: bool = False,
    log: Callable[[int, float], None] | None = None,
) -> tuple[dec.DecoderWeights, dict]:
    """Train a decoder from scratch; returns the float32 weights and the loss history.

    Args:
        model_config: model sizes (default :class:`~qkv.lab.decoder.DecoderConfig`).
        cfg: the recipe (default :class:`TrainConfig`).
        progress: show a rich progress bar.
        log: called as ``log(step, mean loss)`` every 100 steps.

    Returns:
        ``(weights, history)``; ``history`` has ``step``, ``loss``, ``length`` lists, the
        recipe and the wall-clock ``seconds``.
    """
    model_config = model_config or dec.DecoderConfig()
    cfg = cfg or TrainConfig()
    if cfg.max_len > model_config.max_len:
        raise ParameterError(
            f"max_len: expected at most the model's max_len={model_config.max_len}, "
            f"got {cfg.max_len}"
        )
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    rng = np.random.default_rng(cfg.seed)
    model = TorchDecoder(model_config, dec.init_weights(model_config, cfg.seed))
    matrices = [p for n, p in model.params.items() if p.ndim == 2]
    gains = [p for n, p in model.params.items() if p.ndim == 1]
    opt = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": cfg.weight_decay}, {"params": gains}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )
    history: dict = {"step": [], "loss": [], "length": []}
    start = time.perf_counter()
    bar = _progress(progress)
    with bar:
        task = bar.add_task("training", total=cfg.steps, loss=float("nan"))
        for step in range(cfg.steps):
            length = _length(cfg, step, rng)
            tok, mask = tasks.training_batch(
                max(1, cfg.tokens_per_step // length), length, rng, mix=cfg.mix
            )
            tok, mask = torch.from_numpy(tok), torch.from_numpy(mask)
            logits = model(tok[:, :-1])  # (b, n-1, V)
            loss = F.cross_entropy(logits[mask], tok[:, 1:][mask])
            if cfg.lm_weight:
                every = F.cross_entropy(logits.flatten(0, 1), tok[:, 1:].flatten())
                loss = loss + cfg.lm_weight * every
            for g in opt.param_groups:
                g["lr"] = _lr(cfg, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            history["step"].append(step)
            history["loss"].append(value := float(loss.detach()))
            history["length"].append(length)
            bar.update(task, advance=1, loss=value)
            if log is not None and (step + 1) % 100 == 0:
                log(step + 1, float(np.mean(history["loss"][-100:])))
    history["seconds"] = time.perf_counter() - start
    history["recipe"] = asdict(cfg)
    history["model"] = asdict(model_config)
    return from_torch(model), history


def _progress(show: bool):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} loss {task.fields[loss]:.3f}"),
        TimeElapsedColumn(),
        disable=not show,
    )


def passkey_accuracy(
    weights: dec.DecoderWeights,
    *,
    lengths: tuple[int, ...] = (64, 128, 256, 512),
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0),
    per_cell: int = 4,
    seed: int = 1234,
) -> dict[str, list]:
    """Exact-match passkey accuracy per (length, depth) cell, full attention, NumPy forward.

    Teacher-forced: one forward of ``prompt + answer`` and the argmax at each answer position
    (equal to greedy decoding when every digit is right, which is what exact match counts).
    """
    acc = np.zeros((len(lengths), len(depths)))
    for i, length in enumerate(lengths):
        for j, depth in enumerate(depths):
            exs = list(
                tasks.generate(
                    "passkey", lengths=[length], depths=[depth], per_cell=per_cell, seed=seed
                )
            )
            toks = np.stack([e.tokens for e in exs])  # (per_cell, length + 5)
            logits = dec.forward(weights, toks[:, :-1])
            k = len(exs[0].answer)
            pred = logits[:, -k:].argmax(-1)  # (per_cell, k)
            acc[i, j] = np.mean(np.all(pred == toks[:, -k:], axis=1))
    return {"lengths": list(lengths), "depths": list(depths), "accuracy": acc.tolist()}


def save_curve(history: dict, json_path: Path, png_path: Path) -> None:
    """Write the loss history as JSON and its plot (loss vs step, smoothed) as PNG."""
    json_path.write_text(json.dumps(history))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss = np.asarray(history["loss"])
    w = max(1, len(loss) // 50)
    smooth = np.convolve(loss, np.ones(w) / w, mode="valid")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(history["step"], loss, alpha=0.3, label="per step")
    ax.plot(history["step"][w - 1 :], smooth, label=f"mean of {w}")
    ax.set(xlabel="step", ylabel="target cross-entropy", yscale="log", title="lab decoder training")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def run(
    out: Path | None = None,
    cfg: TrainConfig | None = None,
    model_config: dec.DecoderConfig | None = None,
    *,
    progress: bool = False,
    log: Callable[[int, float], None] | None = None,
) -> tuple[Path, dict]:
    """Train, evaluate, and write the weights npz, the loss-curve JSON and PNG next to it."""
    out = Path(out or dec.DEFAULT_PATH)
    weights, history = train(model_config, cfg, progress=progress, log=log)
    weights16 = weights.astype(np.float16).astype(np.float32)  # what will be shipped
    acc = passkey_accuracy(weights16)
    stem = out.with_suffix("")
    curve_json, curve_png = Path(f"{stem}_loss.json"), Path(f"{stem}_loss.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_curve(history, curve_json, curve_png)
    dec.save(
        weights,
        out,
        train={k: history[k] for k in ("recipe", "seconds")},
        steps=len(history["step"]),
        final_loss=float(np.mean(history["loss"][-50:])),
        passkey=acc,
    )
    return out, {"seconds": history["seconds"], "passkey": acc}
