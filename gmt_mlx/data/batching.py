"""Batching: length-grouped batches in a reproducible random order.

Batching owns what mlx-lm gets wrong: batches are grouped by length inside
random windows (so padding is small but the order is still random), the
order is a pure function of (seed, epoch), and resuming at step k skips the
first k batches without building them.
"""

from __future__ import annotations

from collections.abc import Iterator

import mlx.core as mx
import numpy as np

from gmt_mlx.data.encoding import Pair, TokenizedSplit
from gmt_mlx.errors import UserError

# Batch widths are rounded up to a multiple of 8 (the one value: training, validation, DPO's
# reference pass and the memory estimate use it). 32 left up to 31 padding positions per row
# for nothing: training batches take train_buckets' widths anyway, and evaluation's few
# shapes compile once either way, while every padded position costs a full forward.
PAD_MULTIPLE = 8


def check_split_size(n: int, batch_size: int, name: str = "train") -> None:
    # Without a split's name the lengths are a training epoch's (batch_order, length_buckets).
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if n < batch_size:
        examples = "example" if n == 1 else "examples"
        raise UserError(
            f"{name} split has {n} {examples} but --batch-size is {batch_size}; lower --batch-size or add examples"
        )


def batch_order(lengths: list[int], batch_size: int, *, seed: int, epoch: int, group_size: int = 64) -> list[list[int]]:
    """One epoch of batches (lists of example indices), grouped by length yet random.

    A permutation seeded by (seed, epoch) is cut into windows of
    batch_size * group_size examples; each window is sorted by length and
    chunked into batches, and the batch order is shuffled. group_size=1 gives
    plain random batches. The n % batch_size leftover examples sit out this
    epoch. Pure and deterministic in its arguments.
    """
    check_split_size(len(lengths), batch_size)
    if group_size < 1:
        raise UserError(f"group_size must be at least 1, got {group_size}")
    rng = np.random.default_rng((seed, epoch))
    perm = rng.permutation(len(lengths))
    # Drop the leftover from the random permutation, not after sorting: otherwise
    # the longest examples of the last window would sit out every epoch.
    perm = perm[: len(perm) - len(perm) % batch_size]
    lens = np.asarray(lengths, dtype=np.int64)
    window = batch_size * group_size
    batches: list[list[int]] = []
    for start in range(0, len(perm), window):
        chunk = perm[start : start + window]
        chunk = chunk[np.argsort(lens[chunk], kind="stable")]
        batches.extend(chunk[i : i + batch_size].tolist() for i in range(0, len(chunk), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def drawn_indices(lengths: list[int], batch_size: int, *, seed: int, steps: int, group_size: int = 64) -> list[int]:
    """The examples that steps 1..``steps`` of `iterate_batches` draw (sorted): what a short run
    needs per-example data for (DPO's reference log-probabilities), and nothing else."""
    steps_per_epoch = len(lengths) // batch_size
    drawn: set[int] = set()
    for epoch in range(-(-steps // steps_per_epoch)):
        order = batch_order(lengths, batch_size, seed=seed, epoch=epoch, group_size=group_size)
        for indices in order[: steps - epoch * steps_per_epoch]:
            drawn.update(indices)
        if len(drawn) == len(lengths):
            break
    return sorted(drawn)


def _padded_length(longest: int, pad_multiple: int, max_seq_length: int | None) -> int:
    # Rounding up bounds the number of distinct shapes mx.compile sees; the cap keeps
    # L within max_seq_length when that is not itself a multiple.
    if pad_multiple < 1:
        raise UserError(f"pad_multiple must be at least 1, got {pad_multiple}")
    length = -(-longest // pad_multiple) * pad_multiple
    if max_seq_length is not None:
        length = min(length, max(max_seq_length, longest))
    return length


def length_buckets(
    lengths: list[int], batch_size: int, *, seed: int, max_buckets: int = 16, group_size: int = 64, epochs: int = 4
) -> list[int]:
    """At most `max_buckets` padded widths that minimise the padding of our batches.

    Rounding every batch up to a multiple of 8 bounds the compiled shapes but
    wastes ~4 positions per row, 7-20% of the short examples we ship. Instead,
    take the longest example of each batch that `batch_order` makes over
    `epochs` epochs, and choose the widths (from those lengths, the longest
    example always included, so every batch of every epoch fits) that minimise
    the total padded width: an optimal 1-D segmentation, by dynamic
    programming. A dataset with at most `max_buckets` distinct batch maxima
    gets exactly those; the number of compiled step shapes is at most
    `max_buckets` whatever the length spread. Pure and deterministic.
    """
    check_split_size(len(lengths), batch_size)
    if max_buckets < 1:
        raise UserError(f"max_buckets must be at least 1, got {max_buckets}")
    longest = [
        max(lengths[i] for i in b)
        for e in range(epochs)
        for b in batch_order(lengths, batch_size, seed=seed, epoch=e, group_size=group_size)
    ]
    values, counts = np.unique(np.array(longest + [max(lengths)], dtype=np.int64), return_counts=True)
    counts[-1] -= 1  # max(lengths) was added to be a bucket, not as a batch
    if len(values) <= max_buckets:
        return values.tolist()
    # cost[j]: least total width of the batches with maxima values[:j+1] when a
    # bucket ends at values[j]; cost_k[j] = min_i cost_{k-1}[i] + values[j] * (C[j] - C[i]).
    cum = np.cumsum(counts).astype(np.float64)
    width = values.astype(np.float64)
    cost = width * cum
    parents = []
    upper = np.triu(np.ones((len(values), len(values)), dtype=bool), k=1)  # i < j
    for _ in range(max_buckets - 1):
        candidates = np.where(upper, cost[:, None] - cum[:, None] * width[None, :], np.inf)
        best = candidates.argmin(axis=0)
        new = candidates[best, np.arange(len(values))] + width * cum
        improved = new < cost
        parents.append(np.where(improved, best, -1))
        cost = np.where(improved, new, cost)
    # Walk back from the last value: each level's parent is the previous bucket's end.
    buckets, j = [int(values[-1])], len(values) - 1
    for parent in reversed(parents):
        if parent[j] >= 0:
            j = int(parent[j])
            buckets.append(int(values[j]))
    return sorted(buckets)


def _batch_width(longest: int, pad_multiple: int, max_seq_length: int | None, buckets: list[int] | None) -> int:
    """Padded width of a batch whose longest example has `longest` tokens.

    With `buckets`: the smallest bucket that holds it (a batch longer than every
    bucket, from buckets made for another split, keeps its own length); else
    `longest` rounded up to `pad_multiple`.
    """
    if buckets:
        return next((width for width in buckets if width >= longest), longest)
    return _padded_length(longest, pad_multiple, max_seq_length)


def make_batch(
    split: TokenizedSplit,
    indices: list[int],
    *,
    pad_id: int,
    pad_multiple: int = PAD_MULTIPLE,
    buckets: list[int] | None = None,
) -> tuple[mx.array, mx.array]:
    """Pad the examples at `indices` into (tokens int32 (B, L), mask float32 (B, L)).

    L is the longest example rounded up to pad_multiple (capped at the split's
    max_seq_length), or, given `buckets` (see `length_buckets`), the smallest
    bucket that holds it. mask[b, t] = 1 iff token t is a loss target, i.e.
    inside one of the example's spans and t >= 1: it is predicted from position t-1.

    A preference split's batch has 2B rows, the B chosen answers then the B
    rejected ones, and a third array when the split has its reference
    log-probabilities: (2B,) float32 in the same row order.
    """
    chosen = [split.examples[i] for i in indices]
    if chosen and isinstance(chosen[0], Pair):
        chosen = [p.chosen for p in chosen] + [p.rejected for p in chosen]
    length = _batch_width(max(len(e.tokens) for e in chosen), pad_multiple, split.max_seq_length, buckets)
    tokens = np.full((len(chosen), length), pad_id, dtype=np.int32)
    mask = np.zeros((len(chosen), length), dtype=np.float32)
    for row, example in enumerate(chosen):
        n = len(example.tokens)
        tokens[row, :n] = example.tokens
        for start, end in example.target_positions():
            mask[row, start:end] = 1.0
    if split.reference is not None:
        reference = split.reference[np.asarray(indices, dtype=np.int64)]
        return (
            mx.array(tokens),
            mx.array(mask),
            mx.array(np.concatenate([reference[:, 0], reference[:, 1]]).astype(np.float32)),
        )
    return mx.array(tokens), mx.array(mask)


def iterate_batches(
    split: TokenizedSplit,
    batch_size: int,
    *,
    seed: int,
    pad_id: int,
    start_step: int = 0,
    pad_multiple: int = PAD_MULTIPLE,
    loop: bool = True,
    group_size: int = 64,
    shard: tuple[int, int] = (0, 1),
    buckets: list[int] | None = None,
    micro_batches: int = 1,
) -> Iterator[tuple[int, int, mx.array, mx.array]]:
    """Yield (step, epoch, tokens, mask[, reference]) (see `make_batch`), step counting from start_step.

    With ``micro_batches`` k > 1 each step's batch (of ``batch_size``
    examples, this rank's share of it when sharded) is yielded as k
    contiguous micro-batches, each padded to its own width: the examples of a
    step do not depend on how it is accumulated (docs/design.md decision 8).

    Epoch e uses batch_order(seed=seed, epoch=e). With loop=True epochs go on
    forever; with loop=False only epoch 0 is yielded. Resuming at start_step
    gives exactly the batches a fresh iterator yields from that step on,
    without building the skipped ones. Batches are padded as `make_batch`
    does (to `buckets` when given).
    """
    check_split_size(len(split.examples), batch_size, split.name)
    if start_step < 0:
        raise UserError(f"start_step must be >= 0, got {start_step}")
    lengths = split.lengths()
    steps_per_epoch = len(split.examples) // batch_size
    step = start_step
    epoch, offset = divmod(start_step, steps_per_epoch)
    while loop or epoch == 0:
        order = batch_order(lengths, batch_size, seed=seed, epoch=epoch, group_size=group_size)
        for indices in order[offset:]:
            if shard[1] > 1:
                # Data-parallel: this rank's contiguous slice of the (length-sorted) global batch.
                per = len(indices) // shard[1]
                indices = indices[shard[0] * per : (shard[0] + 1) * per]
            per = len(indices) // micro_batches
            for part in range(micro_batches):
                batch = make_batch(
                    split,
                    indices[part * per : (part + 1) * per],
                    pad_id=pad_id,
                    pad_multiple=pad_multiple,
                    buckets=buckets,
                )
                yield (step, epoch, *batch)
            step += 1
        epoch, offset = epoch + 1, 0


def padding_waste(
    split: TokenizedSplit,
    batch_size: int,
    *,
    seed: int,
    pad_multiple: int = PAD_MULTIPLE,
    group_size: int = 64,
    buckets: list[int] | None = None,
) -> float:
    """Fraction of padded positions over epoch 0 of iterate_batches (from lengths only).

    Compare with group_size=1 (plain random batches) to see what grouping saves.
    """
    check_split_size(len(split.examples), batch_size, split.name)
    lengths = split.lengths()
    padded = real = 0
    for indices in batch_order(lengths, batch_size, seed=seed, epoch=0, group_size=group_size):
        batch_lengths = [lengths[i] for i in indices]
        padded += len(indices) * _batch_width(max(batch_lengths), pad_multiple, split.max_seq_length, buckets)
        real += sum(batch_lengths)
    return 1.0 - real / padded


def token_stats(split: TokenizedSplit) -> dict:
    """Counts to print at start-up: examples, tokens, target tokens, max/mean length, truncated, dropped."""
    lengths = split.lengths()
    return {
        "name": split.name,
        "count": len(lengths),
        "total_tokens": sum(lengths),
        "target_tokens": split.num_target_tokens(),
        "max_length": max(lengths, default=0),
        "mean_length": sum(lengths) / len(lengths) if lengths else 0.0,
        "truncated": split.truncated,
        "dropped": split.dropped,
    }


def pad_id(tokenizer) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its EOS."""
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if pad is not None else getattr(tokenizer, "eos_token_id", None)
    if pad is None:
        raise UserError(
            "the tokenizer has neither a pad nor an end-of-sequence token (is the model folder's "
            "tokenizer_config.json missing?)"
        )
    return int(pad)
