"""The `gmt-mlx` command line: one thin module per command, wired here."""

from __future__ import annotations

import typer

from .common import ConfigHelpCommand
from .compare import compare
from .doctor import doctor
from .eval import eval_command
from .export import export
from .finetune import finetune
from .generate import generate
from .import_gguf import import_gguf
from .push import push

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
app.command("generate")(generate)
app.command("eval")(eval_command)
app.command("compare", cls=ConfigHelpCommand)(compare)
app.command("import-gguf")(import_gguf)
app.command("export")(export)
app.command("push")(push)
app.command("doctor")(doctor)


def main() -> None:
    """Console entry point: on Linux, first switch MLX to an optimized BLAS when one is
    installed and passes a numerical check (GMT_MLX_BLAS=reference opts out; see blas.py)."""
    from ..blas import maybe_reexec_with_blas

    maybe_reexec_with_blas()
    app()
