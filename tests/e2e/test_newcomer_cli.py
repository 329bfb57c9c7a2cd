"""What a newcomer tripped on (issue 37), on the command line: --help-all on every command, one
spelling of the positional argument, eval naming a missing run dir, and compare's label for `full`."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer.main

from gmt_mlx.cli import app
from gmt_mlx.cli.parsing import method_labels, parse_methods
from gmt_mlx.compare import plan as compare_plan
from gmt_mlx.config import Config
from tests.helpers import runner

COMMANDS = ["finetune", "compare", "generate", "eval", "export", "push", "import-gguf", "doctor"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_takes_help_all(command):
    result = runner.invoke(app, [command, "--help-all"], env={"COLUMNS": "80"}, terminal_width=80)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Usage:") and "--help-all" in result.output


@pytest.mark.parametrize("command", ["generate", "eval", "export", "push", "import-gguf", "doctor"])
def test_help_all_equals_help_where_nothing_is_hidden(command):
    short = runner.invoke(app, [command, "--help"], env={"COLUMNS": "80"}, terminal_width=80)
    full = runner.invoke(app, [command, "--help-all"], env={"COLUMNS": "80"}, terminal_width=80)
    assert short.exit_code == full.exit_code == 0 and short.output == full.output


def test_positional_arguments_are_spelled_one_way():
    # Upper-case metavars (MODEL, RUN_DIR, FOLDER, FILE): eval used to show its argument as {model}.
    commands = typer.main.get_command(app).commands
    names = {
        name: [p.display_name_raw for p in cmd.params if p.param_type_name == "argument"]
        for name, cmd in commands.items()
    }
    assert names["eval"] == names["generate"] == ["MODEL"]
    for name, arguments in names.items():
        assert all(a == a.upper() for a in arguments), (name, arguments)
    usage = runner.invoke(app, ["eval", "--help"]).output.splitlines()[0]
    assert usage.endswith("{MODEL}"), usage


@pytest.mark.parametrize("model", ["runs/typo", "./typo", "typo.gguf"])
def test_eval_of_a_missing_run_dir_names_it(tmp_path, monkeypatch, model):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["eval", model])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert (
        result.output.strip()
        .splitlines()[-1]
        .startswith(f"error: {model}: no such folder or file (expected a run directory, ")
    )


def test_eval_of_a_hub_id_without_data_still_asks_for_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["eval", "owner/model"])
    assert result.exit_code == 2 and "--data is required" in result.output


def test_compare_labels_full_as_typed():
    def planned(methods: str, **base):
        spec = compare_plan.CompareSpec(
            base=Config(data="d", **base), out=Path("o"), methods=parse_methods(methods), labels=method_labels(methods)
        )
        return [(run.name, run.group, run.method) for run in compare_plan.plan(spec)]

    assert planned("full,lora") == [("full-s0", "full", "sft"), ("lora-s0", "lora", "lora")]
    assert planned("sft,lora")[0] == ("sft-s0", "sft", "sft")
    assert planned("sft", train_mode="dpo")[0][:2] == ("full-s0", "full")  # the objective's own rule stays
    library = compare_plan.CompareSpec(base=Config(data="d"), out=Path("o"), methods=["full"])
    assert [run.group for run in compare_plan.plan(library)] == ["full"] and library.methods == ["sft"]
