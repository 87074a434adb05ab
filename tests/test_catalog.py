"""The catalog covers every mechanism of the project's CATALOG.md, and implemented rows are whole."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

import qkv
from qkv import _dispatch, catalog
from qkv.cli import app

ROOT = Path(__file__).resolve().parent.parent
CATALOG_MD = ROOT.parent / "shared" / "CATALOG.md"


def catalog_md_ids() -> set[str]:
    ids = set()
    for line in CATALOG_MD.read_text().splitlines():
        first_cell = re.match(r"^\| (`[a-z0-9_]+`(?:, `[a-z0-9_]+`)*) \|", line)
        if first_cell:
            ids.update(re.findall(r"`([a-z0-9_]+)`", first_cell.group(1)))
    return ids


@pytest.mark.skipif(not CATALOG_MD.exists(), reason="../shared/CATALOG.md is not beside the repo")
def test_every_id_of_the_catalog_page_is_registered():
    assert catalog_md_ids() == set(catalog.ids())


def test_ids_are_unique_and_families_known():
    assert len(catalog.ids()) == len(set(catalog.ids()))
    assert {m.family for m in catalog.MECHANISMS} == set(catalog.FAMILIES)
    assert len(catalog.PAPERS_WITHOUT_MECHANISM) == 16


@pytest.mark.parametrize("mechanism", catalog.implemented(), ids=lambda m: m.id)
def test_implemented_rows_have_reference_tests_and_tutorial(mechanism):
    assert callable(mechanism.reference_fn())
    assert (ROOT / mechanism.tutorial).exists(), mechanism.tutorial
    tested = [ROOT / t for t in mechanism.tests]
    assert all(t.exists() for t in tested), mechanism.tests
    name = mechanism.reference.partition(":")[2]
    assert any(re.search(rf"\b{name}\b", t.read_text()) for t in tested)
    for op in mechanism.ops:
        assert op in _dispatch.OPS and callable(getattr(qkv, op))


def test_unknown_id_suggests_close_matches():
    with pytest.raises(KeyError, match="did you mean snapkv"):
        catalog.get("snapkvv")


def test_qkv_list_shows_every_id_and_the_coverage_matrix():
    runner = CliRunner()
    result = runner.invoke(app, ["list"], terminal_width=200)
    assert result.exit_code == 0, result.output
    for mechanism_id in catalog.ids():
        assert mechanism_id in result.output
    assert "op x backend coverage" in result.output
    result = runner.invoke(app, ["list", "--json"])
    payload = json.loads(result.output)
    assert [m["id"] for m in payload["mechanisms"]] == catalog.ids()
    assert set(payload["coverage"]) == set(_dispatch.OPS)
    assert payload["coverage"]["sdpa"]["reference"] == "yes"
    for op, row in payload["coverage"].items():  # the matrix is read from the modules themselves
        for name, cell in row.items():
            assert cell.startswith("yes") == _dispatch.provides(_dispatch.load(name), op)
