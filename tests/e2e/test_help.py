"""Help a person can read (issue 14): at 80 columns no option name is cut, flags are switches,
one default style, and `finetune --help` is short with a pointer to `--help-all`."""

from __future__ import annotations

import re
from dataclasses import fields

import pytest

from gmt_mlx.cli import app
from gmt_mlx.config import Config, field_types, flag
from tests.helpers import runner

COMMANDS = ["finetune", "compare", "generate", "eval", "export", "push", "import-gguf", "doctor"]


def render(*args: str) -> str:
    result = runner.invoke(app, list(args), env={"COLUMNS": "80"}, terminal_width=80)
    assert result.exit_code == 0, result.output
    return result.output


def option_names(command: str) -> list:
    """Every option name of a command, as click knows it."""
    import typer.main

    click_command = typer.main.get_command(app).commands[command]
    return [
        name for param in click_command.params for name in (*param.opts, *param.secondary_opts) if name.startswith("--")
    ]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_names_every_option_whole_at_80_columns(command):
    text = render(command, "--help-all" if command in ("finetune", "compare") else "--help")
    assert "<bool>" not in text and "…" not in text and "..." not in text
    assert max(len(line) for line in text.splitlines()) <= 80
    for name in option_names(command):
        assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text), name
    assert "(default:" not in text  # one style: [default: x]


def test_finetune_short_help_lists_the_common_options_and_points_to_the_rest():
    short = render("finetune", "--help")
    assert len(short.splitlines()) < 80
    for name in ("--model", "--data", "--out", "--method", "--mask-ratio", "--learning-rate", "--iters"):
        assert name in short
    assert "--lora-rank" not in short and "--distributed-backend" not in short
    assert "gmt-mlx finetune --help-all" in short
    full = render("finetune", "--help-all")
    for f in fields(Config):
        assert f"--{flag(f.name)}" in full, f.name
    assert "[default: smollm2-135m]" in full and "[default: --no-mask-prompt]" in full
    assert "--method [gmt|sft|full|random|lora|dora]" in full


def test_switches_take_no_value():
    # Shown as switches (no placeholder), so `--overwrite true` is a usage error, not a silent yes.
    text = render("finetune", "--help-all")
    assert re.search(r"^  --overwrite  ", text, re.M)
    assert re.search(r"^  --mask-prompt / --no-mask-prompt$", text, re.M)
    for name, kind in field_types().items():
        if kind is bool:
            assert f"--{flag(name)} / --no-{flag(name)}" in text
