"""Turning the array types qkv accepts into torch tensors."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch


def as_tensor(x: Any) -> torch.Tensor:
    """``x`` as a torch tensor: tensors as they are, CuPy through DLPack (no copy), NumPy without
    a copy where it can (a read-only or non-contiguous array is copied, since torch cannot wrap
    it safely)."""
    import torch

    if isinstance(x, torch.Tensor):
        return x
    if type(x).__module__.startswith("cupy"):
        return torch.from_dlpack(x)
    a = np.ascontiguousarray(x)
    return torch.from_numpy(a if a.flags.writeable else a.copy())


def on_device(x: Any, device: torch.device) -> torch.Tensor:
    """``x`` (any supported array) as a tensor on ``device``: a NumPy mask or positions array
    passed next to CUDA tensors is moved there."""
    return as_tensor(x).to(device)
