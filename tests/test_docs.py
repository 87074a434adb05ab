"""The documentation site builds with ``mkdocs build --strict``, and its examples run.

The build renders the notebooks that the tutorial tests executed in this same run (through the
shared runner, each tutorial executes once per run whichever test needs it first) and is told
not to execute anything itself (``QKV_DOCS_EXECUTE=0``).
"""

from __future__ import annotations

import html
import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
from _runner import runner

ROOT = runner.ROOT
DOCS = ROOT / "docs"


def python_blocks(page: str) -> list[str]:
    """The ```python code blocks of a docs page, in order."""
    text = (DOCS / page).read_text(encoding="utf-8")
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Build the site once for this module; the path of the built site."""
    failed = [runner.key(s) for s in runner.sources() if runner.run_once(s).error is not None]
    out = tmp_path_factory.mktemp("site")
    # Executed above, once; and no end-of-life banner from mkdocs-material on stderr.
    env = {**os.environ, "QKV_DOCS_EXECUTE": "0", "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    log = result.stdout + result.stderr
    note = f" (tutorials that failed in this run: {', '.join(failed)})" if failed else ""
    assert result.returncode == 0, f"mkdocs build --strict failed{note}:\n{log}"
    noisy = [line for line in log.splitlines() if re.search(r"\b(WARNING|ERROR)\b", line)]
    assert not noisy, "the site build printed warnings:\n" + "\n".join(noisy)
    return out


def test_site_has_every_page(site):
    for page in [
        "index.html",
        "install/index.html",
        "guides/choosing-a-backend/index.html",
        "guides/writing-a-backend/index.html",
        "catalog/index.html",
        "benchmarks/index.html",
        "tutorials/index.html",
        "api/index.html",
        "api/qkv/index.html",
        "api/qkv.reference.core/index.html",
        "api/qkv.errors/index.html",
        "api/qkv.catalog/index.html",
    ]:
        assert (site / page).is_file(), f"{page} is missing from the built site"


def test_tutorials_are_rendered_with_their_outputs(site):
    for source in runner.sources():
        page = site / "tutorials" / source.parent.name / source.stem / "index.html"
        assert page.is_file(), f"{runner.key(source)} has no page"
        text = page.read_text(encoding="utf-8")
        assert "data:image/png;base64" in text, f"{runner.key(source)}: no figure rendered"
        assert "Traceback" not in text, f"{runner.key(source)}: an error is shown on the page"


def test_catalog_page_lists_every_paper(site):
    from qkv import catalog

    text = html.unescape((site / "catalog" / "index.html").read_text(encoding="utf-8"))
    text = " ".join(re.sub(r"<[^>]+>", " ", text).split())
    for m in catalog.MECHANISMS:
        assert m.id in text, f"catalog page lacks {m.id}"
        assert " ".join(m.paper.split()) in text, f"catalog page lacks the paper of {m.id}"
    for p in catalog.PAPERS_WITHOUT_MECHANISM:
        assert " ".join(p.title.split()) in text, f"catalog page lacks {p.title!r}"
        assert " ".join(p.reason.split()) in text, f"catalog page lacks the reason for {p.title!r}"


def test_api_pages_render_docstrings(site):
    text = (site / "api" / "qkv" / "index.html").read_text(encoding="utf-8")
    for name in ("sdpa", "flash", "rope", "use_backend"):
        assert f'id="qkv.{name}"' in text, f"the qkv API page lacks qkv.{name}"
    core = (site / "api" / "qkv.reference.core" / "index.html").read_text(encoding="utf-8")
    assert 'class="arithmatex"' in core, "the maths of the reference docstrings is not marked up"


@pytest.mark.parametrize("page", ["index.md", "guides/choosing-a-backend.md"])
def test_examples_run(page):
    blocks = python_blocks(page)
    assert blocks, f"{page} has no python example"
    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fallbacks are part of what the examples show
        for block in blocks:
            exec(compile(block, f"{page} example", "exec"), namespace)


def test_example_backend_works(tmp_path, monkeypatch):
    """The example on the "writing a backend" page is a working backend, by dotted path."""
    import qkv

    (example,) = [b for b in python_blocks("guides/writing-a-backend.md") if "NAME = " in b]
    package = tmp_path / "mypkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "qkv_backend.py").write_text(example)
    monkeypatch.syspath_prepend(str(tmp_path))

    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 3, 5, 8)).astype(np.float32)
    k = rng.standard_normal((2, 3, 7, 8)).astype(np.float32)
    v = rng.standard_normal((2, 3, 7, 4)).astype(np.float32)
    for causal in (False, True):
        got = qkv.sdpa(q, k, v, causal=causal, backend="mypkg.qkv_backend")
        want = qkv.sdpa(q, k, v, causal=causal)
        assert isinstance(got, np.ndarray) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    with pytest.warns(qkv.FallbackWarning, match="only plain or causal"):
        qkv.sdpa(q, k, v, mask=np.ones((5, 7), dtype=bool), backend="mypkg.qkv_backend")


def _hooks():
    """docs/hooks.py, loaded the way MkDocs loads it (its runner module under its own name)."""
    import importlib.util

    sys.modules.setdefault("_notebooks", runner)
    spec = importlib.util.spec_from_file_location("qkv_docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmarks_page_with_and_without_results(tmp_path, monkeypatch):
    import qkv.bench

    hooks = _hooks()
    monkeypatch.setattr(hooks, "RESULTS", tmp_path)
    page, figures = hooks.benchmarks_page()
    assert "No benchmark results yet" in page and figures == []

    (tmp_path / "cpu.json").write_text("{}")
    (tmp_path / "cpu.png").write_bytes(b"\x89PNG")
    rendered = "# CPU benchmarks\n\n## Time\n\n![plot](some/where/cpu.png)\n"
    monkeypatch.setattr(qkv.bench, "render_markdown", lambda path: rendered)
    page, figures = hooks.benchmarks_page()
    assert page.startswith("# Benchmarks\n") and "\n## CPU benchmarks" in page
    assert "\n### Time" in page, "the result's headings nest under the page title"
    assert "![plot](cpu.png)" in page and figures == [tmp_path / "cpu.png"]
