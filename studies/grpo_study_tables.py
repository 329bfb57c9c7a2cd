"""Tables and curves of the GRPO study (studies/grpo_study.py), from its raw results only.

    python studies/grpo_study_tables.py docs/evidence/grpo     # writes tables.md and curves.png there

Reads base.json, rates.json and every trained/RUN/study.json; trains nothing. Means ± sample standard
deviations over seeds; "vs full" is the mean ± std of the per-seed differences to full fine-tuning with
the same seed (paired: same prompts in the same order; the rollouts differ once the weights do).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from study_tools import paired, rate_of, stat

LABELS = ("full", "gmt-r0.8", "random-r0.8", "lora")


def load(folder: Path):
    base = json.loads((folder / "base.json").read_text())
    rates = json.loads((folder / "rates.json").read_text()) if (folder / "rates.json").is_file() else {}
    runs = [json.loads(p.read_text()) for p in sorted(folder.glob("trained/*/study.json"))]
    return base, rates, runs


def main_runs(runs: list, rates: dict, label: str) -> dict:
    """seed -> run, at the method's chosen learning rate."""
    return {r["seed"]: r for r in runs if r["label"] == label and r["learning_rate"] == rate_of(rates, label)}


def step_seconds(run: dict) -> float:
    """Median rollout + update seconds of a step, the first (compiling) left out."""
    steps = [a + b for a, b in zip(run["rollout_seconds"], run["update_seconds"])][1:]
    return statistics.median(steps)


def sweep_table(runs: list, rates: dict) -> list:
    lines = [
        "| method | learning rate | val reward, steps 0 / 8 / 16 | train reward, last 8 steps | "
        "test number (not used to choose) | chosen |",
        "|---|---|---|---|---|---|",
    ]
    for label in ("full", "lora"):
        for r in sorted((r for r in runs if r["label"] == label and r["seed"] == 0), key=lambda r: r["learning_rate"]):
            chosen = "**yes**" if r["learning_rate"] == rate_of(rates, label) else ""
            curve = " / ".join(f"{c['val_reward']:.3f}" for c in r["curve"])
            lines.append(
                f"| {label} | {r['learning_rate']:g} | {curve} | {r['late_train_reward']:.3f} "
                f"| {r['end']['test_number'] * 100:.1f}% | {chosen} |"
            )
    return lines


def result_tables(base: dict, runs: list, rates: dict) -> list:
    full = main_runs(runs, rates, "full")
    acc = [
        "| method | lr | seeds | test, `number` (%) | vs full | test, reasoning-gym checker (%) | vs full "
        "| val reward at end | train reward, last 8 steps |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    forget = ["| method | English loss increase over base | vs full |", "|---|---|---|"]
    cost = [
        "| method | step time / full's (same seed) | rollout share of a step | peak memory, GB | kept fraction |",
        "|---|---|---|---|---|",
    ]
    for label in LABELS:
        mine = main_runs(runs, rates, label)
        if not mine:
            continue
        seeds = sorted(mine)
        rs = [mine[s] for s in seeds]

        def vs(key, scale=100, digits=1, label=label, mine=mine):
            return stat(paired(mine, full, key), scale, digits, sign=True) if label != "full" else ""

        acc.append(
            f"| {label} | {rate_of(rates, label):g} | {','.join(map(str, seeds))} "
            f"| {stat([r['end']['test_number'] for r in rs], 100)} | {vs(lambda r: r['end']['test_number'])} "
            f"| {stat([r['end']['test_reasoning_gym'] for r in rs], 100)} "
            f"| {vs(lambda r: r['end']['test_reasoning_gym'])} "
            f"| {stat([r['final_val_reward'] for r in rs], digits=3)} "
            f"| {stat([r['late_train_reward'] for r in rs], digits=3)} |"
        )
        rise = [r["end"]["english_loss"] - base["english_loss"] for r in rs]
        forget.append(
            f"| {label} | {stat(rise, digits=3, sign=True)} | {vs(lambda r: r['end']['english_loss'], 1, 3)} |"
        )
        ratios = [step_seconds(mine[s]) / step_seconds(full[s]) for s in seeds if s in full]
        share = [
            statistics.median(a / (a + b) for a, b in zip(r["rollout_seconds"][1:], r["update_seconds"][1:]))
            for r in rs
        ]
        kept = [
            statistics.mean(k for k in r["kept_fraction"] if k is not None)
            for r in rs
            if any(k is not None for k in r["kept_fraction"])
        ]
        cost.append(
            f"| {label} | {stat(ratios, digits=3)} | {stat(share, 100, 0)}% "
            f"| {stat([r['peak_memory_gb'] for r in rs], digits=2)} | {stat(kept, digits=3) if kept else '-'} |"
        )
    return (
        ["Held-out test split (48 prompts, greedy, at most 24 tokens):", ""]
        + acc
        + [
            "",
            f"Forgetting: loss on 16 rows of English never trained on (base {base['english_loss']:.3f} nats/token):",
            "",
        ]
        + forget
        + ["", "Cost (runs one after another on a shared 2-core machine; benchmarks/ has interleaved ratios):", ""]
        + cost
        + [""]
    )


def plot(runs: list, rates: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label in LABELS:
        mine = main_runs(runs, rates, label)
        if not mine:
            continue
        steps = [c["step"] for c in next(iter(mine.values()))["curve"]]
        val = [
            statistics.mean(c["val_reward"] for r in mine.values() for c in r["curve"] if c["step"] == s) for s in steps
        ]
        axes[0].plot(steps, val, marker="o", label=label)
        train_steps = [s for s, _ in next(iter(mine.values()))["train_reward"]]
        train = [statistics.mean(r["train_reward"][i][1] for r in mine.values()) for i in range(len(train_steps))]
        axes[1].plot(train_steps, train, marker=".", label=label)
    axes[0].set_ylabel("validation reward (greedy, 16 prompts)")
    axes[1].set_ylabel("training reward (sampled, 8 completions a step)")
    for ax in axes:
        ax.set_xlabel("optimizer step")
    axes[0].legend()
    fig.suptitle("GRPO, SmolLM2-135M on chain_sum, reward `number`: mean over seeds")
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/evidence/grpo")
    base, rates, runs = load(folder)
    lines = [
        "# GRPO study: tables",
        "",
        f"Generated by `python studies/grpo_study_tables.py {folder}` from the raw results in this folder.",
        "",
        f"Base model: test `number` {base['test_number'] * 100:.1f}%, reasoning-gym checker "
        f"{base['test_reasoning_gym'] * 100:.1f}%, English loss {base['english_loss']:.3f}.",
        "",
        "## Learning-rate sweep (seed 0; highest validation reward at the end)",
        "",
    ]
    lines += sweep_table(runs, rates) + ["", "## Results", ""] + result_tables(base, runs, rates)
    (folder / "tables.md").write_text("\n".join(lines) + "\n")
    plot(runs, rates, folder / "curves.png")
    print(f"wrote {folder / 'tables.md'} and {folder / 'curves.png'}")


if __name__ == "__main__":
    main()
