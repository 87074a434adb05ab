"""The torch backend: torch ops (autograd-friendly) and Triton kernels for the hot ops.

Torch tensors stay torch tensors (on their device, with autograd where the op supports it);
NumPy input is wrapped with ``torch.from_numpy`` and handed back as NumPy.
"""

from __future__ import annotations

from typing import Any

import numpy as np

NAME = "torch"


def available() -> tuple[bool, str]:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False, "the torch package is not installed; fix: pip install 'qkv[torch]'"
    return True, "torch is installed"


def asarray(x: Any) -> Any:
    import torch

    if isinstance(x, torch.Tensor):
        return x
    if type(x).__module__.startswith("cupy"):
        return torch.from_dlpack(x)
    return torch.from_numpy(np.ascontiguousarray(x))


def to_numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy()
