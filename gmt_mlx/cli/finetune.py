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
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue the run in this directory from its newest complete checkpoint (its config.yaml is the base; flags override it).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Resume even when the config differs from the run's.")] = False,
    overrides: Dict[str, Any] = None,
) -> None:
    """Fine-tune a model with GMT (or sft / random / lora / dora) and write a run directory.

    Re-running with the same --out resumes an interrupted run of the same config.
    """
    from ..config import load_yaml, resolve
    from ..errors import UserError
    from ..finetune import finetune as run
    from ..rundir import CONFIG_FILE, is_run_dir

    base = None
    if resume is not None:
        if not is_run_dir(resume):
            raise UserError(f"--resume {resume}: not a gmt-mlx run (no {CONFIG_FILE})")
        if overrides.get("out") not in (None, str(resume)):
            raise UserError("--resume RUN_DIR and --out must name the same folder (or leave --out out)")
        base = {**load_yaml(resume / CONFIG_FILE), "out": str(resume)}
    config = resolve(config_file, overrides, base=base)
    result = run(config, overwrite=overwrite, resume=resume is not None, force=force, log=echo)
    for sample in result.samples:
        echo(f"\nprompt: {sample['prompt']}\n  before: {sample['before'].strip()}\n  after:  {sample['after'].strip()}")
    val = f", val loss {result.val_loss:.4f} (best {result.best_val_loss:.4f})" if result.val_loss is not None else ""
    echo(f"\ndone: {result.steps} steps, train loss {result.train_loss:.4f}{val}")
    echo(f"model: {result.model_dir}")
    echo(f"try it: gmt-mlx generate {result.out} --prompt \"...\"")
