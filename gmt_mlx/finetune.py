"""The fine-tuning recipe: setup -> train -> save, one library call.

`finetune(config)` is what `gmt-mlx finetune` runs. Each setup phase is a
small function; the loop itself is `trainer.train`.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional

import mlx.core as mx
import numpy as np

from . import config as cfg
from .checkpoint import save_checkpoint
from .config import Config
from .data import TokenizedSplit, iterate_batches, load_splits, padding_waste, tokenize_split
from .errors import UserError
from .evaluate import describe_prompt, generate_text, sample_prompts, split_loss
from .export import save_hf_model
from .loading import load_base
from .methods import prepare_model
from .optim import build_optimizer, make_schedule
from .progress import Progress
from .trainer import StepResult, train

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
# Pad batch lengths to a multiple of 8: few distinct compiled shapes, little padding.
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


def prepare_run_dir(out: str | Path, overwrite: bool, *, create: bool = True) -> Path:
    """Create the run directory; refuse to clobber anything the user made.

    An existing gmt-mlx run (it has config.yaml) is replaced only with
    ``overwrite``; a non-empty folder that is not a run is never touched.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not (out / CONFIG_FILE).is_file():
            raise UserError(f"--out {out} is a non-empty folder that is not a gmt-mlx run; choose another")
        if not overwrite:
            raise UserError(f"--out {out} already holds a run; pass --overwrite to replace it or choose another --out")
        if create:
            shutil.rmtree(out)
    if create:
        out.mkdir(parents=True, exist_ok=True)
    return out


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


def _train_batches(split: TokenizedSplit, config: Config, pad_id: int, counter: list) -> Iterator:
    for _, _, tokens, mask in iterate_batches(
        split, config.batch_size, seed=config.seed, pad_id=pad_id, pad_multiple=PAD_MULTIPLE
    ):
        counter[0] += _batch_tokens(mask)
        yield tokens, mask


def _pad_id(tokenizer) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else int(tokenizer.eos_token_id)


def finetune(config: Config, *, overwrite: bool = False, log: Callable[[str], None] = print) -> RunResult:
    """Fine-tune ``config.model`` on ``config.data`` and write the run directory."""
    config.validate()
    prepare_run_dir(config.out, overwrite, create=False)  # fail fast, before the slow parts
    mx.random.seed(config.seed)
    if not config.data:
        raise UserError("--data is required (a folder with train.jsonl, or a .jsonl file)")
    rows = load_splits(config.data)  # read the data before the (slow) model load: fail fast
    model, tokenizer, model_config, model_path = load_base(config.model)
    sizes = prepare_model(model, config)
    splits = tokenize_splits(config, rows, tokenizer, log)
    out = prepare_run_dir(config.out, overwrite)
    cfg.save_yaml(config, out / CONFIG_FILE)
    train_split, valid_split = splits["train"], splits.get("valid")
    pad_id = _pad_id(tokenizer)
    steps = total_steps(config, len(train_split))
    schedule = make_schedule(
        config.learning_rate, steps, kind=config.lr_schedule, warmup_steps=config.warmup_steps, min_lr_ratio=config.min_lr_ratio
    )
    optimizer = build_optimizer(
        config.optimizer, schedule, weight_decay=config.weight_decay, method=config.method,
        mask_ratio=config.mask_ratio, mask_scope=config.mask_scope, mask_target=config.mask_target,
        seed=config.seed, sample_size=config.mask_sample_size,
    )

    # Start-up summary: the derived numbers a user should see before waiting.
    stats = {"train": len(train_split), "valid": len(valid_split) if valid_split else 0}
    tokens_per_step = config.batch_size * config.grad_accumulation_steps * np.mean(train_split.lengths())
    masked = config.method in ("gmt", "random") and config.mask_ratio > 0
    updated = sizes["trainable"] * (1 - config.mask_ratio) if masked else sizes["trainable"]
    log(f"model      {config.model} ({model_path})")
    log(f"method     {config.method}" + (f" mask_ratio={config.mask_ratio} scope={config.mask_scope} target={config.mask_target}" if masked else ""))
    log(f"params     {sizes['trainable']:,} trainable of {sizes['total']:,} ({100 * sizes['trainable'] / sizes['total']:.1f}%)")
    log(f"per step   ~{tokens_per_step:.0f} tokens, ~{updated:,.0f} gradient entries kept")
    log(f"data       {stats['train']} train / {stats['valid']} valid examples; padding waste "
        f"{100 * padding_waste(train_split, config.batch_size, seed=config.seed, pad_multiple=PAD_MULTIPLE):.1f}%")
    log(f"steps      {steps} optimizer steps, batch {config.batch_size} x {config.grad_accumulation_steps} accumulation")

    prompts = sample_prompts(rows.get("test") or rows.get("valid") or [], SAMPLE_COUNT)
    before = [generate_text(model, tokenizer, p) for p in prompts]

    metrics = open(out / METRICS_FILE, "a")
    t_start = time.perf_counter()
    progress = Progress(steps, every=config.steps_per_report)
    counter, window = [0], {"t": time.perf_counter(), "tokens": 0}
    total_entries = sizes["trainable"]
    best = {"val_loss": None}
    last: Dict[str, float] = {}

    def write(record: dict) -> None:
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()

    def on_step(result: StepResult) -> None:
        now = time.perf_counter()
        tps = (counter[0] - window["tokens"]) / max(now - window["t"], 1e-9)
        window.update(t=now, tokens=counter[0])
        kept_fraction = result.kept / total_entries
        last.update(loss=result.loss)
        progress.update(result.step, loss=result.loss, tok_s=round(tps), kept=round(kept_fraction, 3))
        if result.step % config.steps_per_report == 0 or result.step == steps:
            write({
                "type": "train", "step": result.step, "loss": result.loss, "learning_rate": result.learning_rate,
                "tokens_per_sec": tps, "kept_fraction": kept_fraction, "grad_norm": result.grad_norm,
                "trained_tokens": counter[0], "peak_memory_gb": mx.get_peak_memory() / 1e9,
                "wall_time": now - t_start,
            })

    def on_eval(step: int) -> None:
        if valid_split is None:
            return
        result = split_loss(model, valid_split, batch_size=config.batch_size, pad_id=pad_id, max_batches=config.val_batches)
        last.update(val_loss=result["loss"])
        improved = best["val_loss"] is None or result["loss"] < best["val_loss"]
        progress.message(f"step {step}: val loss {result['loss']:.4f} (ppl {result['ppl']:.2f})" + (" *best*" if improved else ""))
        write({"type": "eval", "step": step, "val_loss": result["loss"], "val_ppl": result["ppl"],
               "wall_time": time.perf_counter() - t_start})
        if improved:
            best["val_loss"] = result["loss"]
            save_checkpoint(out / "checkpoints" / "best", model, optimizer, step=step, config=config.to_dict(),
                            extra={"val_loss": result["loss"]})

    batches = _train_batches(train_split, config, pad_id, counter)
    train(
        model, optimizer, batches, iters=steps, grad_accumulation_steps=config.grad_accumulation_steps,
        grad_clip=config.grad_clip, on_step=on_step, on_eval=on_eval, steps_per_eval=config.steps_per_eval,
    )
    metrics.close()

    model_dir = save_hf_model(out / "model", model, tokenizer, model_config, dtype=config.dtype, base_path=model_path)
    after = [generate_text(model, tokenizer, p) for p in prompts]
    samples = [{"prompt": describe_prompt(p), "before": b, "after": a} for p, b, a in zip(prompts, before, after)]
    if samples:
        (out / "samples.json").write_text(json.dumps(samples, indent=2))
    return RunResult(out, model_dir, steps, last.get("loss", float("nan")), last.get("val_loss"), best["val_loss"], samples)

