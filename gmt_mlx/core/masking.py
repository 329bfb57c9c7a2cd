"""Gradient masks for Gradient-Mask Tuning, as pure functions on gradient trees.

Nothing here touches a model, an optimizer or a file, so every function can be
traced by `mx.compile`. The unit that shares one threshold is chosen by the
*scope*:

- ``tensor``: one threshold per parameter tensor (the paper's default);
- ``layer``: one threshold per transformer block (``...layers.N.``); parameters
  outside any block (embeddings, final norm, lm_head) are their own unit;
- ``global``: one threshold across all trainable parameters.

Within a unit the ``mask_ratio`` fraction of entries with the smallest |g| is
dropped, without sorting:

1. The threshold T is the ``mask_ratio`` quantile of |g|: exact
   (``mx.partition``) for a unit of at most ``sample_size`` entries, else
   estimated from a systematic sample (`sample_entries` says how many).
2. Entries above T are kept; entries equal to T (ties) fill the gap to the
   target count, chosen by a fixed, uniform 16-bit rank of their position.
3. Entries whose gradient is exactly zero are never kept.

Why it is built this way, its error and its cost: docs/masking.md.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache
from typing import Dict, List, NamedTuple, Tuple

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map_with_path

from gmt_mlx.config import MASK_SCOPES, MaskOptions, check_mask_ratio

# The keyword defaults below are Config's (--mask-scope, --mask-sample-size), written there once.
_DEFAULT = MaskOptions()

_BLOCK = re.compile(r"^(.*?\blayers\.\d+)\.")
# 2^32 / golden ratio: consecutive indices times this constant spread evenly
# over [0, 2^32) (Fibonacci hashing), so the positions whose rank is below any
# cut are a fair, deterministic, evenly spread subset of any tensor.
_FIB = 2654435769
# Tie ranks are 16 bits: a tie fraction is resolved to 1/65536 of the tied entries.
_RANK_LEVELS = 65536
# Sample-size rule (sample_entries): relative error of the kept count at high ratios,
# and the cap on a unit's sample, in multiples of sample_size.
_HIGH_RATIO_FACTOR = 6.25
_MAX_SAMPLE_FACTOR = 16


def unit_of(name: str, scope: str) -> str:
    """The name of the masking unit a parameter belongs to under ``scope``."""
    if scope == "tensor":
        return name
    if scope == "global":
        return "<all>"
    if scope == "layer":
        match = _BLOCK.match(name)
        return match.group(1) if match else name
    raise ValueError(f"unknown mask scope {scope!r} (expected one of {', '.join(MASK_SCOPES)})")


def group_units(names: List[str], scope: str) -> Dict[str, List[str]]:
    """Group parameter names into masking units, keeping first-seen order."""
    units: Dict[str, List[str]] = {}
    for name in names:
        units.setdefault(unit_of(name, scope), []).append(name)
    return units


def hash_start(first: int) -> mx.array:
    """The hash of flat index ``first`` (uint32): `index_hash`'s ``start`` for a slice beginning there."""
    return mx.array((first * _FIB) & 0xFFFFFFFF, mx.uint32)


def index_hash(shape: Tuple[int, ...], start: mx.array | None = None) -> mx.array:
    """Fibonacci hash (uint32) of each entry's flat index.

    A broadcast sum of a column and a row term, so that no index array of the
    tensor's full size is materialised for it. ``start`` (`hash_start`) makes
    the indices those of a slice of a larger tensor: (first + i) * FIB wraps
    like first * FIB + i * FIB, so rows hashed in slices equal the whole.
    """
    if len(shape) == 0:
        shape = (1,)
    cols = shape[-1]
    rows = math.prod(shape[:-1])
    col = mx.arange(cols, dtype=mx.uint32) * mx.array(_FIB, mx.uint32)
    row = mx.arange(rows, dtype=mx.uint32) * mx.array((cols * _FIB) & 0xFFFFFFFF, mx.uint32)
    hashed = row[:, None] + col[None, :]
    if start is not None:
        hashed = hashed + start
    # No reshape when the shape is already 2-D: inside a compiled function a
    # reshape ends the fused kernel, materialising the hash (4 bytes per entry).
    return hashed if len(shape) == 2 else hashed.reshape(shape)


@lru_cache(maxsize=64)
def position_rank(shape: Tuple[int, ...]) -> mx.array:
    """A fixed uint16 rank (0 .. 65535) per position: the top 16 bits of its index hash.

    Every rank holds the same share of positions (an 8-bit rank squeezed into
    255 levels gave rank 0 a double share). Cached per shape: a contiguous
    constant keeps the tie test in the fast kernel (see docs/masking.md).
    """
    rank = (index_hash(shape) >> 16).astype(mx.uint16)
    mx.eval(rank)
    return rank


def sample_stride(total: int, draws: int, row_lengths: List[int]) -> Tuple[int, int]:
    """(stride, width) of a systematic sample of about `draws` entries: `width`
    adjacent entries out of every `stride`, the stride sharing no factor with
    any row length of the unit.

    A stride sharing a factor d with the row length visits only 1/d of the
    columns (a stride equal to it, a single column), and a weight gradient's
    magnitudes differ by column: strides 2 and 4 missed the kept fraction of
    real SmolLM2 and tiny-llama gradients by up to 1.7%. Preferred: width 1
    and the stride nearest total / draws, up to 25% longer than ideal (fewer
    draws, error std. dev. up to 12% larger) or anywhere shorter. Where none
    qualifies (an ideal stride of 2 or 3 and even row lengths, like
    SmolLM2's 576 x 192 k/v projections), the shortest qualifying longer
    stride with as many adjacent entries per stride as keep the draws near
    `draws` (k/v: 2 of every 5 entries instead of the whole tensor, which
    made partitioning those 60 tensors half of all the threshold work).
    (1, 1) means the whole unit, exactly.
    """

    def qualifies(stride: int) -> bool:
        return all(math.gcd(stride, n) == 1 for n in row_lengths)

    ideal = total / draws
    longest = math.floor(1.25 * ideal)
    # Candidates by distance from the ideal stride, the shorter one first on a tie.
    below, above = math.floor(ideal), math.floor(ideal) + 1
    while below >= 2 or above <= longest:
        for stride in sorted((s for s in (below, above) if 2 <= s <= longest), key=lambda s: (abs(s - ideal), s)):
            if qualifies(stride):
                return stride, 1
        below, above = below - 1, above + 1
    for stride in range(max(2, longest + 1), max(2, longest + 1) + 64):
        width = max(1, round(stride / ideal))
        if qualifies(stride) and width <= 0.75 * stride:
            return stride, width
    return 1, 1


def sample_entries(sample_size: int, mask_ratio: float) -> int:
    """Entries to sample from a large unit at ``mask_ratio`` r (docs/masking.md).

    4 r (1 - r) * sample_size holds the kept fraction's standard deviation at
    1 / (2 sqrt(sample_size)) (0.2% at 65536) for every r. Above r = 0.8 that
    would be a large share of the small kept set, so the sample grows with
    r / (1 - r) to hold the kept count's relative error at 2.5 / sqrt(sample_size)
    (1%), up to 16 x sample_size.
    """
    r = mask_ratio
    factor = max(4 * r * (1 - r), r / (_HIGH_RATIO_FACTOR * (1 - r)))
    return max(1024, math.ceil(min(factor, _MAX_SAMPLE_FACTOR) * sample_size))


def pool_plan(grads: List[mx.array], sample_size: int, mask_ratio: float) -> Tuple[int, int, List[int]]:
    """(stride, width, strides per tensor) of a unit's sample; (1, 1, sizes) means the whole unit (exact).

    The sample takes `width` adjacent entries from every whole stride of each tensor.
    """
    total = sum(g.size for g in grads)
    if total <= sample_size:
        return 1, 1, [g.size for g in grads]
    row_lengths = sorted({g.shape[-1] for g in grads if g.ndim > 1})
    stride, width = sample_stride(total, sample_entries(sample_size, mask_ratio), row_lengths)
    if stride == 1:
        return 1, 1, [g.size for g in grads]
    # One stride for the whole unit: each tensor contributes in proportion to its size.
    return stride, width, [g.size // stride for g in grads]


def unit_pool(grads: List[mx.array], stride: int, width: int, counts: List[int], offsets: List[mx.array]) -> mx.array:
    """|g| of the whole unit (stride 1) or of its systematic sample (one offset per tensor)."""
    if stride == 1:
        return mx.concatenate([mx.abs(g).reshape(-1) for g in grads])
    parts = []
    for g, count, offset in zip(grads, counts, offsets):
        if count == 0:  # a tensor smaller than the stride has less than one entry's share
            continue
        # Row i of this view holds entries [i * stride, (i + 1) * stride);
        # `width` adjacent columns of it, at a random offset, are the sample.
        # Slice the gradient before taking |.|, so that no full-size |g| is
        # materialised here.
        rows = g.reshape(-1)[: count * stride].reshape(count, stride)
        parts.append(mx.abs(mx.slice(rows, offset, (1,), (count, width))).reshape(-1))
    return mx.concatenate(parts)


class UnitThresholds(NamedTuple):
    """Per unit (lists of (1,) arrays, one per unit, each depending on that unit
    only): where to cut, and which ties a large unit keeps."""

    threshold: List[mx.array]  # large units: the mask_ratio quantile of |g| (from the sample)
    tie_fraction: List[mx.array]  # large units: of the entries equal to it, the share to keep
    order_cut: List[mx.array]  # small units: keep entries whose order key (_order_key) is >= this (uint64)
    small: List[bool]  # per unit: cut exactly by order key (at most sample_size entries)


def _order_key(magnitude: mx.array, position_hash: mx.array) -> mx.array:
    """A unique uint64 per entry that sorts like |g|, ties broken by position.

    The float32 bits of |g| >= 0 sort like its value; below them, the inverted
    Fibonacci hash of the entry's position in its unit (a bijection on
    positions), so the ties kept are the ones with the smallest hash: a fixed,
    evenly spread subset.
    """
    bits = mx.view(magnitude.astype(mx.float32), mx.uint32).astype(mx.uint64)
    return (bits << 32) | (_NO_HASH - position_hash).astype(mx.uint64)


_NO_HASH = 0xFFFFFFFF


def unit_thresholds(units: List[List[mx.array]], mask_ratio: float, key: mx.array, sample_size: int) -> UnitThresholds:
    """Per unit: where the ``mask_ratio`` fraction with the smallest |g| is cut off.

    A unit of at most ``sample_size`` entries is cut exactly: its order keys
    (|g|, ties broken by position) are partitioned at its drop count, so it
    keeps exactly its target count. A larger unit estimates the quantile of
    |g| and the share of ties to keep from a systematic sample of about
    ``sample_entries(sample_size, mask_ratio)`` entries; its tensors pick ties
    by the 16-bit position rank.

    Each unit is partitioned on its own, never stacked with others: inside
    the fused training step (trainer.make_fused_step) a unit's threshold then
    depends on that unit's gradient only, so each gradient can be freed as
    soon as its update ran. (Stacking equal-length pools saved a few
    microseconds per unit on CPU, and held every gradient of the model alive.)
    """
    plans = [pool_plan(grads, sample_size, mask_ratio) for grads in units]
    sampled = [(u, i) for u, (stride, _, _) in enumerate(plans) if stride > 1 for i in range(len(units[u]))]
    offsets: Dict[Tuple[int, int], mx.array] = {}
    if sampled:
        # An offset in 0 .. stride - width, so that the sampled columns fit.
        starts = mx.array([plans[u][0] - plans[u][1] + 1 for u, _ in sampled], mx.float32)
        draws = (mx.random.uniform(shape=(len(sampled),), key=key) * starts).astype(mx.int32)
        offsets = {ui: draws[j : j + 1] for j, ui in enumerate(sampled)}
    totals = [sum(g.size for g in grads) for grads in units]
    small = [n <= sample_size for n in totals]
    zero, zero_cut = mx.zeros((1,)), mx.zeros((1,), mx.uint64)
    thresholds, fractions, cuts = [], [], []
    for u, (grads, (stride, width, counts)) in enumerate(zip(units, plans)):
        pool = unit_pool(grads, stride, width, counts, [offsets.get((u, i)) for i in range(len(grads))])
        length = pool.size
        kth = min(int(round(mask_ratio * length)), length - 1)
        if int(round(mask_ratio * totals[u])) == 0:
            # A unit whose target drops no entry keeps every non-zero entry,
            # even where a sample's minimum would cut some.
            threshold, fraction, cut = zero, zero, zero_cut
        elif small[u]:
            hashes = mx.arange(length, dtype=mx.uint32) * mx.array(_FIB, mx.uint32)
            threshold, fraction = zero, zero  # unused: cut by order key
            cut = mx.partition(_order_key(pool, hashes), kth)[kth : kth + 1]
        else:
            threshold = mx.partition(pool, kth)[kth : kth + 1]
            # The unit's target count, scaled to its sample.
            n = totals[u]
            keep = mx.array([length * (n - int(round(mask_ratio * n))) / n])
            above = mx.sum(pool > threshold).astype(mx.float32)
            ties = mx.sum(pool == threshold).astype(mx.float32)
            fraction = mx.clip((keep - above) / mx.maximum(ties, 1.0), 0.0, 1.0)
            cut = zero_cut
        thresholds.append(threshold)
        fractions.append(fraction)
        cuts.append(cut)
    return UnitThresholds(thresholds, fractions, cuts, small)


@lru_cache(maxsize=256)
def _position_hash(shape: Tuple[int, ...]) -> mx.array:
    """The uint32 Fibonacci hash of each flat index, built once per (small) shape."""
    h = index_hash(shape)
    mx.eval(h)
    return h


def gmt_masks(
    grads: dict,
    mask_ratio: float,
    scope: str = _DEFAULT.mask_scope,
    key: mx.array | None = None,
    sample_size: int = _DEFAULT.mask_sample_size,
) -> Tuple[dict, mx.array]:
    """GMT keep-masks for a gradient tree: True where the entry is kept.

    Returns the mask tree (same structure as ``grads``) and the number of
    entries kept (an int64 scalar, counted from the masks; divide by the total
    for the kept fraction).
    """
    mask_ratio = check_mask_ratio(mask_ratio)
    if key is None:
        key = mx.random.key(0)
    sample_key, dither_key = mx.random.split(key)
    flat = dict(tree_flatten(grads))
    units = list(group_units(list(flat), scope).values())
    found = unit_thresholds([[flat[n] for n in names] for names in units], mask_ratio, sample_key, sample_size)
    # Per tensor: its unit's cut; zero gradients are never kept. In a large
    # unit each tensor keeps the ties whose 16-bit position rank is below its
    # unit's level, rounded with its own random dither (unbiased over the
    # unit). The scalar arithmetic is done on a (tensors of the unit,) vector
    # sliced one entry per tensor: fused into the full-size kernels, it was
    # recomputed per entry (3x slower).
    dither = mx.random.uniform(shape=(sum(len(unit) for unit in units),), key=dither_key)
    masks: Dict[str, mx.array] = {}
    counts = []
    j = 0
    for u, unit in enumerate(units):
        threshold = found.threshold[u]
        rank_cuts = mx.minimum(mx.floor(found.tie_fraction[u] * _RANK_LEVELS + dither[j : j + len(unit)]), _RANK_LEVELS)
        # rank < cut, written as rank <= cut - 1 so that it fits uint16 (a wider
        # comparison would materialise a widened copy of the rank); a tensor that
        # keeps no tie gets the tie value -1, which no |g| equals.
        tie_values = mx.where((threshold > 0) & (rank_cuts > 0), threshold, -1.0)
        last_ranks = mx.maximum(rank_cuts - 1, 0).astype(mx.uint16)
        offset = 0
        for i, name in enumerate(unit):
            g = flat[name]
            magnitude = mx.abs(g)
            if found.small[u]:
                # The tensor's entries continue the unit's position index from `offset`.
                shift = mx.array((offset * _FIB) & _NO_HASH, mx.uint32)
                keys = _order_key(magnitude, _position_hash(tuple(g.shape)) + shift)
                masks[name] = (keys >= found.order_cut[u][0]) & (magnitude > 0)
            else:
                tie_kept = (magnitude == tie_values[i]) & (position_rank(tuple(g.shape)) <= last_ranks[i])
                masks[name] = (magnitude > threshold[0]) | tie_kept
            counts.append(mx.sum(masks[name]))  # int32: a tensor has < 2^31 entries
            offset += g.size
        j += len(unit)
    # int64 for the total: a large model has more than 2^31 entries.
    kept = mx.sum(mx.stack(counts).astype(mx.int64))
    # Rebuild on the gradient tree itself: tree_unflatten would drop empty
    # containers (e.g. a model's list attributes) that optimizers expect.
    return tree_map_with_path(lambda path, _: masks[path], grads), kept


def mix32(h: mx.array) -> mx.array:
    """MurmurHash3's 32-bit finaliser: every input bit flips each output bit with p ~ 1/2."""
    h = h ^ (h >> 16)
    h = h * mx.array(0x85EBCA6B, mx.uint32)
    h = h ^ (h >> 13)
    h = h * mx.array(0xC2B2AE35, mx.uint32)
    return h ^ (h >> 16)


def random_scores(grads: dict, key: mx.array) -> dict:
    """A random positive score per entry with a non-zero gradient, 0 elsewhere.

    The scores are a hash of (position, a per-tensor seed drawn from ``key``):
    a counter-based generator like MLX's threefry, computed in the consumer's
    fused kernel at ~8x less cost per entry on CPU.
    """
    flat = tree_flatten(grads)
    # One uint32 seed per tensor: the two words of a split threefry key are random bits.
    seeds = mx.random.split(key, max(2, len(flat)))
    seeds = seeds[:, 0] ^ seeds[:, 1]
    scores = {}
    for i, (name, g) in enumerate(flat):
        # 24 bits: what float32 holds exactly; + 1 keeps every eligible score above 0.
        bits = (mix32(index_hash(tuple(g.shape)) ^ seeds[i]) >> 8).astype(mx.float32) + 1.0
        scores[name] = bits * (g != 0)
    return tree_map_with_path(lambda path, _: scores[path], grads)


def random_masks(
    grads: dict,
    mask_ratio: float,
    key: mx.array,
    scope: str = _DEFAULT.mask_scope,
    sample_size: int = _DEFAULT.mask_sample_size,
) -> Tuple[dict, mx.array]:
    """The control: GMT's keep-count per unit, drawn at random from GMT's eligible entries.

    Entries with a zero gradient are never kept, and each unit keeps as many
    entries as `gmt_masks` would (DESIGN.md decision 9), so the two differ only
    in which entries are kept. Afresh for each key.
    """
    score_key, mask_key = mx.random.split(key)
    return gmt_masks(random_scores(grads, score_key), mask_ratio, scope, mask_key, sample_size)


def apply_masks(tree: dict, masks: dict) -> dict:
    """Zero the entries of ``tree`` where ``masks`` is False.

    A multiplication, not ``mx.where``: inside a compiled step MLX fuses it
    into the optimizer's kernel at almost no cost, while a select there slowed
    AdamW's update by ~40% on CPU. (A dropped negative entry becomes -0.0,
    which every optimizer treats as 0.)
    """
    flat_masks = dict(tree_flatten(masks))
    return tree_map_with_path(lambda path, v: v * flat_masks[path], tree)


def count_entries(tree: dict) -> int:
    """Number of scalar entries in a tree of arrays."""
    return sum(v.size for _, v in tree_flatten(tree))
