"""Shared test set-up.

Triton kernels run on the CPU under the Triton interpreter, which must be switched on before
triton is first imported. ``make gpu-check`` sets ``QKV_GPU=1`` to compile them for a real GPU.
"""

from __future__ import annotations

import os

if os.environ.get("QKV_GPU", "") in ("", "0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """The docs build renders the notebooks that the tutorial tests execute: run it last."""
    items.sort(key=lambda item: item.path.name == "test_docs.py")
