"""Padding: the fraction of padded positions and the number of distinct batch widths
(= compiled step variants) of our batching (pad multiples 8/4/2/1, length buckets)
and of mlx_lm's, from the lengths alone, on the shipped examples and a mixed-length set."""

from __future__ import annotations

import statistics
from typing import Dict, List, Sequence

from harness import Context, ModelSpec, pct, tokenized

NAME = "padding"


def mlx_lm_padding(lengths: Sequence[int], batch_size: int) -> tuple:
    """mlx_lm's batching (tuner/trainer.py iterate_batches): batches in file order
    (its length sort keys on len() of the raw record, a constant), each padded to
    1 + 32 * ceil(max / 32). Returns (waste, distinct shapes)."""
    padded = real = 0
    shapes = set()
    for i in range(0, len(lengths) - batch_size + 1, batch_size):
        batch = lengths[i : i + batch_size]
        width = 1 + 32 * ((max(batch) + 31) // 32)
        shapes.add(width)
        padded += batch_size * width
        real += sum(batch)
    return 1 - real / padded, len(shapes)


def our_padding(split, batch_size: int, *, pad_multiple: int = 8, buckets=None, epochs: int = 10) -> tuple:
    """(waste over epoch 0, distinct padded lengths over `epochs` epochs) of our batching."""
    from gmt_mlx.data import batching as data

    kwargs = {"buckets": buckets} if buckets is not None else {}
    waste = data.padding_waste(split, batch_size, seed=0, pad_multiple=pad_multiple, **kwargs)
    shapes = set()
    lengths = split.lengths()
    for epoch in range(epochs):
        for indices in data.batch_order(lengths, batch_size, seed=0, epoch=epoch):
            longest = max(lengths[i] for i in indices)
            if buckets is not None:
                shapes.add(min(b for b in buckets if b >= longest))
            else:
                shapes.add(data._padded_length(longest, pad_multiple, split.max_seq_length))
    return waste, len(shapes)


def padding_section(specs: List[ModelSpec], folders: Dict, batch_size: int) -> dict:
    from mlx_lm import load

    from gmt_mlx.data import batching as data

    have_buckets = hasattr(data, "length_buckets")
    out = {}
    for spec in specs:
        _, tokenizer = load(str(spec.path))
        for name, folder in folders.items():
            _, split = tokenized(folder, tokenizer)
            lengths = split.lengths()
            row = {
                "examples": len(lengths),
                "min_len": min(lengths),
                "mean_len": round(statistics.mean(lengths), 1),
                "max_len": max(lengths),
                "mlx_lm": mlx_lm_padding(lengths, batch_size),
            }
            for pm in (8, 4, 2, 1):
                row[f"pad{pm}"] = our_padding(split, batch_size, pad_multiple=pm)
            if have_buckets:
                buckets = data.length_buckets(lengths, batch_size, seed=0)
                row["buckets"] = our_padding(split, batch_size, buckets=buckets)
                row["bucket_lengths"] = buckets
            out[f"{spec.name} / {name}"] = row
    return out


def run(ctx: Context) -> dict:
    return padding_section(ctx.specs, ctx.folders, ctx.batch_size)


def render(result: dict) -> List[str]:
    """Markdown lines of this benchmark's table."""
    lines: List[str] = []
    lines += [
        "## Padding waste (fraction of padded positions; distinct batch widths over 10 epochs)",
        "",
        "| model / data | n | len min/mean/max | mlx_lm | ours pad 8 | pad 4 | pad 2 | pad 1 | length buckets |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in result.items():
        cells = [
            f"{pct(r[k][0])} ({r[k][1]})" if k in r else "-"
            for k in ("mlx_lm", "pad8", "pad4", "pad2", "pad1", "buckets")
        ]
        lines.append(
            f"| {name} | {r['examples']} | {r['min_len']}/{r['mean_len']}/{r['max_len']} | " + " | ".join(cells) + " |"
        )
    lines.append("")
    return lines
