"""What a run leaves: metrics and checkpoints while it trains (RunLogger), model/, samples and card at the end.

RunLogger holds the loop's callbacks: progress, the metrics records (to
metrics.jsonl and the --report-to trackers, one logger interface:
run/tracking.py), periodic and best checkpoints, validation. Every rank runs
them (validation is sharded over the ranks); only rank 0 prints, writes and
saves.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import mlx.core as mx
import numpy as np

from gmt_mlx.config import Config
from gmt_mlx.core.distributed import is_main
from gmt_mlx.core.optim import MASK_SAMPLE_KEY
from gmt_mlx.core.trainer import StepResult
from gmt_mlx.data.prompts import describe_prompt, sample_prompts
from gmt_mlx.evaluation.evaluate import generate_text, split_loss
from gmt_mlx.models.hf import save_hf_model
from gmt_mlx.platform.blas import arithmetic
from gmt_mlx.publish.push import publish_run
from gmt_mlx.recipes.setup import Setup
from gmt_mlx.run import checkpoint as ckpt
from gmt_mlx.run import final, rundir, tracking
from gmt_mlx.run.progress import Progress


@dataclass
class RunResult:
    out: Path
    model_dir: Path
    steps: int
    train_loss: float
    val_loss: Optional[float]
    best_val_loss: Optional[float]
    samples: list
    resumed_from: Optional[int] = None
    model: Any = field(default=None, repr=False)  # the trained model, in memory
    already_finished: bool = False  # --resume of a finished run: nothing was done


def finished_result(out: Path) -> RunResult:
    """A finished run's result as its files record it (nothing is loaded or written)."""
    train, evals = rundir.read_metrics(out, "train"), rundir.read_metrics(out, "eval")
    # As RunLogger counts them: the step-0 model's validation (DPO, GRPO) is never the best, nor is a NaN.
    val_losses = [r["val_loss"] for r in evals if isinstance(r.get("val_loss"), (int, float)) and r.get("step") != 0]
    finite = [v for v in val_losses if math.isfinite(v)]
    samples = rundir.read_samples(out)  # absent (--samples 0) or damaged: [] (the samples are only shown)
    return RunResult(
        out,
        rundir.model_dir(out),
        rundir.last_step(out) or 0,
        train[-1].get("loss", float("nan")) if train else float("nan"),
        val_losses[-1] if val_losses else None,
        min(finite) if finite else None,
        samples,
        already_finished=True,
    )


def samples_before(config: Config, run: Setup, out: Path, *, fresh: bool, log=print) -> Tuple[list, List[str]]:
    """Sample prompts and the untrained model's answers; a resumed run reuses the ones its first start saved."""
    rows = run.rows.get("test") or run.rows.get("valid") or []
    prompts = sample_prompts(rows, config.samples) if config.samples else []
    if not fresh and prompts:
        saved = rundir.read_samples_before(out, len(prompts))
        if saved is not None:
            return prompts, saved
        # The model is trained now: the untrained answers cannot be made again.
        log(
            f"warning: {out / rundir.SAMPLES_BEFORE_FILE} is missing or damaged; the samples show the answers "
            "before training as not recorded"
        )
    before = (
        [generate_text(run.model, run.tokenizer, p) for p in prompts] if fresh else ["(not recorded)"] * len(prompts)
    )
    if fresh:
        rundir.write_samples_before(out, before)
    return prompts, before


def save_final(
    config: Config, run: Setup, out: Path, logger: "RunLogger", prompts: list, before: List[str], start_step: int, log
) -> RunResult:
    """Write model/ and samples.json, then the model card (and the --push-to-hub upload), then finished.json."""
    model_dir = save_hf_model(
        rundir.model_dir(out), run.model, run.tokenizer, run.model_config, dtype=config.dtype, base_path=run.model_path
    )
    ckpt.fault("after-model")  # kill here (tests): model/ written, the rest not
    after = [generate_text(run.model, run.tokenizer, p) for p in prompts]
    samples = [{"prompt": describe_prompt(p), "before": b, "after": a} for p, b, a in zip(prompts, before, after)]
    if samples:
        rundir.write_samples(out, samples)
    publish_run(out, model_dir, config, step=run.steps, origin=run.origin, log=log)
    final.write_finished(out, run.steps)  # last: a run killed before it is completed on resume
    return logger.result(model_dir, samples, start_step)


class RunLogger:
    """The loop's callbacks: progress, metrics.jsonl (and --report-to trackers), periodic checkpoints,
    validation and the best checkpoint.

    Every rank runs them (validation is sharded over the ranks); only rank 0
    (``main``) prints, writes metrics and saves.
    """

    def __init__(
        self,
        config: Config,
        run: Setup,
        out: Path,
        group,
        *,
        best_val: Optional[float],
        start_step: int = 0,
        on_validation: Optional[Callable[[int, Any, dict], None]] = None,
    ):
        resumed = start_step > 0
        self.on_validation = on_validation
        self.config, self.run, self.out, self.group = config, run, out, group
        self.main = is_main(group)
        self.best_val = best_val
        self.last: Dict[str, float] = {}  # the latest train loss and val loss
        self.checkpoints = RunCheckpoints(config, run, out)
        self.trained_tokens = 0  # real (unpadded) tokens drawn by this start
        self.progress = Progress(run.steps, every=config.steps_per_report)
        self.t_start = time.perf_counter()
        self.window_start, self.window_tokens = self.t_start, 0  # tokens/s over the last step
        self.previous_mask: Optional[np.ndarray] = None
        self.mask_overlap: Optional[float] = None
        # metrics.jsonl and the --report-to trackers (TensorBoard / wandb get a copy of each record); rank 0 only.
        self.logs = tracking.Trackers()
        if self.main:
            self.logs = tracking.open_run_logs(
                config.report_to, out, config.to_dict(), resume_step=start_step if resumed else None
            )
        if resumed:  # a resume straight to the final save still reports the run's last losses
            for kind, key in (("train", "loss"), ("eval", "val_loss")):
                record = rundir.last_record(out, kind)
                if record is not None and isinstance(record.get(key), (int, float)):
                    self.last[key] = record[key]
        else:  # a resumed run keeps the first start's record
            self.write(
                {
                    "type": "setup",
                    "step": 0,
                    "trainable_params": run.sizes["trainable"],
                    "total_params": run.sizes["total"],
                    "total_steps": run.steps,
                }
            )

    def write(self, record: dict) -> None:
        self.logs.log(record)

    def close(self) -> None:
        self.logs.close()

    def count_tokens(self, tokens: int) -> None:
        self.trained_tokens += tokens

    def result(self, model_dir: Path, samples: list, start_step: int) -> RunResult:
        return RunResult(
            self.out,
            model_dir,
            self.run.steps,
            self.last.get("loss", float("nan")),
            self.last.get("val_loss"),
            self.best_val,
            samples,
            start_step or None,
            self.run.model,
        )

    @property
    def saved_step(self) -> int:
        return self.checkpoints.saved_step

    def save(self, step: int) -> Path:
        """Checkpoint the full training state at ``step``, then prune old step checkpoints."""
        return self.checkpoints.save(step, self.best_val)

    def _update_mask_overlap(self) -> None:
        # Share of this step's kept entries (on a fixed sample of positions) that the
        # previous step kept too: 1 - mask_ratio for independent masks, near 1 for sticky ones.
        sample = self.run.optimizer.state.get(MASK_SAMPLE_KEY)
        if sample is None:
            return
        current = np.array(sample)
        previous, self.previous_mask = self.previous_mask, current
        if previous is not None and previous.shape == current.shape and current.any():
            self.mask_overlap = float((current & previous).sum() / current.sum())

    def on_step(self, result: StepResult) -> None:
        config, steps = self.config, self.run.steps
        now = time.perf_counter()
        tps = (self.trained_tokens - self.window_tokens) / max(now - self.window_start, 1e-9)
        self.window_start, self.window_tokens = now, self.trained_tokens
        kept_fraction = result.kept / self.run.sizes["trainable"]
        if not result.skipped:
            self._update_mask_overlap()
        self.last["loss"] = result.loss
        if self.group.size() > 1:
            ckpt.fault(f"rank{self.group.rank()}:after-step:{result.step}")  # kill one rank (tests)
        if not self.main:
            return
        if result.skipped:
            self.progress.message(f"step {result.step}: non-finite loss or gradient, update skipped")
        shown = {"acc": round(result.metrics["reward_accuracy"], 3)} if "reward_accuracy" in result.metrics else {}
        if "reward" in result.metrics:  # GRPO: the sampled completions' mean reward
            shown = {"reward": round(result.metrics["reward"], 3)}
        self.progress.update(result.step, loss=result.loss, **shown, tok_s=round(tps), kept=round(kept_fraction, 3))
        if result.step % config.steps_per_report == 0 or result.step == steps or result.skipped:
            self.write(
                {
                    "type": "train",
                    "step": result.step,
                    "loss": result.loss,
                    **result.metrics,
                    "learning_rate": result.learning_rate,
                    "tokens_per_sec": tps,
                    "kept_fraction": kept_fraction,
                    "mask_overlap": self.mask_overlap,
                    "grad_norm": result.grad_norm,
                    "skipped": result.skipped,
                    "trained_tokens": self.trained_tokens,
                    "peak_memory_gb": mx.get_peak_memory() / 1e9,
                    "memory_estimate_gb": self.run.memory.total / 1e9,
                    "wall_time": now - self.t_start,
                }
            )
        # A skipped (non-finite) step changed nothing: the last good checkpoint stays as it is.
        if (
            config.steps_per_save > 0
            and not result.skipped
            and (result.step % config.steps_per_save == 0 or result.step == steps)
        ):
            self.save(result.step)
        ckpt.fault(f"after-step:{result.step}")

    def on_eval(self, step: int, initial: bool = False) -> None:
        """Validate at ``step``; ``initial``: the step-0 model, reported but never the best checkpoint."""
        if self.run.valid_split is None:
            return
        # Every rank evaluates its share; only rank 0 reports and saves.
        if self.run.session.validate is not None:  # GRPO: the greedy answers' mean reward (every rank: all of it)
            result = self.run.session.validate(self.run.model)
        else:
            result = split_loss(
                self.run.model,
                self.run.valid_split,
                batch_size=self.config.batch_size,
                pad_id=self.run.pad_id,
                max_batches=self.config.val_batches,
                group=self.group,
                loss_fn=self.run.loss_fn,
            )
        if not self.main:
            return
        improved = (
            not initial
            and math.isfinite(result["loss"])  # a NaN validation loss is never the best
            and (self.best_val is None or result["loss"] < self.best_val)
        )
        self.progress.message(f"step {step}: {describe_validation(result)}" + (" *best*" if improved else ""))
        metrics = {f"val_{k}": v for k, v in result.items() if k not in ("loss", "tokens", "ppl")}
        self.write(
            {
                "type": "eval",
                "step": step,
                "val_loss": result["loss"],
                "val_ppl": result["ppl"],
                **metrics,
                "wall_time": time.perf_counter() - self.t_start,
            }
        )
        if not initial:
            self.last["val_loss"] = result["loss"]
            if improved:
                self.best_val = result["loss"]
                if self.config.save_best:
                    self.checkpoints.save_best(step, result["loss"], self.best_val)
        if self.on_validation is not None:
            self.on_validation(step, self.run.model, {**result, "best": improved})


def describe_validation(result: dict) -> str:
    """A validation result in a few words for the progress output."""
    if "reward" in result:  # GRPO: the greedy answers' mean reward ("loss" is its negative)
        return f"val reward {result['reward']:.4f}"
    if result["ppl"] is not None:
        exact = f", exact {result['exact_match']:.1%}" if "exact_match" in result else ""
        return f"val loss {result['loss']:.4f} (ppl {result['ppl']:.2f}{exact})"
    return (
        f"val loss {result['loss']:.4f} (reward accuracy {result['reward_accuracy']:.3f}, "
        f"margin {result['reward_margin']:.3f})"
    )


class RunCheckpoints:
    """A run's step checkpoints (the newest ``keep_checkpoints`` kept) and its best-validation checkpoint."""

    def __init__(self, config: Config, run: Setup, out: Path):
        self.config, self.run, self.out = config, run, out
        self.saved_step = -1  # the step of the newest step checkpoint this start saved
        self.arithmetic = arithmetic()  # the device and BLAS: a resume under others is refused (plan.check_arithmetic)

    def save(self, step: int, best_val: Optional[float]) -> Path:
        """Checkpoint the full training state at ``step``, then prune old step checkpoints."""
        path = self._write(rundir.step_dir(self.out, step), step, best_val)
        self.saved_step = step
        rundir.prune(self.out, self.config.keep_checkpoints)
        return path

    def save_best(self, step: int, val_loss: float, best_val: float) -> None:
        best = rundir.best_dir(self.out)
        if self.saved_step != step:
            self._write(best, step, best_val, val_loss=val_loss)
            return
        # This step was just saved: link its files instead of writing them twice. The
        # linked copy must say it is the best one (a fresh state.json, not a link).
        ckpt.link_checkpoint(rundir.step_dir(self.out, step), best)
        state = ckpt.read_state(best)
        state["best_val_loss"], state["val_loss"] = best_val, val_loss
        (best / ckpt.STATE_FILE).unlink()
        ckpt.write_state(best, state)

    def _write(self, path: Path, step: int, best_val: Optional[float], **extra) -> Path:
        return ckpt.save_checkpoint(
            path,
            self.run.model,
            self.run.optimizer,
            step=step,
            config=self.config.to_dict(),
            extra={
                "best_val_loss": best_val,
                "total_steps": self.run.steps,
                "micro_batches": step * self.config.grad_accumulation_steps,
                "arithmetic": self.arithmetic,
                **self.run.session.checkpoint_state(),
                **extra,
            },
        )
