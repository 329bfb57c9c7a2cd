"""The package's shape, checked (README, "How it works"): layers imported one way, small modules and functions.

The import rules are import-linter contracts in pyproject.toml (the layers, and
no cycle among the modules of any subpackage); this test runs the tool, so a
cycle or an upward import fails the suite and CI.
"""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "gmt_mlx"
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60
# Functions allowed past MAX_FUNCTION_LINES because their length is one job.
LONG_BY_DESIGN = {
    "core/trainer.py::train": "the training loop: one step after another, each line a phase of it",
}
# Modules allowed past MAX_MODULE_LINES because cohesion wins (issue 33).
LARGE_BY_DESIGN = {
    "config.py": "every option's one definition, its checks, and the option groups made of those fields",
}


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_import_contracts_hold():
    linter = Path(sys.executable).parent / "lint-imports"
    if not linter.exists():
        pytest.fail(f"{linter} not found: pip install -e '.[test]' installs import-linter")
    done = subprocess.run([str(linter), "--no-cache", "--no-logo"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_stay_small(path):
    if path.relative_to(PACKAGE).as_posix() in LARGE_BY_DESIGN:
        return
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{path.relative_to(ROOT)} has {lines} lines (at most {MAX_MODULE_LINES})"


def test_functions_stay_small():
    long = []
    for path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                key = f"{path.relative_to(PACKAGE).as_posix()}::{node.name}"
                if length > MAX_FUNCTION_LINES and key not in LONG_BY_DESIGN:
                    long.append(f"{key} ({length} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {', '.join(long)}"


def test_no_private_name_is_imported_across_modules():
    crossing = []
    for path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gmt_mlx"):
                crossing += [f"{path.relative_to(ROOT)}: {node.module}.{a.name}" for a in node.names
                             if a.name.startswith("_") and not a.name.startswith("__")]
    assert not crossing, crossing


def test_choice_lists_are_configs():
    """The modules that check a choice use config's list, the same object (not a copy that can drift)."""
    from gmt_mlx import config
    from gmt_mlx.core import losses, masking, optim
    from gmt_mlx.data import encoding

    choices = {f.name: f.metadata.get("choices") for f in dataclasses.fields(config.Config)}
    assert choices["mask_scope"] is config.MASK_SCOPES is masking.MASK_SCOPES is optim.MASK_SCOPES
    assert choices["mask_target"] is config.MASK_TARGETS is optim.MASK_TARGETS
    assert choices["train_mode"] is config.TRAIN_MODES is losses.TRAIN_MODES
    assert choices["dpo_loss"] is config.DPO_LOSSES is losses.DPO_LOSSES
    assert choices["optimizer"] is config.OPTIMIZERS is optim.OPTIMIZERS
    assert choices["assistant_turns"] is config.ASSISTANT_TURNS is encoding.ASSISTANT_TURNS
    assert choices["moments"] is config.MOMENTS and choices["weight_rounding"] is config.WEIGHT_ROUNDINGS
    assert set(config.PREFERENCE_MODES) < set(config.TRAIN_MODES)
