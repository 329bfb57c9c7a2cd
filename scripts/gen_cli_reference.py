"""Write docs/reference/cli.md: every gmt-mlx command with its arguments and options, from the code.

Run from the repository root: ``python scripts/gen_cli_reference.py`` (``--check`` exits 1 when the
committed file differs). It walks the click commands Typer builds from ``gmt_mlx.cli.app`` and asks
each parameter for the help record ``--help`` prints (names, metavar or choices, help, default), so
it follows the options however the commands declare them (by hand or from Config's fields).
tests/test_docs.py fails when the committed page is stale.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "docs" / "reference" / "cli.md"
COMMAND = "python scripts/gen_cli_reference.py"


def _escape(text: str) -> str:
    """Help text as Markdown: no accidental emphasis or HTML tags, one line."""
    return " ".join(text.split()).replace("*", r"\*").replace("<", "&lt;")


def _command_section(name: str, command, parent_ctx) -> list:
    """The Markdown lines of one command: its help, usage, arguments and options by group."""
    import click

    ctx = click.Context(command, info_name=name, parent=parent_ctx)
    lines = [f"## gmt-mlx {name}", ""]
    if command.help:
        lines += [_escape(paragraph) + "\n" for paragraph in command.help.split("\n\n")]
    usage = " ".join(command.collect_usage_pieces(ctx))
    lines += ["```", f"gmt-mlx {name} {usage}".rstrip(), "```", ""]
    groups: dict = {}
    for param in command.get_params(ctx):
        if param.name == "help":
            continue  # every command has it
        record = param.get_help_record(ctx)
        if param.param_type_name == "argument":
            groups.setdefault("Arguments", []).append(record or (param.name.upper(), ""))
            continue
        if record is None:  # a hidden option
            continue
        title = getattr(param, "rich_help_panel", None) or "Options"
        groups.setdefault(title, []).append(record)
    for title, records in groups.items():
        lines += [f"### {title}", ""]
        for opts, help_text in records:
            lines.append(f"- `{opts}`" + (f": {_escape(help_text)}" if help_text else ""))
        lines.append("")
    return lines


def render() -> str:
    """The whole reference page, as the current code describes the commands."""
    import click
    import typer.main

    from gmt_mlx.cli import app

    group = typer.main.get_command(app)
    root_ctx = click.Context(group, info_name="gmt-mlx")
    lines = [
        "# CLI reference",
        "",
        f"Generated from the code by `{COMMAND}`; do not edit by hand (tests/test_docs.py fails",
        "when this page is stale). `gmt-mlx COMMAND --help` prints the same; `finetune --help` and",
        "`compare --help` show the common options, `--help-all` every one. Every option of the",
        "training config can also be a key of a YAML file (`-c FILE`, the option name with `_`).",
        "",
        "Commands: " + " · ".join(f"[{name}](#gmt-mlx-{name})" for name in group.commands),
        "",
    ]
    for name, command in group.commands.items():
        lines += _command_section(name, command, root_ctx)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list) -> int:
    """Write the page, or with ``--check`` report whether the committed one is current."""
    text = render()
    if "--check" in argv:
        current = OUTPUT.read_text() if OUTPUT.exists() else ""
        if current != text:
            print(f"{OUTPUT.relative_to(ROOT)} is stale: run {COMMAND}", file=sys.stderr)
            return 1
        return 0
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
