"""Whole epochs, each tool with its own batching: tokens/s of ours (full with mlx_lm's
trainable set, with and without length buckets; LoRA) against mlx_lm.lora (full,
LoRA), one warmup pass, then each batch's fastest timed pass."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import List, Sequence

from harness import (
    Context,
    DataFactory,
    ModelSpec,
    build_contenders,
    interleave,
    mlx_lm_batches,
    mlx_lm_dataset,
    our_batches,
    pad_token,
    resident_bytes,
    summarize,
    tokenized,
    tokenizer_of,
)

NAME = "pipeline"


def pipeline_section(
    spec: ModelSpec, folders, workdir: Path, batch_size: int, data_names: Sequence[str], passes: int
) -> dict:
    """Ours vs mlx_lm, each with its own batching, over whole epochs (one warmup epoch, one timed)."""
    import mlx.core as mx

    from gmt_mlx.data import batching as gdata

    tokenizer = tokenizer_of(spec)
    pad_id = pad_token(tokenizer)
    out = {}
    for data_name in data_names:
        rows, split = tokenized(folders[data_name], tokenizer)
        theirs_ds = mlx_lm_dataset(rows, tokenizer)
        steps = len(split) // batch_size  # one epoch, both tools
        turns = (1 + passes) * steps
        buckets = (
            gdata.length_buckets(split.lengths(), batch_size, seed=0) if hasattr(gdata, "length_buckets") else None
        )
        which = ["sft frozen-emb", "mlx_lm full", "lora", "mlx_lm lora"]
        contenders = build_contenders(
            spec,
            turns,
            DataFactory(lambda: our_batches(split, batch_size, pad_id)),
            DataFactory(lambda: mlx_lm_batches(theirs_ds, batch_size, 2048), dataset=theirs_ds),
            which=which,
            workdir=workdir,
            batch_size=batch_size,
            max_seq_length=2048,
        )
        if buckets is not None:
            c = build_contenders(
                spec,
                turns,
                DataFactory(lambda: our_batches(split, batch_size, pad_id, buckets=buckets)),
                None,
                which=["sft frozen-emb"],
                workdir=workdir,
                batch_size=batch_size,
                max_seq_length=2048,
            )[0]
            c.name = "sft frozen-emb, length buckets"
            contenders.insert(1, c)
        interleave(contenders, turns, f"pipeline {spec.name} / {data_name}")
        resident_bytes(contenders)
        res = summarize(contenders, steps, "sft frozen-emb")
        for ours, theirs in (
            ("sft frozen-emb", "mlx_lm full"),
            ("sft frozen-emb, length buckets", "mlx_lm full"),
            ("lora", "mlx_lm lora"),
        ):
            if ours in res and theirs in res:
                res[ours]["tokens_per_s_vs_" + theirs.replace(" ", "_")] = (
                    res[ours]["epoch_tokens_per_s"] / res[theirs]["epoch_tokens_per_s"]
                )
        out[data_name] = {"steps_per_epoch": steps, "timed_passes": passes, "result": res}
        del contenders
        gc.collect()
        mx.clear_cache()
    return out


def run(ctx: Context, spec: ModelSpec) -> dict:
    small = ctx.quick or spec.name.startswith("tiny")
    return pipeline_section(
        spec,
        ctx.folders,
        ctx.workdir,
        ctx.batch_size,
        ["chat", "mixed"] if small else ["mixed"],
        passes=2 if small else 1,
    )


def render(result: dict) -> List[str]:
    """Markdown lines of this benchmark's tables."""
    lines: List[str] = []
    for data_name, p in result.items():
        lines += [
            f"### Whole epoch, own batching: {data_name} ({p['steps_per_epoch']} steps; 1 warmup pass, then each "
            f"batch's "
            f"fastest of {p['timed_passes']} passes)",
            "",
            "| contender | trainable | tokens/s (real tokens) / first row | distinct shapes | ours / mlx_lm tokens/s |",
            "|---|---|---|---|---|",
        ]
        first = next(iter(p["result"].values()))
        for name, r in p["result"].items():
            vs = [f"{v:.3f}" for k, v in r.items() if k.startswith("tokens_per_s_vs_")]
            lines.append(
                f"| {name} | {r['trainable']:,} | {r['epoch_tokens_per_s'] / first['epoch_tokens_per_s']:.3f} | "
                f"{len(r['shapes'])} | {' '.join(vs) or '-'} |"
            )
        lines.append("")
    return lines
