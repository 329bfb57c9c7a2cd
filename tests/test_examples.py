"""Every shipped example config loads through the config loader, and its data exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gmt_mlx.config import Config, load_yaml, resolve

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


def test_there_are_examples():
    assert EXAMPLES, "no examples/*.yaml found"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_config_loads(path):
    """An unknown key or a wrong type is a UserError from load_yaml; resolve validates values."""
    values = load_yaml(path)
    assert values, f"{path.name} sets nothing"
    config = resolve(path)
    assert isinstance(config, Config)
    for key, value in values.items():
        assert getattr(config, key) == value, key


def _data_folders(path: Path) -> list[str]:
    """The data folders an example uses: its `data:` key, else the `examples/data/...`
    folders named by the scripts that run it with `-c examples/<name>.yaml`."""
    data = load_yaml(path).get("data")
    if data:
        return [str(data)]
    folders = []
    for script in (REPO / "examples").glob("*.sh"):
        text = script.read_text()
        if f"examples/{path.name}" in text:
            folders += re.findall(r"examples/data/[\w.-]+", text)
    return sorted(set(folders))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_data_exists(path):
    folders = _data_folders(path)
    assert folders, f"{path.name}: no data folder in the config or in a script that runs it"
    for folder in folders:
        full = REPO / folder
        assert (full / "train.jsonl").is_file(), f"{path.name}: {folder}/train.jsonl is missing"


@pytest.mark.parametrize("study, script", [("ceiling", "ceiling_tables.py"), ("grpo", "grpo_study_tables.py")])
def test_study_tables_regenerate_from_the_raw_results(tmp_path, study, script):
    """docs/evidence/STUDY/tables.md is what its tables script makes of the shipped raw results."""
    import shutil
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    shipped = root / "docs" / "evidence" / study
    copy = tmp_path / study
    shutil.copytree(shipped, copy)
    (copy / "tables.md").unlink()
    subprocess.run([sys.executable, str(root / "examples" / script), str(copy)], check=True, capture_output=True)
    expected = (shipped / "tables.md").read_text().replace(f"docs/evidence/{study}", str(copy))
    assert (copy / "tables.md").read_text() == expected
    assert (copy / "curves.png").stat().st_size > 10_000
