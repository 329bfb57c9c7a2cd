"""Compare methods (sft, gmt, random, lora, dora) on one model, data and budget.

`compare(spec)` runs every (method, mask ratio, seed) of the plan
(compare/plan.py) as a normal fine-tuning run under ``OUT/runs/<name>/``,
evaluates each saved model on the test split (loss, perplexity, generation
accuracy), evaluates the untouched base model once, and writes:

    OUT/results.json     every run's numbers and curves, and the per-method rows
    OUT/results.md       one row per method: mean ± std over seeds
    OUT/*.png            validation loss vs step and vs wall time, train loss,
                         GMT's kept fraction and mask overlap between steps

Under ``--train-mode grpo`` every run trains with GRPO on the same prompts and
rewards; validation is the mean reward of greedy answers (each run records its
own step 0, the base model), the test evaluation scores greedy answers with
the runs' rewards (mean and per reward, `reward_eval.reward_evaluation`) instead
of a loss, and the table and plots show rewards (higher is better).

(report.py builds results.md and the plots from the results dict.)

What is held equal: every run starts from the same base config (data,
sequence length, batch, accumulation, optimizer step budget, schedule shape,
warmup, evaluation cadence), and seed s gives every method the same data order.
What differs: the method, its mask ratio (gmt/random only), and its learning
rate (full-weight methods and adapters need very different ones; see
plan.DEFAULT_LEARNING_RATES).

A finished run (``model/config.json`` and ``metrics.jsonl`` present, same
config) is reused, and its evaluation too (``eval.json``), so a comparison
interrupted half-way picks up where it stopped; an interrupted run resumes
from its last checkpoint.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Tuple

from gmt_mlx import config as cfg
from gmt_mlx.compare.plan import CompareSpec, PlannedRun, plan, with_cadence
from gmt_mlx.compare.report import aggregate, render_markdown, write_plots
from gmt_mlx.config import Config
from gmt_mlx.data.sources import data_options
from gmt_mlx.errors import Interrupted, UserError
from gmt_mlx.objectives import objective_of
from gmt_mlx.run import rundir
from gmt_mlx.run.progress import format_seconds
from gmt_mlx.run.rundir import RESULTS_MD

if TYPE_CHECKING:  # annotations only: evaluate.py imports MLX, which `gmt-mlx compare --help` need not load
    from gmt_mlx.evaluation.evaluate import EvalOptions

RESULTS_JSON, EVAL_FILE, BASE_EVAL = "results.json", "eval.json", "base_eval.json"
BASE_VAL = "base_val.json"  # the base model's validation loss: every validation curve's step 0


# --------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------


def _is_finished(run_dir: Path) -> bool:
    # Finished, with its model/ (a deleted one makes the run train again). Its sums are not checked here:
    # a reused run contributes its metrics and stored evaluation, and whatever reads its model/ checks them.
    return rundir.is_finished(run_dir) and rundir.has_model(run_dir) and bool(rundir.read_metrics(run_dir))


def _check_same_config(run: PlannedRun, run_dir: Path) -> Dict[str, tuple]:
    try:
        saved = rundir.read_config(run_dir)
    except UserError:
        return {rundir.CONFIG_FILE: ("unreadable", "")}
    return cfg.diff({**Config().to_dict(), **saved}, run.config.to_dict())


def _eval_settings(spec: CompareSpec, split: str) -> dict:
    settings = {"split": split, "scorers": list(spec.scorers), "limit": spec.eval_limit, "max_tokens": spec.max_tokens}
    if rewarded(spec.base):
        settings.update(rewards=spec.base.reward, reward_weights=spec.base.reward_weights)
    return settings


def _evaluate(spec: CompareSpec, model: str, split: Optional[str], path: Path, config: Config, log) -> Optional[dict]:
    """Evaluate ``model`` on ``split`` once; reuse ``path`` when it holds the same evaluation."""
    from gmt_mlx.evaluation.evaluate import evaluate

    if split is None:
        return None
    settings = _eval_settings(spec, split)
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("settings") == settings:
            return saved
    t0 = time.perf_counter()
    result = evaluate(model, config.data, _eval_options(spec, split, config))
    result["settings"] = settings
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(path)
    acc = ", ".join(f"{k} {100 * v:.1f}%" for k, v in result.get("accuracy", {}).items() if v is not None)
    if "preference_accuracy" in result:
        what = f"preference accuracy {100 * result['preference_accuracy']:.1f}% of {result['pairs']} pairs"
    elif result.get("reward") is not None:
        each = ", ".join(f"{name} {value:.4f}" for name, value in result["rewards"].items())
        what = f"reward {result['reward']:.4f} ({each}) of {result['reward_count']} greedy answers"
    else:
        what = f"loss {result['loss']:.4f} (ppl {result['ppl']:.3f})"
    log(
        f"eval       {split}: {what}"
        + (f", accuracy {acc} of {result['count']}" if acc else "")
        + f" [{time.perf_counter() - t0:.0f} s]"
    )
    return result


def _eval_options(spec: CompareSpec, split: str, config: Config) -> EvalOptions:
    """How compare evaluates a model: the spec's generation settings and the run config's way with the data."""
    from gmt_mlx.evaluation.evaluate import EvalOptions

    grpo = rewarded(config)  # the runs' rewards score the answers; no (SFT) loss beside them
    return EvalOptions(
        split=split,
        scorers=tuple(spec.scorers),
        mask_prompt=config.mask_prompt,
        assistant_turns=config.assistant_turns,
        max_seq_length=config.max_seq_length,
        batch_size=spec.eval_batch_size,
        max_tokens=spec.max_tokens,
        limit=spec.eval_limit,
        loss=not grpo,
        rewards=config.reward if grpo else None,
        reward_weights=config.reward_weights if grpo else None,
        **data_options(config),
    )


def _base_validation(base: Config, splits: Dict[str, list], path: Path, log) -> Optional[float]:
    """The untouched model's validation loss, measured as finetune measures it (same split, batches
    and dtype): the step-0 point of every curve (LoRA starts as the base model too). Cached in ``path``."""
    import mlx.core as mx

    from gmt_mlx.data.batching import pad_id
    from gmt_mlx.evaluation.evaluate import split_loss
    from gmt_mlx.models.loading import load_base

    if "valid" not in splits or objective_of(base).validates_at_start:  # these validate at step 0 themselves
        return None
    settings = {
        key: getattr(base, key)
        for key in (
            "model",
            "data",
            "batch_size",
            "val_batches",
            "max_seq_length",
            "mask_prompt",
            "assistant_turns",
            "train_dtype",
        )
    }
    settings.update({key: value for key, value in data_options(base).items() if value})  # old caches stay valid
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError):
            saved = {}  # a damaged cache is recomputed
        if isinstance(saved, dict) and saved.get("settings") == settings and isinstance(saved.get("val_loss"), float):
            return saved["val_loss"]
    t0 = time.perf_counter()
    model, tokenizer, _, _ = load_base(base.model)
    model.set_dtype(getattr(mx, base.train_dtype))
    valid = objective_of(base).tokenize(base, {"valid": splits["valid"]}, tokenizer, lambda s: None)["valid"]
    loss = split_loss(model, valid, batch_size=base.batch_size, pad_id=pad_id(tokenizer), max_batches=base.val_batches)[
        "loss"
    ]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"settings": settings, "val_loss": loss}, indent=2))
    tmp.replace(path)
    log(f"valid: loss {loss:.4f} (step 0 of every validation curve) [{time.perf_counter() - t0:.0f} s]")
    return loss


def _with_val_loss(summary: Optional[dict], val_loss: Optional[float]) -> Optional[dict]:
    if summary is None:
        return (
            None
            if val_loss is None
            else {
                "val_loss": val_loss,
                "test_loss": None,
                "test_ppl": None,
                "test_reward": None,
                "test_rewards": {},
                "accuracy": {},
                "count": 0,
                "samples": [],
            }
        )
    return {**summary, "val_loss": val_loss}


def compare(spec: CompareSpec, *, overwrite: bool = False, log: Callable[[str], None] = print) -> dict:
    """Run (or reuse) every planned run, evaluate them, and write results.json/.md and the plots."""
    from gmt_mlx.data.sources import load_splits
    from gmt_mlx.recipes.plan import total_steps

    out = Path(spec.out)
    _check_out(spec, out)
    plan(spec)  # check every run's config before anything else
    # Fail on bad data before any model is loaded (GRPO takes prompt rows with no completion).
    splits = load_splits(spec.base.data, **data_options(spec.base), **objective_of(spec.base).load_options())
    if rewarded(spec.base) and eval_split_of(splits):  # rows its rewards cannot score, before training
        from gmt_mlx.data.prompts import split_where
        from gmt_mlx.objectives.grpo.reward_eval import check_reward_rows, limited

        split = eval_split_of(splits)
        check_reward_rows(
            limited(splits[split], spec.eval_limit), rewards_of(spec.base), split_where(spec.base.data, split)
        )
    spec = with_cadence(spec, total_steps(spec.base, len(splits["train"])), log)
    runs = plan(spec)
    eval_split = _eval_split(splits, log)
    if not overwrite:  # refuse a finished run of another config before spending time on anything
        _refuse_changed_runs(runs, out)
    (out / "runs").mkdir(parents=True, exist_ok=True)

    base_eval = _evaluate(
        spec, spec.base.model, eval_split, out / BASE_EVAL, spec.base, lambda s: log(f"[base model] {s}")
    )
    base_val = _base_validation(spec.base, splits, out / BASE_VAL, lambda s: log(f"[base model] {s}"))
    started = time.perf_counter()
    summaries, trained = _run_all(
        spec, runs, eval_split, base_eval, base_val, started=started, overwrite=overwrite, log=log
    )
    base = _with_val_loss(summarize_eval(base_eval), base_val)
    if rewarded(spec.base) and base is not None:  # every run's step 0 is the base model's val reward
        steps0 = [point[2] for s in summaries for point in s["curves"]["val"][:1] if point[0] == 0]
        base["val_reward"] = steps0[0] if steps0 else None
    results = {
        "spec": describe_spec(spec, eval_split),
        "base": base,
        "runs": summaries,
        "rows": aggregate(summaries, spec.scorers, reward_names(spec)),
        "wall_time": time.perf_counter() - started,
    }
    _write_results(results, out)
    log(
        f"\ncompare done: {len(runs)} runs ({len(runs) - trained} reused) in "
        f"{format_seconds(time.perf_counter() - started)}; see {out / RESULTS_MD}"
    )
    return results


def _check_out(spec: CompareSpec, out: Path) -> None:
    """Refuse an empty spec, and an --out that is a file or a folder of something other than a comparison."""
    if not spec.methods or not spec.seeds:
        raise UserError("compare needs at least one method and one seed")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "runs").is_dir() and not (out / RESULTS_JSON).is_file():
        raise UserError(f"--out {out} is a non-empty folder that is not a gmt-mlx comparison; choose another")


def eval_split_of(splits: Dict[str, list]) -> Optional[str]:
    """The split every model is evaluated on: test, else valid, else None."""
    return "test" if "test" in splits else ("valid" if "valid" in splits else None)


def reward_names(spec: CompareSpec) -> List[str]:
    """The rewards a GRPO comparison scores with, in --reward's order; [] for the other objectives."""
    return rewards_of(spec.base).names if rewarded(spec.base) else []


def rewarded(config: Config) -> bool:
    """Whether the objective's runs are measured by their rewards (GRPO): the answers scored, no loss beside."""
    return objective_of(config).measure == "reward"


def rewards_of(base: Config):
    """The comparison's rewards (`parse_rewards`)."""
    from gmt_mlx.objectives.grpo.rewards import parse_rewards

    return parse_rewards(base.reward, base.reward_weights)


def _eval_split(splits: Dict[str, list], log: Callable[[str], None]) -> Optional[str]:
    """The split every model is evaluated on (test, else valid, else None), with a warning for each missing one."""
    eval_split = eval_split_of(splits)
    if "valid" not in splits:
        log("warning: no valid.jsonl: no validation-loss curves")
    if eval_split != "test":
        log(f"warning: no test.jsonl: evaluating on {eval_split or 'nothing'}")
    return eval_split


def _refuse_changed_runs(runs: List[PlannedRun], out: Path) -> None:
    """UserError when a finished run under ``out`` was made with another config than the plan's."""
    for run in runs:
        run_dir = out / "runs" / run.name
        if _is_finished(run_dir) and (diff := _check_same_config(run, run_dir)):
            keys = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
            raise UserError(
                f"{run_dir} holds a finished run with a different config ({keys}); "
                f"use another --out or pass --overwrite"
            )


def _run_all(
    spec: CompareSpec,
    runs: List[PlannedRun],
    eval_split: Optional[str],
    base_eval: Optional[dict],
    base_val: Optional[float],
    *,
    started: float,
    overwrite: bool,
    log: Callable[[str], None],
) -> Tuple[List[dict], int]:
    """Train (or reuse) and evaluate every run in turn, with progress and an ETA: (summaries, runs trained)."""
    out = Path(spec.out)
    trained_time, trained = 0.0, 0
    summaries = []
    for i, run in enumerate(runs, start=1):
        run_dir = out / "runs" / run.name
        reuse = _is_finished(run_dir) and not overwrite
        remaining = len(runs) - i + 1
        eta = f"ETA {format_seconds(trained_time / trained * remaining)}" if trained else "ETA ?"
        log(
            f"\n=== compare {i}/{len(runs)}: {run.name} (lr {run.config.learning_rate:g}) | "
            f"elapsed {format_seconds(time.perf_counter() - started)} | {eta}"
            + (" | finished earlier, reused" if reuse else "")
        )
        if not reuse:
            trained_time += _train(run, run_dir, overwrite=overwrite, log=log)
            trained += 1
        evaluation = _evaluate(spec, str(run_dir), eval_split, run_dir / EVAL_FILE, run.config, log)
        if evaluation is not None and base_eval is not None:  # preference runs: DPO's numbers against the base
            from gmt_mlx.evaluation.evaluate import against_base

            evaluation = {**evaluation, **against_base(evaluation, base_eval, run.config.to_dict())}
        if not reuse and evaluation is not None:
            trained_time += evaluation.get("wall_time", 0.0)  # the ETA counts a run's evaluation with its training
        summaries.append(summarize_run(run, run_dir, evaluation, base_val_loss=base_val))
    return summaries, trained


def _train(run: PlannedRun, run_dir: Path, *, overwrite: bool, log: Callable[[str], None]) -> float:
    """Fine-tune one planned run (resuming its checkpoint if it has one); the seconds it took."""
    import mlx.core as mx

    from gmt_mlx.recipes.finetune import finetune

    t0 = time.perf_counter()
    (run_dir / EVAL_FILE).unlink(missing_ok=True)  # it described the model being replaced
    mx.reset_peak_memory()
    try:
        finetune(run.config, overwrite=overwrite and run_dir.exists(), log=log)
    except Interrupted:
        raise Interrupted(
            f"comparison interrupted during {run.name} (its checkpoint is saved); run the same "
            f"compare command again to resume: finished runs are reused"
        ) from None
    return time.perf_counter() - t0


def _write_results(results: dict, out: Path) -> None:
    """results.json, results.md and the plots (their paths go into ``results["plots"]``)."""
    (out / RESULTS_JSON).write_text(json.dumps(results, indent=2))
    (out / RESULTS_MD).write_text(render_markdown(results))
    results["plots"] = [str(p) for p in write_plots(results, out)]


# --------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------


def _median(values: List[float]) -> Optional[float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(values) if values else None


def _mean(values: List[Optional[float]]) -> Optional[float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def summarize_eval(evaluation: Optional[dict]) -> Optional[dict]:
    """The numbers of an evaluation that results.json keeps (and its first three answers)."""
    if evaluation is None:
        return None
    items = evaluation.get("items") or evaluation.get("reward_items", [])
    return {
        "test_loss": evaluation.get("loss"),
        "test_ppl": evaluation.get("ppl"),
        "test_preference_accuracy": evaluation.get("preference_accuracy"),
        "test_margin": evaluation.get("margin"),
        "test_reward_accuracy": evaluation.get("reward_accuracy"),
        "test_dpo_loss": evaluation.get("dpo_loss"),
        "test_reward": evaluation.get("reward"),
        "test_rewards": evaluation.get("rewards", {}),
        "reward_count": evaluation.get("reward_count", 0),
        "accuracy": evaluation.get("accuracy", {}),
        "count": evaluation.get("count", 0),
        "samples": [{k: item[k] for k in ("prompt", "reference", "answer")} for item in items[:3]],
    }


def step_speeds(train: List[dict], evals: List[dict], steps_per_save: int) -> List[float]:
    """The tokens/s of the report steps that measured training alone.

    A report's rate is that of its one step, timed from the end of the step before. Left out:
    the first report (compilation), and steps that follow a validation pass or a checkpoint
    save (their time includes it). What remains still holds the odd step that compiles a new
    batch width: take the median.
    """
    after = {r["step"] + 1 for r in evals}
    if steps_per_save > 0:
        after |= {r["step"] + 1 for r in train if r["step"] % steps_per_save == 0}
    clean = [r for r in train[1:] if r["step"] not in after]
    # With a validation after every step nothing is clean: use what there is (marked noisy: < 4 samples).
    chosen = clean or train[1:] or train
    return [v for v in (r.get("tokens_per_sec") for r in chosen) if v is not None and math.isfinite(v) and v > 0]


def speed_spread(speeds: List[float]) -> Optional[float]:
    """Interquartile range over the median of per-step speeds (None with fewer than 4 of them)."""
    if len(speeds) < 4:
        return None
    q1, _, q3 = statistics.quantiles(speeds, n=4)
    return (q3 - q1) / statistics.median(speeds)


def summarize_run(
    run: PlannedRun, run_dir: Path, evaluation: Optional[dict], base_val_loss: Optional[float] = None
) -> dict:
    """One run's numbers (from metrics.jsonl and eval.json) and its curves.

    ``base_val_loss`` (the untouched model's) starts the validation curve at step 0 when the
    run did not record a step-0 evaluation itself.
    """
    records = rundir.read_metrics(run_dir)
    train = [r for r in records if r.get("type") == "train" and not r.get("skipped")]
    evals = [r for r in records if r.get("type") == "eval"]
    setup = [r for r in records if r.get("type") == "setup"]
    trainable = setup[-1]["trainable_params"] if setup else None
    total = setup[-1]["total_params"] if setup else None
    kept = _mean([r.get("kept_fraction") for r in train])
    speeds = step_speeds(train, evals, run.config.steps_per_save)
    share = trainable / total if trainable and total else None
    val_curve = [[r["step"], r.get("wall_time"), r["val_loss"]] for r in evals]
    grpo = rewarded(run.config)
    if grpo:  # the greedy answers' mean reward (its val_loss is minus it), higher is better
        val_curve = [[r["step"], r.get("wall_time"), r.get("val_reward")] for r in evals]
    if base_val_loss is not None and not (val_curve and val_curve[0][0] == 0):
        val_curve.insert(0, [0, 0.0, base_val_loss])
    rewards = [r.get("val_reward") for r in evals if r.get("val_reward") is not None]
    summary = {
        "name": run.name,
        "group": run.group,
        "method": run.method,
        "mask_ratio": run.mask_ratio,
        "seed": run.seed,
        "learning_rate": run.config.learning_rate,
        "steps": train[-1]["step"] if train else 0,
        "final_val_loss": evals[-1]["val_loss"] if evals else None,
        "best_val_loss": min(r["val_loss"] for r in evals) if evals else None,
        "final_val_reward_accuracy": evals[-1].get("val_reward_accuracy") if evals else None,
        "final_val_reward": rewards[-1] if grpo and rewards else None,
        "best_val_reward": max(rewards) if grpo and rewards else None,
        "tokens_per_sec": _median(speeds),
        "tokens_per_sec_samples": len(speeds),
        "tokens_per_sec_spread": speed_spread(speeds),
        "wall_time": train[-1]["wall_time"] if train else None,
        "peak_memory_gb": max((r.get("peak_memory_gb") or 0.0) for r in train) if train else None,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_share": share,
        "updated_share": share * kept if share is not None and kept is not None else None,
        "kept_fraction": kept,
        "mask_overlap": _mean([r.get("mask_overlap") for r in train]),
        "curves": {
            "val": val_curve,
            # GRPO adds the rollouts' mean reward (sampled, at the run's temperature).
            "train": [
                [
                    r["step"],
                    r.get("wall_time"),
                    r["loss"],
                    r.get("kept_fraction"),
                    r.get("mask_overlap"),
                    *([r.get("reward")] if grpo else []),
                ]
                for r in train
            ],
        },
    }
    summary.update(
        summarize_eval(evaluation)
        or {
            "test_loss": None,
            "test_ppl": None,
            "accuracy": {},
            "count": 0,
            "test_reward": None,
            "test_rewards": {},
            "samples": [],
        }
    )
    return summary


def describe_spec(spec: CompareSpec, eval_split: Optional[str]) -> dict:
    """What a comparison held equal and what it varied, for results.json and the results.md header."""
    base = spec.base
    return {
        "model": base.model,
        "data": base.data,
        "out": str(spec.out),
        "methods": spec.methods,
        "seeds": spec.seeds,
        "mask_ratios": spec.mask_ratios,
        "train_mode": base.train_mode,
        "objective": objective_of(base).describe(base.to_dict()),
        "learning_rates": {m: spec.learning_rate(m) for m in spec.methods},
        "steps": base.iters if base.epochs is None else f"{base.epochs} epochs",
        "steps_per_eval": base.steps_per_eval,
        "steps_per_report": base.steps_per_report,
        "batch_size": base.batch_size,
        "grad_accumulation_steps": base.grad_accumulation_steps,
        "lr_schedule": base.lr_schedule,
        "warmup_steps": base.warmup_steps,
        "min_lr_ratio": base.min_lr_ratio,
        "optimizer": base.optimizer,
        "mask_prompt": base.mask_prompt,
        "max_seq_length": base.max_seq_length,
        "mask_scope": base.mask_scope,
        "mask_target": base.mask_target,
        "lora": {
            "rank": base.lora_rank,
            "scale": base.lora_scale,
            "dropout": base.lora_dropout,
            "keys": base.lora_keys or "all linear layers",
            "num_layers": base.num_layers,
        },
        "eval": {
            "split": eval_split,
            "scorers": spec.scorers,
            "limit": spec.eval_limit,
            "max_tokens": spec.max_tokens,
            "decoding": "greedy",
            "rewards": reward_names(spec),
            "reward_weights": rewards_of(base).weights if rewarded(base) else [],
        },
        "command": spec.command,
        "base_config": base.to_dict(),
    }
