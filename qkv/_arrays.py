"""The array types qkv accepts, told apart without importing their libraries.

qkv takes NumPy arrays, torch tensors and CuPy arrays. The dispatcher uses these helpers to
hand each backend its own array type and to give the caller back the type it passed in.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

Kind = Literal["numpy", "torch", "cupy"]


def kind(x: Any) -> Kind | None:
    """``"numpy"``, ``"torch"`` or ``"cupy"`` for an array of that library, else ``None``."""
    if isinstance(x, np.ndarray):
        return "numpy"
    root = type(x).__module__.split(".", 1)[0]
    if root == "torch" and type(x).__name__ in ("Tensor", "Parameter"):
        return "torch"
    if root == "cupy" and type(x).__name__ == "ndarray":
        return "cupy"
    return None


def is_array(x: Any) -> bool:
    return kind(x) is not None


_DTYPE_NAMES: dict[Any, str] = {}


def dtype_name(x: Any) -> str:
    """The dtype of any supported array as a NumPy-style name: ``"float32"``, ``"bfloat16"``...

    Names are remembered per dtype object: ``str(dtype)`` costs microseconds, and the checks
    of a small decode call read the name several times.
    """
    dtype = x.dtype
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        name = _DTYPE_NAMES[dtype] = str(dtype).removeprefix("torch.")
        return name
    except TypeError:  # an unhashable dtype object
        return str(dtype).removeprefix("torch.")


def is_float(x: Any) -> bool:
    return dtype_name(x) in ("float16", "bfloat16", "float32", "float64")


def to_numpy(x: Any) -> np.ndarray:
    """A NumPy view or copy of ``x`` (torch tensors are detached and moved to the CPU)."""
    k = kind(x)
    if k == "numpy":
        return x
    if k == "torch":
        t = x.detach().cpu()
        if dtype_name(t) == "bfloat16":
            raise TypeError("bfloat16 tensors have no NumPy dtype; cast to float32 first")
        return t.numpy()
    if k == "cupy":
        return x.get()
    raise TypeError(f"expected a NumPy, torch or CuPy array, got {type(x).__name__}")


def from_numpy(x: np.ndarray, like: Any) -> Any:
    """``x`` as the array type (and device) of ``like``."""
    k = kind(like)
    if k in (None, "numpy"):
        return x
    if k == "torch":
        import torch

        return torch.from_numpy(np.ascontiguousarray(x)).to(like.device)
    import cupy

    with cupy.cuda.Device(like.device.id):
        return cupy.asarray(x)
