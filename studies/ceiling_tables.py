"""Tables and curves of the second evidence study (studies/ceiling_study.py), from its raw results only.

    python studies/ceiling_tables.py docs/evidence/ceiling     # writes tables.md and curves.png there

Reads base.json, rates.json and every REGIME/RUN/study.json; trains nothing. Means ± sample
standard deviations over seeds; "vs full" is the mean ± std of the per-seed differences to
full fine-tuning with the same seed (paired: same data order).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from study_tools import paired, rate_of, stat

LABELS = ("full", "gmt-r0.5", "gmt-r0.8", "random-r0.5", "lora")
REGIMES = {
    "small": "(b) small set: 32 examples, 24 steps (each example seen 6 times)",
    "large": "(a) much data: 512 examples, 32 steps (no example repeated)",
}


def load(folder: Path):
    base = json.loads((folder / "base.json").read_text())
    rates = json.loads((folder / "rates.json").read_text()) if (folder / "rates.json").is_file() else {}
    runs = [json.loads(p.read_text()) for p in sorted(folder.glob("*/*/study.json"))]
    return base, rates, runs


def main_runs(runs: list, rates: dict, regime: str, label: str) -> dict:
    """seed -> run, at the method's chosen learning rate."""
    return {
        r["seed"]: r
        for r in runs
        if r["regime"] == regime and r["label"] == label and r["learning_rate"] == rate_of(rates, label)
    }


def median_step(run: dict) -> float:
    return statistics.median(run["step_seconds"][1:] or run["step_seconds"])  # the first includes compiling


def sweep_table(runs: list, rates: dict) -> list:
    lines = ["| method | learning rate | lowest val loss | at step | chosen |", "|---|---|---|---|---|"]
    for label in ("full", "lora"):
        for r in sorted(
            (r for r in runs if r["regime"] == "small" and r["label"] == label and r["seed"] == 0),
            key=lambda r: r["learning_rate"],
        ):
            chosen = "**yes**" if r["learning_rate"] == rate_of(rates, label) else ""
            lines.append(
                f"| {label} | {r['learning_rate']:g} | {r['best_val_loss']:.4f} | {r['best_step']} | {chosen} |"
            )
    return lines


def regime_tables(base: dict, runs: list, rates: dict, regime: str) -> list:
    full = main_runs(runs, rates, regime, "full")
    acc = [
        "| method | lr | seeds | test acc. at selected | vs full | test acc. at end | vs full | lowest val loss | "
        "step selected | val exact at selected |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    forget = [
        "| method | English loss increase, selected | at end | vs full (end) | leg_counting loss increase, selected "
        "| at end | vs full (end) |",
        "|---|---|---|---|---|---|---|",
    ]
    cost = [
        "| method | step time / full's (same seed) | training wall time, s | peak memory, GB |",
        "|---|---|---|---|",
    ]
    for label in LABELS:
        mine = main_runs(runs, rates, regime, label)
        if not mine:
            continue
        seeds = sorted(mine)
        rs = [mine[s] for s in seeds]
        exact_at_best = [next(c["val_exact_match"] for c in r["curve"] if c["step"] == r["best_step"]) for r in rs]
        vs_full = label != "full"  # the paired difference to full, for every other method

        def legs_end(r):
            return r["end"]["leg_counting_loss"]

        acc.append(
            f"| {label} | {rate_of(rates, label):g} | {','.join(map(str, seeds))} "
            f"| {stat([r['best']['test_accuracy'] for r in rs], 100)} "
            f"| {stat(paired(mine, full, lambda r: r['best']['test_accuracy']), 100, sign=True) if vs_full else ''} "
            f"| {stat([r['end']['test_accuracy'] for r in rs], 100)} "
            f"| {stat(paired(mine, full, lambda r: r['end']['test_accuracy']), 100, sign=True) if vs_full else ''} "
            f"| {stat([r['best_val_loss'] for r in rs], digits=4)} | {', '.join(str(r['best_step']) for r in rs)} "
            f"| {stat(exact_at_best, 100)} |"
        )
        rise = {
            (probe, when): [r[when][f"{probe}_loss"] - base[f"{probe}_loss"] for r in rs]
            for probe in ("english", "leg_counting")
            for when in ("best", "end")
        }
        forget.append(
            f"| {label} | {stat(rise['english', 'best'], digits=3, sign=True)} "
            f"| {stat(rise['english', 'end'], digits=3, sign=True)} "
            f"| {stat(paired(mine, full, lambda r: r['end']['english_loss']), digits=3, sign=True) if vs_full else ''} "
            f"| {stat(rise['leg_counting', 'best'], digits=3, sign=True)} "
            f"| {stat(rise['leg_counting', 'end'], digits=3, sign=True)} "
            f"| {stat(paired(mine, full, legs_end), digits=3, sign=True) if vs_full else ''} "
            f"|"
        )
        ratios = [median_step(mine[s]) / median_step(full[s]) for s in seeds if s in full]
        cost.append(
            f"| {label} | {stat(ratios, digits=3)} | {stat([r['train_seconds'] for r in rs], digits=0)} "
            f"| {stat([r['peak_memory_gb'] for r in rs], digits=2)} |"
        )
    return (
        [f"### {REGIMES[regime]}", "", "Held-out accuracy (reasoning-gym's checker, 128 test problems, %):", ""]
        + acc
        + [
            "",
            f"Forgetting: loss increase over the base model (base: English {base['english_loss']:.3f}, "
            f"leg_counting {base['leg_counting_loss']:.3f}; 16 rows each):",
            "",
        ]
        + forget
        + ["", "Cost (runs one after another on a shared 2-core machine; benchmarks/ has the interleaved ratios):", ""]
        + cost
        + [""]
    )


def plot(runs: list, rates: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex="col")
    for row, regime in enumerate(REGIMES):
        for label in LABELS:
            mine = main_runs(runs, rates, regime, label)
            if not mine:
                continue
            steps = [c["step"] for c in next(iter(mine.values()))["curve"]]
            for col, key, scale in ((0, "val_loss", 1.0), (1, "val_exact_match", 100.0)):
                means = [
                    statistics.mean(c[key] * scale for r in mine.values() for c in r["curve"] if c["step"] == s)
                    for s in steps
                ]
                axes[row][col].plot(steps, means, marker="o", markersize=3, label=label)
        axes[row][0].set_ylabel(f"{regime}: validation loss")
        axes[row][1].set_ylabel(f"{regime}: validation exact match, %")
    for ax in axes[1]:
        ax.set_xlabel("optimizer step (batch 8)")
    axes[0][0].legend()
    fig.suptitle("SmolLM2-135M on chain_sum: mean over seeds")
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/evidence/ceiling")
    base, rates, runs = load(folder)
    lines = (
        [
            "# Second evidence study: tables",
            "",
            f"Generated by `python studies/ceiling_tables.py {folder}` from the raw results in this folder.",
            "",
            f"Base model: test accuracy {base['test_accuracy'] * 100:.1f}%, English loss {base['english_loss']:.3f}, "
            f"leg_counting loss {base['leg_counting_loss']:.3f}.",
            "",
            "## Learning-rate sweep (small regime, seed 0; lowest validation loss reached)",
            "",
        ]
        + sweep_table(runs, rates)
        + [""]
    )
    lines += ["## Results", ""]
    for regime in REGIMES:
        lines += regime_tables(base, runs, rates, regime)
    (folder / "tables.md").write_text("\n".join(lines) + "\n")
    plot(runs, rates, folder / "curves.png")
    print(f"wrote {folder / 'tables.md'} and {folder / 'curves.png'}")


if __name__ == "__main__":
    main()
