"""Every tutorial runs top to bottom, once per test run, at its small size.

Each ``tutorials/<family>/<id>.py`` is executed as a notebook in a fresh kernel of this Python
with ``QKV_TUTORIAL_SMALL=1``, and the executed notebook is stored as
``docs/tutorials/<family>/<id>.ipynb``, which ``tests/test_docs.py`` then renders into the site
without running anything again.
"""

from __future__ import annotations

import pytest
from _runner import runner

SOURCES = runner.sources()


def test_there_are_tutorials():
    assert SOURCES, "no tutorials/<family>/<id>.py found"


@pytest.mark.parametrize("source", SOURCES, ids=[runner.key(s) for s in SOURCES])
def test_tutorial_runs(source):
    run = runner.run_once(source)
    run.check()
    assert runner.is_current(source), f"{runner.target(source)} was not written"


def test_implemented_mechanisms_have_a_tutorial():
    from qkv import catalog

    missing = [
        f"{m.id}: {m.tutorial}"
        for m in catalog.implemented()
        if not (runner.ROOT / m.tutorial).is_file()
    ]
    assert not missing, "implemented mechanisms without a tutorial file:\n" + "\n".join(missing)
