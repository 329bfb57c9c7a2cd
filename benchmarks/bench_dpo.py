"""DPO step ratio GMT / full: bench_step_ratio's split (shared forward/backward/norm,
then each method's update, interleaved on one real gradient) with the DPO loss on
batch-size pairs of examples/data/prefs (two rows per pair). Issue 15's target:
GMT-DPO step / full DPO step <= 1.05 at the benchmark batch."""

from __future__ import annotations

from typing import List

import bench_step_ratio
from harness import Context, ModelSpec

NAME = "dpo"
CONTENDERS = ["sft", "gmt tensor/grad", "gmt tensor/grad ratio 0.5", "random ratio 0.5"]


def run(ctx: Context, spec: ModelSpec) -> dict:
    return bench_step_ratio.update_section(
        spec,
        ctx.folders,
        ctx.batch_size,
        reps=12 if ctx.quick else 10,
        before=None,
        train_mode="dpo",
        contenders=CONTENDERS,
    )


def render(result: dict) -> List[str]:
    return bench_step_ratio.render(result)
