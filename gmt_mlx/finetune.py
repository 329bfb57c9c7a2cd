"""The fine-tuning recipe: plan the run dir -> set up -> train -> save.

`finetune(config)` is what `gmt-mlx finetune` runs. Each phase is a small
function; the loop itself is `trainer.train`. A run that is killed at any
moment and resumed ends with exactly the weights it would have had: every
checkpoint holds weights, optimizer state, step and RNG, the data order is a
pure function of (seed, epoch), and masks derive from (seed, step).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from . import config as cfg
from . import checkpoint as ckpt
from . import rundir
from .config import Config
from .distributed import check_batch_size, check_same_config, init_group, is_main
from .data import pad_id as batch_pad_id
from .data import TokenizedSplit, iterate_batches, length_buckets, load_splits, padding_waste, tokenize_split
from .errors import Interrupted, UserError
from .evaluate import describe_prompt, generate_text, sample_prompts, split_loss
from .export import save_hf_model
from .hub import check_push, publish_run
from .loading import load_base
from .memory import advice, available_bytes, estimate
from .methods import enable_grad_checkpoint, prepare_model
from .optim import MASK_SAMPLE_KEY, build_optimizer, make_schedule
from .progress import Progress
from .trainer import NonFiniteError, StepResult, train

# Training batches are padded to train_buckets' widths; this multiple only rounds the
# memory estimate's sequence length and a batch no bucket holds (none, by construction).
PAD_MULTIPLE = 8
SAMPLE_COUNT = 2


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


@dataclass
class RunPlan:
    """What to do with the output folder: start fresh (maybe replacing a run) or resume."""

    out: Path
    fresh: bool
    replace: bool = False
    checkpoint: Optional[Path] = None


def plan_run(config: Config, *, overwrite: bool = False, resume: bool = False, force: bool = False) -> RunPlan:
    """Decide between a fresh run and a resume; refuse to clobber anything the user made.

    An interrupted run of the same config in ``--out`` is resumed
    automatically; one with a different config is refused with the differing
    keys (``--force`` resumes anyway, ``--overwrite`` starts over). A folder
    that is not a gmt-mlx run is never touched.
    """
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        if resume:
            raise UserError(f"nothing to resume: {out} is not a gmt-mlx run")
        return RunPlan(out, fresh=True)
    if not rundir.is_run_dir(out):
        raise UserError(f"--out {out} is a non-empty folder that is not a gmt-mlx run; choose another")
    if overwrite:
        return RunPlan(out, fresh=True, replace=True)
    latest = rundir.latest_checkpoint(out)
    if rundir.is_finished(out) and not resume:
        raise UserError(f"--out {out} already holds a finished run; pass --overwrite to replace it or choose another --out")
    try:
        previous = cfg.load_yaml(out / rundir.CONFIG_FILE)
    except UserError as err:
        raise UserError(f"cannot resume {out}: {err}") from None
    differences = cfg.diff({**Config().to_dict(), **previous}, config.to_dict())
    if differences and not force:
        listed = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in differences.items()))
        raise UserError(f"{out} holds a run with a different config ({listed}); pass --force to resume it "
                        f"anyway or --overwrite to start over")
    # No checkpoint yet (killed early): start over in place. A checkpoint at the
    # last step (killed while saving the model) resumes straight to the save.
    return RunPlan(out, fresh=latest is None, replace=latest is None, checkpoint=latest)


def tokenize_splits(config: Config, rows: Dict[str, list], tokenizer, log: Callable[[str], None]) -> Dict[str, TokenizedSplit]:
    """Tokenize every split present; warn about truncation."""
    splits = {}
    for name, split_rows in rows.items():
        split = tokenize_split(
            split_rows, tokenizer, mask_prompt=config.mask_prompt, max_seq_length=config.max_seq_length, name=name
        )
        if split.truncated:
            log(f"warning: {split.truncated} of {len(split_rows)} {name} examples were longer than "
                f"--max-seq-length {config.max_seq_length} and were truncated")
        if split.dropped:
            log(f"warning: {split.dropped} {name} examples had no target tokens left and were dropped")
        if len(split) == 0:
            raise UserError(f"{name} split has no usable examples")
        splits[name] = split
    return splits


def total_steps(config: Config, n_train: int) -> int:
    """Optimizer steps for the run: --iters, or --epochs over the training split."""
    if config.epochs is None:
        return config.iters
    batches_per_epoch = max(1, n_train // config.batch_size)
    return max(1, math.ceil(config.epochs * batches_per_epoch / config.grad_accumulation_steps))


def _batch_tokens(mask: mx.array) -> int:
    """Real (unpadded) tokens in a batch: targets run to each example's end."""
    m = np.array(mask)
    last = m.shape[1] - np.argmax(m[:, ::-1] > 0, axis=1)
    return int(last.sum())


def train_buckets(split: TokenizedSplit, config: Config) -> List[int]:
    """The padded widths of this run's training batches (data.length_buckets).

    Against rounding each batch up to a multiple of 8 they cut the padding of
    the shipped examples from 8-19% to 1-3% of the positions, and they bound
    the compiled step shapes at 16 whatever the spread of lengths
    (benchmarks/RESULTS.md). Deterministic in (lengths, batch size, seed), so
    a resumed run pads exactly as the first start did.
    """
    return length_buckets(split.lengths(), config.batch_size, seed=config.seed)


def _train_batches(split: TokenizedSplit, config: Config, pad_id: int, counter: list, start_micro: int,
                   shard: tuple = (0, 1), buckets: Optional[List[int]] = None) -> Iterator:
    for _, _, tokens, mask in iterate_batches(
        split, config.batch_size, seed=config.seed, pad_id=pad_id, pad_multiple=PAD_MULTIPLE, start_step=start_micro,
        shard=shard, buckets=buckets,
    ):
        counter[0] += _batch_tokens(mask)
        yield tokens, mask


@contextmanager
def stop_on_sigint(log: Callable[[str], None]):
    """First Ctrl-C asks the loop to stop after the current step; a second one aborts."""
    flag = {"stop": False}
    if threading.current_thread() is not threading.main_thread():
        yield lambda: flag["stop"]
        return

    def handler(signum, frame):
        if flag["stop"]:
            raise KeyboardInterrupt
        flag["stop"] = True
        log("\nstopping after this step to save a checkpoint (Ctrl-C again to abort without saving)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: flag["stop"]
    finally:
        signal.signal(signal.SIGINT, previous)


@dataclass
class Tracker:
    """Per-run bookkeeping shared by the callbacks: metrics file, best loss, last values."""

    metrics: Any
    t_start: float
    best_val: Optional[float] = None
    last: Dict[str, float] = field(default_factory=dict)
    saved_step: int = -1
    resumed: bool = False
    main: bool = True  # rank 0 (or the only process): the one that writes

    def write(self, record: dict) -> None:
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()


def finetune(
    config: Config,
    *,
    overwrite: bool = False,
    resume: bool = False,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> RunResult:
    """Fine-tune ``config.model`` on ``config.data`` and write (or resume) the run directory.

    Under `mlx.launch` every rank runs this; rank 0 alone prints, writes
    metrics, checkpoints and the final model (see distributed.py).
    """
    config.validate()
    group = init_group(config.distributed_backend)
    main = is_main(group)
    if not main:
        log = lambda *_: None  # noqa: E731
    check_batch_size(config.batch_size, group.size())
    plan = plan_run(config, overwrite=overwrite, resume=resume, force=force)  # fail fast, before the slow parts
    # Also a barrier: no rank reads the run dir after rank 0 starts changing it.
    check_same_config(config.to_dict(), group)
    if config.push_to_hub:
        check_push(config.push_to_hub)  # repo id and token, before hours of training
    mx.random.seed(config.seed)
    if not config.data:
        raise UserError("--data is required (a folder with train.jsonl, or a .jsonl file)")
    rows = load_splits(config.data)  # read the data before the (slow) model load
    # LoRA/DoRA keep a quantized base quantized (QLoRA); full-weight methods need floats.
    model, tokenizer, model_config, model_path = load_base(config.model, dequantize=config.method not in cfg.ADAPTER_METHODS)
    sizes = prepare_model(model, config)
    if config.grad_checkpoint:
        enable_grad_checkpoint(model)
    splits = tokenize_splits(config, rows, tokenizer, log)
    train_split, valid_split = splits["train"], splits.get("valid")
    pad_id = batch_pad_id(tokenizer)
    steps = total_steps(config, len(train_split))
    schedule = make_schedule(
        config.learning_rate, steps, kind=config.lr_schedule, warmup_steps=config.warmup_steps, min_lr_ratio=config.min_lr_ratio
    )
    optimizer = build_optimizer(
        config.optimizer, schedule, weight_decay=config.weight_decay, method=config.method,
        mask_ratio=config.mask_ratio, mask_scope=config.mask_scope, mask_target=config.mask_target,
        seed=config.seed, sample_size=config.mask_sample_size,
    )
    memory = _check_memory(config, model, model_config, sizes, train_split, log)

    out = plan.out
    if main:
        if plan.replace:
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
    start_step, best_val = 0, None
    if plan.checkpoint is not None:
        meta = ckpt.load_checkpoint(plan.checkpoint, model, optimizer)
        start_step, best_val = int(meta["step"]), meta.get("best_val_loss")
        best = rundir.best_dir(out)
        if ckpt.is_complete(best):  # a step checkpoint saved just before a new best knows the older best
            best_val = ckpt.read_state(best).get("best_val_loss", best_val)
        if main:
            rundir.truncate_metrics(out, start_step)
        log(f"resuming   from {plan.checkpoint} (step {start_step} of {steps})")
    elif main:
        (out / rundir.METRICS_FILE).unlink(missing_ok=True)
    if main:
        cfg.save_yaml(config, out / rundir.CONFIG_FILE)
    buckets = train_buckets(train_split, config)
    _summary(config, sizes, train_split, valid_split, steps, memory, model_path, buckets, log)
    if group.size() > 1:
        log(f"ranks      {group.size()} data-parallel ranks, {config.batch_size // group.size()} examples each per micro-batch")

    prompts = sample_prompts(rows.get("test") or rows.get("valid") or [], config.samples) if main and config.samples else []
    before = _samples_before(out, model, tokenizer, prompts, fresh=plan.checkpoint is None) if main else []

    metrics_file = open(out / rundir.METRICS_FILE, "a") if main else open(os.devnull, "w")
    tracker = Tracker(metrics_file, time.perf_counter(), best_val, resumed=start_step > 0, main=main)
    callbacks = _callbacks(config, out, model, optimizer, tracker, steps, sizes, memory, valid_split, pad_id, group)
    counter = callbacks.pop("counter")
    batches = _train_batches(train_split, config, pad_id, counter, start_step * config.grad_accumulation_steps,
                             (group.rank(), group.size()), buckets)
    try:
        with stop_on_sigint(log) as should_stop:
            last_step = train(
                model, optimizer, batches, iters=steps, start_step=start_step,
                grad_accumulation_steps=config.grad_accumulation_steps, grad_clip=config.grad_clip,
                steps_per_eval=config.steps_per_eval, should_stop=should_stop, max_bad_steps=config.max_bad_steps,
                group=group, **callbacks,
            )
    except NonFiniteError as err:
        latest = rundir.latest_checkpoint(out)
        where = f"the last good checkpoint is {latest}" if latest else "no checkpoint was saved yet"
        raise UserError(f"stopped: {err}; {where}. Lower --learning-rate or check the data") from None
    except RuntimeError as err:
        if group.size() == 1 or "[ring]" not in str(err) and "peer" not in str(err):
            raise
        latest = rundir.latest_checkpoint(out)
        raise UserError(f"rank {group.rank()} lost contact with another rank ({str(err).splitlines()[0]}); "
                        f"resume from {latest or 'the start'} with the same mlx.launch command") from None
    finally:
        tracker.metrics.close()
    if last_step < steps:
        if main and tracker.saved_step != last_step:
            _save(out, model, optimizer, last_step, config, tracker, steps)
        raise Interrupted(f"interrupted at step {last_step} of {steps}; checkpoint saved. "
                          f"Resume with: gmt-mlx finetune --resume {out}")
    if not main:  # the other ranks hold the same weights; rank 0 writes them
        return RunResult(out, rundir.model_dir(out), steps, tracker.last.get("loss", float("nan")),
                         tracker.last.get("val_loss"), tracker.best_val, [], start_step or None, model)

    model_dir = save_hf_model(rundir.model_dir(out), model, tokenizer, model_config, dtype=config.dtype, base_path=model_path)
    after = [generate_text(model, tokenizer, p) for p in prompts]
    samples = [{"prompt": describe_prompt(p), "before": b, "after": a} for p, b, a in zip(prompts, before, after)]
    if samples:
        (out / rundir.SAMPLES_FILE).write_text(json.dumps(samples, indent=2))
    publish_run(out, model_dir, config, step=steps, base_path=model_path, log=log)  # model card, --push-to-hub
    return RunResult(out, model_dir, steps, tracker.last.get("loss", float("nan")), tracker.last.get("val_loss"),
                     tracker.best_val, samples, start_step or None, model)


def _check_memory(config: Config, model, model_config: dict, sizes: dict, train_split: TokenizedSplit, log) -> Any:
    longest = max(train_split.lengths())
    seq_len = -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE
    weight_bytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    memory = estimate(
        model_config, weight_bytes=weight_bytes, trainable=sizes["trainable"], batch_size=config.batch_size,
        seq_len=seq_len, optimizer=config.optimizer, method=config.method,
        grad_accumulation_steps=config.grad_accumulation_steps, grad_checkpoint=config.grad_checkpoint,
    )
    available = available_bytes()
    if config.memory_check and available and memory.total > available:
        raise UserError(f"estimated peak memory {memory.total / 1e9:.1f} GB exceeds the {available / 1e9:.1f} GB "
                        f"available; {advice(config.method)}; or pass --no-memory-check to try anyway")
    return memory


def _summary(config, sizes, train_split, valid_split, steps, memory, model_path, buckets, log) -> None:
    """Start-up summary: the derived numbers a user should see before waiting."""
    tokens_per_step = config.batch_size * config.grad_accumulation_steps * np.mean(train_split.lengths())
    masked = config.method in ("gmt", "random") and config.mask_ratio > 0
    updated = sizes["trainable"] * (1 - config.mask_ratio) if masked else sizes["trainable"]
    waste = padding_waste(train_split, config.batch_size, seed=config.seed, buckets=buckets)
    log(f"model      {config.model} ({model_path})")
    log(f"method     {config.method}" + (f" mask_ratio={config.mask_ratio} scope={config.mask_scope} target={config.mask_target}" if masked else ""))
    log(f"params     {sizes['trainable']:,} trainable of {sizes['total']:,} ({100 * sizes['trainable'] / sizes['total']:.1f}%)")
    log(f"per step   ~{tokens_per_step:.0f} tokens, ~{updated:,.0f} gradient entries kept")
    log(f"data       {len(train_split)} train / {len(valid_split) if valid_split else 0} valid examples; "
        f"padding waste {100 * waste:.1f}% ({len(buckets)} batch widths)")
    log(f"memory     estimated peak {memory.describe()}")
    log(f"steps      {steps} optimizer steps, batch {config.batch_size} x {config.grad_accumulation_steps} accumulation")


def _samples_before(out: Path, model, tokenizer, prompts: list, *, fresh: bool) -> List[str]:
    """Answers of the untrained model; a resumed run reuses the ones its first start saved."""
    path = out / rundir.SAMPLES_BEFORE_FILE
    if not fresh and path.is_file():
        saved = json.loads(path.read_text())
        if len(saved) == len(prompts):
            return saved
    before = [generate_text(model, tokenizer, p) for p in prompts] if fresh else ["(not recorded)"] * len(prompts)
    if fresh:
        path.write_text(json.dumps(before))
    return before


def _save(out: Path, model, optimizer, step: int, config: Config, tracker: Tracker, steps: int) -> Path:
    path = ckpt.save_checkpoint(
        rundir.step_dir(out, step), model, optimizer, step=step, config=config.to_dict(),
        extra={"best_val_loss": tracker.best_val, "total_steps": steps,
               "micro_batches": step * config.grad_accumulation_steps},
    )
    tracker.saved_step = step
    rundir.prune(out, config.keep_checkpoints)
    return path


def _callbacks(config, out, model, optimizer, tracker: Tracker, steps, sizes, memory, valid_split, pad_id, group=None) -> dict:
    """on_step (progress, metrics, periodic checkpoints) and on_eval (validation, best checkpoint)."""
    progress = Progress(steps, every=config.steps_per_report)
    counter, window = [0], {"t": time.perf_counter(), "tokens": 0}
    if not tracker.resumed:  # a resumed run keeps the first start's record
        tracker.write({"type": "setup", "step": 0, "trainable_params": sizes["trainable"], "total_params": sizes["total"],
                       "total_steps": steps})
    masks = {"previous": None, "overlap": None}

    def mask_overlap() -> None:
        # Share of this step's kept entries (on a fixed sample of positions) that the
        # previous step kept too: 1 - mask_ratio for independent masks, near 1 for sticky ones.
        sample = optimizer.state.get(MASK_SAMPLE_KEY)
        if sample is None:
            return
        current = np.array(sample)
        previous, masks["previous"] = masks["previous"], current
        if previous is not None and previous.shape == current.shape and current.any():
            masks["overlap"] = float((current & previous).sum() / current.sum())

    def on_step(result: StepResult) -> None:
        now = time.perf_counter()
        tps = (counter[0] - window["tokens"]) / max(now - window["t"], 1e-9)
        window.update(t=now, tokens=counter[0])
        kept_fraction = result.kept / sizes["trainable"]
        if not result.skipped:
            mask_overlap()
        tracker.last.update(loss=result.loss)
        if group is not None and group.size() > 1:
            ckpt.fault(f"rank{group.rank()}:after-step:{result.step}")  # kill one rank (tests)
        if not tracker.main:
            return
        if result.skipped:
            progress.message(f"step {result.step}: non-finite loss or gradient, update skipped")
        progress.update(result.step, loss=result.loss, tok_s=round(tps), kept=round(kept_fraction, 3))
        if result.step % config.steps_per_report == 0 or result.step == steps or result.skipped:
            tracker.write({
                "type": "train", "step": result.step, "loss": result.loss, "learning_rate": result.learning_rate,
                "tokens_per_sec": tps, "kept_fraction": kept_fraction, "mask_overlap": masks["overlap"],
                "grad_norm": result.grad_norm, "skipped": result.skipped, "trained_tokens": counter[0],
                "peak_memory_gb": mx.get_peak_memory() / 1e9, "memory_estimate_gb": memory.total / 1e9,
                "wall_time": now - tracker.t_start,
            })
        # A skipped (non-finite) step changed nothing: the last good checkpoint stays as it is.
        if config.steps_per_save > 0 and not result.skipped and (result.step % config.steps_per_save == 0 or result.step == steps):
            _save(out, model, optimizer, result.step, config, tracker, steps)
        ckpt.fault(f"after-step:{result.step}")

    def on_eval(step: int) -> None:
        if valid_split is None:
            return
        # Every rank evaluates its share; only rank 0 reports and saves.
        result = split_loss(model, valid_split, batch_size=config.batch_size, pad_id=pad_id,
                            max_batches=config.val_batches, group=group)
        if not tracker.main:
            return
        tracker.last.update(val_loss=result["loss"])
        improved = tracker.best_val is None or result["loss"] < tracker.best_val
        progress.message(f"step {step}: val loss {result['loss']:.4f} (ppl {result['ppl']:.2f})" + (" *best*" if improved else ""))
        tracker.write({"type": "eval", "step": step, "val_loss": result["loss"], "val_ppl": result["ppl"],
                       "wall_time": time.perf_counter() - tracker.t_start})
        if improved:
            tracker.best_val = result["loss"]
            best = rundir.best_dir(out)
            if tracker.saved_step == step:
                ckpt.link_checkpoint(rundir.step_dir(out, step), best)
                state = ckpt.read_state(best)
            else:
                ckpt.save_checkpoint(best, model, optimizer, step=step, config=config.to_dict(),
                                     extra={"best_val_loss": tracker.best_val, "total_steps": steps,
                                            "micro_batches": step * config.grad_accumulation_steps})
                state = None
            if state is not None:
                # The linked copy must say it is the best one (a fresh state.json, not a link).
                state["best_val_loss"], state["val_loss"] = tracker.best_val, result["loss"]
                (best / ckpt.STATE_FILE).unlink()
                (best / ckpt.STATE_FILE).write_text(json.dumps(state, indent=2))

    return {"on_step": on_step, "on_eval": on_eval, "counter": counter}
