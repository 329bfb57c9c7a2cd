"""Threshold: the cost of the mask against parameter count (1M .. 128M entries, one
tensor = one unit) relative to a copy pass of the same tensor, per-entry cost
relative to the smallest size, and the kept-fraction error."""

from __future__ import annotations

import gc
import sys
from typing import List, Sequence

from harness import Context, compiled_masks, log, pct, timed_interleaved

NAME = "threshold"


def threshold_row(n: int, old, reps: int) -> dict:
    """One size: the mask's time relative to a copy pass, and its kept-fraction error."""
    import mlx.core as mx

    from gmt_mlx.core import masking as new

    cols = 1024
    mx.random.seed(n)
    # Heavy-ish tails and row structure, like a weight gradient.
    g = mx.random.normal((n // cols, cols)) * mx.random.uniform(shape=(n // cols, 1))
    mx.eval(g)
    tree = {"w": g}
    key = mx.random.key(1)
    copy = mx.compile(lambda x: x * 1.0001)
    fns = {"copy": lambda: copy(g), "after": lambda: compiled_masks(new, "tensor", key)(tree)}
    if old is not None:
        fns["before"] = lambda: compiled_masks(old, "tensor", key)(tree)
    med = timed_interleaved(fns, reps)
    errors = {}
    for ratio in (0.2, 0.5):
        errs = []
        for seed in range(4):
            masks, _ = new.gmt_masks(tree, ratio, "tensor", mx.random.key(100 + seed))
            errs.append(abs(masks["w"].sum().item() / n - (1 - ratio)))
        errors[f"r={ratio}"] = max(errs)
    row = {
        "entries": n,
        "after_vs_copy": med["after"] / med["copy"],
        "after_s_per_entry": med["after"] / n,
        "max_kept_error": errors,
    }
    if old is not None:
        row["before_vs_copy"] = med["before"] / med["copy"]
        row["before_s_per_entry"] = med["before"] / n
    return row


def threshold_section(sizes: Sequence[int], reps: int) -> dict:
    """Mask cost vs entries (one tensor = one unit) relative to a copy of the same tensor,
    and the kept-fraction error over several keys and mask ratios."""
    import mlx.core as mx

    old = sys.modules.get("gmt_mlx_before.masking")
    rows = []
    for n in sizes:
        rows.append(threshold_row(n, old, reps))  # its tensors are freed on return
        log(f"threshold: {n / 1e6:.0f}M entries done")
        gc.collect()
        mx.clear_cache()
    base = rows[0]["after_s_per_entry"]
    for row in rows:
        row["after_per_entry_vs_smallest"] = row["after_s_per_entry"] / base
        if "before_s_per_entry" in row:
            row["before_per_entry_vs_smallest"] = row["before_s_per_entry"] / rows[0]["before_s_per_entry"]
    return {"rows": rows}


def run(ctx: Context) -> dict:
    sizes = [2**20, 2**22, 2**24] if ctx.quick else [2**20, 2**22, 2**24, 2**26, 2**27]
    return threshold_section(sizes, reps=3)


def render(result: dict) -> List[str]:
    """Markdown lines of this benchmark's tables."""
    lines: List[str] = []
    lines += [
        "## Mask cost vs entries (one tensor = one unit, tensor scope)",
        "",
        "| entries | after / copy pass | after per entry / 1M row | before / copy pass | before per entry / 1M row | "
        "max kept error r=0.2 | r=0.5 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['entries'] / 1e6:.0f}M | {r['after_vs_copy']:.2f} | {r['after_per_entry_vs_smallest']:.2f} | "
            f"{r.get('before_vs_copy', float('nan')):.2f} | {r.get('before_per_entry_vs_smallest', float('nan')):.2f} "
            f"| "
            f"{pct(r['max_kept_error']['r=0.2'])} | {pct(r['max_kept_error']['r=0.5'])} |"
        )
    lines.append("")
    return lines
