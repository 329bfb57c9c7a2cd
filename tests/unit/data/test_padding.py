"""Length buckets: bounded batch widths with the least padding."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from gmt_mlx.data.batching import batch_order, iterate_batches, length_buckets, make_batch, padding_waste
from gmt_mlx.data.encoding import Example, TokenizedSplit


def split_of(lengths, max_seq_length=None):
    return TokenizedSplit(
        [Example.after(list(range(1, n + 1)), 0) for n in lengths], 0, "train", max_seq_length=max_seq_length
    )


def batch_maxima(lengths, batch_size, seed, epochs):
    return [
        max(lengths[i] for i in b) for e in range(epochs) for b in batch_order(lengths, batch_size, seed=seed, epoch=e)
    ]


def test_buckets_are_optimal_against_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(25):
        lengths = [int(n) for n in rng.integers(5, 40, int(rng.integers(8, 30)))]
        max_buckets = int(rng.integers(1, 5))
        buckets = length_buckets(lengths, 2, seed=3, max_buckets=max_buckets, epochs=2)
        maxima = batch_maxima(lengths, 2, 3, 2)

        def width(bs):
            return sum(min(b for b in bs if b >= m) for m in maxima)

        others = sorted(set(maxima) - {max(lengths)})
        best = min(
            width(list(c) + [max(lengths)]) for k in range(max_buckets) for c in itertools.combinations(others, k)
        )
        assert len(buckets) <= max_buckets and buckets[-1] == max(lengths)
        assert width(buckets) == best


def test_few_distinct_lengths_get_exactly_those():
    assert length_buckets([48, 50, 52, 60] * 5, 4, seed=0) == [48, 50, 52, 60]


def test_every_batch_of_every_epoch_fits_and_shapes_stay_bounded():
    rng = np.random.default_rng(2)
    lengths = [int(n) for n in rng.integers(10, 900, 700)]
    split = split_of(lengths)
    buckets = length_buckets(lengths, 8, seed=0, max_buckets=12)
    assert len(buckets) <= 12 and buckets == sorted(buckets)
    widths = set()
    for _, epoch, tokens, _ in iterate_batches(split, 8, seed=0, pad_id=0, buckets=buckets):
        widths.add(tokens.shape[1])
        if epoch == 6:  # beyond the 4 epochs the buckets were chosen from
            break
    assert widths <= set(buckets)
    # Less padding than any other 12 widths, e.g. evenly spaced ones.
    even = [int(np.ceil(max(lengths) * k / 12)) for k in range(1, 13)]
    assert padding_waste(split, 8, seed=0, buckets=buckets) < padding_waste(split, 8, seed=0, buckets=even)


def test_make_batch_pads_to_the_smallest_bucket_that_fits():
    split = split_of([5, 9, 17])
    assert make_batch(split, [0, 1], pad_id=0, buckets=[8, 12, 20])[0].shape == (2, 12)
    assert make_batch(split, [2], pad_id=0, buckets=[8, 12, 20])[0].shape == (1, 20)
    # Longer than every bucket (buckets from another split): its own length.
    assert make_batch(split, [2], pad_id=0, buckets=[8, 12])[0].shape == (1, 17)


def test_padding_waste_with_buckets_matches_make_batch():
    split = split_of([5, 9, 17, 33, 40, 41, 70, 3])
    buckets = length_buckets(split.lengths(), 2, seed=7, max_buckets=3)
    padded = real = 0
    for indices in batch_order(split.lengths(), 2, seed=7, epoch=0):
        tokens, _ = make_batch(split, indices, pad_id=0, buckets=buckets)
        padded += tokens.size
        real += sum(split.lengths()[i] for i in indices)
    assert padding_waste(split, 2, seed=7, buckets=buckets) == pytest.approx(1 - real / padded)


def test_bad_max_buckets():
    with pytest.raises(Exception, match="max_buckets"):
        length_buckets([3, 4, 5, 6], 2, seed=0, max_buckets=0)
