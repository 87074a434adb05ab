"""The ``qkv`` command as a user runs it: clear messages and exit codes, no tracebacks."""

from __future__ import annotations

import subprocess
import sys

import pytest

from qkv import _dispatch


def qkv_command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qkv.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_an_unknown_backend_is_one_line_and_exit_code_2():
    result = qkv_command("check", "no_such_backend")
    assert result.returncode == 2
    assert "UnknownBackend" in result.stdout and "known names: reference" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_an_unavailable_backend_names_the_fix():
    if _dispatch.availability(_dispatch.load("cupy"))[0]:
        pytest.skip("cupy can run on this machine")
    result = qkv_command("check", "cupy")
    assert result.returncode == 2
    assert "fix: pip install 'qkv[cupy]'" in " ".join(result.stdout.split())


def test_check_passes_on_the_reference_and_prints_json():
    import json

    result = qkv_command("check", "reference", "--max-examples", "3", "--seed", "0", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] and {row["op"] for row in report["rows"]} >= {"sdpa", "flash", "rope"}
