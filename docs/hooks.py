"""MkDocs hooks: the pages that are generated from the code, so that they cannot drift.

* ``on_config`` makes sure every tutorial has an executed notebook in ``docs/tutorials/``
  (running the missing or stale ones, see ``docs/_notebooks.py``) and fills the "Tutorials"
  and "API" sections of the nav.
* ``on_files`` adds the generated pages: the catalog (from :mod:`qkv.catalog` and the backend
  registry), the benchmarks page (from ``benchmarks/results/*.json``), the tutorials index and
  one API page per public module.
* ``on_page_content`` drops the Sphinx roles (``:func:`` and friends) that docstrings carry;
  ``on_post_page`` drops the MathJax 2 loader that nbconvert puts in every notebook page (the
  site loads MathJax 3 once, for every page).

``QKV_DOCS_EXECUTE=0`` forbids running tutorials here: a missing or stale notebook is then a
warning (and an error under ``--strict``). The test suite sets it, because it has executed
every tutorial already.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
from pathlib import Path

import _notebooks  # docs/_notebooks.py: MkDocs puts this folder on sys.path while it loads us
from mkdocs.structure.files import File, Files

log = logging.getLogger("mkdocs.hooks.qkv")

ROOT = _notebooks.ROOT
RESULTS = ROOT / "benchmarks" / "results"

#: The catalog families, in the order their API pages appear.
FAMILIES = (
    "forms",
    "heads",
    "positions",
    "local",
    "kv",
    "sparse",
    "retrieval",
    "recsys",
    "analysis",
)


def _family_modules() -> list[str]:
    """Every module of each family package under ``qkv/reference`` (one per paper), sorted."""
    modules = []
    for family in FAMILIES:
        package = ROOT / "qkv" / "reference" / family
        if package.is_dir():
            modules += [
                f"qkv.reference.{family}.{path.stem}"
                for path in sorted(package.glob("*.py"))
                if not path.stem.startswith("_")
            ]
    return modules


def _lab_modules() -> list[str]:
    """The public modules of :mod:`qkv.lab`, sorted."""
    return [
        f"qkv.lab.{path.stem}"
        for path in sorted((ROOT / "qkv" / "lab").glob("*.py"))
        if not path.stem.startswith("_")
    ]


#: (title, module, extra mkdocstrings options) of the API pages, in nav order.
API = (
    ("qkv", "qkv", {"force_inspection": True, "show_source": False, "filters": "public"}),
    ("qkv.reference.core", "qkv.reference.core", {}),
    *((module, module, {}) for module in _family_modules()),
    ("qkv.errors", "qkv.errors", {"show_source": False}),
    ("qkv.catalog", "qkv.catalog", {}),
    ("qkv.testing", "qkv.testing", {}),
    *((module, module, {}) for module in _lab_modules()),
)

_state: dict[str, object] = {}


# --------------------------------------------------------------------------- tutorials


def _title(source: Path) -> str:
    """The first Markdown heading of a tutorial script (``# # Title``), else its id."""
    for line in source.read_text(encoding="utf-8").splitlines():
        match = re.match(r"#\s+#\s+(.+)", line)
        if match:
            return match.group(1).strip()
    return source.stem


def _executed_tutorials() -> list[Path]:
    """Run what needs running (unless forbidden); the sources whose notebook is current."""
    allowed = os.environ.get("QKV_DOCS_EXECUTE", "1") not in ("0", "", "no", "false")
    ready = []
    for source in _notebooks.sources():
        if allowed:
            run = _notebooks.ensure(source, log=log.info)
            if run is not None and run.error is not None:
                log.warning(
                    "tutorial %s failed, so it is left out of the site:\n%s",
                    _notebooks.key(source),
                    run.error,
                )
                continue
        elif not _notebooks.is_current(source):
            log.warning(
                "tutorial %s has no up-to-date executed notebook in docs/tutorials "
                "(QKV_DOCS_EXECUTE=0 forbids running it here; did its test fail?)",
                _notebooks.key(source),
            )
            continue
        ready.append(source)
    return ready


def _tutorial_uri(source: Path) -> str:
    return _notebooks.target(source).relative_to(ROOT / "docs").as_posix()


# --------------------------------------------------------------------------- nav


def _api_modules() -> list[tuple[str, str, dict]]:
    """The API pages whose module imports here (``qkv.testing`` may not exist yet)."""
    found = []
    for title, module, options in API:
        try:
            importlib.import_module(module)
        except ImportError:
            continue
        found.append((title, module, options))
    return found


def _fill_nav(nav: list, tutorials: list[Path], api: list[tuple[str, str, dict]]) -> None:
    from qkv import catalog

    by_family: dict[str, list[str]] = {}
    for source in tutorials:
        by_family.setdefault(source.parent.name, []).append(_tutorial_uri(source))
    families = [f for f in catalog.FAMILIES if f in by_family]
    families += sorted(set(by_family) - set(families))
    tutorials_nav: list = ["tutorials/index.md"]
    tutorials_nav += [{family: by_family[family]} for family in families]
    api_nav: list = ["api/index.md"]
    api_nav += [{title: f"api/{module}.md"} for title, module, _ in api]
    for item in nav:
        if isinstance(item, dict) and "Tutorials" in item:
            item["Tutorials"] = tutorials_nav
        if isinstance(item, dict) and "API" in item:
            item["API"] = api_nav


def on_config(config):
    tutorials = _executed_tutorials()
    api = _api_modules()
    _state["tutorials"] = tutorials
    _state["api"] = api
    if config.nav:
        _fill_nav(config.nav, tutorials, api)
    return config


# --------------------------------------------------------------------------- pages


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _coverage() -> tuple[list[str], dict[str, dict[str, bool]], dict[str, str]]:
    """Backend names, op -> backend -> implemented natively, and backends that failed to load.

    Read from the registry itself: what a backend module defines, not what runs on the machine
    that builds the site.
    """
    import qkv  # noqa: F401  (registers the dispatched ops)
    from qkv import _dispatch

    names, modules, broken = [], {}, {}
    for name in _dispatch.known_backends():
        try:
            modules[name] = _dispatch.load(name)
            names.append(name)
        except Exception as exc:  # a broken third-party entry point must not break the docs
            broken[name] = f"{type(exc).__name__}: {exc}"
    table = {op: {n: _dispatch.provides(modules[n], op) for n in names} for op in _dispatch.OPS}
    return names, table, broken


def catalog_page(tutorials: list[Path]) -> str:
    from qkv import catalog

    names, cover, broken = _coverage()
    pages = {source.relative_to(ROOT).as_posix(): source for source in tutorials}
    mechanisms = catalog.MECHANISMS
    done = sum(m.status == "implemented" for m in mechanisms)
    out = [
        "# Catalog",
        "",
        "Every mechanism of the seed papers, grouped by family: its id (the name of its function "
        "in `qkv.reference.<family>` and, for ops, of `qkv.<id>`), its status, its paper, the "
        "backends that implement its ops natively (any other backend runs them on the NumPy "
        "reference, with a `FallbackWarning`), and its tutorial.",
        "",
        f"**{done} of {len(mechanisms)} mechanisms implemented.** This page is generated from "
        "`qkv.catalog` and the backend registry each time the site is built; `qkv list` prints "
        "the same tables in a terminal.",
        "",
        "## Backend coverage",
        "",
        "| op | " + " | ".join(f"`{n}`" for n in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for op, row in cover.items():
        cells = ["yes" if row[n] else "reference" for n in names]
        out.append(f"| `{op}` | " + " | ".join(cells) + " |")
    out.append("")
    if broken:
        out += [
            "!!! warning",
            "    These registered backends could not be loaded while building this page:",
            "",
            *[f"    * `{name}`: {_cell(why)}" for name, why in broken.items()],
            "",
        ]
    for family, members in catalog.by_family().items():
        if not members:
            continue
        out += [
            f"## {family}",
            "",
            f"*{catalog.FAMILIES[family]}*",
            "",
            "| id | status | mechanism | paper | backends | tutorial |",
            "|---|---|---|---|---|---|",
        ]
        for m in members:
            paper = _cell(m.paper)
            if m.arxiv:
                paper = f"[{paper}](https://arxiv.org/abs/{m.arxiv}) ({m.arxiv})"
            if m.code:
                paper += f" · [code]({m.code})"
            if m.status != "implemented":
                backends = "—"
            elif m.ops:
                backends = ", ".join(
                    n for n in names if all(cover.get(op, {}).get(n) for op in m.ops)
                )
            else:
                backends = "NumPy (not dispatched)"
            tutorial = "—"
            if m.tutorial in pages:
                source = pages[m.tutorial]
                tutorial = f"[{_cell(_title(source))}]({_tutorial_uri(source)})"
            status = f'<span class="qkv-{m.status}">{m.status}</span>'
            out.append(
                f"| `{m.id}` | {status} | {_cell(m.what)} | {paper} | {backends} | {tutorial} |"
            )
        out.append("")
    out += [
        "## Papers without a mechanism",
        "",
        "Seed papers that carry no query/key/value mechanism to implement, and why.",
        "",
        "| paper | reason |",
        "|---|---|",
    ]
    for p in catalog.PAPERS_WITHOUT_MECHANISM:
        title = _cell(p.title)
        if getattr(p, "arxiv", None):
            title = f"[{title}](https://arxiv.org/abs/{p.arxiv})"
        out.append(f"| {title} | {_cell(p.reason)} |")
    out.append("")
    return "\n".join(out)


def tutorials_page(tutorials: list[Path]) -> str:
    from qkv import catalog

    out = [
        "# Tutorials",
        "",
        "One tutorial per paper, each built from the paper's equations up: a few lines of NumPy "
        "straight from the maths, a check against `qkv.reference`, a picture that shows the "
        "paper's point, and the same call through every backend available, timed.",
        "",
        "Each tutorial is a plain Python script in jupytext's percent format "
        "(`tutorials/<family>/<id>.py`), so it is three things at once:",
        "",
        "* a script: `python tutorials/core/sdpa.py`;",
        "* a notebook: `jupytext --to notebook tutorials/core/sdpa.py`, or open the script "
        "directly in Jupyter with jupytext installed;",
        "* a page of this site, executed while the site was built.",
        "",
        "The pages here were executed with `QKV_TUTORIAL_SMALL=1`, which shrinks the problem "
        "sizes (the code path is the same), on the machine that built the site; the test suite "
        "runs every tutorial the same way. Run one yourself without the variable for the full "
        "sizes.",
        "",
        "| tutorial | covers |",
        "|---|---|",
    ]
    for source in tutorials:
        rel = source.relative_to(ROOT).as_posix()
        ids = [m.id for m in catalog.MECHANISMS if m.tutorial == rel]
        covers = ", ".join(f"`{i}`" for i in ids) or "—"
        link = os.path.relpath(_notebooks.target(source), ROOT / "docs" / "tutorials")
        out.append(f"| [{_cell(_title(source))}]({Path(link).as_posix()}) | {covers} |")
    if not tutorials:
        out.append("| (no executed tutorial) | |")
    out.append("")
    return "\n".join(out)


def api_index_page(api: list[tuple[str, str, dict]]) -> str:
    out = [
        "# API reference",
        "",
        "Generated from the docstrings. Start with [`qkv`](qkv.md): the dispatched ops "
        "(`qkv.sdpa`, `qkv.flash`, ...) take the same arguments as their NumPy reference in "
        "[`qkv.reference.core`](qkv.reference.core.md), plus `backend=`.",
        "",
    ]
    for title, module, _ in api:
        doc = (importlib.import_module(module).__doc__ or "").strip().splitlines()
        summary = doc[0] if doc else ""
        out.append(f"* [`{title}`]({module}.md): {summary}")
    out.append("")
    return "\n".join(out)


def api_page(title: str, module: str, options: dict) -> str:
    lines = [f"# `{title}`", "", f"::: {module}"]
    if options:
        lines.append("    options:")
        lines.append("      show_root_heading: false")
        for name, value in options.items():
            lines.append(
                f"      {name}: {str(value).lower() if isinstance(value, bool) else value}"
            )
    else:
        lines += ["    options:", "      show_root_heading: false"]
    return "\n".join(lines) + "\n"


def benchmarks_page() -> tuple[str, list[Path]]:
    """The benchmarks page, and the figures it shows (served next to it)."""
    results = sorted(RESULTS.glob("*.json"), key=lambda p: (p.stem != "cpu", p.name))
    figures = sorted(RESULTS.glob("*.png"))
    head = [
        "# Benchmarks",
        "",
        "Each backend against the NumPy reference and against the best peer on the same machine "
        "(`torch.nn.functional.scaled_dot_product_attention` on the CPU), measured in one run "
        "by `qkv bench` (`make bench`); GPU results come from `make gpu-check`. The numbers "
        "below are the JSON files in `benchmarks/results/`, rendered when the site was built.",
        "",
    ]
    try:
        from qkv.bench import render_markdown
    except ImportError:
        render_markdown = None
    if not results or render_markdown is None:
        why = "no results in `benchmarks/results/`" if not results else "`qkv.bench` is missing"
        head += [
            '!!! note "No benchmark results yet"',
            f"    This site was built with {why}. Run `make bench` (or `qkv bench`), then "
            "rebuild the site with `make docs`.",
            "",
        ]
        return "\n".join(head), []
    # Each result renders as a page of its own; nest its headings under this page's title.
    body = "\n\n".join(
        re.sub(r"^(#{1,5}) ", r"#\1 ", render_markdown(path), flags=re.M) for path in results
    )
    names = {p.name for p in figures}

    def local(match: re.Match) -> str:  # a figure of ours, wherever the Markdown points
        name = Path(match.group(2)).name
        return f"![{match.group(1)}]({name})" if name in names else match.group(0)

    body = re.sub(r"!\[([^\]]*)\]\(([^)\s]+)\)", local, body)
    shown = [p for p in figures if f"]({p.name})" in body]
    extra = [f"![{p.stem}]({p.name})" for p in figures if p not in shown]
    return "\n".join(head) + "\n" + body + (
        "\n\n" + "\n\n".join(extra) if extra else ""
    ) + "\n", figures


def on_files(files: Files, config) -> Files:
    tutorials = _state.get("tutorials", [])
    api = _state.get("api", [])
    keep = {_tutorial_uri(source) for source in tutorials}
    for file in list(files):  # notebooks whose tutorial is gone, or failed, stay out of the site
        uri = file.src_uri
        if uri.startswith("tutorials/") and uri.endswith(".ipynb") and uri not in keep:
            files.remove(file)

    def add(uri: str, content: str) -> None:
        existing = files.get_file_from_path(uri)
        if existing is not None:
            files.remove(existing)
        files.append(File.generated(config, uri, content=content))

    add("catalog.md", catalog_page(tutorials))
    add("tutorials/index.md", tutorials_page(tutorials))
    add("api/index.md", api_index_page(api))
    for title, module, options in api:
        add(f"api/{module}.md", api_page(title, module, options))
    page, figures = benchmarks_page()
    add("benchmarks/index.md", page)
    for figure in figures:
        files.append(File.generated(config, f"benchmarks/{figure.name}", abs_src_path=str(figure)))
    return files


_ROLE = re.compile(r":(?:py:)?(?:func|meth|class|mod|attr|data|exc|obj|const):(?=<code>)")


def on_page_content(html: str, page, config, files) -> str:
    """Docstrings use Sphinx roles (:func:`sdpa`); on the site the code span is enough."""
    return _ROLE.sub("", html)


_NB_MATHJAX = re.compile(r"<!-- Load mathjax -->.*?<!-- End of mathjax configuration -->", re.S)


def on_post_page(output: str, page, config) -> str:
    """Notebook pages: drop nbconvert's MathJax 2 block; docs/javascripts/mathjax.js covers them."""
    if page.file.src_uri.endswith(".ipynb"):
        return _NB_MATHJAX.sub("", output, count=1)
    return output
