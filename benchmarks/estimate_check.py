"""The start-up memory estimate (gmt_mlx/run/memory.py), recomputed now, against measured MLX peaks.

    python benchmarks/estimate_check.py benchmarks/results/estimate-135m.json [more.json ...] [--reference]

For every gmt-mlx contender of a `bench_memory.py` report it rebuilds the
run's configuration (bench_memory's common arguments, then the contender's),
loads the model lazily (shapes only: nothing is computed), prepares it as
`finetune` does and asks `recipes.setup.check_memory` for the estimate, with
the report's token count as the longest training example. ``--reference``
adds the 1.39B rows measured in earlier rounds (benchmarks/RESULTS.md, issue
22), with the options their `--low-memory` meant then. Prints a markdown
table (contender, MLX peak, estimate then, estimate now, error now) and, with
``--write``, stores ``estimate_now_gb`` beside each contender in its report.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from gmt_mlx.config import resolve  # noqa: E402

SHAPES = Path.home() / ".cache" / "gmt-mlx" / "bench-shapes"
LOW_8BIT = ["--train-dtype", "bfloat16", "--moments", "8bit", "--update-per-layer", "--grad-clip", "0"]
LOW_4BIT = ["--train-dtype", "bfloat16", "--moments", "4bit", "--update-per-layer"]
FROZEN = ["--freeze-embeddings", "--freeze-lm-head"]
# (name, MLX peak GB, options, where it was measured): 1.39B shape, batch 1 x 49 tokens.
REFERENCE = [
    (
        "1.4b full fused bf16 8bit-factored",
        11.44,
        ["--method", "full", "--train-dtype", "bfloat16", "--moments", "8bit-factored", "--grad-clip", "0"],
        "memory-1.4b.json, 4af8c8f",
    ),
    (
        "1.4b gmt fused bf16 8bit-factored",
        12.85,
        ["--method", "gmt", "--train-dtype", "bfloat16", "--moments", "8bit-factored", "--grad-clip", "0"],
        "memory-1.4b.json, 4af8c8f",
    ),
    (
        "1.4b gmt fused bf16 8bit",
        14.42,
        ["--method", "gmt", "--train-dtype", "bfloat16", "--moments", "8bit", "--grad-clip", "0"],
        "memory-1.4b-lowmem-8bit.json, 0f1abc9",
    ),
    ("1.4b gmt per-layer 8bit", 6.83, ["--method", "gmt"] + LOW_8BIT, "memory-1.4b-per-layer.json, 9b3f34c"),
    ("1.4b full per-layer 8bit", 6.54, ["--method", "full"] + LOW_8BIT, "memory-1.4b-per-layer.json, 9b3f34c"),
    (
        "1.4b gmt per-layer 8bit-factored",
        5.63,
        ["--method", "gmt"] + LOW_8BIT + ["--moments", "8bit-factored"],
        "memory-1.4b-per-layer.json, 9b3f34c",
    ),
    (
        "1.4b gmt per-layer 8bit frozen",
        5.82,
        ["--method", "gmt"] + LOW_8BIT + FROZEN,
        "memory-1.4b-frozen.json, 8e31ba5",
    ),
    (
        "1.4b full per-layer 8bit frozen",
        5.74,
        ["--method", "full"] + LOW_8BIT + FROZEN,
        "memory-1.4b-frozen.json, 8e31ba5",
    ),
    (
        "1.4b gmt per-layer 8bit-factored frozen",
        4.51,
        ["--method", "gmt"] + LOW_8BIT + ["--moments", "8bit-factored"] + FROZEN,
        "memory-1.4b-frozen.json, 8e31ba5",
    ),
    ("1.4b gmt per-layer 4bit", 5.37, ["--method", "gmt"] + LOW_4BIT, "memory-1.4b-4bit (main job, 2026-12-03 14:53)"),
    ("1.4b gmt per-layer 4bit frozen", 4.50, ["--method", "gmt"] + LOW_4BIT + FROZEN, "memory-1.4b-4bit"),
    ("1.4b full per-layer 4bit frozen", 4.42, ["--method", "full"] + LOW_4BIT + FROZEN, "memory-1.4b-4bit"),
]
COMMON = ["--batch-size", "1", "--grad-clip", "1.0"]


def overrides(args: list) -> dict:
    """`gmt-mlx finetune` options as config values (the last of a repeated option wins)."""
    from gmt_mlx.config import field_types

    types, out, i = field_types(), {}, 0
    while i < len(args):
        name = args[i][2:].replace("-", "_")
        has_value = i + 1 < len(args) and not args[i + 1].startswith("--")
        if has_value:
            if name in types:
                out[name] = types[name](args[i + 1])
            i += 2
            continue
        if name in types:
            out[name] = True
        elif name.startswith("no_") and name[3:] in types:
            out[name[3:]] = False
        i += 1
    return out


class _Split:
    """A training split's lengths: all that check_memory reads of it."""

    def __init__(self, lengths):
        self._lengths = list(lengths)

    def lengths(self):
        return self._lengths


def estimate_for(folder: Path, args: list, lengths: list):
    """check_memory's estimate for a run of ``args`` on the model in ``folder`` (loaded lazily)."""
    from mlx_lm.utils import load_model

    from gmt_mlx.models.methods import enable_grad_checkpoint, prepare_model
    from gmt_mlx.recipes.setup import check_memory

    values = dict(args) if isinstance(args, dict) else overrides(args)
    values.update(model=str(folder), data="unused", memory_check=False)
    config = resolve(overrides=values)
    model, model_config = load_model(folder, lazy=True)
    sizes = prepare_model(model, config)
    if config.grad_checkpoint:
        enable_grad_checkpoint(model)
    return check_memory(config, model, model_config, sizes, _Split(lengths), lambda _: None)


def run_row(run: Path) -> tuple:
    """(name, MLX peak, estimate then, config, model folder, lengths) of a finished `gmt-mlx finetune` run
    directory: its config.yaml, its largest peak_memory_gb, its data tokenized again."""
    import yaml
    from mlx_lm.utils import load_tokenizer

    from gmt_mlx.data.sources import data_options, load_splits
    from gmt_mlx.models.resolve import resolve_model
    from gmt_mlx.objectives import objective_of

    values = yaml.safe_load((run / "config.yaml").read_text())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("type") == "train"]
    peak = max(r["peak_memory_gb"] for r in train)
    folder = resolve_model(values["model"])
    config = resolve(overrides=values)
    rows = load_splits(config.data, **data_options(config))
    lengths = (
        objective_of(config)
        .tokenize(config, {"train": rows["train"]}, load_tokenizer(folder), lambda _: None)["train"]
        .lengths()
    )
    return run.name, peak, train[-1].get("memory_estimate_gb"), values, folder, lengths


def rows_of(report: dict) -> list:
    """(name, MLX peak, estimate then, options, model folder, lengths) of a bench_memory report's gmt-mlx rows."""
    tokens = report["tokens_per_example"]
    lengths = tokens if isinstance(tokens, list) else [tokens] * 4
    common = [a for a in report["gmt_common_args"]]
    return [
        (c["name"], c["mlx_peak_gb"], c.get("estimate_gb"), common + c["extra_args"], Path(report["model"]), lengths)
        for c in report["contenders"]
        if c["tool"] == "gmt-mlx" and c["ok"]
    ]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("reports", nargs="*", type=Path)
    ap.add_argument("--reference", action="store_true", help="add the earlier 1.39B rows")
    ap.add_argument("--runs", nargs="*", type=Path, default=[], help="finished `gmt-mlx finetune` run directories")
    ap.add_argument("--write", action="store_true", help="store estimate_now_gb in each report")
    args = ap.parse_args(argv)
    lines = ["| contender | MLX peak GB | estimate then | estimate now | error now |", "|---|---|---|---|---|"]
    worst = 0.0
    for path in args.reports:
        report = json.loads(path.read_text())
        now = {}
        for name, peak, then, options, folder, lengths in rows_of(report):
            est = estimate_for(folder, options, lengths)
            now[name] = est.total / 1e9
            worst = max(worst, abs(now[name] / peak - 1))
            lines.append(_line(f"{report['shape']} {name}", peak, then, now[name]) + f" <!-- {est.describe()} -->")
        if args.write:
            for c in report["contenders"]:
                if c["name"] in now:
                    c["estimate_now_gb"] = round(now[c["name"]], 3)
            path.write_text(json.dumps(report, indent=2) + "\n")
    for run in args.runs:
        name, peak, then, values, folder, lengths = run_row(run)
        est = estimate_for(folder, values, lengths)
        worst = max(worst, abs(est.total / 1e9 / peak - 1))
        lines.append(_line(f"run {name}", peak, then, est.total / 1e9) + f" <!-- {est.describe()} -->")
    if args.reference:
        for name, peak, options, _ in REFERENCE:
            est = estimate_for(SHAPES / "qwen2-1.4b-bfloat16", COMMON + options, [49] * 4)
            worst = max(worst, abs(est.total / 1e9 / peak - 1))
            lines.append(_line(name, peak, None, est.total / 1e9) + f" <!-- {est.describe()} -->")
    print("\n".join(lines))
    print(f"\nlargest error: {100 * worst:.1f}%")


def _line(name: str, peak: float, then, now: float) -> str:
    then_text = "-" if then is None else f"{then:.2f} ({100 * (then / peak - 1):+.0f}%)"
    return f"| {name} | {peak:.2f} | {then_text} | {now:.2f} | {100 * (now / peak - 1):+.1f}% |"


if __name__ == "__main__":
    main()
