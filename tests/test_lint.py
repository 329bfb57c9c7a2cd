"""The tree passes ruff (pyproject.toml's [tool.ruff]: 120 columns, rules E, F, W, I) and is as ruff formats it."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("ruff") is None, reason="ruff is not installed (pip install -e '.[test]' installs it)"
)


def ruff(*args: str) -> subprocess.CompletedProcess:
    # `python -m ruff` from the repository root: the ruff of this environment, reading the root's pyproject.toml.
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def said(done: subprocess.CompletedProcess) -> str:
    """The start of what ruff printed, and its last line (the count)."""
    lines = (done.stdout + done.stderr).strip().splitlines()
    return "\n".join(lines[:40] + (["...", lines[-1]] if len(lines) > 40 else []))


def test_ruff_check_finds_nothing():
    done = ruff("check", "--no-cache", "--output-format", "concise", ".")
    assert done.returncode == 0, f"`ruff check .` found (`ruff check --fix .` fixes some):\n{said(done)}"


def test_ruff_format_changes_nothing():
    done = ruff("format", "--no-cache", "--check", ".")
    assert done.returncode == 0, f"`ruff format --check .` would reformat (run `ruff format .`):\n{said(done)}"
