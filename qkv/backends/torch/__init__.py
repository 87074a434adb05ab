"""The torch backend: torch ops (autograd-friendly) and Triton kernels for the hot ops.

Torch tensors stay torch tensors (on their device, with autograd where the op supports it);
NumPy input is wrapped with ``torch.from_numpy`` and handed back as NumPy.

Ops:

* ``sdpa``: torch's fused ``scaled_dot_product_attention`` (explicit softmax when weights or
  log-sum-exp are requested), with the reference's masks, bottom-right causality, grouped heads
  and zero output for rows that may see no key;
* ``flash``: a Triton forward kernel on CUDA tensors (and on CPU tensors under
  ``TRITON_INTERPRET=1``), otherwise the ``sdpa`` path; see
  :func:`qkv.backends.torch._attention.flash` for which runs when;
* ``rope``: rotary position embedding;
* ``sigmoid``: sigmoid attention, a Triton forward kernel where ``flash``'s would run, else
  explicit torch operations (see :mod:`qkv.backends.torch._sigmoid`);
* ``tensor``: exact tensor (Kronecker) attention, a streaming Triton forward kernel where
  ``flash``'s would run, else a streaming torch form with autograd; neither forms the
  ``N x M**2`` scores (see :mod:`qkv.backends.torch._tensor`).

Neither torch nor triton is imported until an op runs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qkv.backends.torch._attention import flash, sdpa
from qkv.backends.torch._rope import rope
from qkv.backends.torch._sigmoid import sigmoid
from qkv.backends.torch._tensor import tensor
from qkv.backends.torch._tensors import as_tensor

NAME = "torch"

__all__ = ["NAME", "asarray", "available", "flash", "rope", "sdpa", "sigmoid", "tensor", "to_numpy"]


def available() -> tuple[bool, str]:
    """``(True, ...)`` when torch can be imported, else ``(False, reason and fix)``."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return False, "the torch package is not installed; fix: pip install 'qkv[torch]'"
    return True, "torch is installed"


def asarray(x: Any) -> Any:
    """``x`` as a torch tensor (see :func:`qkv.backends.torch._tensors.as_tensor`)."""
    return as_tensor(x)


def to_numpy(x: Any) -> np.ndarray:
    """A NumPy copy of tensor ``x`` (detached, moved to the CPU)."""
    return x.detach().cpu().numpy()


# local: neighborhood attention (a Triton forward kernel where flash's runs, else a gather form)
from qkv.backends.torch._neighborhood import neighborhood  # noqa: E402

__all__ += ["neighborhood"]

# heads: RCMHA's relative-score attention (a fused Triton kernel where it applies, else torch ops)
from qkv.backends.torch._relative import relative_attention  # noqa: E402

__all__ += ["relative_attention"]

# sparse: attention over per-head selected keys (gather + masked softmax, autograd-friendly)
from qkv.backends.torch._sparse import sparse_attention  # noqa: E402

__all__ += ["sparse_attention"]

# kv: packed quantisation, SnapKV's window scoring, attention over a mixed-precision cache
# (Triton kernels where they apply, else torch operations)
from qkv.backends.torch._kv import (  # noqa: E402
    dequantize,
    mixed_attention,
    quantize,
    window_scores,
)

__all__ += ["dequantize", "mixed_attention", "quantize", "window_scores"]

# retrieval: LeanVec's first stage, float queries against 8-bit vectors (one batched product)
from qkv.backends.torch._lvq import lvq_dot  # noqa: E402

__all__ += ["lvq_dot"]
