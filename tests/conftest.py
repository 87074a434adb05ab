"""Shared test set-up.

Triton kernels run on the CPU under the Triton interpreter, which must be switched on before
triton is first imported. ``make gpu-check`` sets ``QKV_GPU=1`` to compile them for a real GPU.
"""

from __future__ import annotations

import os

if os.environ.get("QKV_GPU", "") in ("", "0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
