"""`gmt-mlx finetune`: parse options, resolve the config, call the library."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated, Any, Dict, Optional

import typer

from gmt_mlx.cli.common import echo, user_errors, with_config_options


@with_config_options
@user_errors
def finetune(
    config_file: Annotated[
        Optional[Path], typer.Option("--config", "-c", help="YAML file of options (flags override it).")
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing run in --out.")] = False,
    resume: Annotated[
        Optional[Path],
        typer.Option(
            "--resume",
            help="Continue the run in this directory from its newest complete checkpoint "
            "(its config.yaml is the base; flags override it).",
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Resume even when the config differs from the run's.")] = False,
    overrides: Dict[str, Any] = None,
) -> None:
    """Fine-tune a model with GMT (or sft / random / lora / dora) and write a run directory.

    Re-running with the same --out resumes an interrupted run of the same config.
    """
    from gmt_mlx.config import resolve
    from gmt_mlx.objectives import objective_of
    from gmt_mlx.recipes.finetune import finetune as run

    base, resuming = None, resume is not None
    if resume is not None:
        base = _resume_base(resume, overrides, config_file)
        resuming = resume.exists()
    config = resolve(config_file, overrides, base=base)
    result = run(config, overwrite=overwrite, resume=resuming, force=force, log=echo)
    val = ""
    if result.val_loss is not None:  # GRPO's "val loss" is minus the mean reward: it shows the reward
        shown = objective_of(config).shown_validation
        name, value = shown(result.val_loss)
        # None when no validation was finite (a NaN is never the best)
        best = "" if result.best_val_loss is None else f" (best {shown(result.best_val_loss)[1]:.4f})"
        val = f", {name} {value:.4f}{best}"
    if result.already_finished:
        echo(f"{result.out} is already finished; nothing changed")
        echo(f"finished: {result.steps} steps, train loss {result.train_loss:.4f}{val}")
        echo(f"model: {result.model_dir}")
        return
    for sample in result.samples:
        echo(f"\nprompt: {sample['prompt']}\n  before: {sample['before'].strip()}\n  after:  {sample['after'].strip()}")
    echo(f"\ndone: {result.steps} steps, train loss {result.train_loss:.4f}{val}")
    echo(f"model: {result.model_dir}")
    echo(f"try it: gmt-mlx generate {result.out} --prompt {shlex.quote(_example_prompt(config, result.samples))}")


def _resume_base(resume: Path, overrides: Dict[str, Any], config_file: Optional[Path]) -> Dict[str, Any]:
    """The options `--resume RUN_DIR` starts from: the run's own config, or only its --out when nothing was saved."""
    from gmt_mlx.errors import UserError
    from gmt_mlx.run.rundir import has_trained, is_empty, is_run_dir, run_config

    if overrides.get("out") not in (None, str(resume)):
        raise UserError("--resume RUN_DIR and --out must name the same folder (or leave --out out)")
    full_command = bool(overrides.get("data") or config_file)
    if not resume.exists() and full_command:
        # Killed before the folder existed: with the full command, resuming it is starting it.
        echo(f"nothing to resume in {resume} yet (no such folder): starting it")
        return {"out": str(resume)}
    if not resume.is_dir():
        raise UserError(
            f"--resume {resume}: no such folder; start the run with your original command "
            f"(gmt-mlx finetune --model ... --data ... --out {resume})"
        )
    if not is_empty(resume) and not is_run_dir(resume):
        raise UserError(f"--resume {resume}: not a gmt-mlx run (no config.yaml, no checkpoints)")
    try:
        return {**run_config(resume), "out": str(resume)}  # plan_run warns if it fell back
    except UserError as err:
        # Killed before its config was saved (or that config is lost with no checkpoint
        # holding a copy): nothing was trained, so the run can only be started, and
        # only the command that started it knows the model and data.
        if has_trained(resume):
            raise UserError(
                f"cannot resume {resume}: {err}, and no checkpoint holds a copy of the config; "
                f"pass --overwrite with your original options to start over"
            ) from None
        if not full_command:
            raise UserError(
                f"nothing to resume in {resume} yet (it stopped before its config was saved); start "
                f"it with your original command: gmt-mlx finetune --model ... --data ... --out {resume}"
            ) from None
        return {"out": str(resume)}


def _example_prompt(config, samples: list) -> str:
    """A prompt of the kind the model was trained on: a sample's, else the first held-out one."""
    from gmt_mlx.data.prompts import describe_prompt, sample_prompts
    from gmt_mlx.data.sources import data_options, load_splits
    from gmt_mlx.errors import UserError
    from gmt_mlx.objectives import objective_of

    if samples:
        return samples[0]["prompt"]
    try:
        rows = load_splits(config.data, **data_options(config), **objective_of(config).load_options())
    except UserError:
        return "..."
    prompts = sample_prompts(rows.get("test") or rows.get("valid") or rows.get("train") or [], 1)
    return describe_prompt(prompts[0]) if prompts else "..."
