"""The bad inputs listed in docs/bad-input.md: each gives one clear line and a non-zero exit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gmt_mlx.cli import app
from tests.helpers import assert_clean_error as message  # checks the error, returns its line
from tests.helpers import runner, write_jsonl


def run(model, data, out, *extra):
    return runner.invoke(
        app,
        [
            "finetune",
            "--model",
            str(model),
            "--data",
            str(data),
            "--out",
            str(out),
            "--iters",
            "1",
            "--batch-size",
            "2",
            *map(str, extra),
        ],
    )


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


@pytest.mark.parametrize(
    "content,fragment",
    [
        ('{"messages": "hi"}\n', "train.jsonl:1"),
        ("[1, 2]\n", "train.jsonl:1"),
        ('{"prompt": "p"}\n', "train.jsonl:1"),
    ],
)
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


def test_a_negative_grad_clip_or_warmup_is_refused(tiny_model_dir, chat_data, tmp_path):
    # -1 used to mean "off" silently (only > 0 clips); 0 is the documented off.
    assert (
        message(run(tiny_model_dir, chat_data, tmp_path / "a", "--grad-clip", "-1"))
        == "error: --grad-clip must be 0 or more, got -1.0"
    )
    assert (
        message(run(tiny_model_dir, chat_data, tmp_path / "b", "--warmup-steps", "-2"))
        == "error: --warmup-steps must be 0 or more, got -2"
    )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_warmup_past_the_last_step_is_flagged(tiny_model_dir, chat_data, tmp_path):
    result = run(tiny_model_dir, chat_data, tmp_path / "o", "--warmup-steps", "50", "--iters", "2")
    assert result.exit_code == 0, result.output
    assert (
        "warning: --warmup-steps 50 is not below the run's 2 steps: the learning rate never reaches "
        "--learning-rate 1e-05"
    ) in result.output
    quiet = run(tiny_model_dir, chat_data, tmp_path / "q", "--warmup-steps", "1", "--iters", "2")
    assert quiet.exit_code == 0 and "--warmup-steps" not in quiet.output


def test_a_lone_surrogate_names_the_line(tiny_model_dir, tmp_path):
    (tmp_path / "d").mkdir()
    # A whole pair (an emoji) is a character; half of one is not, and the tokenizer would fail cryptically.
    (tmp_path / "d" / "train.jsonl").write_text('{"text": "ok \\ud83d\\ude00"}\n{"text": "bad \\ud800 half"}\n')
    assert message(run(tiny_model_dir, tmp_path / "d", tmp_path / "o")) == (
        f"error: {tmp_path / 'd' / 'train.jsonl'}:2: the text holds a lone UTF-16 surrogate (\\ud800, half of a "
        "pair): not a character; remove it or write the whole pair"
    )


def test_resume_of_a_folder_never_made_starts_the_run_with_the_full_command(tiny_model_dir, chat_data, tmp_path):
    out = tmp_path / "never"
    bare = runner.invoke(app, ["finetune", "--resume", str(out)])
    assert message(bare) == (
        f"error: --resume {out}: no such folder; start the run with your original command "
        f"(gmt-mlx finetune --model ... --data ... --out {out})"
    )
    full = runner.invoke(
        app,
        [
            "finetune",
            "--resume",
            str(out),
            "--model",
            str(tiny_model_dir),
            "--data",
            str(chat_data),
            "--iters",
            "1",
            "--batch-size",
            "2",
        ],
    )
    assert full.exit_code == 0, full.output
    assert f"nothing to resume in {out} yet (no such folder): starting it" in full.output
    assert (out / "model" / "config.json").is_file()
