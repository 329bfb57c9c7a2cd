"""Shared offline fixtures: a tiny random llama + tokenizer, and tiny datasets."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from gmt_mlx.models.tiny import make_tiny_model


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


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def arithmetic_chat(n: int, start: int = 0):
    return [
        {"messages": [{"role": "user", "content": f"What is {a} + {a + 3}?"},
                      {"role": "assistant", "content": f"{a} + {a + 3} = {2 * a + 3}."}]}
        for a in range(start, start + n)
    ]


def write_chat_data(folder: Path) -> Path:
    """A data folder in the chat format: 16 train, 4 valid, 4 test."""
    write_jsonl(folder / "train.jsonl", arithmetic_chat(16))
    write_jsonl(folder / "valid.jsonl", arithmetic_chat(4, 100))
    write_jsonl(folder / "test.jsonl", arithmetic_chat(4, 200))
    return folder


@pytest.fixture()
def chat_data(tmp_path) -> Path:
    """A data folder in the chat format: 16 train, 4 valid, 4 test."""
    return write_chat_data(tmp_path / "data")
