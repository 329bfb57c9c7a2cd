"""`gmt-mlx import-gguf`: convert a llama, qwen2, qwen3, phi3, gemma or gemma2 GGUF file to a Hugging Face folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gmt_mlx.cli.common import echo, user_errors
from gmt_mlx.config import Config


@user_errors
def import_gguf(
    file: Annotated[
        Path, typer.Argument(metavar="FILE", help="The .gguf file (F32, F16, Q8_0, Q4_0 or Q4_1 tensors).")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write (must not exist or be empty).")],
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = Config.dtype,
) -> None:
    """Dequantize, rename to HF layout, undo GGML's q/k permutation, build the tokenizer."""
    from gmt_mlx.errors import UserError
    from gmt_mlx.models.gguf.reader import convert_gguf

    if not file.is_file():
        raise UserError(f"GGUF file not found: {file}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not empty")
    echo(f"wrote {convert_gguf(file, out, dtype=dtype)}")
