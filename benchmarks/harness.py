"""The shared harness of the benchmarks: models, data, the turnstile that interleaves
training loops step by step, contenders (our loop and mlx_lm's), timing and summaries.

Each benchmark module (bench_*.py) builds on these; bench.py runs them. The method
(interleaving, warmup, ratios only) is described in benchmarks/README.md.
"""

from __future__ import annotations

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
from dataclasses import dataclass
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

    from gmt_mlx.platform.blas import blas_info

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
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "-C", str(REPO), "status", "--porcelain", "--", "gmt_mlx"], capture_output=True, text=True
            ).stdout.strip()
        )
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
    from gmt_mlx.models.tiny import make_tiny_model

    specs = []
    for name in names:
        if name == "tiny":
            # Small enough for seconds per step, big enough that matmuls dominate.
            path = make_tiny_model(
                workdir / "tiny-llama",
                hidden_size=256,
                num_hidden_layers=4,
                num_attention_heads=4,
                num_key_value_heads=2,
                intermediate_size=768,
            )
            specs.append(ModelSpec("tiny llama (256 x 4 layers)", path, 4))
        else:
            from gmt_mlx.models.resolve import resolve_model

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
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"What is {question}?"},
                    {"role": "assistant", "content": f"{question} = {sum(terms)}."},
                ]
            }
        )
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def datasets(workdir: Path, quick: bool) -> Dict[str, Path]:
    """Data folders: the shipped examples and a generated mixed-length chat set."""
    out = {name: REPO / "examples" / "data" / name for name in ("chat", "completions", "text", "prefs")}
    mixed = workdir / "mixed"
    write_jsonl(mixed / "train.jsonl", mixed_length_rows(32 if quick else 16))
    out["mixed"] = mixed
    return out


def tokenized(folder: Path, tokenizer, max_seq_length: int = 2048):
    from gmt_mlx.data.encoding import tokenize_split
    from gmt_mlx.data.sources import load_splits

    rows = load_splits(folder)["train"]
    return rows, tokenize_split(rows, tokenizer, mask_prompt=False, max_seq_length=max_seq_length, name="train")


def mlx_lm_dataset(rows: list, tokenizer):
    from mlx_lm.tuner.datasets import CacheDataset, create_dataset

    return CacheDataset(create_dataset(rows, tokenizer, types.SimpleNamespace(mask_prompt=False)))


_TOKENIZERS: Dict[str, object] = {}


def tokenizer_of(spec: ModelSpec):
    """The model's tokenizer, loaded once per run."""
    from mlx_lm.utils import load_tokenizer

    if spec.name not in _TOKENIZERS:
        _TOKENIZERS[spec.name] = load_tokenizer(spec.path)
    return _TOKENIZERS[spec.name]


def pad_token(tokenizer) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else int(tokenizer.eos_token_id)


@dataclass
class Context:
    """What every benchmark gets: the run's options, its models and data, the old masking code."""

    quick: bool
    batch_size: int
    timed_steps: int  # timed steps per contender in the whole-step benchmark
    workdir: Path
    specs: List[ModelSpec]
    folders: Dict[str, Path]
    before: Optional[types.ModuleType]  # gmt_mlx_before.optim (masking as of BEFORE_COMMIT), or None


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
    from gmt_mlx.models.loading import load_base

    model, tokenizer, _, _ = load_base(str(path))
    return model, tokenizer


def trainable_count(model) -> int:
    from mlx.utils import tree_flatten

    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))


def our_loop(model, optimizer, turns: int, grad_clip: float) -> Callable[[Iterator], None]:
    from gmt_mlx.core.trainer import train

    def run(batches):
        train(model, optimizer, batches, iters=turns + 1, grad_clip=grad_clip)

    return run


def mlx_lm_loop(model, optimizer, turns: int, dataset, max_seq_length: int, batch_size: int, workdir: Path):
    """mlx_lm.tuner.trainer.train as `mlx_lm.lora --train` calls it, without validation (and
    stopped before its final save)."""
    from mlx_lm.tuner.trainer import TrainingArgs, train

    big = 10**9
    args = TrainingArgs(
        batch_size=batch_size,
        iters=turns + 1,
        steps_per_report=big,
        steps_per_eval=big,
        steps_per_save=big,
        max_seq_length=max_seq_length,
        adapter_file=str(workdir / f"adapters-{id(model)}.safetensors"),
    )

    def run(batches):
        # Their loop calls iterate_batches(dataset=..., batch_size=..., ...); ours hands it the turnstile.
        train(
            model=model,
            optimizer=optimizer,
            train_dataset=dataset,
            val_dataset=None,
            args=args,
            iterate_batches=lambda **_: batches,
        )

    return run


def our_batches(split, batch_size: int, pad_id: int, *, fixed=None, buckets=None):
    """(tokens, mask), real tokens: a fixed batch forever, or our batching of `split`
    (epoch 0, repeated: the warmup pass compiles every shape the timed pass sees)."""
    from gmt_mlx.data import batching as data

    if fixed is not None:
        tokens, mask, real = fixed
        while True:
            yield (tokens, mask), real, 0
    lengths = split.lengths()
    order = data.batch_order(lengths, batch_size, seed=0, epoch=0)
    kwargs = {"buckets": buckets} if buckets is not None else {}
    from gmt_mlx.data.batching import PAD_MULTIPLE

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
    for batch, lengths in iterate_batches(
        dataset=dataset, batch_size=batch_size, max_seq_length=max_seq_length, loop=True, seed=0
    ):
        # Each epoch permutes the same batches: the lengths identify a batch.
        yield (batch, lengths), int(mx.sum(lengths[:, 1]).item()), tuple(lengths[:, 1].tolist())


def fixed_batch(split, batch_size: int, pad_id: int, width: int):
    """The first `batch_size` examples padded to `width`, in both tools' formats."""
    import mlx.core as mx
    import numpy as np

    from gmt_mlx.data.batching import make_batch

    indices = list(range(batch_size))
    tokens, mask = make_batch(split, indices, pad_id=pad_id, pad_multiple=width)
    assert tokens.shape[1] == width, (tokens.shape, width)
    lengths = [len(split.examples[i].tokens) for i in indices]
    theirs = mx.array(np.array([[0, n] for n in lengths], np.int32))
    return (tokens, mask, sum(lengths)), (tokens, theirs, sum(lengths))


def build_contenders(
    spec: ModelSpec,
    turns: int,
    ours_data,
    theirs_data,
    *,
    which: Sequence[str],
    workdir: Path,
    batch_size: int,
    max_seq_length: int,
    before=None,
) -> List[Contender]:
    """The contenders of one section; `ours_data()` / `theirs_data()` make fresh batch iterators."""
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from gmt_mlx.config import Config
    from gmt_mlx.core.optim import build_optimizer
    from gmt_mlx.models.methods import prepare_model

    defaults = Config()
    clip = defaults.grad_clip
    out: List[Contender] = []
    shared = {}

    def shared_full():
        # sft, gmt and random share one model and one AdamW state: a step's cost
        # does not depend on the values, and it keeps 10 contenders within memory.
        if not shared:
            model, _ = load_model(spec.path)
            prepare_model(model, Config(method="sft"))
            shared["model"] = model
            shared["adamw"] = build_optimizer(defaults.optim, defaults.learning_rate, seed=0).optimizer
        return shared["model"], shared["adamw"]

    def masked(method, scope="tensor", target="grad", sample_size=None, module=None):
        from gmt_mlx.config import MaskOptions
        from gmt_mlx.core.optim import MaskedOptimizer

        model, base = shared_full()
        ratio = 0.0 if method == "sft" else MASK_RATIO
        if module is not None:  # the 'before' code: its MaskedOptimizer takes the keywords it took then
            kw = {} if sample_size is None else {"sample_size": sample_size}
            return model, module.MaskedOptimizer(
                base, method="gmt" if method == "sft" else method, mask_ratio=ratio, scope=scope, target=target, **kw
            )
        kw = {} if sample_size is None else {"mask_sample_size": sample_size}
        mask = MaskOptions(method=method, mask_ratio=ratio, mask_scope=scope, mask_target=target, **kw)
        return model, MaskedOptimizer(base, mask, seed=0)

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
            prepare_model(model, Config(method="sft", freeze_embeddings=True, freeze_lm_head=True))
            opt = build_optimizer(defaults.optim, defaults.learning_rate, seed=0)
        elif name == "lora":
            model, _ = load_model(spec.path)
            prepare_model(model, Config(method="lora", num_layers=spec.lora_layers))
            opt = build_optimizer(defaults.optim, defaults.learning_rate, seed=0)  # lora: no mask
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
            run = mlx_lm_loop(
                model,
                opt,
                turns,
                None if theirs_data is None else theirs_data.dataset,
                max_seq_length,
                batch_size,
                workdir,
            )
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

            c.resident_bytes += sum(
                math.prod(shape) for shape in {tuple(v.shape) for _, v in tree_flatten(model.trainable_parameters())}
            )


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


GMT_CONTENDERS = [
    "sft",
    "gmt tensor/grad",
    "gmt tensor/update",
    "gmt layer/grad",
    "gmt layer/update",
    "gmt global/grad",
    "gmt global/update",
    "random",
    "gmt tensor/grad sample 16384",
    "gmt before tensor/grad",
]
VERSUS_CONTENDERS = ["sft frozen-emb", "mlx_lm full", "lora", "mlx_lm lora"]


# --------------------------------------------------------------------------
# Timing outside the loops; the masking code before issue 7
# --------------------------------------------------------------------------


def load_before() -> Optional[types.ModuleType]:
    """gmt_mlx.core.masking and gmt_mlx.core.optim as of BEFORE_COMMIT, as package `gmt_mlx_before`."""
    pkg = Path(tempfile.mkdtemp(prefix="gmt-before-")) / "gmt_mlx_before"
    pkg.mkdir()
    try:
        for name in ("masking", "optim"):
            src = subprocess.run(
                ["git", "-C", str(REPO), "show", f"{BEFORE_COMMIT}:gmt_mlx/{name}.py"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
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
        for k in list(fns) if r % 2 == 0 else list(fns)[::-1]:
            t0 = time.perf_counter()
            mx.eval(fns[k]())
            if r > 0:
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


_MASK_FNS: Dict[tuple, Callable] = {}


def compiled_masks(module, scope, key):
    """module.gmt_masks at MASK_RATIO, compiled once per (module, scope) for the whole run."""
    import mlx.core as mx

    k = (module.__name__, scope)
    if k not in _MASK_FNS:
        _MASK_FNS[k] = mx.compile(lambda g: module.gmt_masks(g, MASK_RATIO, scope, key))
    return _MASK_FNS[k]


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"
