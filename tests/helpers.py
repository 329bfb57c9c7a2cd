"""What the tests share, written once: the CLI runner, the clean-error check, tiny data sets, the repository's paths.

Fixtures live in tests/conftest.py (pytest finds it for every folder below tests/); plain functions live here and are
imported (`from tests.helpers import cli, assert_clean_error`), so a test file says where each helper comes from.
"""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from gmt_mlx.cli import app

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent

# One runner for every command test: click >= 8.2 keeps stdout and stderr apart (result.stdout, result.stderr) and
# interleaves both in result.output.
runner = CliRunner()


def cli(*args, **kwargs):
    """Run `gmt-mlx ARGS...` in this process (each argument str()-ed) and return click's Result."""
    return runner.invoke(app, [str(a) for a in args], **kwargs)


def finetune_args(model, data, out, *extra) -> list:
    """The arguments of `gmt-mlx finetune --model MODEL --data DATA --out OUT EXTRA...`, as strings."""
    return ["finetune", "--model", str(model), "--data", str(data), "--out", str(out), *map(str, extra)]


def resumable_run_args(model, data, out, *extra) -> list:
    """`finetune` arguments of the short GMT run the resume and damage tests kill and resume: 6 steps, a checkpoint
    every 2, validation every 3, a metrics record every step."""
    return finetune_args(
        model,
        data,
        out,
        "--iters",
        6,
        "--learning-rate",
        "1e-3",
        "--steps-per-save",
        2,
        "--steps-per-eval",
        3,
        "--steps-per-report",
        1,
        "--method",
        "gmt",
        "--mask-ratio",
        0.5,
        *extra,
    )


def last_line(result) -> str:
    """The last non-blank line a command printed (stdout and stderr together)."""
    return result.output.strip().splitlines()[-1]


def assert_clean_error(result, *fragments, exit_code: int | None = 2, usage: bool = False) -> str:
    """A user error as the CLI must give it: exit `exit_code` (None: any non-zero), no traceback, and stderr one line,
    `error: ...`, holding every fragment (stdout may hold the run's log up to the error). Returns that line.

    usage=True: an error click itself reports (an unknown option, a value of the wrong type), which it prints as its
    usage lines and then one `Error: ...` line; that last line must hold the fragments.
    """
    if exit_code is None:
        assert result.exit_code != 0, result.output
    else:
        assert result.exit_code == exit_code, (result.exit_code, result.output)
    assert "Traceback" not in result.output, result.output
    lines = result.stderr.strip().splitlines()
    if usage:
        assert lines[0].startswith("Usage: ") and lines[-1].startswith("Error: "), result.stderr
    else:
        assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]
    return lines[-1]


def write_jsonl(path: Path, rows) -> Path:
    """Write `rows` as JSON Lines at `path` (making its folder) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def arithmetic_chat(n: int, start: int = 0) -> list:
    """`n` chat rows "What is a + (a+3)?" -> "a + (a+3) = 2a+3.", for a from `start`."""
    return [
        {
            "messages": [
                {"role": "user", "content": f"What is {a} + {a + 3}?"},
                {"role": "assistant", "content": f"{a} + {a + 3} = {2 * a + 3}."},
            ]
        }
        for a in range(start, start + n)
    ]


def write_chat_data(folder: Path, train: int = 16, valid: int = 4, test: int | None = 4) -> Path:
    """A data folder in the chat format (16 train, 4 valid, 4 test by default; test=None writes no test split);
    the splits do not overlap."""
    write_jsonl(folder / "train.jsonl", arithmetic_chat(train))
    write_jsonl(folder / "valid.jsonl", arithmetic_chat(valid, 100))
    if test is not None:
        write_jsonl(folder / "test.jsonl", arithmetic_chat(test, 200))
    return folder
