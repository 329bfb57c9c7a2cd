"""`gmt-mlx finetune`: parse options, resolve the config, call the library."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Dict, Optional

import typer

from .common import echo, user_errors, with_config_options


@with_config_options
@user_errors
def finetune(
    config_file: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML file of options (flags override it).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing run in --out.")] = False,
    overrides: Dict[str, Any] = None,
) -> None:
    """Fine-tune a model with GMT (or sft / random) and write a run directory."""
    from ..config import resolve
    from ..finetune import finetune as run

    config = resolve(config_file, overrides)
    result = run(config, overwrite=overwrite, log=echo)
    for sample in result.samples:
        echo(f"\nprompt: {sample['prompt']}\n  before: {sample['before'].strip()}\n  after:  {sample['after'].strip()}")
    val = f", val loss {result.val_loss:.4f} (best {result.best_val_loss:.4f})" if result.val_loss is not None else ""
    echo(f"\ndone: {result.steps} steps, train loss {result.train_loss:.4f}{val}")
    echo(f"model: {result.model_dir}")
    echo(f"try it: gmt-mlx generate {result.out} --prompt \"...\"")
