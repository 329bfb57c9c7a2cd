"""The `gmt-mlx` command line: one thin module per command, wired here."""

from __future__ import annotations

import typer

from gmt_mlx.cli.common import ConfigHelpCommand, with_help_all
from gmt_mlx.cli.compare import compare
from gmt_mlx.cli.doctor import doctor
from gmt_mlx.cli.eval import eval_command
from gmt_mlx.cli.export import export
from gmt_mlx.cli.finetune import finetune
from gmt_mlx.cli.generate import generate
from gmt_mlx.cli.import_gguf import import_gguf
from gmt_mlx.cli.push import push

app = typer.Typer(
    name="gmt-mlx",
    help="Fine-tune Hugging Face LLMs on MLX with Gradient-Mask Tuning (arXiv 2406.15330).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain click help: rich's tables cut long option names at 80 columns and show flags as <bool>.
    rich_markup_mode=None,
)
app.command("finetune", cls=ConfigHelpCommand)(finetune)
app.command("generate", cls=ConfigHelpCommand)(with_help_all(generate))
app.command("eval", cls=ConfigHelpCommand)(with_help_all(eval_command))
app.command("compare", cls=ConfigHelpCommand)(compare)
app.command("import-gguf", cls=ConfigHelpCommand)(with_help_all(import_gguf))
app.command("export", cls=ConfigHelpCommand)(with_help_all(export))
app.command("push", cls=ConfigHelpCommand)(with_help_all(push))
app.command("doctor", cls=ConfigHelpCommand)(with_help_all(doctor))


def main() -> None:
    """Console entry point: on Linux, first switch MLX to an optimized BLAS when one is
    installed and passes a numerical check (GMT_MLX_BLAS=reference opts out; see blas.py)."""
    from gmt_mlx.platform.blas import maybe_reexec_with_blas

    maybe_reexec_with_blas()
    app()
