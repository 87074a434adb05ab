"""What the CPU benchmark scripts of this folder share: the record of the machine they ran on
and their command line (``--quick`` for a smoke run, ``--out`` for the JSON)."""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np


def environment() -> dict[str, Any]:
    """Library versions, thread counts and the load average at the time of the run."""
    import numba
    import torch

    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "numba_threads": numba.get_num_threads(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "loadavg": list(os.getloadavg()),
    }


def arguments(doc: str, default_out: Path, argv: list[str] | None = None) -> argparse.Namespace:
    """``--quick`` and ``--out`` (the PNG goes next to the JSON), described by ``doc``'s first
    paragraph."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    parser.add_argument(
        "--out",
        type=Path,
        default=default_out,
        help="JSON output path (the PNG is written next to it)",
    )
    return parser.parse_args(argv)
