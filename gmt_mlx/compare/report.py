"""`gmt-mlx compare`'s report: the per-method rows, results.md and the PNG plots.

`aggregate` turns the runs' summaries (compare.summarize_run) into one row
per (method, mask ratio) with mean ± std over seeds; `render_markdown` and
`write_plots` present them. Pure functions of the results dict: a comparison's
report can be rebuilt from its results.json alone.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from gmt_mlx.config import MASKED_METHODS
from gmt_mlx.objectives import objective_of

PLOTS = (
    "val_loss_vs_step.png",
    "val_loss_vs_time.png",
    "train_loss_vs_step.png",
    "kept_fraction.png",
    "mask_overlap.png",
)
# An objective whose validation measures a reward (GRPO): rewards (higher is better) where the others plot losses.
GRPO_PLOTS = (
    "val_reward_vs_step.png",
    "val_reward_vs_time.png",
    "train_reward_vs_step.png",
    "kept_fraction.png",
    "mask_overlap.png",
)


def plot_names(train_mode: Optional[str]) -> tuple:
    """The PNG files of a comparison in ``train_mode``."""
    return GRPO_PLOTS if objective_of(train_mode).measure == "reward" else PLOTS


def mean_std(values: List[Optional[float]]) -> Optional[dict]:
    """Mean and sample standard deviation (0 for a single seed) of the finite values."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": sum(values) / len(values), "std": std, "n": len(values)}


ROW_METRICS = (
    "final_val_loss",
    "best_val_loss",
    "test_loss",
    "test_ppl",
    "tokens_per_sec",
    "wall_time",
    "peak_memory_gb",
    "trainable_share",
    "updated_share",
    "kept_fraction",
    "mask_overlap",
    "final_val_reward_accuracy",
    "test_preference_accuracy",
    "test_reward_accuracy",
    "test_dpo_loss",
    "final_val_reward",
    "best_val_reward",
    "test_reward",
)


# A run's tokens/s is marked noisy when its per-step rates spread this much (interquartile range
# over median) or when fewer than 4 steps measured training alone.
NOISY_SPREAD = 0.25


def speed_is_noisy(summary: dict) -> bool:
    """Whether a run's median tokens/s rests on too few or too scattered per-step rates."""
    spread = summary.get("tokens_per_sec_spread")
    return summary.get("tokens_per_sec") is not None and (spread is None or spread > NOISY_SPREAD)


def aggregate(summaries: List[dict], scorers: Sequence[str], rewards: Sequence[str] = ()) -> List[dict]:
    """One row per (method, mask ratio): mean ± std over seeds of every metric (GRPO: each reward's too)."""
    groups: Dict[str, List[dict]] = {}
    for s in summaries:
        groups.setdefault(s["group"], []).append(s)
    rows = []
    for label, members in groups.items():
        row = {
            "group": label,
            "method": members[0]["method"],
            "mask_ratio": members[0]["mask_ratio"],
            "learning_rate": members[0]["learning_rate"],
            "seeds": [m["seed"] for m in members],
        }
        for key in ROW_METRICS:
            row[key] = mean_std([m.get(key) for m in members])
        row["accuracy"] = {name: mean_std([m["accuracy"].get(name) for m in members]) for name in scorers}
        row["test_rewards"] = {
            name: mean_std([(m.get("test_rewards") or {}).get(name) for m in members]) for name in rewards
        }
        row["speed_noisy"] = any(speed_is_noisy(m) for m in members)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------
# results.md
# --------------------------------------------------------------------------


def _fmt(stat: Optional[dict], digits: int = 4, scale: float = 1.0, suffix: str = "") -> str:
    if stat is None:
        return "—"
    mean = stat["mean"] * scale
    text = f"{mean:.{digits}f}{suffix}"
    if stat["n"] > 1:
        text += f" ± {stat['std'] * scale:.{digits}f}{suffix}"
    return text


def render_markdown(results: dict) -> str:
    """results.md: the spec, one table row per method (base model first), mask statistics, plots, samples."""
    spec, rows = results["spec"], results["rows"]
    # Preference runs have no perplexity: their columns are the validation reward accuracy and the
    # test preference accuracy (chosen answer likelier than the rejected one).
    table = objective_of(spec).report  # "loss", "preference" or "reward": the objective's own table
    preference = table == "preference"
    lines = ["# gmt-mlx compare", ""] + _spec_lines(spec)
    if table == "reward":
        lines += _reward_table(spec, rows, results["base"]) + _notes(False) + _reward_notes(spec)
    else:
        lines += _method_table(spec["eval"]["scorers"], rows, results["base"], preference) + _notes(preference)
    lines += _mask_table(rows) + _plot_lines(plot_names(spec.get("train_mode"))) + _sample_lines(results)
    return "\n".join(lines)


def _spec_lines(spec: dict) -> List[str]:
    """The command, then what was held equal and what varied, one bullet each."""
    lora = spec["lora"]
    lines: List[str] = []
    if spec.get("command"):
        lines += ["Command:", "", "```sh", spec["command"], "```", ""]
    seeds = ", ".join(map(str, spec["seeds"]))
    lines += [
        f"- model: `{spec['model']}`; data: `{spec['data']}`",
        f"- budget: {spec['steps']} optimizer steps, batch {spec['batch_size']} x "
        f"{spec['grad_accumulation_steps']} accumulation, {spec['optimizer']}, {spec['lr_schedule']} schedule "
        f"(warmup {spec['warmup_steps']}, min lr ratio {spec['min_lr_ratio']}), prompt masked: {spec['mask_prompt']}",
        f"- seeds: {seeds} (mean ± sample std over seeds; a seed fixes the data order for every method)",
        *([f"- objective: {spec['objective']}"] if spec.get("objective") else []),
        *(
            [
                f"- validation every {spec['steps_per_eval']} steps and metrics every {spec['steps_per_report']}; "
                "every validation curve starts at step 0, the base model"
            ]
            if spec.get("steps_per_eval")
            else []
        ),
        "- learning rates: " + ", ".join(f"{m} {lr:g}" for m, lr in spec["learning_rates"].items()),
        f"- GMT/random: mask scope {spec['mask_scope']}, target {spec['mask_target']}; "
        f"LoRA/DoRA: rank {lora['rank']}, scale {lora['scale']:g}, dropout {lora['dropout']:g}, "
        f"keys {lora['keys']}, blocks {'all' if lora['num_layers'] < 0 else lora['num_layers']}",
        _eval_line(spec),
        "",
    ]
    return lines


def _eval_line(spec: dict) -> str:
    """How the test evaluation went: a loss and scorers, or (GRPO) rewards of greedy answers."""
    ev, scorers = spec["eval"], spec["eval"]["scorers"]
    scored = f"scorer{'s' if len(scorers) > 1 else ''} {', '.join(scorers)}"
    if objective_of(spec).report == "reward":
        weights = " + ".join(f"{w:g} x {n}" for n, w in zip(ev.get("rewards", []), ev.get("reward_weights", [])))
        return (
            f"- evaluation: {ev['split']} split, the first {ev['limit']} prompts answered greedily (at most "
            f"{ev['max_tokens']} new tokens) and scored by the runs' rewards, {weights}"
            + (f"; also {scored}" if scorers else "")
        )
    return (
        f"- evaluation: {ev['split']} split, loss over all of it; accuracy on the first {ev['limit']} prompts, "
        f"greedy, at most {ev['max_tokens']} new tokens, {scored}"
    )


def _method_table(scorers: List[str], rows: List[dict], base: Optional[dict], preference: bool) -> List[str]:
    """The main table: the base model's row, then one row per method (mean ± std over seeds)."""
    acc_headers = [f"accuracy ({s})" for s in scorers]
    quality = ["val reward acc", "test pref. acc", "test reward acc"] if preference else ["test ppl"]
    headers = [
        "method",
        "lr",
        "final val loss",
        "best val loss",
        *quality,
        *acc_headers,
        "tokens/s",
        "train time (s)",
        "peak mem (GB)",
        "trained %",
        "updated %/step",
    ]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    if base is not None:
        lines.append(_base_row(scorers, base, preference))
    for row in rows:
        acc = [_fmt(row["accuracy"].get(s), 1, 100, "%") for s in scorers]
        if preference:
            first = [
                _fmt(row.get(key), 1, 100, "%")
                for key in ("final_val_reward_accuracy", "test_preference_accuracy", "test_reward_accuracy")
            ]
        else:
            first = [_fmt(row["test_ppl"], 3)]
        cells = [
            row["group"],
            f"{row['learning_rate']:g}",
            _fmt(row["final_val_loss"]),
            _fmt(row["best_val_loss"]),
            *first,
            *acc,
            _fmt(row["tokens_per_sec"], 0) + (" (noisy)" if row.get("speed_noisy") else ""),
            _fmt(row["wall_time"], 1),
            _fmt(row["peak_memory_gb"], 2),
            _fmt(row["trainable_share"], 2, 100, "%"),
            _fmt(row["updated_share"], 2, 100, "%"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _reward_table(spec: dict, rows: List[dict], base: Optional[dict]) -> List[str]:
    """GRPO's table: validation and test rewards (higher is better), each reward's test mean, then speed and
    memory as in `_method_table`."""
    scorers, rewards = spec["eval"]["scorers"], spec["eval"].get("rewards", [])
    headers = [
        "method",
        "lr",
        "final val reward",
        "best val reward",
        "test reward",
        *[f"test {name}" for name in rewards],
        *[f"accuracy ({s})" for s in scorers],
        "tokens/s",
        "train time (s)",
        "peak mem (GB)",
        "trained %",
        "updated %/step",
    ]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    if base is not None:
        value = lambda v: f"{v:.4f}" if v is not None else "—"  # noqa: E731
        per = [value((base.get("test_rewards") or {}).get(name)) for name in rewards]
        acc = [f"{100 * base['accuracy'][s]:.1f}%" if base["accuracy"].get(s) is not None else "—" for s in scorers]
        cells = [
            "base model (no training)",
            "—",
            value(base.get("val_reward")),
            value(base.get("val_reward")),
            value(base.get("test_reward")),
            *per,
            *acc,
            "—",
            "—",
            "—",
            "0%",
            "0%",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    for row in rows:
        per = [_fmt(row.get("test_rewards", {}).get(name)) for name in rewards]
        acc = [_fmt(row["accuracy"].get(s), 1, 100, "%") for s in scorers]
        cells = [
            row["group"],
            f"{row['learning_rate']:g}",
            _fmt(row.get("final_val_reward")),
            _fmt(row.get("best_val_reward")),
            _fmt(row.get("test_reward")),
            *per,
            *acc,
            _fmt(row["tokens_per_sec"], 0) + (" (noisy)" if row.get("speed_noisy") else ""),
            _fmt(row["wall_time"], 1),
            _fmt(row["peak_memory_gb"], 2),
            _fmt(row["trainable_share"], 2, 100, "%"),
            _fmt(row["updated_share"], 2, 100, "%"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _reward_notes(spec: dict) -> List[str]:
    """What GRPO's reward columns mean."""
    return [
        "- *val reward*: the mean weighted reward of greedy answers to the first --val-batches x --batch-size "
        "validation prompts, at most --max-completion-length tokens (the base model's is every run's step 0); "
        "higher is better. *test reward*: the same on the evaluation split (see above); *test NAME*: that "
        "reward's own unweighted mean. *tokens/s* counts prompts and sampled completions, rollouts included.",
        "",
    ]


def _base_row(scorers: List[str], base: dict, preference: bool) -> str:
    """The untrained model's table row: its own numbers, dashes where a method's do not apply."""
    acc = [f"{100 * base['accuracy'][s]:.1f}%" if base["accuracy"].get(s) is not None else "—" for s in scorers]
    if preference:
        pref = base.get("test_preference_accuracy")
        first = ["—", f"{100 * pref:.1f}%" if pref is not None else "—", "—"]
    else:
        first = [f"{base['test_ppl']:.3f}" if base.get("test_ppl") is not None else "—"]
    val = f"{base['val_loss']:.4f}" if base.get("val_loss") is not None else "—"
    cells = ["base model (no training)", "—", val, val, *first, *acc, "—", "—", "—", "0%", "0%"]
    return "| " + " | ".join(cells) + " |"


def _notes(preference: bool) -> List[str]:
    """What the table's less obvious columns mean."""
    lines = [
        "",
        "- *trained %*: share of the model's parameters that receive gradients (adapters count as extra "
        "parameters on top of the base). *updated %/step*: trained % times the mean kept fraction, i.e. the "
        "gradient entries the optimizer sees per step (with Adam and `--mask-target grad`, momentum still moves "
        "masked entries).",
        "- *tokens/s*: the median of per-step rates, measured at the report steps, leaving out the first (it "
        "compiles) and steps timed across a validation pass or checkpoint save; *(noisy)*: fewer than 4 such "
        f"steps, or their interquartile range above {NOISY_SPREAD:.0%} of the median, so compare rows with care. "
        "*train time*: the training loop with its validation passes, without model loading and saving.",
        "",
    ]
    if preference:
        lines += [
            "- *val reward acc*: the share of validation pairs whose chosen reward beats the rejected one, "
            "at the last validation. *test pref. acc*: the share of test pairs whose chosen answer the model "
            "finds likelier. *test reward acc*: the same with the base model's log-probabilities as the "
            "reference (DPO's reward accuracy on test).",
            "",
        ]
    return lines


def _mask_table(rows: List[dict]) -> List[str]:
    """GMT/random rows: mean kept fraction and mask overlap between steps ([] without such a row)."""
    masked = [r for r in rows if r["method"] in MASKED_METHODS]
    if not masked:
        return []
    lines = ["| masked method | mean kept fraction | mean mask overlap with the previous step |", "|---|---|---|"]
    for row in masked:
        lines.append(f"| {row['group']} | {_fmt(row['kept_fraction'], 3)} | {_fmt(row['mask_overlap'], 3)} |")
    lines += [
        "",
        "Mask overlap: the share of a step's kept entries that the previous step kept too, measured "
        "on a fixed sample of ~65k positions (a random mask gives 1 - ratio).",
        "",
    ]
    return lines


def _plot_lines(names: Sequence[str] = PLOTS) -> List[str]:
    """The plots write_plots draws, as images next to results.md."""
    return ["## Plots", ""] + [f"![{name[:-4].replace('_', ' ')}]({name})" for name in names] + [""]


def _sample_lines(results: dict) -> List[str]:
    """The first seed's first test prompts, with the base model's and each run's answer."""
    spec, base = results["spec"], results["base"]
    samples = [(r["name"], r["samples"]) for r in results["runs"] if r["samples"] and r["seed"] == spec["seeds"][0]]
    if not samples and not (base and base["samples"]):
        return []
    lines = ["## Sample answers (first test prompts, first seed)", ""]
    first = base["samples"] if base and base["samples"] else samples[0][1]
    for k, item in enumerate(first):
        lines.append(f"**{item['prompt'].strip()}** (reference: `{str(item['reference']).strip()}`)")
        lines.append("")
        if base and len(base["samples"]) > k:
            lines.append(f"- base model: `{_one_line(base['samples'][k]['answer'])}`")
        for name, items in samples:
            if len(items) > k:
                lines.append(f"- {name}: `{_one_line(items[k]['answer'])}`")
        lines.append("")
    return lines


def _one_line(text: str, width: int = 120) -> str:
    text = " ".join(str(text).split()).replace("`", "'")
    return text if len(text) <= width else text[: width - 1] + "…"


# --------------------------------------------------------------------------
# Plots (matplotlib's object API with the Agg canvas: no pyplot, no global state)
# --------------------------------------------------------------------------


def _series(runs: List[dict], curve: str, x_index: int, y_index: int) -> Dict[str, List[tuple]]:
    """Per group: the mean curve over seeds (points present in every seed) and its min/max."""
    groups: Dict[str, List[dict]] = {}
    for run in runs:
        groups.setdefault(run["group"], []).append(run)
    out = {}
    for label, members in groups.items():
        by_step: Dict[int, List[tuple]] = {}
        for run in members:
            for point in run["curves"][curve]:
                if point[y_index] is not None and point[x_index] is not None:
                    by_step.setdefault(point[0], []).append((point[x_index], point[y_index]))
        points = []
        for step in sorted(by_step):
            values = by_step[step]
            if len(values) == len(members):
                xs, ys = zip(*values)
                points.append((sum(xs) / len(xs), sum(ys) / len(ys), min(ys), max(ys)))
        if points:
            out[label] = points
    return out


def _plot(path: Path, title: str, xlabel: str, ylabel: str, series: Dict[str, List[tuple]], empty: str) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for label, points in series.items():
        xs, ys, lo, hi = zip(*points)
        line = ax.plot(xs, ys, marker="o", markersize=3, label=label)[0]
        if any(a != b for a, b in zip(lo, hi)):
            ax.fill_between(xs, lo, hi, alpha=0.2, color=line.get_color(), linewidth=0)
    if series:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes)
    if xlabel == "optimizer step":
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def write_plots(results: dict, out: Path) -> List[Path]:
    """The PNG plots of a comparison (mean over seeds; the band is the min-max over seeds)."""
    runs = results["runs"]
    masked = [r for r in runs if r["method"] in MASKED_METHODS]
    no_val = "no validation split"
    grpo = objective_of(results["spec"]).measure == "reward"
    names = plot_names(results["spec"].get("train_mode"))
    # GRPO: the greedy answers' mean reward (higher is better), and the rollouts' mean reward in training.
    val = "validation reward (greedy)" if grpo else "validation loss"
    train = (
        ("Rollout reward (sampled, report steps)", "mean reward", 5)
        if grpo
        else ("Training loss (report steps)", "training loss", 2)
    )
    return [
        _plot(out / names[0], val.capitalize(), "optimizer step", val, _series(runs, "val", 0, 2), no_val),
        _plot(
            out / names[1], f"{val.capitalize()} against time", "wall time (s)", val, _series(runs, "val", 1, 2), no_val
        ),
        _plot(
            out / names[2],
            train[0],
            "optimizer step",
            train[1],
            _series(runs, "train", 0, train[2]),
            "no training records",
        ),
        _plot(
            out / names[3],
            "Kept fraction of gradient entries",
            "optimizer step",
            "kept fraction",
            _series(masked, "train", 0, 3),
            "no gmt/random run",
        ),
        _plot(
            out / names[4],
            "Mask overlap with the previous step",
            "optimizer step",
            "overlap",
            _series(masked, "train", 0, 4),
            "no gmt/random run",
        ),
    ]
