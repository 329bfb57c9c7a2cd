"""`gmt-mlx export`: a run's model as a Hugging Face folder (merged), a PEFT adapter, or a GGUF file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from gmt_mlx.cli.common import echo, user_errors


@user_errors
def export(
    run_dir: Annotated[
        Path,
        typer.Argument(metavar="RUN_DIR", help="A run directory written by `gmt-mlx finetune`.", show_default=False),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the model to.")],
    dtype: Annotated[
        Optional[str], typer.Option(help="float32, bfloat16 or float16.  [default: the run's --dtype]")
    ] = None,
    checkpoint: Annotated[
        str, typer.Option(help="last (the final model), best (lowest validation loss) or step-N.")
    ] = "last",
    adapter_only: Annotated[
        bool, typer.Option("--adapter-only", help="LoRA/DoRA runs: write only the adapter, in PEFT's format.")
    ] = False,
    dataset: Annotated[
        Optional[List[str]],
        typer.Option(
            "--dataset",
            metavar="ID",
            help="Hub dataset id the training data came from (repeatable): the card's `datasets`.",
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a model already in --out.")] = False,
    format: Annotated[
        str,
        typer.Option(
            "--format",
            help="hf (safetensors folder) or gguf (one .gguf file + an Ollama Modelfile, "
            "for llama.cpp / Ollama / LM Studio).",
        ),
    ] = "hf",
    outtype: Annotated[
        Optional[str], typer.Option(help="--format gguf: f32, f16, q8_0 or q4_0.  [default: f16]")
    ] = None,
) -> None:
    """Export a run: merged safetensors + config + tokenizer + model card (or a PEFT adapter, or a GGUF)."""
    from gmt_mlx.publish.export import export_run

    result = export_run(
        run_dir,
        out,
        dtype=dtype,
        checkpoint=checkpoint,
        adapter_only=adapter_only,
        datasets=dataset or None,
        overwrite=overwrite,
        log=echo,
        format=format,
        outtype=outtype,
    )
    step = f", step {result.step}" if result.step is not None else ""
    echo(f"exported {result.source}{step} to {result.out}: {', '.join(result.files)}")
    if format == "gguf":
        echo(f"run it: cd {result.out} && ollama create {result.out.name} -f Modelfile && ollama run {result.out.name}")
    echo(f"publish it: gmt-mlx push {result.out} --repo USER/NAME")
