"""GRPO step costs (issue 23's benchmarks): where a step's time goes, and GMT-GRPO step / full GRPO step.

Three sections, on SmolLM2-135M and examples/data/chain_sum (reward reasoning_gym,
4 completions per prompt, at most 16 tokens each, 4 prompts a step):

- ``fixed``: the step the loop runs, on the same rollouts for every method. One
  round of rollouts is sampled once (the recipe's own ``RolloutBatches``), then
  each method's set-up (``recipes.setup.build_setup``: model, masked optimizer,
  GRPO loss, exactly as ``gmt-mlx finetune`` builds them) runs the trainer's
  fused compiled step (``trainer.make_fused_step``, what ``trainer.train`` calls
  when there is no accumulation) on that batch, ``--reps`` times, interleaved
  (A B, B A, ...), each evaluated with the state as ``train`` does. Step ratio
  = median(method) / median(full). The same batch is also split as
  bench_step_ratio does: the part every full-weight method shares (``grad_fn``
  + norm) and each method's update (``update_fn``: clip, mask, AdamW), to show
  what the mask itself costs next to a GRPO gradient.
- ``reencode``: how often decoding the sampled ids and encoding the text again changes them (what the
  decode/re-encode of older mlx-lm-lora GRPO trainers trained on), on the recipe's own rollouts.
- ``runs``: whole steps of real ``gmt-mlx finetune --train-mode grpo`` runs,
  full and gmt alternating run by run (full, gmt, full, gmt); from each run's
  metrics.jsonl (``--steps-per-report 1``): rollout_seconds and update_seconds
  per step. Steps after the first (compilation) only. Gives the share of a
  step spent in rollouts and the whole-step ratio gmt / full (rollouts included,
  which differ a little between the runs once their weights part).

    python benchmarks/bench_grpo.py                      # fixed and runs, ~17 min on 2 cores
    python benchmarks/bench_grpo.py --sections fixed     # only the fixed-rollout step ratio (~8 min)
    python benchmarks/bench_grpo.py --sections reencode --reencode-prompts 32 --reencode-tokens 64   # ~2 min
    python benchmarks/bench_grpo.py --sections runs --iters 6 --pairs 2

Writes benchmarks/results/grpo-<section>.json (and prints a summary). On Linux
CPU it first re-executes itself with an optimized BLAS preloaded (gmt_mlx/platform/blas.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from harness import environment, log  # noqa: E402

MODEL = "smollm2-135m"
DATA = REPO / "examples" / "data" / "chain_sum"
# The settings every section shares (the sample run; lr as the GRPO study's range).
SETTINGS = {
    "reward": "reasoning_gym",
    "num_generations": 4,
    "max_completion_length": 16,
    "batch_size": 4,
    "learning_rate": 1e-5,
}


def _config(method: str, iters: int, **extra):
    from gmt_mlx.config import Config

    return Config(
        model=MODEL, data=str(DATA), train_mode="grpo", method=method, iters=iters, **{**SETTINGS, **extra}
    ).validate()


def fixed_section(methods, reps: int, cold: bool = False) -> dict:
    """Every method's fused step on one fixed round of rollouts, interleaved (see the module docstring)."""
    import mlx.core as mx

    from gmt_mlx.core import trainer
    from gmt_mlx.recipes.setup import build_setup

    quiet = lambda *_: None  # noqa: E731
    runs = {}
    for method in methods:
        run = build_setup(_config(method, iters=100), quiet)
        run.optimizer.init(run.model.trainable_parameters())
        runs[method] = run
    # One round of rollouts, sampled by the first set-up's (step-0) model: every method trains on it.
    first = runs[methods[0]]
    t0 = time.perf_counter()
    batch = next(iter(first.session.rollouts))
    rollout_s = time.perf_counter() - t0
    stats = dict(first.session.rollouts.round.stats)
    log(
        f"rollouts: {rollout_s:.1f}s, batch shape {tuple(batch[0].shape)}, reward {stats.get('reward'):.3f}, "
        f"completion length {stats.get('completion_length'):.1f}"
    )

    fused, split, states = {}, {}, {}
    for method, run in runs.items():
        run.model.train()
        fused[method] = trainer.make_fused_step(run.model, run.optimizer, run.loss_fn, SETTINGS_GRAD_CLIP[0])
        split[method] = trainer.make_step_fns(run.model, run.optimizer, run.loss_fn, SETTINGS_GRAD_CLIP[0])
        states[method] = trainer.training_state(run.model, run.optimizer)

    def fused_step(method):
        loss, count, metrics, norm, kept, applied = fused[method](None, *batch)
        mx.eval(norm, kept, applied, loss, count, metrics, states[method])  # as trainer.train
        return int(kept.item())

    def shared(method):
        loss, count, metrics, grads = split[method][0](*batch)
        scale = 1.0 / mx.maximum(count, 1.0)
        norm = trainer.global_norm(grads) * scale
        mx.eval(loss, count, metrics, grads, scale, norm)
        return grads, scale, norm

    # Warm-up: compile every function once (the first step of a run is not timed either).
    kept = {}
    for method in methods:
        kept[method] = fused_step(method)
        args = shared(method)
        mx.eval(split[method][1](*args), states[method])
        del args
    log(f"compiled; kept entries per method: {kept}")
    times = {m: [] for m in methods}
    shared_times, update_times = [], {m: [] for m in methods}
    ref = methods[0]
    for r in range(reps):
        order = methods if r % 2 == 0 else methods[::-1]
        for method in order:
            if cold:
                mx.clear_cache()  # an empty buffer cache for each step (trainer.train keeps its cache)
            t0 = time.perf_counter()
            fused_step(method)
            times[method].append(time.perf_counter() - t0)
        # The split: the shared gradient once (the reference method's), then each update on it.
        t0 = time.perf_counter()
        args = shared(ref)
        shared_times.append(time.perf_counter() - t0)
        for method in order:
            if cold:
                mx.clear_cache()
            t0 = time.perf_counter()
            mx.eval(split[method][1](*args), states[method])
            update_times[method].append(time.perf_counter() - t0)
        del args
        log(
            f"rep {r + 1}/{reps}: "
            + ", ".join(f"{m} {times[m][-1]:.2f}s" for m in methods)
            + f" | shared {shared_times[-1]:.2f}s, updates "
            + ", ".join(f"{m} {update_times[m][-1]:.3f}s" for m in methods)
        )
    base = statistics.median(times[ref])
    shared_s = statistics.median(shared_times)
    base_update = statistics.median(update_times[ref])
    out = {
        "methods": methods,
        "reps": reps,
        "cold_cache": cold,
        "rollout_seconds_vs_full_step": rollout_s / base,
        "batch_shape": list(batch[0].shape),
        "rollout_stats": stats,
        "shared_vs_full_update": shared_s / base_update,
        "result": {},
    }
    for method in methods:
        paired = sorted(t / u for t, u in zip(times[method], times[ref]))
        update = statistics.median(update_times[method])
        out["result"][method] = {
            "step_ratio": statistics.median(times[method]) / base,
            "step_ratio_paired_quartiles": [paired[len(paired) // 4], paired[(3 * len(paired)) // 4]],
            "update_vs_full_update": update / base_update,
            "split_step_ratio": (shared_s + update) / (shared_s + base_update),
            "kept_entries": kept[method],
        }
    return out


SETTINGS_GRAD_CLIP = [1.0]  # Config's default --grad-clip (set from it in main)


def runs_section(methods, iters: int, pairs: int, workdir: Path) -> dict:
    """Real `gmt-mlx finetune` runs, alternating methods run by run; per-step rollout/update seconds."""
    gmt_bin = Path(sys.executable).with_name("gmt-mlx")
    commands, per_run = {}, []
    for p in range(pairs):
        order = methods if p % 2 == 0 else methods[::-1]
        for method in order:
            out_dir = workdir / f"grpo-{method}-{p}"
            cmd = [
                str(gmt_bin),
                "finetune",
                "--model",
                MODEL,
                "--data",
                str(DATA),
                "--train-mode",
                "grpo",
                "--method",
                method,
                "--reward",
                SETTINGS["reward"],
                "--num-generations",
                str(SETTINGS["num_generations"]),
                "--max-completion-length",
                str(SETTINGS["max_completion_length"]),
                "--batch-size",
                str(SETTINGS["batch_size"]),
                "--iters",
                str(iters),
                "--learning-rate",
                str(SETTINGS["learning_rate"]),
                "--steps-per-report",
                "1",
                "--steps-per-eval",
                "0",
                "--val-batches",
                "1",
                "--samples",
                "0",
                "--steps-per-save",
                "0",
                "--out",
                str(out_dir),
                "--overwrite",
            ]
            commands[method] = (
                " ".join(["gmt-mlx"] + cmd[1:]).replace(str(REPO) + "/", "").replace(str(workdir), "$TMP")
            )
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True, text=True)
            rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
            train = [r for r in rows if r.get("type") == "train"]
            per_run.append(
                {
                    "method": method,
                    "pair": p,
                    "wall_s": time.perf_counter() - t0,
                    "steps": [
                        {
                            k: r.get(k)
                            for k in (
                                "step",
                                "rollout_seconds",
                                "update_seconds",
                                "completion_length",
                                "reward",
                                "kept_fraction",
                                "peak_memory_gb",
                            )
                        }
                        for r in train
                    ],
                }
            )
            log(f"run {method} #{p}: {len(train)} steps in {per_run[-1]['wall_s']:.0f}s")
    out = {"methods": methods, "iters": iters, "pairs": pairs, "commands": commands, "runs": per_run, "result": {}}
    for method in methods:
        steps = [s for r in per_run if r["method"] == method for s in r["steps"] if s["step"] > 1]
        rollout = [s["rollout_seconds"] for s in steps]
        update = [s["update_seconds"] for s in steps]
        whole = [a + b for a, b in zip(rollout, update)]
        out["result"][method] = {
            "steps_counted": len(steps),
            "rollout_share_median": statistics.median(a / w for a, w in zip(rollout, whole)),
            "rollout_seconds_median": statistics.median(rollout),
            "update_seconds_median": statistics.median(update),
            "step_seconds_median": statistics.median(whole),
            "completion_length_mean": statistics.mean(s["completion_length"] for s in steps),
            "peak_memory_gb_max": max(s["peak_memory_gb"] for s in steps),
        }
    ref = out["result"][methods[0]]
    for method in methods:
        r = out["result"][method]
        r["step_ratio"] = r["step_seconds_median"] / ref["step_seconds_median"]
        r["update_ratio"] = r["update_seconds_median"] / ref["update_seconds_median"]
    # Paired by (pair, step): the same step number of runs started one after the other.
    if len(methods) == 2:
        a, b = methods
        pairs_ratio = []
        for p in range(pairs):
            ra = {s["step"]: s for r in per_run if r["method"] == a and r["pair"] == p for s in r["steps"]}
            rb = {s["step"]: s for r in per_run if r["method"] == b and r["pair"] == p for s in r["steps"]}
            for step in sorted(set(ra) & set(rb)):
                if step > 1:
                    pairs_ratio.append((rb[step]["update_seconds"]) / (ra[step]["update_seconds"]))
        out["update_ratio_paired_median"] = statistics.median(pairs_ratio) if pairs_ratio else None
    return out


def reencode_section(prompts: int, max_tokens: int, seed: int = 0) -> dict:
    """How often decoding sampled completion ids and encoding the text again changes them: what a trainer
    that re-encodes completions (instead of keeping the ids, as ours and mlx-lm-lora 5.10 do) would train on.
    The rollouts are the recipe's own (``sample_rollouts``, temperature 1, top-p 1) on the first ``prompts``
    train prompts, 4 completions each; the text is what a reward sees (stop token dropped, ``completion_text``)."""
    from gmt_mlx.objectives.grpo.rollouts import completion_text, sample_rollouts
    from gmt_mlx.recipes.setup import build_setup

    run = build_setup(_config("full", iters=100, max_completion_length=max_tokens, seed=seed), lambda *_: None)
    tok, stops = run.tokenizer, run.session.rollouts.stops
    g = SETTINGS["num_generations"]
    changed = changed_tokens = total = tokens = truncated = changed_truncated = 0
    examples = []
    key = seed
    for start in range(0, prompts, SETTINGS["batch_size"]):
        batch = [run.train_split.examples[i].tokens for i in range(start, min(start + SETTINGS["batch_size"], prompts))]
        out = sample_rollouts(
            run.model,
            tok,
            batch,
            num_generations=g,
            temperature=1.0,
            top_p=1.0,
            max_completion_length=max_tokens,
            key=key,
            stop_ids=stops,
        )
        key = out.next_key
        for ids, cut in zip(out.completion_ids, out.truncated):
            body = ids[:-1] if ids and ids[-1] in stops else list(ids)
            again = tok.encode(completion_text(tok, ids, stops), add_special_tokens=False)
            total += 1
            tokens += len(body)
            truncated += bool(cut)
            if again != body:
                changed += 1
                changed_truncated += bool(cut)
                changed_tokens += sum(a != b for a, b in zip(again, body)) + abs(len(again) - len(body))
                if len(examples) < 5:
                    examples.append({"sampled": body, "reencoded": again, "text": tok.decode(body)})
        log(f"reencode: {total} completions, {changed} changed")
    return {
        "prompts": prompts,
        "num_generations": g,
        "max_completion_length": max_tokens,
        "completions": total,
        "completion_tokens": tokens,
        "changed": changed,
        "changed_fraction": changed / total,
        "changed_tokens": changed_tokens,
        "truncated": truncated,
        "changed_among_truncated": changed_truncated,
        "examples": examples,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="fixed,runs", help="fixed, runs, reencode (comma-separated)")
    parser.add_argument("--methods", default="full,gmt", help="the first is the reference of the ratios")
    parser.add_argument("--reps", type=int, default=10, help="fixed: timed steps per method")
    parser.add_argument(
        "--cold-cache",
        action="store_true",
        help="fixed: empty MLX's buffer cache before each timed call (trainer.train does not)",
    )
    parser.add_argument("--iters", type=int, default=6, help="runs: steps per run")
    parser.add_argument("--pairs", type=int, default=2, help="runs: runs per method")
    parser.add_argument("--reencode-prompts", type=int, default=32)
    parser.add_argument("--reencode-tokens", type=int, default=64, help="reencode: max completion length")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--workdir", default="/tmp/bench-grpo")
    parser.add_argument("--no-blas", action="store_true")
    args = parser.parse_args()
    if not args.no_blas:
        from gmt_mlx.platform.blas import maybe_reexec_with_blas

        print(f"BLAS: {maybe_reexec_with_blas()}", flush=True)
    from gmt_mlx.config import Config

    SETTINGS_GRAD_CLIP[0] = Config().grad_clip
    methods = args.methods.split(",")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    env = environment()
    for section in args.sections.split(","):
        start = time.perf_counter()
        if section == "fixed":
            result = fixed_section(methods, args.reps, args.cold_cache)
            name = "fixed-cold" if args.cold_cache else "fixed"
        elif section == "reencode":
            name = "reencode"
            result = reencode_section(args.reencode_prompts, args.reencode_tokens)
        elif section == "runs":
            name = "runs"
            result = runs_section(methods, args.iters, args.pairs, workdir)
        else:
            raise SystemExit(f"unknown section {section!r}")
        result["seconds"] = time.perf_counter() - start
        result["settings"] = {"model": MODEL, "data": "examples/data/chain_sum", **SETTINGS}
        result["environment"] = env
        path = out_dir / f"grpo-{name}.json"
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps({k: v for k, v in result.items() if k not in ("runs", "environment")}, indent=1))
        log(f"wrote {path}")


if __name__ == "__main__":
    main()
