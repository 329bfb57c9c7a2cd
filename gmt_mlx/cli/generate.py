"""`gmt-mlx generate`: greedy (or sampled) text from a run or a model."""

from __future__ import annotations

from typing import Annotated

import typer

from gmt_mlx.cli.common import echo, user_errors


@user_errors
def generate(
    model: Annotated[
        str, typer.Argument(metavar="MODEL", help="A run directory, HF folder, GGUF file, Hub id or 'smollm2-135m'.")
    ],
    prompt: Annotated[
        str, typer.Option("--prompt", "-p", help="The prompt (wrapped in the chat template when the model has one).")
    ],
    max_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 128,
    raw: Annotated[bool, typer.Option("--raw", help="Do not apply the chat template.")] = False,
) -> None:
    """Generate text from a fine-tuned run (RUN_DIR/model) or any model."""
    from gmt_mlx.evaluation.evaluate import generate_text
    from gmt_mlx.models.loading import load_base, run_model_dir

    net, tokenizer, _, _ = load_base(run_model_dir(model))
    echo(generate_text(net, tokenizer, prompt, max_tokens=max_tokens, chat=False if raw else None))
