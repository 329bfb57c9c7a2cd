"""`gmt-mlx compare`: run several methods on one config; table and plots."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Any, Dict, Optional

import typer

from gmt_mlx.cli.common import echo, eval_option, user_errors, with_config_options
from gmt_mlx.compare.plan import PER_RUN_KEYS
from gmt_mlx.config import COMPARE_MAX_TOKENS, eval_default


def _command_line() -> Optional[str]:
    """The command as typed (`gmt-mlx ...` or `python -m gmt_mlx ...`), for results.md."""
    program = sys.argv[0] if sys.argv else ""
    if Path(program).name == "gmt-mlx" or Path(program).parent.name == "gmt_mlx":
        return "gmt-mlx " + shlex.join(sys.argv[1:])
    return None


@with_config_options(exclude=PER_RUN_KEYS)
@user_errors
def compare(
    out: Annotated[
        Path,
        typer.Option(
            "--out", "-o", help="Comparison folder: runs/<method>[-r<ratio>]-s<seed>/, results.json, results.md, plots."
        ),
    ],
    methods: Annotated[
        str, typer.Option(help="Comma-separated methods: sft, gmt, random, lora, dora.")
    ] = "sft,gmt,lora",
    seeds: Annotated[
        str, typer.Option(help="Comma-separated seeds; each runs every method (same data order per seed).")
    ] = "0",
    mask_ratios: Annotated[
        str, typer.Option(help="Comma-separated mask ratios for gmt and random (one run each).")
    ] = "0.2",
    learning_rates: Annotated[
        Optional[str],
        typer.Option(
            help="Peak LR per method, e.g. lora=2e-4,gmt=2e-5, or one number for all.  "
            "[default: sft/gmt/random 2e-5, lora/dora 1e-4]"
        ),
    ] = None,
    scorer: Annotated[
        Optional[str],
        typer.Option(
            help="Comma-separated accuracy scorers: exact, number, gsm8k, boxed, reasoning_gym[:TASK], "
            "module:function.  [default: exact; none for grpo, whose --reward scores]"
        ),
    ] = None,
    eval_limit: eval_option("eval_limit") = eval_default("eval_limit"),
    max_tokens: Annotated[
        Optional[int],
        typer.Option(
            help="New tokens per generated answer at most (greedy).  "
            f"[default: {COMPARE_MAX_TOKENS}; grpo: --max-completion-length]"
        ),
    ] = None,
    eval_batch_size: Annotated[int, typer.Option(help="Prompts generated together.")] = eval_default("batch_size"),
    config_file: Annotated[
        Optional[Path],
        typer.Option(
            "--config",
            "-c",
            help="YAML of shared options (flags override it); "
            "it must not set method, mask_ratio, seed, learning_rate or out.",
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Re-run every run, even finished ones.")] = False,
    overrides: Dict[str, Any] = None,
) -> None:
    """Compare methods on the same model, data, seeds and step budget: results.md table and PNG plots.

    Every run is a normal fine-tuning run under OUT/runs/. Running the same
    command again resumes an interrupted comparison and reuses finished runs.
    """
    from gmt_mlx.cli.parsing import method_labels, parse_learning_rates, parse_mask_ratios, parse_methods, parse_seeds
    from gmt_mlx.compare.plan import CADENCE_KEYS, CompareSpec, check_base
    from gmt_mlx.compare.recipe import compare as run
    from gmt_mlx.config import load_yaml, resolve
    from gmt_mlx.data.scorers import parse_scorers
    from gmt_mlx.errors import UserError
    from gmt_mlx.run.rundir import RESULTS_MD

    from_yaml = load_yaml(config_file) if config_file is not None else {}
    if config_file is not None:
        check_base(from_yaml, str(config_file))
    if eval_limit < 0 or (max_tokens is not None and max_tokens < 1) or eval_batch_size < 1:
        raise UserError("--eval-limit must be 0 or more; --max-tokens and --eval-batch-size at least 1")
    spec = CompareSpec(
        base=resolve(config_file, overrides),
        out=out,
        methods=parse_methods(methods),
        seeds=parse_seeds(seeds),
        labels=method_labels(methods),
        mask_ratios=parse_mask_ratios(mask_ratios),
        learning_rates=parse_learning_rates(learning_rates),
        scorers=parse_scorers(scorer) if scorer is not None else None,
        eval_limit=eval_limit,
        max_tokens=max_tokens,
        eval_batch_size=eval_batch_size,
        command=_command_line(),
        # Unless set, compare reports and validates often enough to draw a curve.
        auto_cadence=tuple(k for k in CADENCE_KEYS if overrides.get(k) is None and k not in from_yaml),
    )
    results = run(spec, overwrite=overwrite, log=echo)
    echo("")
    echo((out / RESULTS_MD).read_text().split("\n## Plots")[0])
    echo(f"plots: {', '.join(Path(p).name for p in results['plots'])}")
