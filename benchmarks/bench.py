#!/usr/bin/env python
"""gmt-mlx benchmarks: step time, tokens/s and peak memory, ours against mlx_lm.lora.

    python benchmarks/bench.py            # tiny llama + SmolLM2-135M (~20 min on 2 CPU cores)
    python benchmarks/bench.py --quick    # tiny llama only (~3 min)

What is measured, all in ONE process, contenders interleaved step by step
(see benchmarks/README.md for the method and benchmarks/RESULTS.md for results):

- padding:   padding waste of our batching (several pad rules) and of
             mlx_lm's, on the shipped examples and a mixed-length set, and the
             number of distinct batch shapes (= compiled step variants).
- masking:   where GMT's masking time goes on the model's own tensor shapes,
             before (the masking code at BEFORE_COMMIT) and after, each piece
             relative to one AdamW update of the same tensors.
- threshold: cost of the mask vs parameter count (1M .. 128M entries), and
             the kept-fraction error, on synthetic and on real gradients.
- step:      median optimizer-step time, tokens/s and peak memory of every
             method on one fixed batch (same data and shape for everyone):
             sft, gmt (3 scopes x 2 targets), random, lora, sft with mlx_lm's
             trainable set, and mlx_lm.lora itself (full and lora).
- pipeline:  tokens/s of ours vs mlx_lm.lora, each with its own batching, over
             whole epochs of the chat examples and of a mixed-length set.

Every training loop runs unmodified in its own thread (ours:
gmt_mlx.trainer.train; theirs: mlx_lm.tuner.trainer.train); the loops pull
batches from a turnstile that lets exactly one loop run one step at a time, so
contention from other processes on a shared machine hits every contender
alike. Only ratios measured side by side are reported.

On Linux the script re-executes itself with an optimized BLAS preloaded, the
same mechanism as the gmt-mlx CLI (gmt_mlx/blas.py); --no-blas keeps MLX's
reference BLAS.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import math
import os
import platform
import random as pyrandom
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
# The masking code before the performance work (issue 7), for before/after.
BEFORE_COMMIT = "05cee8e"
MASK_RATIO = 0.2


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------


def environment() -> dict:
    import mlx.core as mx
    import mlx_lm

    from gmt_mlx.blas import blas_info

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        pass
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "gmt_mlx"], capture_output=True, text=True).stdout.strip())
    except OSError:
        commit, dirty = "?", False
    info = blas_info(measure=True)
    return {
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(mem_gb, 1) if mem_gb else None,
        "os": platform.platform(),
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm.__version__,
        "device": str(mx.default_device()),
        "gmt_mlx_commit": commit + ("+uncommitted" if dirty else ""),
        "blas": {k: info.get(k) for k in ("kind", "library", "gflops", "reexecuted")},
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


# --------------------------------------------------------------------------
# Models and data
# --------------------------------------------------------------------------


@dataclass
class ModelSpec:
    name: str
    path: Path
    lora_layers: int  # mlx_lm.lora's default: 16 blocks, or all of a smaller model


def model_specs(names: Sequence[str], workdir: Path) -> List[ModelSpec]:
    from gmt_mlx.tiny import make_tiny_model

    specs = []
    for name in names:
        if name == "tiny":
            # Small enough for seconds per step, big enough that matmuls dominate.
            path = make_tiny_model(workdir / "tiny-llama", hidden_size=256, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, intermediate_size=768)
            specs.append(ModelSpec("tiny llama (256 x 4 layers)", path, 4))
        else:
            from gmt_mlx.models import resolve_model

            specs.append(ModelSpec(name, resolve_model(name), 16))
    return specs


def mixed_length_rows(n: int, seed: int = 0, max_terms: int = 24) -> list:
    """Chat examples whose lengths spread ~3.5x (62 .. 213 SmolLM2 tokens for 16 of them):
    sums of 2 .. max_terms numbers, the answer repeating the question."""
    rng = pyrandom.Random(seed)
    rows = []
    for _ in range(n):
        terms = [rng.randint(1, 99) for _ in range(rng.randint(2, max_terms))]
        question = " + ".join(map(str, terms))
        rows.append({"messages": [{"role": "user", "content": f"What is {question}?"},
                                  {"role": "assistant", "content": f"{question} = {sum(terms)}."}]})
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def datasets(workdir: Path, quick: bool) -> Dict[str, Path]:
    """Data folders: the shipped examples and a generated mixed-length chat set."""
    out = {name: REPO / "examples" / "data" / name for name in ("chat", "completions", "text")}
    mixed = workdir / "mixed"
    write_jsonl(mixed / "train.jsonl", mixed_length_rows(32 if quick else 16))
    out["mixed"] = mixed
    return out


def tokenized(folder: Path, tokenizer, max_seq_length: int = 2048):
    from gmt_mlx.data import load_splits, tokenize_split

    rows = load_splits(folder)["train"]
    return rows, tokenize_split(rows, tokenizer, mask_prompt=False, max_seq_length=max_seq_length, name="train")


def mlx_lm_dataset(rows: list, tokenizer):
    from mlx_lm.tuner.datasets import CacheDataset, create_dataset

    return CacheDataset(create_dataset(rows, tokenizer, types.SimpleNamespace(mask_prompt=False)))


# --------------------------------------------------------------------------
# Padding
# --------------------------------------------------------------------------


def mlx_lm_padding(lengths: Sequence[int], batch_size: int) -> tuple:
    """mlx_lm's batching (tuner/trainer.py iterate_batches): batches in file order
    (its length sort keys on len() of the raw record, a constant), each padded to
    1 + 32 * ceil(max / 32). Returns (waste, distinct shapes)."""
    padded = real = 0
    shapes = set()
    for i in range(0, len(lengths) - batch_size + 1, batch_size):
        batch = lengths[i : i + batch_size]
        width = 1 + 32 * ((max(batch) + 31) // 32)
        shapes.add(width)
        padded += batch_size * width
        real += sum(batch)
    return 1 - real / padded, len(shapes)


def our_padding(split, batch_size: int, *, pad_multiple: int = 8, buckets=None, epochs: int = 10) -> tuple:
    """(waste over epoch 0, distinct padded lengths over `epochs` epochs) of our batching."""
    from gmt_mlx import data

    kwargs = {"buckets": buckets} if buckets is not None else {}
    waste = data.padding_waste(split, batch_size, seed=0, pad_multiple=pad_multiple, **kwargs)
    shapes = set()
    lengths = split.lengths()
    for epoch in range(epochs):
        for indices in data.batch_order(lengths, batch_size, seed=0, epoch=epoch):
            longest = max(lengths[i] for i in indices)
            if buckets is not None:
                shapes.add(min(b for b in buckets if b >= longest))
            else:
                shapes.add(data._padded_length(longest, pad_multiple, split.max_seq_length))
    return waste, len(shapes)


def padding_section(specs: List[ModelSpec], folders: Dict[str, Path], batch_size: int) -> dict:
    from mlx_lm import load

    from gmt_mlx import data

    have_buckets = hasattr(data, "length_buckets")
    out = {}
    for spec in specs:
        _, tokenizer = load(str(spec.path))
        for name, folder in folders.items():
            _, split = tokenized(folder, tokenizer)
            lengths = split.lengths()
            row = {"examples": len(lengths), "min_len": min(lengths), "mean_len": round(statistics.mean(lengths), 1),
                   "max_len": max(lengths), "mlx_lm": mlx_lm_padding(lengths, batch_size)}
            for pm in (8, 4, 2, 1):
                row[f"pad{pm}"] = our_padding(split, batch_size, pad_multiple=pm)
            if have_buckets:
                buckets = data.length_buckets(lengths, batch_size, seed=0)
                row["buckets"] = our_padding(split, batch_size, buckets=buckets)
                row["bucket_lengths"] = buckets
            out[f"{spec.name} / {name}"] = row
    return out


# --------------------------------------------------------------------------
# The turnstile: one step at a time, each loop in its own thread
# --------------------------------------------------------------------------


@dataclass
class StepRecord:
    seconds: float
    tokens: int  # real (unpadded) tokens in the batch
    step_bytes: int  # peak memory of the step above what was allocated when it started
    shape: tuple
    batch_id: object = None  # the same batch seen again (another pass) has the same id


class _Stop(Exception):
    """Raised into a loop at its request for one batch more than it was given turns for."""


class Contender:
    """A training loop in its own thread that advances one optimizer step per turn.

    ``run(batches)`` runs the loop over ``batches`` (an iterator of (batch,
    real tokens, batch id)) for more than ``turns`` steps. Requesting batch
    k+1 marks the end of step k; the request after the last turn is answered
    with `_Stop`, which ends the loop before anything it does after its last
    step (mlx_lm saves the weights there).
    """

    def __init__(self, name: str, run: Callable[[Iterator], None], batches: Iterator, turns: int, group: str = ""):
        self.name, self.group, self.turns = name, group, turns
        self._run, self._batches = run, batches
        self._go, self._done = threading.Semaphore(0), threading.Semaphore(0)
        self.records: List[StepRecord] = []
        self.error: Optional[BaseException] = None
        self.trainable = None
        self.footprint = None
        self.cold_cache = True
        # Memory a standalone run holds between steps: weights, optimizer state, caches.
        self.resident_bytes = 0
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    def _feed(self):
        import mlx.core as mx

        for k, (batch, tokens, batch_id) in enumerate(self._batches):
            if k > 0:
                self._finish()
            if k >= self.turns:
                raise _Stop()
            self._go.acquire()
            if self.cold_cache:
                # An empty buffer cache: what mlx_lm's loop does to itself after
                # each step (clear_cache_threshold=0), so every contender alike.
                mx.clear_cache()
            mx.reset_peak_memory()
            self._pending = (time.perf_counter(), tokens, tuple(batch[0].shape), batch_id, mx.get_active_memory())
            yield batch

    def _finish(self):
        import mlx.core as mx

        start, tokens, shape, batch_id, active = self._pending
        seconds = time.perf_counter() - start
        self.records.append(StepRecord(seconds, tokens, mx.get_peak_memory() - active, shape, batch_id))
        self._done.release()

    def _main(self):
        try:
            self._run(self._feed())
            self.error = RuntimeError("the loop ended before its last turn")
            self._done.release()
        except _Stop:
            pass  # the last step was recorded and released in _feed
        except BaseException as err:  # reported by the scheduler
            self.error = err
            self._done.release()

    def start(self):
        self._thread.start()

    def turn(self):
        self._go.release()
        self._done.acquire()
        if self.error is not None:
            raise RuntimeError(f"{self.name} failed: {self.error!r}") from self.error


def interleave(contenders: List[Contender], turns: int, label: str) -> None:
    """Give every contender `turns` steps, alternating the order (ABC, CBA, ...)."""
    for c in contenders:
        c.start()
    for t in range(turns):
        order = contenders if t % 2 == 0 else contenders[::-1]
        t0 = time.perf_counter()
        for c in order:
            c.turn()
        log(f"{label}: round {t + 1}/{turns} ({time.perf_counter() - t0:.0f}s)")
    for c in contenders:
        c._thread.join(timeout=600)


# --------------------------------------------------------------------------
# Contenders: our loop and mlx_lm's
# --------------------------------------------------------------------------


def load_model(path: Path):
    from gmt_mlx.loading import load_base

    model, tokenizer, _, _ = load_base(str(path))
    return model, tokenizer


def trainable_count(model) -> int:
    from mlx.utils import tree_flatten

    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))


def our_loop(model, optimizer, turns: int, grad_clip: float) -> Callable[[Iterator], None]:
    from gmt_mlx.trainer import train

    def run(batches):
        train(model, optimizer, batches, iters=turns + 1, grad_clip=grad_clip)

    return run


def mlx_lm_loop(model, optimizer, turns: int, dataset, max_seq_length: int, batch_size: int, workdir: Path):
    """mlx_lm.tuner.trainer.train as `mlx_lm.lora --train` calls it, without validation (and
    stopped before its final save)."""
    from mlx_lm.tuner.trainer import TrainingArgs, train

    big = 10**9
    args = TrainingArgs(batch_size=batch_size, iters=turns + 1, steps_per_report=big, steps_per_eval=big, steps_per_save=big,
                        max_seq_length=max_seq_length, adapter_file=str(workdir / f"adapters-{id(model)}.safetensors"))

    def run(batches):
        # Their loop calls iterate_batches(dataset=..., batch_size=..., ...); ours hands it the turnstile.
        train(model=model, optimizer=optimizer, train_dataset=dataset, val_dataset=None, args=args,
              iterate_batches=lambda **_: batches)

    return run


def ours_config(**kw):
    from gmt_mlx.config import Config

    return Config(**kw)


def our_batches(split, batch_size: int, pad_id: int, *, fixed=None, epochs_of=None, buckets=None):
    """(tokens, mask), real tokens: a fixed batch forever, or our batching of `split`
    (epoch 0, repeated: the warmup pass compiles every shape the timed pass sees)."""
    import mlx.core as mx

    from gmt_mlx import data

    if fixed is not None:
        tokens, mask, real = fixed
        while True:
            yield (tokens, mask), real, 0
    lengths = split.lengths()
    order = data.batch_order(lengths, batch_size, seed=0, epoch=0)
    kwargs = {"buckets": buckets} if buckets is not None else {}
    from gmt_mlx.finetune import PAD_MULTIPLE

    while True:
        for k, indices in enumerate(order):
            tokens, mask = data.make_batch(split, indices, pad_id=pad_id, pad_multiple=PAD_MULTIPLE, **kwargs)
            yield (tokens, mask), sum(lengths[i] for i in indices), k


def mlx_lm_batches(dataset, batch_size: int, max_seq_length: int, *, fixed=None):
    """Their (batch, lengths) pairs: a fixed batch forever, or their own iterate_batches."""
    import mlx.core as mx
    from mlx_lm.tuner.trainer import iterate_batches

    if fixed is not None:
        tokens, lengths, real = fixed
        while True:
            yield (tokens, lengths), real, 0
    for batch, lengths in iterate_batches(dataset=dataset, batch_size=batch_size, max_seq_length=max_seq_length, loop=True, seed=0):
        # Each epoch permutes the same batches: the lengths identify a batch.
        yield (batch, lengths), int(mx.sum(lengths[:, 1]).item()), tuple(lengths[:, 1].tolist())


def fixed_batch(split, batch_size: int, pad_id: int, width: int):
    """The first `batch_size` examples padded to `width`, in both tools' formats."""
    import mlx.core as mx
    import numpy as np

    from gmt_mlx.data import make_batch

    indices = list(range(batch_size))
    tokens, mask = make_batch(split, indices, pad_id=pad_id, pad_multiple=width)
    assert tokens.shape[1] == width, (tokens.shape, width)
    lengths = [len(split.examples[i].tokens) for i in indices]
    theirs = mx.array(np.array([[0, n] for n in lengths], np.int32))
    return (tokens, mask, sum(lengths)), (tokens, theirs, sum(lengths))


def build_contenders(spec: ModelSpec, section: str, turns: int, ours_data, theirs_data, *, which: Sequence[str],
                     workdir: Path, batch_size: int, max_seq_length: int, before=None) -> List[Contender]:
    """The contenders of one section; `ours_data()` / `theirs_data()` make fresh batch iterators."""
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from gmt_mlx.methods import prepare_model
    from gmt_mlx.optim import build_optimizer

    defaults = ours_config()
    clip = defaults.grad_clip
    out: List[Contender] = []
    shared = {}

    def shared_full():
        # sft, gmt and random share one model and one AdamW state: a step's cost
        # does not depend on the values, and it keeps 10 contenders within memory.
        if not shared:
            model, _ = load_model(spec.path)
            prepare_model(model, ours_config(method="sft"))
            shared["model"] = model
            shared["adamw"] = build_optimizer("adamw", defaults.learning_rate, weight_decay=defaults.weight_decay).optimizer
        return shared["model"], shared["adamw"]

    def masked(method, scope="tensor", target="grad", sample_size=None, module=None):
        from gmt_mlx.optim import MaskedOptimizer

        cls = module.MaskedOptimizer if module is not None else MaskedOptimizer
        model, base = shared_full()
        kw = {} if sample_size is None else {"sample_size": sample_size}
        ratio = 0.0 if method == "sft" else MASK_RATIO
        return model, cls(base, method="gmt" if method == "sft" else method, mask_ratio=ratio, scope=scope, target=target, **kw)

    for name in which:
        if name == "sft":
            model, opt = masked("sft")
        elif name.startswith("gmt ") or name == "random":
            if name == "random":
                model, opt = masked("random")
            elif name.startswith("gmt before"):
                if before is None:
                    continue
                model, opt = masked("gmt", module=before)
            elif name.startswith("gmt tensor/grad sample"):
                model, opt = masked("gmt", sample_size=int(name.rsplit(" ", 1)[1]))
            else:
                scope, target = name.split()[1].split("/")
                model, opt = masked("gmt", scope, target)
        elif name == "sft frozen-emb":
            model, _ = load_model(spec.path)
            prepare_model(model, ours_config(method="sft", freeze_embeddings=True, freeze_lm_head=True))
            opt = build_optimizer("adamw", defaults.learning_rate, weight_decay=defaults.weight_decay)
        elif name == "lora":
            model, _ = load_model(spec.path)
            prepare_model(model, ours_config(method="lora", num_layers=spec.lora_layers))
            opt = build_optimizer("adamw", defaults.learning_rate, method="lora")
        elif name.startswith("mlx_lm"):
            kind = name.split()[1]
            model, _ = load_model(spec.path)
            model.freeze()
            if kind == "full":  # --fine-tune-type full --num-layers -1: every block, not the embeddings
                for layer in model.layers:
                    layer.unfreeze()
            else:  # their defaults: rank 8, scale 20, dropout 0, all linear layers of the last 16 blocks
                linear_to_lora_layers(model, spec.lora_layers, {"rank": 8, "scale": 20.0, "dropout": 0.0})
            opt = optim.Adam(learning_rate=1e-5)  # their default optimizer and learning rate
            run = mlx_lm_loop(model, opt, turns, None if theirs_data is None else theirs_data.dataset,
                              max_seq_length, batch_size, workdir)
            # MLX streams are per thread: nothing lazy may cross into the loop's thread.
            mx.eval(model.parameters())
            c = Contender(name, run, theirs_data(), turns, group="mlx_lm")
            c.trainable = trainable_count(model)
            c.footprint = (model, opt, False)
            out.append(c)
            continue
        else:
            raise ValueError(name)
        mx.eval(model.parameters())
        c = Contender(name, our_loop(model, opt, turns, clip), ours_data(), turns, group="ours")
        c.trainable = trainable_count(model)
        c.footprint = (model, opt, name.startswith("gmt ") and not name.startswith("gmt before"))
        out.append(c)
    return out


def tree_bytes(tree) -> int:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(tree) if isinstance(v, mx.array))


def resident_bytes(contenders: List["Contender"]) -> None:
    """Weights + optimizer state (+ GMT's per-shape tie ranks, 1 byte per entry of each
    distinct trainable shape) of each contender, as a standalone run would hold them."""
    for c in contenders:
        model, opt, ranks = c.footprint
        c.resident_bytes = tree_bytes(model.parameters()) + tree_bytes(opt.state)
        if ranks:
            from mlx.utils import tree_flatten

            c.resident_bytes += sum(math.prod(shape) for shape in {tuple(v.shape) for _, v in tree_flatten(model.trainable_parameters())})


class DataFactory:
    """Callable that makes a fresh batch iterator; carries mlx_lm's dataset when needed."""

    def __init__(self, make: Callable[[], Iterator], dataset=None):
        self._make, self.dataset = make, dataset

    def __call__(self):
        return self._make()


def summarize(contenders: List[Contender], warmup: int, reference: str) -> Dict[str, dict]:
    """Median step time, tokens/s, peak memory; ratios to `reference` per round (median)."""
    ref = next(c for c in contenders if c.name == reference)
    out = {}
    for c in contenders:
        timed = c.records[warmup:]
        if not timed:
            continue
        secs = [r.seconds for r in timed]
        pair = [a.seconds / b.seconds for a, b in zip(timed, ref.records[warmup:])]
        best: Dict[object, StepRecord] = {}
        for r in timed:  # the fastest time of each distinct batch: noise only ever adds time
            if r.batch_id not in best or r.seconds < best[r.batch_id].seconds:
                best[r.batch_id] = r
        out[c.name] = {
            "group": c.group,
            "min_step_s": min(secs),
            "ratio_of_mins": min(secs) / min(r.seconds for r in ref.records[warmup:]),
            "epoch_tokens_per_s": sum(r.tokens for r in best.values()) / sum(r.seconds for r in best.values()),
            "distinct_batches": len(best),
            "trainable": c.trainable,
            "steps": len(timed),
            "median_step_s": statistics.median(secs),
            "tokens_per_s": sum(r.tokens for r in timed) / sum(secs),
            "median_tokens_per_s": statistics.median(r.tokens / r.seconds for r in timed),
            "step_gb": max(r.step_bytes for r in timed) / 1e9,
            "resident_gb": c.resident_bytes / 1e9,
            "peak_gb": (c.resident_bytes + max(r.step_bytes for r in timed)) / 1e9,
            "ratio_to_ref": statistics.median(pair) if pair else None,
            "ratio_of_medians": statistics.median(secs) / statistics.median(r.seconds for r in ref.records[warmup:]),
            "shapes": sorted({r.shape for r in c.records}),
            "all_step_s": secs,
        }
    return out


GMT_CONTENDERS = ["sft", "gmt tensor/grad", "gmt tensor/update", "gmt layer/grad", "gmt layer/update",
                  "gmt global/grad", "gmt global/update", "random", "gmt tensor/grad sample 16384", "gmt before tensor/grad"]
VERSUS_CONTENDERS = ["sft frozen-emb", "mlx_lm full", "lora", "mlx_lm lora"]


def step_section(spec: ModelSpec, folders, workdir: Path, batch_size: int, timed: dict, before) -> dict:
    """Every method on one fixed batch (the first examples of the chat set, one shape).

    Two groups, each interleaved: our methods against sft (the buffer cache is
    kept between steps, as our loop keeps it), and ours against mlx_lm (every
    step starts from an empty cache, which is what mlx_lm's loop does to itself).
    """
    import mlx.core as mx

    _, tokenizer = load_model_tokenizer(spec)
    rows, split = tokenized(folders["chat"], tokenizer)
    pad_id = pad_token(tokenizer)
    width = 8 * math.ceil(max(split.lengths()[:batch_size]) / 8)
    ours_fixed, theirs_fixed = fixed_batch(split, batch_size, pad_id, width)
    warmup = 1
    out = {"batch_shape": [batch_size, width], "warmup_steps": warmup}
    for group, which, reference, cold in (("methods", GMT_CONTENDERS, "sft", False), ("versus", VERSUS_CONTENDERS, "sft frozen-emb", True)):
        turns = warmup + timed[group]
        contenders = build_contenders(
            spec, "step", turns, DataFactory(lambda: our_batches(None, batch_size, pad_id, fixed=ours_fixed)),
            DataFactory(lambda: mlx_lm_batches(None, batch_size, 2048, fixed=theirs_fixed)), which=which,
            workdir=workdir, batch_size=batch_size, max_seq_length=2048, before=before)
        for c in contenders:
            c.cold_cache = cold
        mx.clear_cache()
        interleave(contenders, turns, f"step {spec.name} / {group}")
        resident_bytes(contenders)
        result = summarize(contenders, warmup, reference)
        for pair in (("sft frozen-emb", "mlx_lm full"), ("lora", "mlx_lm lora")):
            if all(p in result for p in pair):
                ours, theirs = (next(c for c in contenders if c.name == p) for p in pair)
                ratios = [b.seconds / a.seconds for a, b in zip(ours.records[warmup:], theirs.records[warmup:])]
                result[pair[0]]["speedup_vs_" + pair[1].replace(" ", "_")] = statistics.median(ratios)
                result[pair[0]]["speedup_of_fastest_vs_" + pair[1].replace(" ", "_")] = (
                    min(r.seconds for r in theirs.records[warmup:]) / min(r.seconds for r in ours.records[warmup:]))
        out[group] = result
        del contenders
        gc.collect()
        mx.clear_cache()
    return out


def update_section(spec: ModelSpec, folders, batch_size: int, reps: int, before) -> dict:
    """The step split in two: the part every full-weight method shares (forward,
    backward, gradient norm: trainer.make_step_fns' grad_fn + trainer.global_norm)
    and the update (clip, mask, optimizer: update_fn), each method's update timed
    `reps` times, interleaved, on the same real gradient. The update is where
    the methods differ; short and repeated, it is measured far more precisely than
    whole steps on a shared machine. Step ratio = (shared + update) / (shared +
    sft's update)."""
    import mlx.core as mx
    import numpy as np

    from gmt_mlx import trainer
    from gmt_mlx.methods import prepare_model
    from gmt_mlx.optim import MaskedOptimizer, build_optimizer

    defaults = ours_config()
    model, tokenizer = load_model(spec.path)
    prepare_model(model, ours_config(method="sft"))
    _, split = tokenized(folders["chat"], tokenizer)
    width = 8 * math.ceil(max(split.lengths()[:batch_size]) / 8)
    (tokens, mask, _), _ = fixed_batch(split, batch_size, pad_token(tokenizer), width)
    base = build_optimizer("adamw", defaults.learning_rate, weight_decay=defaults.weight_decay).optimizer
    optimizers = {"sft": MaskedOptimizer(base, mask_ratio=0.0)}
    for name in GMT_CONTENDERS[1:]:
        if name == "random":
            optimizers[name] = MaskedOptimizer(base, method="random", mask_ratio=MASK_RATIO)
        elif name.startswith("gmt before"):
            if before is not None:
                optimizers[name] = before.MaskedOptimizer(base, mask_ratio=MASK_RATIO)
        elif name.startswith("gmt tensor/grad sample"):
            optimizers[name] = MaskedOptimizer(base, mask_ratio=MASK_RATIO, sample_size=int(name.rsplit(" ", 1)[1]))
        else:
            scope, target = name.split()[1].split("/")
            optimizers[name] = MaskedOptimizer(base, mask_ratio=MASK_RATIO, scope=scope, target=target)
    fns = {name: trainer.make_step_fns(model, opt, grad_clip=defaults.grad_clip) for name, opt in optimizers.items()}
    grad_fn = fns["sft"][0]
    state = trainer.training_state(model, base)

    def shared():
        loss, ntoks, grads = grad_fn(tokens, mask)
        norm = trainer.global_norm(grads)
        mx.eval(loss, ntoks, norm, grads)
        return grads, norm

    grads, norm = shared()
    for _, update_fn in fns.values():  # compile
        mx.eval(update_fn(grads, norm), state)
    times = {name: [] for name in fns}
    shared_times = []
    for r in range(reps):
        t0 = time.perf_counter()
        grads, norm = shared()
        shared_times.append(time.perf_counter() - t0)
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            mx.clear_cache()  # the same (cold) start for every update
            t0 = time.perf_counter()
            mx.eval(fns[name][1](grads, norm), state)
            times[name].append(time.perf_counter() - t0)
    shared_s = statistics.median(shared_times)
    sft = statistics.median(times["sft"])
    # The update costs the same whatever the batch; the shared part grows with
    # the tokens of a step. DESIGN.md's reference step is 4 x 256 tokens.
    long_tokens = mx.array(np.resize(np.array(tokens), (batch_size, 256)), mx.int32)  # valid ids, repeated
    long_mask = mx.ones((batch_size, 256))
    long_times = []
    for _ in range(3):
        t0 = time.perf_counter()
        loss, ntoks, g = grad_fn(long_tokens, long_mask)
        mx.eval(loss, ntoks, trainer.global_norm(g), g)
        long_times.append(time.perf_counter() - t0)
        del g
    shared_long = statistics.median(long_times[1:])
    out = {"reps": reps, "shared_vs_sft_update": shared_s / sft, "shared_long_vs_sft_update": shared_long / sft,
           "batch_shape": [batch_size, width], "long_shape": [batch_size, 256], "result": {}}
    for name, ts in times.items():
        update = statistics.median(ts)
        # Per repetition, against sft's update of the same repetition: the spread.
        paired = sorted((shared_s + t) / (shared_s + u) for t, u in zip(ts, times["sft"]))
        out["result"][name] = {"update_vs_sft_update": update / sft, "step_ratio": (shared_s + update) / (shared_s + sft),
                               "step_ratio_quartiles": [paired[len(paired) // 4], paired[(3 * len(paired)) // 4]],
                               "step_ratio_long": (shared_long + update) / (shared_long + sft)}
    del fns, optimizers, model, grads, long_tokens
    gc.collect()
    mx.clear_cache()
    return out


def pipeline_section(spec: ModelSpec, folders, workdir: Path, batch_size: int, data_names: Sequence[str], passes: int) -> dict:
    """Ours vs mlx_lm, each with its own batching, over whole epochs (one warmup epoch, one timed)."""
    import mlx.core as mx

    from gmt_mlx import data as gdata

    _, tokenizer = load_model_tokenizer(spec)
    pad_id = pad_token(tokenizer)
    out = {}
    for data_name in data_names:
        rows, split = tokenized(folders[data_name], tokenizer)
        theirs_ds = mlx_lm_dataset(rows, tokenizer)
        steps = len(split) // batch_size  # one epoch, both tools
        turns = (1 + passes) * steps
        buckets = gdata.length_buckets(split.lengths(), batch_size, seed=0) if hasattr(gdata, "length_buckets") else None
        which = ["sft frozen-emb", "mlx_lm full", "lora", "mlx_lm lora"]
        contenders = build_contenders(
            spec, "pipeline", turns, DataFactory(lambda: our_batches(split, batch_size, pad_id)),
            DataFactory(lambda: mlx_lm_batches(theirs_ds, batch_size, 2048), dataset=theirs_ds), which=which,
            workdir=workdir, batch_size=batch_size, max_seq_length=2048)
        if buckets is not None:
            c = build_contenders(spec, "pipeline", turns, DataFactory(lambda: our_batches(split, batch_size, pad_id, buckets=buckets)),
                                 None, which=["sft frozen-emb"], workdir=workdir, batch_size=batch_size, max_seq_length=2048)[0]
            c.name = "sft frozen-emb, length buckets"
            contenders.insert(1, c)
        interleave(contenders, turns, f"pipeline {spec.name} / {data_name}")
        resident_bytes(contenders)
        res = summarize(contenders, steps, "sft frozen-emb")
        for ours, theirs in (("sft frozen-emb", "mlx_lm full"), ("sft frozen-emb, length buckets", "mlx_lm full"), ("lora", "mlx_lm lora")):
            if ours in res and theirs in res:
                res[ours]["tokens_per_s_vs_" + theirs.replace(" ", "_")] = res[ours]["epoch_tokens_per_s"] / res[theirs]["epoch_tokens_per_s"]
        out[data_name] = {"steps_per_epoch": steps, "timed_passes": passes, "result": res}
        del contenders
        gc.collect()
        mx.clear_cache()
    return out


_TOKENIZERS: Dict[str, object] = {}


def load_model_tokenizer(spec: ModelSpec):
    from mlx_lm.utils import load_tokenizer

    if spec.name not in _TOKENIZERS:
        _TOKENIZERS[spec.name] = load_tokenizer(spec.path)
    return None, _TOKENIZERS[spec.name]


def pad_token(tokenizer) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else int(tokenizer.eos_token_id)


# --------------------------------------------------------------------------
# Masking: where the time goes, before and after; cost vs size; accuracy
# --------------------------------------------------------------------------


def load_before() -> Optional[types.ModuleType]:
    """gmt_mlx.masking and gmt_mlx.optim as of BEFORE_COMMIT, as package `gmt_mlx_before`."""
    pkg = Path(tempfile.mkdtemp(prefix="gmt-before-")) / "gmt_mlx_before"
    pkg.mkdir()
    try:
        for name in ("masking", "optim"):
            src = subprocess.run(["git", "-C", str(REPO), "show", f"{BEFORE_COMMIT}:gmt_mlx/{name}.py"],
                                 capture_output=True, text=True, check=True).stdout
            (pkg / f"{name}.py").write_text(src)
    except (OSError, subprocess.CalledProcessError) as err:
        log(f"no 'before' masking code ({err}); skipping before/after")
        return None
    (pkg / "__init__.py").write_text("")
    sys.path.insert(0, str(pkg.parent))
    importlib.import_module("gmt_mlx_before.masking")
    return importlib.import_module("gmt_mlx_before.optim")


def timed_interleaved(fns: Dict[str, Callable[[], object]], reps: int) -> Dict[str, float]:
    """Median seconds of each zero-argument function, interleaved (first call excluded)."""
    import mlx.core as mx

    times = {k: [] for k in fns}
    for r in range(reps + 1):
        for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            t0 = time.perf_counter()
            mx.eval(fns[k]())
            if r > 0:
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def masking_section(spec: ModelSpec, before, reps: int) -> dict:
    """Pieces of the mask on this model's tensor shapes (synthetic gradients), each relative
    to one compiled AdamW update of the same tensors."""
    from functools import partial

    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten, tree_map

    from gmt_mlx import masking as new

    model, _ = load_model(spec.path)
    params = model.trainable_parameters()
    mx.random.seed(0)
    grads = tree_map(lambda p: mx.random.normal(p.shape) * 1e-3, params)
    mx.eval(grads)
    flat = [g for _, g in tree_flatten(grads)]
    key = mx.random.key(0)
    adamw = optim.AdamW(1e-5)
    adamw.init(params)
    state = [model.state, adamw.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def adamw_update(g):
        adamw.update(model, g)
        return mx.array(0)

    def compiled(fn):
        c = mx.compile(fn)
        return lambda: c(*flat)

    units = [[g] for g in flat]
    fns = {"AdamW update (the reference)": lambda: (adamw_update(grads), state)}
    old = sys.modules.get("gmt_mlx_before.masking")
    if old is not None:
        def old_pieces(kind):
            def f(*gs):
                keys = mx.random.split(key, len(gs))
                out = []
                for i, g in enumerate(gs):
                    a = mx.abs(g)
                    if kind == "sample":
                        if g.size > 65536:
                            idx = mx.random.randint(0, g.size, (65536,), key=keys[i])
                            out.append(a.reshape(-1)[idx])
                    elif kind == "threshold":
                        out.append(old.unit_threshold([a], MASK_RATIO, keys[i], 65536))
                    elif kind == "counts":
                        t = mx.array(2.5e-4)
                        out.append(mx.sum(a > t).astype(mx.int64) + mx.sum(a == t).astype(mx.int64))
                    elif kind == "tie hash + mask":
                        t = mx.array(2.5e-4)
                        out.append((a > t) | ((a == t) & (old._position_hash(a.shape, 0) < mx.array(12345, mx.uint32))))
                    elif kind == "where":
                        out.append(mx.where(a > 2.5e-4, g, mx.zeros((), g.dtype)))
                return out
            return f
        fns["before: random gather of the samples"] = compiled(old_pieces("sample"))
        fns["before: threshold (gather + partition)"] = compiled(old_pieces("threshold"))
        fns["before: 2 counting passes (> T, == T)"] = compiled(old_pieces("counts"))
        fns["before: tie hash + keep mask"] = compiled(old_pieces("tie hash + mask"))
        fns["before: mx.where to apply"] = compiled(old_pieces("where"))
        fns["before: gmt_masks, tensor scope"] = lambda: _compiled_masks(old, "tensor", key)(grads)

    def new_pieces(kind):
        def f(*gs):
            if kind == "pools":
                plans = [new._pool_plan([g], 65536, MASK_RATIO) for g in gs]
                offset = [mx.array([1], mx.int32)]
                return [new._unit_pool([g], s, w, c, offset) for g, (s, w, c) in zip(gs, plans)]
            if kind == "thresholds":
                return new.unit_thresholds([[g] for g in gs], MASK_RATIO, key, 65536)
            if kind in ("keep", "keep no ties"):
                ts = mx.full((len(gs),), 2.5e-4)
                cuts = mx.full((len(gs),), 77, mx.uint8)
                out = []
                for i, g in enumerate(gs):
                    a = mx.abs(g)
                    k = a > ts[i]
                    if kind == "keep":
                        k = k | ((a == ts[i]) & (new._position_rank(tuple(g.shape)) < cuts[i]))
                    out.append(mx.sum(k))
                return out
            if kind == "multiply":
                return [g * (mx.abs(g) > 2.5e-4) for g in gs]
        return f

    fns["after: strided samples"] = compiled(new_pieces("pools"))
    fns["after: thresholds (samples + batched partition + tie stats)"] = compiled(new_pieces("thresholds"))
    fns["after: keep mask + exact count"] = compiled(new_pieces("keep"))
    fns["after: keep mask + count, no tie test"] = compiled(new_pieces("keep no ties"))
    fns["after: multiply to apply (alone; fused into the optimizer in a step)"] = compiled(new_pieces("multiply"))
    for scope in ("tensor", "layer", "global"):
        fns[f"after: gmt_masks, {scope} scope"] = (
            lambda scope=scope: (lambda c: c(grads))(_compiled_masks(new, scope, key)))
    medians = timed_interleaved(fns, reps)
    ref = medians["AdamW update (the reference)"]
    total = sum(g.size for g in flat)
    return {"entries": total, "tensors": len(flat), "relative_to_adamw": {k: v / ref for k, v in medians.items()}}


_MASK_FNS: Dict[tuple, Callable] = {}


def _compiled_masks(module, scope, key):
    import mlx.core as mx

    k = (module.__name__, scope)
    if k not in _MASK_FNS:
        _MASK_FNS[k] = mx.compile(lambda g: module.gmt_masks(g, MASK_RATIO, scope, key))
    return _MASK_FNS[k]


def threshold_section(sizes: Sequence[int], before, reps: int) -> dict:
    """Mask cost vs entries (one tensor = one unit) relative to a copy of the same tensor,
    and the kept-fraction error over several keys and mask ratios."""
    import mlx.core as mx
    import numpy as np

    from gmt_mlx import masking as new

    old = sys.modules.get("gmt_mlx_before.masking")
    rows = []
    for n in sizes:
        cols = 1024
        mx.random.seed(n)
        # Heavy-ish tails and row structure, like a weight gradient.
        g = mx.random.normal((n // cols, cols)) * mx.random.uniform(shape=(n // cols, 1))
        mx.eval(g)
        tree = {"w": g}
        key = mx.random.key(1)
        copy = mx.compile(lambda x: x * 1.0001)
        fns = {"copy": lambda: copy(g), "after": lambda: _compiled_masks(new, "tensor", key)(tree)}
        if old is not None:
            fns["before"] = lambda: _compiled_masks(old, "tensor", key)(tree)
        med = timed_interleaved(fns, reps)
        errors = {}
        for ratio in (0.2, 0.5):
            errs = []
            for seed in range(4):
                masks, kept = new.gmt_masks(tree, ratio, "tensor", mx.random.key(100 + seed))
                errs.append(abs(masks["w"].sum().item() / n - (1 - ratio)))
            errors[f"r={ratio}"] = max(errs)
        row = {"entries": n, "after_vs_copy": med["after"] / med["copy"], "after_s_per_entry": med["after"] / n,
               "max_kept_error": errors}
        if old is not None:
            row["before_vs_copy"] = med["before"] / med["copy"]
            row["before_s_per_entry"] = med["before"] / n
        rows.append(row)
        log(f"threshold: {n / 1e6:.0f}M entries done")
        del g, tree
        gc.collect()
        mx.clear_cache()
    base = rows[0]["after_s_per_entry"]
    for row in rows:
        row["after_per_entry_vs_smallest"] = row["after_s_per_entry"] / base
        if "before_s_per_entry" in row:
            row["before_per_entry_vs_smallest"] = row["before_s_per_entry"] / rows[0]["before_s_per_entry"]
    return {"rows": rows}


def real_gradient_accuracy(spec: ModelSpec, folders, batch_size: int, keys: int) -> dict:
    """Kept fraction per unit on one real gradient of the model, every scope, several keys."""
    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np
    from mlx.utils import tree_flatten

    from gmt_mlx import masking as new
    from gmt_mlx.data import make_batch
    from gmt_mlx.losses import sft_loss

    model, tokenizer = load_model(spec.path)
    _, split = tokenized(folders["chat"], tokenizer)
    tokens, mask = make_batch(split, list(range(batch_size)), pad_id=pad_token(tokenizer), pad_multiple=8)
    _, grads = nn.value_and_grad(model, sft_loss)(model, tokens, mask)
    mx.eval(grads)
    out = {}
    names = [n for n, _ in tree_flatten(grads)]
    for scope in ("tensor", "layer", "global"):
        units = new.group_units(names, scope)
        worst, sampled_worst, n_units = 0.0, 0.0, 0
        for k in range(keys):
            masks, kept = new.gmt_masks(grads, MASK_RATIO, scope, mx.random.key(k))
            flat_m, flat_g = dict(tree_flatten(masks)), dict(tree_flatten(grads))
            for unit, members in units.items():
                size = sum(flat_g[n].size for n in members)
                if size < 10_000:
                    continue
                nonzero = sum(int((flat_g[n] != 0).sum().item()) for n in members) / size
                got = sum(int(flat_m[n].sum().item()) for n in members) / size
                err = abs(got - min(1 - MASK_RATIO, nonzero))
                worst = max(worst, err)
                if size > 65536:
                    sampled_worst = max(sampled_worst, err)
                n_units += k == 0
        out[scope] = {"units_checked": n_units, "keys": keys, "max_abs_error": worst, "max_abs_error_sampled_units": sampled_worst}
    return out


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def render(results: dict) -> str:
    env = results["environment"]
    lines = ["# Benchmark run", "", f"Command: `{env['command']}`", ""]
    lines += ["| | |", "|---|---|"]
    for k in ("cpu", "cores", "memory_gb", "os", "python", "mlx", "mlx_lm", "device", "gmt_mlx_commit", "load_average"):
        lines.append(f"| {k} | {env[k]} |")
    lines.append(f"| BLAS | {env['blas']} |")
    lines.append(f"| wall time | {results.get('wall_s', 0) / 60:.1f} min |")
    lines.append("")
    if "padding" in results:
        lines += ["## Padding waste (fraction of padded positions; distinct batch widths over 10 epochs)", "",
                  "| model / data | n | len min/mean/max | mlx_lm | ours pad 8 | pad 4 | pad 2 | pad 1 | length buckets |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, r in results["padding"].items():
            cells = [f"{pct(r[k][0])} ({r[k][1]})" if k in r else "-" for k in ("mlx_lm", "pad8", "pad4", "pad2", "pad1", "buckets")]
            lines.append(f"| {name} | {r['examples']} | {r['min_len']}/{r['mean_len']}/{r['max_len']} | " + " | ".join(cells) + " |")
        lines.append("")
    for model_name, m in results.get("models", {}).items():
        lines += [f"## {model_name}", ""]
        if "masking" in m:
            mk = m["masking"]
            lines += [f"### Where the masking time goes ({mk['entries']:,} entries in {mk['tensors']} tensors; time / one AdamW update of the same tensors)", "",
                      "| piece | x AdamW update |", "|---|---|"]
            for k, v in mk["relative_to_adamw"].items():
                lines.append(f"| {k} | {v:.2f} |")
            lines.append("")
        if "update" in m:
            up = m["update"]
            b, lb = up.get("batch_shape", ["?", "?"]), up.get("long_shape", ["?", "?"])
            lines += [f"### Step split in two: shared forward/backward/norm, then each method's update ({up['reps']} interleaved "
                      f"repetitions on one real gradient; shared part = {up['shared_vs_sft_update']:.2f} x sft's update at "
                      f"{b[0]} x {b[1]} tokens, {up.get('shared_long_vs_sft_update', float('nan')):.2f} x at {lb[0]} x {lb[1]})", "",
                      f"| method | update / sft update | step / sft step, {b[0]} x {b[1]} tokens | (quartiles over repetitions) | step / sft step, {lb[0]} x {lb[1]} tokens |",
                      "|---|---|---|---|---|"]
            for name, r in up["result"].items():
                q = r["step_ratio_quartiles"]
                lines.append(f"| {name} | {r['update_vs_sft_update']:.3f} | **{r['step_ratio']:.3f}** | ({q[0]:.3f} .. {q[1]:.3f}) | "
                             f"{r.get('step_ratio_long', float('nan')):.3f} |")
            lines.append("")
        if "step" in m:
            st = m["step"]
            titles = {"methods": "every method against sft, whole steps through `gmt_mlx.trainer.train`",
                      "versus": "ours against `mlx_lm.lora` (whole steps through each tool's own loop)"}
            for group in ("methods", "versus"):
                if group not in st:
                    continue
                res = st[group]
                ref_name = next(iter(res))
                ref = res[ref_name]
                lines += [f"### Optimizer step, {titles[group]}: fixed batch {st['batch_shape'][0]} x {st['batch_shape'][1]} tokens, "
                          f"{ref['steps']} timed steps each, ratios to {ref_name}", "",
                          f"| contender | trainable | step / {ref_name} (median per round) | (ratio of fastest steps) | tokens/s / {ref_name} | peak memory / {ref_name} | distinct shapes |",
                          "|---|---|---|---|---|---|---|"]
                for name, r in res.items():
                    lines.append(f"| {name} | {r['trainable']:,} | {r['ratio_to_ref']:.3f} | ({r['ratio_of_mins']:.3f}) | "
                                 f"{r['median_tokens_per_s'] / ref['median_tokens_per_s']:.3f} | {r['peak_gb'] / ref['peak_gb']:.3f} | {len(r['shapes'])} |")
                for name, r in res.items():
                    for k, v in r.items():
                        if k.startswith("speedup_vs_"):
                            other = k[len("speedup_vs_"):]
                            lines.append(f"\n{name} vs {other.replace('_', ' ')}: their step time / ours = **{v:.3f}** (median per round; "
                                         f"fastest steps: {r['speedup_of_fastest_vs_' + other]:.3f})")
                lines.append("")
        if "pipeline" in m:
            for data_name, p in m["pipeline"].items():
                lines += [f"### Whole epoch, own batching: {data_name} ({p['steps_per_epoch']} steps; 1 warmup pass, then each batch's "
                          f"fastest of {p['timed_passes']} passes)", "",
                          "| contender | trainable | tokens/s (real tokens) / first row | distinct shapes | ours / mlx_lm tokens/s |", "|---|---|---|---|---|"]
                first = next(iter(p["result"].values()))
                for name, r in p["result"].items():
                    vs = [f"{v:.3f}" for k, v in r.items() if k.startswith("tokens_per_s_vs_")]
                    lines.append(f"| {name} | {r['trainable']:,} | {r['epoch_tokens_per_s'] / first['epoch_tokens_per_s']:.3f} | {len(r['shapes'])} | {' '.join(vs) or '-'} |")
                lines.append("")
        if "accuracy" in m:
            lines += ["### Kept fraction on a real gradient (target 1 - mask_ratio = 0.8; units >= 10k entries)", "",
                      "| scope | units | keys | max abs error | max abs error, sampled units |", "|---|---|---|---|---|"]
            for scope, a in m["accuracy"].items():
                lines.append(f"| {scope} | {a['units_checked']} | {a['keys']} | {pct(a['max_abs_error'])} | {pct(a['max_abs_error_sampled_units'])} |")
            lines.append("")
    if "threshold" in results:
        lines += ["## Mask cost vs entries (one tensor = one unit, tensor scope)", "",
                  "| entries | after / copy pass | after per entry / 1M row | before / copy pass | before per entry / 1M row | max kept error r=0.2 | r=0.5 |",
                  "|---|---|---|---|---|---|---|"]
        for r in results["threshold"]["rows"]:
            lines.append(f"| {r['entries'] / 1e6:.0f}M | {r['after_vs_copy']:.2f} | {r['after_per_entry_vs_smallest']:.2f} | "
                         f"{r.get('before_vs_copy', float('nan')):.2f} | {r.get('before_per_entry_vs_smallest', float('nan')):.2f} | "
                         f"{pct(r['max_kept_error']['r=0.2'])} | {pct(r['max_kept_error']['r=0.5'])} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model only, fewer sizes and steps (~3 min)")
    parser.add_argument("--models", default=None, help="comma-separated: tiny, smollm2-135m (default: both; --quick: tiny)")
    parser.add_argument("--sections", default="padding,masking,threshold,step,pipeline,accuracy")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per method in the step section, twice that for ours vs mlx_lm (default 3; --quick 6)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="folder for the JSON and markdown results")
    parser.add_argument("--no-blas", action="store_true", help="keep MLX's bundled reference BLAS (no re-exec)")
    args = parser.parse_args(argv)
    if not args.no_blas:
        from gmt_mlx.blas import maybe_reexec_with_blas

        log(f"BLAS: {maybe_reexec_with_blas()}")
    t_start = time.perf_counter()
    sections = set(args.sections.split(","))
    models = args.models.split(",") if args.models else (["tiny"] if args.quick else ["tiny", "smollm2-135m"])
    timed = args.steps or (6 if args.quick else 3)
    workdir = Path(tempfile.mkdtemp(prefix="gmt-bench-"))
    results: dict = {"environment": environment(), "models": {}}
    specs = model_specs(models, workdir)
    folders = datasets(workdir, args.quick)
    before = load_before() if sections & {"masking", "threshold", "step"} else None
    if "padding" in sections:
        log("padding")
        results["padding"] = padding_section(specs, folders, args.batch_size)
    for spec in specs:
        m = results["models"].setdefault(spec.name, {})
        if "masking" in sections:
            log(f"masking {spec.name}")
            m["masking"] = masking_section(spec, before, reps=3 if args.quick else 4)
        if "accuracy" in sections:
            log(f"accuracy {spec.name}")
            m["accuracy"] = real_gradient_accuracy(spec, folders, args.batch_size, keys=3)
        if "step" in sections:
            log(f"update {spec.name}")
            m["update"] = update_section(spec, folders, args.batch_size, reps=12 if args.quick else 10, before=before)
            m["step"] = step_section(spec, folders, workdir, args.batch_size,
                                     {"methods": timed, "versus": 2 * timed}, before)
        if "pipeline" in sections:
            data_names = ["chat", "mixed"] if (args.quick or spec.name.startswith("tiny")) else ["mixed"]
            passes = 2 if (args.quick or spec.name.startswith("tiny")) else 1
            m["pipeline"] = pipeline_section(spec, folders, workdir, args.batch_size, data_names, passes)
    if "threshold" in sections:
        log("threshold")
        sizes = [2**20, 2**22, 2**24] if args.quick else [2**20, 2**22, 2**24, 2**26, 2**27]
        results["threshold"] = threshold_section(sizes, before, reps=3)
    results["wall_s"] = time.perf_counter() - t_start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "quick" if args.quick else "full"
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1, default=str))
    report = render(results)
    (out / f"{stem}.md").write_text(report)
    print(report)
    log(f"done in {results['wall_s'] / 60:.1f} min; wrote {out / (stem + '.md')} and {stem}.json")


if __name__ == "__main__":
    main()
