"""Issue 38, case 5: a reward function that raises or calls sys.exit is a one-line error naming the reward."""

from __future__ import annotations

import sys

import pytest
from typer.testing import CliRunner

from gmt_mlx.cli import app
from gmt_mlx.errors import UserError
from gmt_mlx.objectives.grpo.rewards import Reward, _call
from tests.helpers import write_jsonl

runner = CliRunner()


def exiting_reward(prompt, completion, row):
    sys.exit(3)


def quiet_exit_reward(prompt, completion, row):
    raise SystemExit


def key_error_reward(prompt, completion, row):
    return row["missing"]


def rows(n, start=0):
    return [
        {
            "messages": [
                {"role": "user", "content": f"What is {a} + 3?"},
                {"role": "assistant", "content": str(a + 3)},
            ],
            "answer": str(a + 3),
        }
        for a in range(start, start + n)
    ]


@pytest.mark.parametrize(
    "name,shown",
    [
        ("exiting_reward", "SystemExit: 3"),
        ("quiet_exit_reward", "SystemExit"),
        ("key_error_reward", "KeyError: 'missing'"),
    ],
)
@pytest.mark.slow
def test_a_reward_that_exits_or_raises_is_one_line_naming_it(tiny_model_dir, tmp_path, name, shown):
    """SystemExit(3) used to end the run with exit 3 and nothing printed."""
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", rows(8))
    write_jsonl(data / "valid.jsonl", rows(4, 100))
    spec = f"tests.unit.objectives.test_safety_rewards:{name}"
    result = runner.invoke(
        app,
        [
            "finetune",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "o"),
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
            "--reward",
            spec,
            "--samples",
            "0",
        ],
    )
    assert result.exit_code == 2, result.output
    assert (
        result.output.strip().splitlines()[-1]
        == f"error: {data / 'valid.jsonl'}, row 1: --reward {spec} raised {shown}"
    )
    assert "Traceback" not in result.output


def test_keyboard_interrupt_in_a_reward_still_stops_the_run():
    """Ctrl-C is the user's, not the reward's: it is not turned into a reward error."""

    def interrupted(prompt, completion, row):
        raise KeyboardInterrupt

    reward = Reward(name="m:interrupted", fn=interrupted, kind="user", weight=1.0)
    with pytest.raises(KeyboardInterrupt):
        _call(reward, "p", "c", {}, "here")
    with pytest.raises(UserError, match="^here: --reward m:exit raised SystemExit: 3$"):
        _call(Reward(name="m:exit", fn=exiting_reward, kind="user", weight=1.0), "p", "c", {}, "here")
