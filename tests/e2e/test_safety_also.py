"""Issue 38's "Also" list: a damaged finished.json, a bad value named in its YAML file, NaN never "best",
GRPO's "best" the same at the end and on resume."""

from __future__ import annotations

import math

import pytest
from typer.testing import CliRunner

from gmt_mlx.cli import app
from gmt_mlx.config import resolve
from gmt_mlx.errors import UserError
from gmt_mlx.recipes import outputs
from gmt_mlx.run import rundir
from tests.helpers import write_jsonl

runner = CliRunner()


def args(model, data, out, *extra):
    return [
        "finetune",
        "--model",
        str(model),
        "--data",
        str(data),
        "--out",
        str(out),
        "--iters",
        "4",
        "--learning-rate",
        "1e-3",
        "--steps-per-save",
        "2",
        "--steps-per-eval",
        "2",
        "--samples",
        "0",
        *map(str, extra),
    ]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["truncate", "flip", "delete-sums"])
def test_a_damaged_finished_json_exports_the_final_checkpoint(tiny_model_dir, chat_data, tmp_path, how):
    """The final step's checkpoint verifies: export uses it (it used to refuse: no final step without finished.json)."""
    out = tmp_path / "run"
    assert runner.invoke(app, args(tiny_model_dir, chat_data, out)).exit_code == 0
    finished = out / rundir.FINISHED_FILE
    text = finished.read_text()
    finished.write_text(
        {"truncate": text[: len(text) // 2], "flip": text.replace("{", "[", 1), "delete-sums": '{"step": 4}'}[how]
    )
    result = runner.invoke(app, ["export", str(out), "--out", str(tmp_path / "hf")])
    assert result.exit_code == 0, result.output
    assert "exporting the final step's checkpoint step-000004 instead (the same weights)" in result.output
    assert (tmp_path / "hf" / "config.json").is_file()


@pytest.mark.slow
def test_a_damaged_finished_json_without_a_final_checkpoint_says_why(tiny_model_dir, chat_data, tmp_path):
    out = tmp_path / "run"
    assert (
        runner.invoke(app, args(tiny_model_dir, chat_data, out, "--steps-per-save", "0", "--no-save-best")).exit_code
        == 0
    )
    (out / rundir.FINISHED_FILE).write_text("{")
    result = runner.invoke(app, ["export", str(out), "--out", str(tmp_path / "hf")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: {out}: finished.json is damaged, and no checkpoint holds the final step; export another one "
        "(--checkpoint best or step-N) or start the run over"
    ]


def test_a_bad_value_in_a_yaml_file_is_named_there(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("mask_ratio: 1.5\nlearning_rate: .nan\n")
    with pytest.raises(UserError) as err:
        resolve(path)
    assert str(err.value) == f"{path}: learning_rate must be a finite number, got nan"
    path.write_text("mask_ratio: 1.5\n")
    with pytest.raises(UserError) as err:
        resolve(path)
    assert str(err.value) == f"{path}: mask_ratio must be in [0, 1) (the fraction dropped), got 1.5"
    with pytest.raises(UserError) as err:  # the flag wins over the file, and is named as a flag
        resolve(path, {"mask_ratio": 2.0})
    assert str(err.value) == "--mask-ratio must be in [0, 1) (the fraction dropped), got 2.0"


def test_a_bad_value_in_a_resumed_runs_config_names_its_config_yaml(tiny_model_dir, chat_data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / rundir.CONFIG_FILE).write_text("mask_ratio: 1.5\n")  # as gmt-mlx before checksums wrote it, then edited
    (out / rundir.METRICS_FILE).write_text('{"type": "train", "step": 1}\n')
    result = runner.invoke(app, ["finetune", "--resume", str(out)])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: {out / rundir.CONFIG_FILE}: mask_ratio must be in [0, 1) (the fraction dropped), got 1.5"
    ]


@pytest.mark.slow
def test_a_nan_validation_loss_is_never_best(tiny_model_dir, chat_data, tmp_path, monkeypatch):
    monkeypatch.setattr(outputs, "split_loss", lambda *a, **k: {"loss": math.nan, "ppl": math.nan, "tokens": 1})
    out = tmp_path / "run"
    result = runner.invoke(app, args(tiny_model_dir, chat_data, out))
    assert result.exit_code == 0, result.output
    assert "*best*" not in result.output and "step 2: val loss nan" in result.output
    assert not rundir.best_dir(out).exists()
    assert "val loss nan\n" in result.output and "(best" not in result.output
    resumed = runner.invoke(app, ["finetune", "--resume", str(out)])
    assert resumed.exit_code == 0 and "val loss nan\n" in resumed.output and "(best" not in resumed.output


CALLS = []


def first_validation_reward(prompt, completion, row):
    """1 for the step-0 validation (the first 4 calls: 4 valid rows), 0 after: the step-0 model scores best."""
    CALLS.append(1)
    return 1.0 if len(CALLS) <= 4 else 0.0


@pytest.mark.slow
def test_grpo_best_is_the_same_at_the_end_and_on_resume(tiny_model_dir, tmp_path):
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"What is {a} + 3?"},
                {"role": "assistant", "content": str(a + 3)},
            ],
            "answer": str(a + 3),
        }
        for a in range(12)
    ]
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", rows[:8])
    write_jsonl(data / "valid.jsonl", rows[8:])
    CALLS.clear()
    out = tmp_path / "run"
    done = runner.invoke(
        app,
        [
            "finetune",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(data),
            "--out",
            str(out),
            "--train-mode",
            "grpo",
            "--batch-size",
            "2",
            "--num-generations",
            "2",
            "--max-completion-length",
            "4",
            "--iters",
            "2",
            "--steps-per-eval",
            "1",
            "--samples",
            "0",
            "--reward",
            "tests.e2e.test_safety_also:first_validation_reward",
        ],
    )
    assert done.exit_code == 0, done.output
    end = [line for line in done.output.splitlines() if line.startswith("done:")][0]
    assert end.endswith("val reward 0.0000 (best 0.0000)")  # step 0 (reward 1) is where training started
    resumed = runner.invoke(app, ["finetune", "--resume", str(out)])
    assert resumed.exit_code == 0, resumed.output
    again = [line for line in resumed.output.splitlines() if line.startswith("finished:")][0]
    assert again.split(", ", 1)[1] == end.split(", ", 1)[1]
