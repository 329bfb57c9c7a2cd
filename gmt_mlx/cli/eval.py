"""`gmt-mlx eval`: loss, perplexity and generation accuracy of a model or run on a data split."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from gmt_mlx.cli.common import echo, eval_option, run_option, user_errors
from gmt_mlx.config import eval_default

if TYPE_CHECKING:  # annotations only: like every command, eval imports the library (and MLX) when it runs
    from gmt_mlx.evaluation.evaluate import EvalOptions


_OWN_DATA = "a run's own, for its own data"


@user_errors
def eval_command(
    model: Annotated[
        str, typer.Argument(metavar="MODEL", help="A run directory, HF folder, GGUF file, Hub id or 'smollm2-135m'.")
    ],
    data: run_option("data", "a run's own --data") = None,
    columns: run_option("columns", _OWN_DATA) = None,
    data_config: run_option("data_config", _OWN_DATA) = None,
    data_splits: run_option("data_splits", _OWN_DATA) = None,
    split: eval_option("split") = eval_default("split"),
    scorer: eval_option("scorer") = None,
    reward: run_option("reward", "a GRPO run's own") = None,
    reward_weights: run_option("reward_weights", "1 each") = None,
    max_tokens: eval_option("max_tokens") = None,
    batch_size: eval_option("batch_size") = eval_default("batch_size"),
    limit: eval_option("limit") = None,
    mask_prompt: eval_option("mask_prompt") = None,
    loss: Annotated[bool, typer.Option("--loss/--no-loss", help="Compute loss and perplexity.")] = True,
    generate: Annotated[bool, typer.Option("--generate/--no-generate", help="Generate answers and score them.")] = True,
    out: Annotated[
        Optional[Path],
        typer.Option("--out", "-o", help="Write the full result (every item's answer and scores) to this JSON file."),
    ] = None,
    show: Annotated[int, typer.Option(help="Print this many scored answers.")] = 3,
    baseline: Annotated[
        bool,
        typer.Option(
            "--baseline",
            help="A run only: also evaluate the base model it was tuned from, on the same rows, "
            "and print base -> tuned with before/after answers.",
        ),
    ] = False,
) -> None:
    """Evaluate a model or a fine-tuned run: loss/perplexity on a split and generation accuracy."""
    from gmt_mlx.evaluation.evaluate import evaluate, evaluate_with_base

    check_model_path(model)
    options = eval_options(
        split=split,
        scorer=scorer,
        max_tokens=max_tokens,
        batch_size=batch_size,
        limit=limit,
        mask_prompt=mask_prompt,
        loss=loss,
        generate=generate,
        columns=columns,
        data_config=data_config,
        data_splits=data_splits,
        reward=reward,
        reward_weights=reward_weights,
    )
    if baseline:
        results = evaluate_with_base(model, data, options, on_model=_report_model, on_batch=_report_batch)
        print_comparison(
            results, results["tuned"].get("scorers", []), show=show, max_tokens=results["tuned"].get("max_tokens")
        )
        _write_json(out, results)
        return
    result = evaluate(model, data, options, on_batch=_report_batch)
    print_result(result, options, show=show)
    _write_json(out, result)


def check_model_path(model: str) -> None:
    """A model typed as a local path (runs/typo, ./x, a .gguf) must exist: said first, before the
    "--data is required" that a missing run directory would otherwise lead to (it has no data of its own)."""
    from gmt_mlx.errors import UserError
    from gmt_mlx.hub import looks_like_path

    if looks_like_path(model) and not Path(model).expanduser().exists():
        # Worded as generate's and finetune's missing model (models.resolve), with a run directory first.
        raise UserError(
            f"{model}: no such folder or file (expected a run directory, a model folder with "
            "config.json, a .gguf file, a Hub id owner/name or 'smollm2-135m')"
        )


def eval_options(
    *,
    split: str,
    scorer: Optional[str],
    max_tokens: Optional[int],
    batch_size: int,
    limit: Optional[int],
    mask_prompt: Optional[bool],
    loss: bool,
    generate: bool,
    columns: Optional[str],
    data_config: Optional[str],
    data_splits: Optional[str],
    reward: Optional[str] = None,
    reward_weights: Optional[str] = None,
) -> EvalOptions:
    """The command's options as one `EvalOptions`, checked (UserError naming the flag)."""
    from gmt_mlx.data.scorers import parse_scorers
    from gmt_mlx.errors import UserError
    from gmt_mlx.evaluation.evaluate import EvalOptions
    from gmt_mlx.objectives.grpo.rewards import parse_rewards

    if limit is not None and limit < 0:
        raise UserError(f"--limit must be 0 or more, got {limit}")
    if (max_tokens is not None and max_tokens < 1) or batch_size < 1:
        raise UserError("--max-tokens and --batch-size must be at least 1")
    if reward_weights is not None and reward is None:
        raise UserError("--reward-weights needs --reward (one weight per reward)")
    if reward is not None:
        parse_rewards(reward, reward_weights)  # unknown names, bad weights: one line, before anything loads
    return EvalOptions(
        split=split,
        scorers=tuple(parse_scorers(scorer)) if scorer is not None else None,
        mask_prompt=mask_prompt,
        batch_size=batch_size,
        max_tokens=max_tokens,
        limit=limit,
        loss=loss,
        generate=generate,
        columns=columns,
        data_config=data_config,
        data_splits=data_splits,
        rewards=reward,
        reward_weights=reward_weights,
    )


def _report_batch(done: int, total: int) -> None:
    # stderr: progress must not mix with the results on stdout (or in a redirected file).
    sys.stderr.write(f"generating {done}/{total}\n")
    sys.stderr.flush()


def _report_model(role: str) -> None:
    sys.stderr.write(f"evaluating the {role} model\n")
    sys.stderr.flush()


def _write_json(out: Optional[Path], result: dict) -> None:
    """--out: the full result (every item's answer and scores) as JSON."""
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    echo(f"wrote     {out}")


def print_result(result: dict, options: EvalOptions, *, show: int) -> None:
    """The first ``show`` scored answers, then the model, data, loss, each scorer's accuracy and
    the rewards, one line each."""
    for item in result.get("items", [])[:show]:
        scores = ", ".join(f"{k} {v:g}" for k, v in item["scores"].items())
        echo(
            f"prompt:    {item['prompt'].strip()}\n  answer:    {item['answer'].strip()}\n"
            f"  reference: {str(item['reference']).strip()}\n  score:     {scores}"
        )
    if not result.get("items"):
        for item in result.get("reward_items", [])[:show]:
            values = ", ".join(f"{k} {v:g}" for k, v in item["rewards"].items())
            echo(
                f"prompt:    {item['prompt'].strip()}\n  answer:    {item['answer'].strip()}\n"
                f"  reference: {str(item['reference']).strip()}\n  reward:    {item['reward']:g} ({values})"
            )
    echo(f"model     {result['model']}")
    echo(f"data      {result['data']} ({options.split}, {result['examples']} examples)")
    if "preference_accuracy" in result:
        echo(
            f"preference accuracy {100 * result['preference_accuracy']:.1f}% of {result['pairs']} pairs "
            f"(chosen answer likelier than the rejected one; mean log-prob margin {result['margin']:.3f})"
        )
    if "loss" in result:
        echo(
            f"loss      {result['loss']:.4f} (perplexity {result['ppl']:.3f}, {result['tokens']} target tokens"
            f"{', completions only' if result['mask_prompt'] else ''})"
        )
    if result.get("loss_skipped"):
        echo(f"loss      skipped: {result['loss_skipped']}")
    if options.generate and "count" in result:
        if result["count"] == 0:
            echo("accuracy  skipped: the split has no prompt/answer pairs")
        for name, value in result.get("accuracy", {}).items():
            if value is not None:
                echo(
                    f"accuracy  {name}: {100 * value:.1f}% of {result['count']} "
                    f"(greedy, max {result['max_tokens']} tokens)"
                )
    for line in reward_lines(result):
        echo(line)


def reward_lines(result: dict, base: Optional[dict] = None) -> list:
    """The mean reward and each reward's mean, one line each (``base``: "base -> tuned")."""
    if result.get("reward_count") is None:
        return []
    if not result["reward_count"]:
        return ["reward    skipped: no prompts scored"]

    def shown(r: dict, key: Optional[str] = None) -> str:
        return f"{(r['reward'] if key is None else r['rewards'][key]):.4f}"

    def pair(key: Optional[str] = None) -> str:
        return f"base {shown(base, key)} -> tuned {shown(result, key)}" if base else shown(result, key)

    weights = " + ".join(f"{w:g} x {n}" for n, w in zip(result["reward_names"], result["reward_weights"]))
    lines = [
        f"reward    {pair()} mean of {result['reward_count']} (greedy, max {result['max_tokens']} tokens; {weights})"
    ]
    lines += [f"  {name:<8}{pair(name)}" for name in result["reward_names"]]
    return lines


def _one_line(text: str, width: int = 100) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 3] + "..."


def print_comparison(results: dict, scorers: list, *, show: int, max_tokens: int) -> None:
    """base -> tuned: a few answers side by side, then loss and each scorer's accuracy, one line each."""
    from gmt_mlx.evaluation.evaluate import score_summary

    base, tuned = results["base"], results["tuned"]
    for before, after in list(zip(base.get("items", []), tuned.get("items", [])))[:show]:
        echo(
            f"{_one_line(after['prompt'])}   (reference: {_one_line(after['reference'])})\n"
            f"  base:  {_one_line(before['answer'])}\n  tuned: {_one_line(after['answer'])}"
        )
    if show and tuned.get("items"):
        echo("")
    echo(f"base      {base['model']}\ntuned     {tuned['model']}")
    echo(f"data      {tuned['data']} ({tuned['split']}, {tuned['examples']} examples)")
    if "preference_accuracy" in tuned:
        echo(
            f"preference accuracy base {100 * base['preference_accuracy']:.1f}% -> tuned "
            f"{100 * tuned['preference_accuracy']:.1f}% of {tuned['pairs']} pairs (log-prob margin "
            f"{base['margin']:.3f} -> {tuned['margin']:.3f})"
        )
        if tuned.get("reward_accuracy") is not None:
            echo(f"reward accuracy {100 * tuned['reward_accuracy']:.1f}% (DPO's, with the base as the reference)")
    if "loss" in tuned:
        echo(
            f"loss      base {base['loss']:.4f} -> tuned {tuned['loss']:.4f} "
            f"(perplexity {base['ppl']:.2f} -> {tuned['ppl']:.2f})"
        )
    for line in reward_lines(tuned, base):
        echo(line)
    if "count" in tuned and tuned["count"] == 0:
        echo("accuracy  skipped: the split has no prompt/answer pairs")
    elif "count" in tuned:
        for name in scorers:
            gain = 100 * (tuned["accuracy"][name] - base["accuracy"][name])
            echo(
                f"{name:<9} base {score_summary(base, name)} -> tuned {score_summary(tuned, name)}: "
                f"{gain:+.0f} points (greedy, max {max_tokens} tokens)"
            )
