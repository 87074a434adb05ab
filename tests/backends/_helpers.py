"""Helpers shared by the backend tests: compiling the CuPy kernels with nvcc, and choosing
the device a Triton kernel test runs on.

The test modules import them as ``from _helpers import ...``: this folder has no
``__init__.py``, so pytest's default ``prepend`` import mode puts it on ``sys.path`` before it
imports a test module from it.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

NVCC = shutil.which("nvcc") or next(
    (p for p in ("/usr/local/cuda/bin/nvcc", "/usr/local/bin/nvcc") if Path(p).exists()), None
)
needs_nvcc = pytest.mark.skipif(
    NVCC is None, reason="nvcc not found; the CUDA sources are not compiled here"
)


def nvcc(source: Path, out: Path, *options: str, check: bool = True) -> subprocess.CompletedProcess:
    """``nvcc -arch=sm_90 --std=c++17 <options> -o out source``; with ``check``, assert that it
    compiled (nvcc's messages in the failure)."""
    result = subprocess.run(
        [NVCC, "-arch=sm_90", "--std=c++17", *options, "-o", str(out), str(source)],
        capture_output=True,
        text=True,
        check=False,
    )
    if check:
        assert result.returncode == 0, f"nvcc failed on {source.name}:\n{result.stderr}"
    return result


def ptx_params(ptx: Path) -> dict[str, list[str]]:
    """Each entry point's parameter types (``u64``, ``u32``, ``f32``...) in a PTX file."""
    entries = re.findall(r"\.entry\s+(\w+)\s*\(([^)]*)\)", ptx.read_text())
    return {name: re.findall(r"\.param\s+\.(\w+)", params) for name, params in entries}


def ptx_arg_type(arg: object) -> str:
    """The PTX parameter type that CuPy's packing of the kernel argument ``arg`` lands in."""
    import numpy as np

    from qkv.backends.cupy import _launch

    if isinstance(arg, np.ndarray) or arg is _launch.NULL:
        return "u64"  # a device pointer
    assert isinstance(arg, np.generic), f"unsized Python scalar {arg!r} in kernel arguments"
    return {"i4": "u32", "i8": "u64", "f4": "f32", "f8": "f64"}[arg.dtype.str[1:]]


def triton_device_or_skip(device: str, kernel: str):
    """``torch.device(device)`` for a test of the Triton kernels in
    ``qkv.backends.torch.triton.<kernel>``, or a skip with the reason: ``cuda`` needs a GPU and
    ``QKV_GPU=1`` (``make gpu-check``), CPU tensors need the Triton interpreter."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    if device == "cuda":
        if os.environ.get("QKV_GPU", "") in ("", "0") or not torch.cuda.is_available():
            pytest.skip("needs an NVIDIA GPU and QKV_GPU=1 (make gpu-check)")
    elif not importlib.import_module(f"qkv.backends.torch.triton.{kernel}").interpreted():
        pytest.skip("CPU tensors need the Triton interpreter (TRITON_INTERPRET=1)")
    return torch.device(device)
