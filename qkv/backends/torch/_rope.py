r"""Rotary position embedding on torch tensors (autograd-friendly).

Same maths as :func:`qkv.reference.core.rope`: each feature pair $(x_a, x_b)$ of the token at
position $p$ is rotated by the angle $p\,\theta_i$, $\theta_i = \text{base}^{-2i/D}$.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qkv.backends.torch._tensors import on_device

if TYPE_CHECKING:
    import torch


def rope(
    x: torch.Tensor,
    *,
    positions: torch.Tensor | None = None,
    offset: int = 0,
    base: float = 10000.0,
    pairing: str = "adjacent",
) -> torch.Tensor:
    r"""Rotate feature pairs of ``x (B, H, N, D)`` by position-dependent angles.

    $$
    x'_a = x_a \cos p\theta_i - x_b \sin p\theta_i, \qquad
    x'_b = x_a \sin p\theta_i + x_b \cos p\theta_i, \qquad \theta_i = \text{base}^{-2i/D}.
    $$

    Args:
        x: ``(B, H, N, D)`` queries or keys, ``D`` even.
        positions: integer positions ``(N,)`` or ``(B, N)``; default ``offset + arange(N)``.
        offset: first position when ``positions`` is not given.
        base: the frequency base.
        pairing: ``"adjacent"`` pairs ``(x_{2i}, x_{2i+1})``; ``"half"`` pairs
            ``(x_i, x_{i + D/2})``.

    Returns:
        ``(B, H, N, D)`` in the dtype of ``x``. Angles are computed in float64, the rotation in
        float64 for float64 input and float32 otherwise (as the reference does).
    """
    import torch

    B, H, N, D = x.shape
    if positions is None:
        positions = offset + torch.arange(N, device=x.device)  # (N,)
    pos = on_device(positions, x.device).to(torch.float64)  # (N,) or (B, N)
    theta = base ** (-torch.arange(0, D, 2, device=x.device, dtype=torch.float64) / D)  # (D/2,)
    angle = pos[..., None] * theta  # (N, D/2) or (B, N, D/2)
    if angle.ndim == 3:
        angle = angle[:, None]  # (B, 1, N, D/2)
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    cos, sin = torch.cos(angle).to(work), torch.sin(angle).to(work)
    xw = x.to(work)
    if pairing == "adjacent":
        a, b = xw[..., 0::2], xw[..., 1::2]  # (B, H, N, D/2) each
    else:
        a, b = xw[..., : D // 2], xw[..., D // 2 :]  # (B, H, N, D/2) each
    ra, rb = a * cos - b * sin, a * sin + b * cos  # (B, H, N, D/2) each
    if pairing == "adjacent":
        out = torch.stack([ra, rb], dim=-1).flatten(-2)  # interleave back: (B, H, N, D)
    else:
        out = torch.cat([ra, rb], dim=-1)  # (B, H, N, D)
    return out.to(x.dtype)
