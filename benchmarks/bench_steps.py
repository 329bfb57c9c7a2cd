"""Whole optimizer steps through each tool's own loop on one fixed batch, interleaved
step by step: every one of our methods against sft, and ours against mlx_lm.lora
(full and LoRA), with median step time, tokens/s and peak memory as ratios."""

from __future__ import annotations

import gc
import math
import statistics
from pathlib import Path
from typing import List

from harness import (
    GMT_CONTENDERS,
    VERSUS_CONTENDERS,
    Context,
    DataFactory,
    ModelSpec,
    build_contenders,
    fixed_batch,
    interleave,
    mlx_lm_batches,
    our_batches,
    pad_token,
    resident_bytes,
    summarize,
    tokenized,
    tokenizer_of,
)

NAME = "step"


def step_section(spec: ModelSpec, folders, workdir: Path, batch_size: int, timed: dict, before) -> dict:
    """Every method on one fixed batch (the first examples of the chat set, one shape).

    Two groups, each interleaved: our methods against sft (the buffer cache is
    kept between steps, as our loop keeps it), and ours against mlx_lm (every
    step starts from an empty cache, which is what mlx_lm's loop does to itself).
    """
    import mlx.core as mx

    tokenizer = tokenizer_of(spec)
    rows, split = tokenized(folders["chat"], tokenizer)
    pad_id = pad_token(tokenizer)
    width = 8 * math.ceil(max(split.lengths()[:batch_size]) / 8)
    ours_fixed, theirs_fixed = fixed_batch(split, batch_size, pad_id, width)
    warmup = 1
    out = {"batch_shape": [batch_size, width], "warmup_steps": warmup}
    for group, which, reference, cold in (
        ("methods", GMT_CONTENDERS, "sft", False),
        ("versus", VERSUS_CONTENDERS, "sft frozen-emb", True),
    ):
        turns = warmup + timed[group]
        contenders = build_contenders(
            spec,
            turns,
            DataFactory(lambda: our_batches(None, batch_size, pad_id, fixed=ours_fixed)),
            DataFactory(lambda: mlx_lm_batches(None, batch_size, 2048, fixed=theirs_fixed)),
            which=which,
            workdir=workdir,
            batch_size=batch_size,
            max_seq_length=2048,
            before=before,
        )
        for c in contenders:
            c.cold_cache = cold
        mx.clear_cache()
        interleave(contenders, turns, f"step {spec.name} / {group}")
        resident_bytes(contenders)
        result = summarize(contenders, warmup, reference)
        for pair in (("sft frozen-emb", "mlx_lm full"), ("lora", "mlx_lm lora")):
            if all(p in result for p in pair):
                ours, theirs = (next(c for c in contenders if c.name == p) for p in pair)
                ratios = [b.seconds / a.seconds for a, b in zip(ours.records[warmup:], theirs.records[warmup:])]
                result[pair[0]]["speedup_vs_" + pair[1].replace(" ", "_")] = statistics.median(ratios)
                result[pair[0]]["speedup_of_fastest_vs_" + pair[1].replace(" ", "_")] = min(
                    r.seconds for r in theirs.records[warmup:]
                ) / min(r.seconds for r in ours.records[warmup:])
        out[group] = result
        del contenders
        gc.collect()
        mx.clear_cache()
    return out


def run(ctx: Context, spec: ModelSpec) -> dict:
    return step_section(
        spec,
        ctx.folders,
        ctx.workdir,
        ctx.batch_size,
        {"methods": ctx.timed_steps, "versus": 2 * ctx.timed_steps},
        ctx.before,
    )


def render(result: dict) -> List[str]:
    """Markdown lines of this benchmark's tables."""
    lines: List[str] = []
    st = result
    titles = {
        "methods": "every method against sft, whole steps through `gmt_mlx.core.trainer.train`",
        "versus": "ours against `mlx_lm.lora` (whole steps through each tool's own loop)",
    }
    for group in ("methods", "versus"):
        if group not in st:
            continue
        res = st[group]
        ref_name = next(iter(res))
        ref = res[ref_name]
        lines += [
            f"### Optimizer step, {titles[group]}: fixed batch {st['batch_shape'][0]} x {st['batch_shape'][1]} tokens, "
            f"{ref['steps']} timed steps each, ratios to {ref_name}",
            "",
            f"| contender | trainable | step / {ref_name} (median per round) | (ratio of fastest steps) | tokens/s / "
            f"{ref_name} | peak memory / {ref_name} | distinct shapes |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, r in res.items():
            lines.append(
                f"| {name} | {r['trainable']:,} | {r['ratio_to_ref']:.3f} | ({r['ratio_of_mins']:.3f}) | "
                f"{r['median_tokens_per_s'] / ref['median_tokens_per_s']:.3f} | {r['peak_gb'] / ref['peak_gb']:.3f} | "
                f"{len(r['shapes'])} |"
            )
        for name, r in res.items():
            for k, v in r.items():
                if k.startswith("speedup_vs_"):
                    other = k[len("speedup_vs_") :]
                    lines.append(
                        f"\n{name} vs {other.replace('_', ' ')}: their step time / ours = **{v:.3f}** (median per "
                        f"round; "
                        f"fastest steps: {r['speedup_of_fastest_vs_' + other]:.3f})"
                    )
        lines.append("")
    return lines
