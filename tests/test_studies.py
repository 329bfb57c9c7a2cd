"""The studies (studies/): every config they run loads through the config loader, its data exists, and the
shipped tables are what the tables scripts make of the raw results. The configs a user starts from, in
examples/, have their own test: tests/test_example_configs.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gmt_mlx.config import Config, load_yaml, resolve

REPO = Path(__file__).resolve().parent.parent
STUDIES = sorted((REPO / "studies").glob("*.yaml"))


def test_there_are_study_configs():
    assert STUDIES, "no studies/*.yaml found"


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_study_config_loads(path):
    """An unknown key or a wrong type is a UserError from load_yaml; resolve validates values."""
    values = load_yaml(path)
    assert values, f"{path.name} sets nothing"
    config = resolve(path)
    assert isinstance(config, Config)
    for key, value in values.items():
        assert getattr(config, key) == value, key


def _data_folders(path: Path) -> list[str]:
    """The data folders a study config uses: its `data:` key, else the `examples/data/...`
    folders named by the scripts that run it with `-c studies/<name>.yaml`."""
    data = load_yaml(path).get("data")
    if data:
        return [str(data)]
    folders = []
    for script in (REPO / "studies").glob("*.sh"):
        text = script.read_text()
        if f"studies/{path.name}" in text:
            folders += re.findall(r"examples/data/[\w.-]+", text)
    return sorted(set(folders))


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_study_data_exists(path):
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
    subprocess.run([sys.executable, str(root / "studies" / script), str(copy)], check=True, capture_output=True)
    expected = (shipped / "tables.md").read_text().replace(f"docs/evidence/{study}", str(copy))
    assert (copy / "tables.md").read_text() == expected
    assert (copy / "curves.png").stat().st_size > 10_000
