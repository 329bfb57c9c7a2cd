"""The bad inputs listed in docs/bad-input.md: each gives one clear line and a non-zero exit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gmt_mlx.cli import app

from .conftest import write_jsonl

runner = CliRunner()


def run(model, data, out, *extra):
    return runner.invoke(app, ["finetune", "--model", str(model), "--data", str(data), "--out", str(out),
                               "--iters", "1", "--batch-size", "2", *map(str, extra)])


def message(result):
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    return result.output.strip().splitlines()[-1]


def test_non_utf8_bytes(tiny_model_dir, tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    assert "train.jsonl:2: not UTF-8" in message(run(tiny_model_dir, tmp_path / "d", tmp_path / "o"))


def test_data_file_that_is_a_directory(tiny_model_dir, tmp_path):
    (tmp_path / "d" / "train.jsonl").mkdir(parents=True)
    assert "train.jsonl: is a directory" in message(run(tiny_model_dir, tmp_path / "d", tmp_path / "o"))


def test_chat_data_without_a_chat_template(tiny_model_dir, chat_data, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template")
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    assert "need a chat template" in message(run(model, chat_data, tmp_path / "o"))


def test_long_examples_are_truncated_with_a_warning(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d" / "train.jsonl", [{"text": "word " * 300}] + [{"text": "short one"}] * 3)
    result = run(tiny_model_dir, data, tmp_path / "o", "--max-seq-length", "64")
    assert result.exit_code == 0, result.output
    assert "1 of 4 train examples were longer than --max-seq-length 64 and were truncated" in result.output


def test_read_only_output_directory(tiny_model_dir, chat_data, tmp_path, monkeypatch):
    # Tests may run as root, which ignores permission bits: simulate the refusal.
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self == tmp_path / "ro" / "run":
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    line = message(run(tiny_model_dir, chat_data, tmp_path / "ro" / "run"))
    assert line == f"error: Permission denied: {tmp_path / 'ro' / 'run'}"


def test_output_path_below_a_file(tiny_model_dir, chat_data, tmp_path):
    (tmp_path / "afile").write_text("x")
    assert "afile" in message(run(tiny_model_dir, chat_data, tmp_path / "afile" / "run"))


@pytest.mark.parametrize("content,fragment", [
    ('{"messages": "hi"}\n', "train.jsonl:1"),
    ('[1, 2]\n', "train.jsonl:1"),
    ('{"prompt": "p"}\n', "train.jsonl:1"),
])
def test_wrong_keys_and_shapes(tiny_model_dir, tmp_path, content, fragment):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.jsonl").write_text(content)
    assert fragment in message(run(tiny_model_dir, tmp_path / "d", tmp_path / "o"))


def test_momentum_out_of_range(tiny_model_dir, chat_data, tmp_path):
    line = message(run(tiny_model_dir, chat_data, tmp_path / "o", "--optimizer", "sgd", "--momentum", "1"))
    assert "--momentum must be in [0, 1), got 1.0" in line


def test_damaged_metrics_on_resume_names_the_line_and_goes_on(tiny_model_dir, chat_data, tmp_path):
    out = tmp_path / "o"
    assert run(tiny_model_dir, chat_data, out, "--iters", "2", "--steps-per-save", "1").exit_code == 0
    (out / "model" / "config.json").unlink()  # as if killed while saving the model
    (out / "metrics.jsonl").write_text('{"type": "setup", "step": 0}\n{"type": "tra\n{"type": "train", "step": 1}\n')
    # The metrics are a record of the past, not the state: the resume names the line, skips it and goes on.
    resumed = runner.invoke(app, ["finetune", "--resume", str(out)])
    assert resumed.exit_code == 0, resumed.output
    assert "metrics.jsonl:2: not a metrics record (damaged line, skipped)" in resumed.output
    assert "tra\n" not in (out / "metrics.jsonl").read_text() and (out / "model" / "config.json").is_file()
