"""The tutorial runner of ``docs/_notebooks.py`` (as ``runner``), for the test modules.

``tests/test_tutorials.py`` (one test per tutorial) and ``tests/test_docs.py`` (the site build)
share one runner, loaded once per process under one module name, so that each tutorial runs
once per pytest run whichever of them asks first: the docs build reuses the notebooks the
tutorial tests wrote, and running the docs test alone still executes the tutorials it needs.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_NAME = "qkv_docs_notebooks"
_PATH = Path(__file__).resolve().parent.parent / "docs" / "_notebooks.py"


def _load():
    if _NAME not in sys.modules:
        spec = importlib.util.spec_from_file_location(_NAME, _PATH)
        module = importlib.util.module_from_spec(spec)
        sys.modules[_NAME] = module
        spec.loader.exec_module(module)
    return sys.modules[_NAME]


runner = _load()
