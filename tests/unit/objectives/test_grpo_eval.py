"""GRPO beyond finetune: prompt-only rows, `eval --reward`, and `compare --train-mode grpo`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gmt_mlx.cli import app
from tests.helpers import assert_clean_error as message  # checks the error, returns its line
from tests.helpers import runner, write_jsonl

from .test_grpo_loop import DIGITS, grpo_args, sums


def prompt_rows(n: int, start: int = 0, answer: bool = True):
    return [
        {"prompt": f"What is {a} + 3?", **({"answer": str(a + 3)} if answer else {})} for a in range(start, start + n)
    ]


def user_turns(n: int, start: int = 0):
    return [
        {"messages": [{"role": "user", "content": f"What is {a} + 3?"}], "answer": str(a + 3)}
        for a in range(start, start + n)
    ]


@pytest.fixture(scope="module")
def grpo_run(tiny_model_dir, tmp_path_factory) -> Path:
    """A finished GRPO run on prompt-only rows (with a test split of them), rewarded by digits and format."""
    folder = tmp_path_factory.mktemp("grpo-eval")
    data = folder / "data"
    write_jsonl(data / "train.jsonl", prompt_rows(8))
    write_jsonl(data / "valid.jsonl", prompt_rows(4, 100))
    write_jsonl(data / "test.jsonl", prompt_rows(3, 200))
    result = runner.invoke(
        app,
        grpo_args(
            tiny_model_dir,
            data,
            folder / "run",
            "--iters",
            "2",
            "--reward",
            f"{DIGITS},format",
            "--reward-weights",
            "1,0.5",
        ),
    )
    assert result.exit_code == 0, result.output
    return folder / "run"


# ---- prompt-only rows ----------------------------------------------------------------------


def test_prompt_rows_without_completion_train_grpo_and_are_refused_elsewhere(grpo_run, tiny_model_dir, tmp_path):
    assert (grpo_run / "model").is_dir()
    data = grpo_run.parent / "data"
    line = message(
        runner.invoke(
            app,
            [
                "finetune",
                "--model",
                str(tiny_model_dir),
                "--data",
                str(data),
                "--out",
                str(tmp_path / "sft"),
                "--iters",
                "1",
            ],
        )
    )
    assert "train.jsonl:1: has 'prompt' but no 'completion'" in line and "--train-mode grpo" in line
    line = message(
        runner.invoke(
            app,
            [
                "finetune",
                "--model",
                str(tiny_model_dir),
                "--data",
                str(data),
                "--out",
                str(tmp_path / "dpo"),
                "--iters",
                "1",
                "--train-mode",
                "dpo",
            ],
        )
    )
    assert "no 'completion'" in line


def test_chat_rows_with_only_a_user_turn_train_grpo(tiny_model_dir, tmp_path):
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", user_turns(4))
    result = runner.invoke(app, grpo_args(tiny_model_dir, data, tmp_path / "o", "--iters", "1", "--reward", "exact"))
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["type"] == "train" and "reward" in r for r in records)


# ---- eval --reward -------------------------------------------------------------------------


def test_eval_of_a_grpo_run_scores_its_own_rewards(grpo_run, tmp_path):
    out = tmp_path / "eval.json"
    result = runner.invoke(app, ["eval", str(grpo_run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    names = [DIGITS, "format"]
    assert saved["reward_names"] == names and saved["reward_weights"] == [1.0, 0.5]
    assert saved["reward_count"] == 3 and set(saved["rewards"]) == set(names)
    # The weighted total, item by item and on average; answers as long as the run's --max-completion-length.
    items = saved["reward_items"]
    for item in items:
        assert item["reward"] == pytest.approx(item["rewards"][DIGITS] + 0.5 * item["rewards"]["format"])
    assert saved["reward"] == pytest.approx(sum(i["reward"] for i in items) / 3)
    assert saved["max_tokens"] == 6 and saved["scorers"] == [] and "accuracy" not in saved
    assert saved["loss_skipped"] and "loss" not in saved  # prompt rows: nothing to score a loss on
    assert f"reward    {saved['reward']:.4f} mean of 3" in result.output and "format" in result.output
    assert "loss      skipped" in result.output


def test_eval_reward_matches_the_runs_validation_reward(grpo_run):
    from gmt_mlx.evaluation.evaluate import EvalOptions, evaluate

    evals = [json.loads(line) for line in (grpo_run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in evals if r["type"] == "eval"][-1]
    assert last["step"] == 2
    # The first --val-batches x --batch-size valid prompts, decoded --batch-size x G at once as validation does.
    result = evaluate(str(grpo_run), options=EvalOptions(split="valid", batch_size=8, limit=2, loss=False))
    assert result["reward"] == last["val_reward"] and result["completion_length"] == last["val_completion_length"]
    for name, value in result["rewards"].items():
        assert value == last[f"val_rewards/{name}/mean"]


def test_eval_reward_on_any_model_with_names_and_weights(tiny_model_dir, tmp_path):
    data = tmp_path / "data"
    write_jsonl(data / "test.jsonl", sums(3))
    write_jsonl(data / "train.jsonl", sums(3))
    result = runner.invoke(
        app,
        [
            "eval",
            str(tiny_model_dir),
            "--data",
            str(data),
            "--reward",
            "exact,format",
            "--reward-weights",
            "2,1",
            "--max-tokens",
            "3",
            "--scorer",
            "number",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "accuracy  number" in result.output and "(greedy, max 3 tokens; 2 x exact + 1 x format)" in result.output
    assert "loss      " in result.output and "skipped" not in result.output  # chat rows with answers: a loss too


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--reward", "nonsense"], "unknown reward 'nonsense'"),
        (["--reward", "exact", "--reward-weights", "1,2"], "--reward-weights has 2 weights but --reward names 1"),
        (["--reward-weights", "1"], "--reward-weights needs --reward"),
        (["--reward", "exact"], "test.jsonl, row 2: no answer, which --reward exact needs"),
    ],
)
def test_eval_reward_errors_are_one_line(tiny_model_dir, tmp_path, flags, expected):
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", prompt_rows(2))
    write_jsonl(data / "test.jsonl", prompt_rows(1) + prompt_rows(1, answer=False))
    assert expected in message(runner.invoke(app, ["eval", str(tiny_model_dir), "--data", str(data), *flags]))


# ---- compare --train-mode grpo -------------------------------------------------------------


@pytest.mark.slow
def test_compare_grpo_reports_rewards_not_losses(grpo_run, tiny_model_dir, tmp_path):
    data = grpo_run.parent / "data"
    out = tmp_path / "c"
    args = [
        "compare",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(data),
        "--out",
        str(out),
        "--train-mode",
        "grpo",
        "--methods",
        "full,gmt,lora",
        "--mask-ratios",
        "0.5",
        "--batch-size",
        "2",
        "--num-generations",
        "4",
        "--max-completion-length",
        "6",
        "--iters",
        "2",
        "--val-batches",
        "1",
        "--reward",
        f"{DIGITS},format",
        "--reward-weights",
        "1,0.5",
        "--learning-rates",
        "3e-3",
        "--eval-limit",
        "2",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    names = [DIGITS, "format"]
    assert results["spec"]["eval"]["rewards"] == names and results["spec"]["eval"]["max_tokens"] == 6
    assert results["spec"]["eval"]["scorers"] == []
    runs = {r["name"]: r for r in results["runs"]}
    assert set(runs) == {"full-s0", "gmt-r0.5-s0", "lora-s0"}
    step0 = set()
    for run in runs.values():
        saved = yaml_config(out / "runs" / run["name"])
        assert saved["train_mode"] == "grpo" and saved["reward"] == f"{DIGITS},format"
        val = run["curves"]["val"]
        # Each run's own step-0 validation (the base model's reward), never an SFT loss.
        assert val[0][0] == 0 and val[-1][0] == 2 and all(0 <= p[2] <= 1.5 for p in val)
        step0.add(val[0][2])
        assert run["final_val_reward"] == val[-1][2] and run["best_val_reward"] == max(p[2] for p in val)
        assert run["test_loss"] is None and set(run["test_rewards"]) == set(names) and run["reward_count"] == 2
        assert len(run["curves"]["train"][0]) == 6  # the rollouts' mean reward beside the loss
    assert len(step0) == 1  # every method starts from the same model (LoRA's adapters start at zero)
    base = results["base"]
    assert base["val_reward"] == step0.pop() and base["test_reward"] is not None and base["test_loss"] is None
    rows = {r["group"]: r for r in results["rows"]}
    assert rows["gmt r=0.5"]["test_reward"]["mean"] == runs["gmt-r0.5-s0"]["test_reward"]
    table = (out / "results.md").read_text()
    assert "| method | lr | final val reward | best val reward | test reward | test " + DIGITS in table
    assert "val loss" not in table and "test ppl" not in table
    for name in ("val_reward_vs_step.png", "val_reward_vs_time.png", "train_reward_vs_step.png"):
        assert (out / name).is_file() and f"]({name})" in table
    # Run again: everything reused, evaluations included.
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert "3 runs (3 reused)" in again.output


def yaml_config(run_dir: Path) -> dict:
    import yaml

    return yaml.safe_load((run_dir / "config.yaml").read_text())


def test_compare_grpo_refuses_rows_its_rewards_cannot_score_before_training(tiny_model_dir, tmp_path):
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", prompt_rows(4))
    write_jsonl(data / "test.jsonl", prompt_rows(1) + prompt_rows(1, answer=False))
    line = message(
        runner.invoke(
            app,
            [
                "compare",
                "--model",
                str(tiny_model_dir),
                "--data",
                str(data),
                "--out",
                str(tmp_path / "c"),
                "--train-mode",
                "grpo",
                "--reward",
                "exact",
            ],
        )
    )
    assert "test.jsonl, row 2: no answer, which --reward exact needs" in line
    assert not (tmp_path / "c" / "runs").exists()


def test_eval_baseline_of_a_grpo_run_compares_rewards(grpo_run):
    result = runner.invoke(app, ["eval", str(grpo_run), "--baseline", "--show", "0"])
    assert result.exit_code == 0, result.output
    assert "reward    base " in result.output and " -> tuned " in result.output and "format" in result.output
