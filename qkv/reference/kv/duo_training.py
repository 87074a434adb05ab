r"""Optimising DuoAttention's gates on the lab decoder (torch autograd, CPU, seeded).

The paper's objective (section 3.2 and ``train.py`` of the official code): run the frozen model
twice on a synthetic passkey sequence, once with full attention and once with every head's
attention replaced by the gated mix of :func:`qkv.reference.kv.duo_attention.duo_attention`,
and minimise

$$
\mathcal L = \frac{1}{|\mathcal A|} \sum_{i \in \mathcal A}
  \frac{1}{d} \big\lVert H^{\text{full}}_i - H^{\text{mixed}}_i \big\rVert_2^2
  \;+\; \lambda\, \frac{1}{L H_{kv}} \sum_{l, g} |\alpha_{l,g}|,
$$

$\mathcal A$ the answer positions, $H$ the final hidden states (after the final RMSNorm),
$\lambda = 0.05$, with Adam at learning rate 0.02 and the gates clamped to $[0, 1]$ after each
step (the official code clamps before each step: the same sequence of gates). Gates start at 1.
Only the gates are trained; the model's weights are frozen. The answer positions are the ones
whose *next* token is a passkey digit (where the model must have retrieved it); the official
code uses the positions labelled with the answer, the same tokens shifted by one.

The paper trains on 1000-32000-token contexts with 128 sinks and 256 recent tokens; the lab
decoder sees at most 528 tokens, so the defaults here scale that down: 4 sinks, 28 recent,
passkey prompts of 96-256 tokens with the needle at a uniform depth. The paper's data holds 10
passkeys of 32 tokens per sequence; the lab's passkey task has one 5-digit passkey.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from qkv.errors import ParameterError
from qkv.lab import decoder as dec
from qkv.lab import tasks
from qkv.lab.train import TorchDecoder, _rms, _rope, to_torch
from qkv.reference.kv.duo_attention import streaming_mask
from qkv.reference.kv.policy import check_budget


@dataclass(frozen=True, eq=False)
class GateFit:
    """The result of :func:`train_gates`.

    Attributes:
        gates: optimised gates ``(L, Hkv)`` float64 in ``[0, 1]``.
        loss: total loss per step.
        distill: the hidden-state distance per step.
    """

    gates: np.ndarray
    loss: list[float]
    distill: list[float]


def gated_hidden(
    model: TorchDecoder, tokens: torch.Tensor, gates: torch.Tensor, *, n_sink: int, recent: int
) -> torch.Tensor:
    """Final hidden states ``(B, N, d)`` with every head's attention gated by ``gates (L, Hkv)``.

    The same block as :class:`qkv.lab.train.TorchDecoder`, its attention replaced by
    ``alpha * full + (1 - alpha) * streaming`` per KV head (repeated over its query heads).
    """
    c = model.config
    B, N = tokens.shape
    lam = torch.from_numpy(streaming_mask(N, N, n_sink=n_sink, recent=recent))  # (N, N)
    x = model.p("embed")[tokens]  # (B, N, d)
    for i in range(c.n_layers):

        def w(name: str, i: int = i) -> torch.Tensor:
            return model.p(f"layers.{i}.{name}")

        xn = _rms(x, w("attn_norm"), c.eps)  # (B, N, d)
        q = (xn @ w("wq")).view(B, N, c.n_heads, c.head_dim).transpose(1, 2)  # (B, H, N, Dh)
        k = (xn @ w("wk")).view(B, N, c.n_kv_heads, c.head_dim).transpose(1, 2)  # (B, Hkv, N, Dh)
        v = (xn @ w("wv")).view(B, N, c.n_kv_heads, c.head_dim).transpose(1, 2)  # (B, Hkv, N, Dh)
        q, k = _rope(q, c.rope_base), _rope(k, c.rope_base)
        full = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        stream = F.scaled_dot_product_attention(q, k, v, attn_mask=lam, enable_gqa=True)
        alpha = gates[i].repeat_interleave(c.group)[None, :, None, None]  # (1, H, 1, 1)
        a = alpha * full + (1 - alpha) * stream  # (B, H, N, Dh)
        h = x + a.transpose(1, 2).reshape(B, N, c.d_model) @ w("wo")  # (B, N, d)
        hn = _rms(h, w("mlp_norm"), c.eps)
        x = h + (F.silu(hn @ w("w1")) * (hn @ w("w3"))) @ w("w2")
    return _rms(x, model.p("final_norm"), c.eps)


def passkey_batch(
    rng: np.random.Generator, batch: int, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Passkey sequences ``(batch, length + 5)`` and the answer-position mask ``(batch, length + 5)``."""
    exs = [tasks.passkey(length, float(rng.uniform()), rng) for _ in range(batch)]
    tokens = np.stack([e.tokens for e in exs])  # (batch, length + 5)
    mask = np.zeros(tokens.shape, dtype=bool)
    mask[:, length - 1 : -1] = True  # positions whose next token is a digit
    return torch.from_numpy(tokens), torch.from_numpy(mask)


def train_gates(
    weights: dec.DecoderWeights,
    *,
    steps: int = 150,
    lr: float = 0.02,
    reg: float = 0.05,
    n_sink: int = 4,
    recent: int = 28,
    lengths: tuple[int, int] = (96, 256),
    batch: int = 2,
    seed: int = 0,
    threads: int = 1,
) -> GateFit:
    """Optimise one gate per (layer, KV head) of the lab decoder with the paper's loss.

    Args:
        weights: the frozen model.
        steps: Adam steps.
        lr: learning rate (0.02, as the official config).
        reg: $\\lambda$, weight of the mean absolute gate (0.05, as the official code).
        n_sink: sinks of the streaming attention.
        recent: recent window of the streaming attention.
        lengths: range of passkey prompt lengths drawn per step.
        batch: sequences per step.
        seed: seed of the data.
        threads: torch CPU threads.

    Returns:
        The :class:`GateFit`.
    """
    check_budget("steps", steps)
    check_budget("n_sink", n_sink, minimum=0)
    check_budget("recent", recent)
    check_budget("batch", batch)
    lo, hi = lengths
    if not 16 <= lo <= hi <= weights.config.max_len - 5:
        raise ParameterError(
            f"lengths: expected 16 <= lo <= hi <= {weights.config.max_len - 5}, got {lengths}"
        )
    torch.set_num_threads(threads)
    rng = np.random.default_rng(seed)
    model = to_torch(weights).requires_grad_(False)
    c = weights.config
    gates = torch.ones(c.n_layers, c.n_kv_heads, requires_grad=True)
    opt = torch.optim.Adam([gates], lr=lr)
    ones = torch.ones(c.n_layers, c.n_kv_heads)
    losses, distills = [], []
    for _ in range(steps):
        tokens, mask = passkey_batch(rng, batch, int(rng.integers(lo, hi + 1)))
        with torch.no_grad():
            target = gated_hidden(model, tokens, ones, n_sink=n_sink, recent=recent)
        mixed = gated_hidden(model, tokens, gates, n_sink=n_sink, recent=recent)
        distill = ((target - mixed)[mask] ** 2).mean(-1).sum() / mask.sum()
        loss = distill + reg * gates.abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            gates.clamp_(0, 1)
        losses.append(float(loss.detach()))
        distills.append(float(distill.detach()))
    return GateFit(gates.detach().double().numpy(), losses, distills)


@functools.lru_cache(maxsize=1)
def lab_gates() -> tuple[tuple[float, ...], ...]:
    """Gates of the shipped lab decoder with the default recipe (computed once per process)."""
    return tuple(map(tuple, train_gates(dec.load()).gates.tolist()))
