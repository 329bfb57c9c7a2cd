#!/usr/bin/env python
"""gmt-mlx benchmarks: step time, tokens/s and peak memory, ours against mlx_lm.lora.

    python benchmarks/bench.py                         # every benchmark, tiny llama + SmolLM2-135M (12-20 min)
    python benchmarks/bench.py --quick                 # tiny llama only (~3 min)
    python benchmarks/bench.py --sections step-ratio   # one benchmark (comma-separate several)

Benchmarks, in the order they run, one module each over the shared harness
(harness.py: models, data, the turnstile, contenders, timing):

- padding     (bench_padding.py): padding waste and distinct batch shapes of
              our batching and of mlx_lm's.
- masking     (bench_masking.py): where GMT's masking time goes, before
              (BEFORE_COMMIT) and after, relative to one AdamW update.
- accuracy    (bench_accuracy.py): kept fraction on a real gradient.
- step-ratio  (bench_step_ratio.py): GMT / SFT step ratio, precisely (the
              shared forward/backward and each method's update timed apart).
- dpo         (bench_dpo.py): the same split for the DPO step (GMT-DPO /
              full DPO), on pairs of examples/data/prefs.
- step        (bench_steps.py): whole steps of every method against sft, and
              ours against mlx_lm.lora, on one fixed batch.
- pipeline    (bench_pipeline.py): tokens/s over whole epochs, each tool
              with its own batching.
- threshold   (bench_threshold.py): mask cost vs parameter count, and its error.

All in ONE process; contenders interleaved step by step (see
benchmarks/README.md for the method, benchmarks/RESULTS.md for results). Only
ratios measured side by side are reported.

On Linux the script re-executes itself with an optimized BLAS preloaded, the
same mechanism as the gmt-mlx CLI (gmt_mlx/platform/blas.py); --no-blas keeps MLX's
reference BLAS.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Sequence

import bench_accuracy
import bench_dpo
import bench_masking
import bench_padding
import bench_pipeline
import bench_step_ratio
import bench_steps
import bench_threshold
import harness
from harness import REPO, Context, datasets, environment, load_before, log, model_specs

# The order they run in: padding, then each model's benchmarks model by model, then
# threshold (last: it allocates tensors of up to 128M entries).
FIRST, PER_MODEL, LAST = (
    [bench_padding],
    [bench_masking, bench_accuracy, bench_step_ratio, bench_dpo, bench_steps, bench_pipeline],
    [bench_threshold],
)
BENCHMARKS = FIRST + PER_MODEL + LAST
# The order of their tables in the report.
REPORT_ORDER = [bench_masking, bench_step_ratio, bench_dpo, bench_steps, bench_pipeline, bench_accuracy]
NAMES = [b.NAME for b in BENCHMARKS]
# These compare against the masking code as of BEFORE_COMMIT.
NEED_BEFORE = {"masking", "threshold", "step-ratio", "step"}


def key(bench) -> str:
    """The benchmark's key in the results JSON."""
    return getattr(bench, "KEY", bench.NAME)


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
        lines += bench_padding.render(results["padding"])
    for model_name, m in results.get("models", {}).items():
        lines += [f"## {model_name}", ""]
        for bench in REPORT_ORDER:
            if key(bench) in m:
                lines += bench.render(m[key(bench)])
    if "threshold" in results:
        lines += bench_threshold.render(results["threshold"])
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny model only, fewer sizes and steps (~3 min)")
    parser.add_argument(
        "--models", default=None, help="comma-separated: tiny, smollm2-135m (default: both; --quick: tiny)"
    )
    parser.add_argument(
        "--sections",
        default=",".join(NAMES),
        help=f"benchmarks to run, comma-separated (default: all: {','.join(NAMES)})",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="timed steps per method in the step benchmark, twice that for ours vs mlx_lm (default 3; --quick 6)",
    )
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument(
        "--out", default=str(REPO / "benchmarks" / "results"), help="folder for the JSON and markdown results"
    )
    parser.add_argument("--no-blas", action="store_true", help="keep MLX's bundled reference BLAS (no re-exec)")
    parser.add_argument(
        "--before",
        default=harness.BEFORE_COMMIT,
        help=f"the commit whose masking code the 'before' contenders run "
        f"(default {harness.BEFORE_COMMIT}, before issue 7)",
    )
    args = parser.parse_args(argv)
    harness.BEFORE_COMMIT = args.before
    sections = args.sections.split(",")
    unknown = sorted(set(sections) - set(NAMES))
    if unknown:
        parser.error(f"unknown --sections {','.join(unknown)} (choose from {','.join(NAMES)})")
    if not args.no_blas:
        from gmt_mlx.platform.blas import maybe_reexec_with_blas

        log(f"BLAS: {maybe_reexec_with_blas()}")
    t_start = time.perf_counter()
    models = args.models.split(",") if args.models else (["tiny"] if args.quick else ["tiny", "smollm2-135m"])
    workdir = Path(tempfile.mkdtemp(prefix="gmt-bench-"))
    results: dict = {"environment": environment(), "models": {}}
    specs = model_specs(models, workdir)
    ctx = Context(
        quick=args.quick,
        batch_size=args.batch_size,
        timed_steps=args.steps or (6 if args.quick else 3),
        workdir=workdir,
        specs=specs,
        folders=datasets(workdir, args.quick),
        before=load_before() if NEED_BEFORE & set(sections) else None,
    )
    chosen: List = [b for b in BENCHMARKS if b.NAME in sections]
    for bench in (b for b in FIRST if b in chosen):
        log(bench.NAME)
        results[key(bench)] = bench.run(ctx)
    for spec in specs:
        m = results["models"].setdefault(spec.name, {})
        for bench in (b for b in PER_MODEL if b in chosen):
            log(f"{bench.NAME} {spec.name}")
            m[key(bench)] = bench.run(ctx, spec)
    for bench in (b for b in LAST if b in chosen):
        log(bench.NAME)
        results[key(bench)] = bench.run(ctx)
    results["wall_s"] = time.perf_counter() - t_start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # A subset gets its own file name, so it never overwrites a full run's report.
    stem = ("quick" if args.quick else "full") + (
        "" if chosen == BENCHMARKS else "-" + "+".join(b.NAME for b in chosen)
    )
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1, default=str))
    report = render(results)
    (out / f"{stem}.md").write_text(report)
    print(report)
    log(f"done in {results['wall_s'] / 60:.1f} min; wrote {out / (stem + '.md')} and {stem}.json")


if __name__ == "__main__":
    main()
