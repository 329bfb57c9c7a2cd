"""Shared offline fixtures: a tiny random llama + tokenizer, and tiny datasets.

This conftest.py sits at the top of tests/, so its fixtures reach every test below it (unit/..., e2e/); plain
helper functions are in tests/helpers.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gmt_mlx.models.tiny import make_tiny_model
from tests.helpers import write_chat_data


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Keep converted models out of the user's ~/.cache during tests."""
    old = os.environ.get("GMT_MLX_CACHE")
    os.environ["GMT_MLX_CACHE"] = str(tmp_path_factory.mktemp("gmt-cache"))
    yield
    if old is None:
        os.environ.pop("GMT_MLX_CACHE", None)
    else:
        os.environ["GMT_MLX_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random-weight llama in HF layout (config.json, model.safetensors, tokenizer)."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture()
def chat_data(tmp_path) -> Path:
    """A data folder in the chat format: 16 train, 4 valid, 4 test."""
    return write_chat_data(tmp_path / "data")
