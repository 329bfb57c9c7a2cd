"""Gradient masks for Gradient-Mask Tuning, as pure functions on gradient trees.

Nothing here touches a model, an optimizer or a file, so every function can be
traced by `mx.compile`. The unit that shares one threshold is chosen by the
*scope*:

- ``tensor``: one threshold per parameter tensor (the paper's default);
- ``layer``: one threshold per transformer block (``...layers.N.``); parameters
  outside any block (embeddings, final norm, lm_head) are their own unit;
- ``global``: one threshold across all trainable parameters.

Within a unit the ``mask_ratio`` fraction of entries with the smallest |g| is
dropped. How, and why it costs a few elementwise passes over the gradient
instead of a sort (measurements: benchmarks/RESULTS.md):

1. The threshold T is the ``mask_ratio`` quantile r of |g|. A unit of at most
   ``sample_size`` entries gets it exactly (``mx.partition`` of the unit). A
   larger unit estimates it from a *systematic* sample of
   n = 4 r (1 - r) * sample_size entries (``sample_entries``: that many keep
   the error's standard deviation at 1 / (2 sqrt(sample_size)) whatever r):
   w adjacent entries (usually 1) out of every s of each of its tensors,
   from a random offset drawn from the step's key. One stride s for the
   whole unit, so each tensor is sampled in proportion to its size; nudged
   to share no factor with the row lengths, so every column is visited (a
   weight gradient's magnitudes differ by column). A strided slice is a view: the sample
   costs one cache line per entry, where the random gather it replaces was
   ~2x slower per entry on CPU and needed random indices besides. Units with
   pools of the same length are stacked and partitioned in one call.
2. Entries strictly above T are kept. Entries *equal* to T (ties) fill the gap
   to the target count: the fraction of ties to keep is read off the same
   pool (exact, or the sample), and which ties are kept is decided by a fixed
   low-discrepancy rank of each position (8 bits of a Fibonacci hash of the
   flat index, built once per tensor shape). So a constant gradient still
   keeps 1 - mask_ratio of the unit, spread over the whole tensor.
3. Entries whose gradient is exactly zero are never kept: when T == 0 only the
   non-zero entries are kept.

The keep-mask of a tensor is one fused elementwise kernel (two compares and
the rank test); the number kept is counted exactly from it. Masks are applied
by multiplication, which MLX's compiler fuses into the optimizer's kernel
(``mx.where`` there made AdamW's update ~40% slower on CPU).

Accuracy: exact for units up to ``sample_size`` entries (ties resolved to
within 1/255 of the tied entries); otherwise the kept fraction carries the
sampling error of a quantile, standard deviation at most 1 / (2 sqrt(sample_size))
= 0.2% absolute at the default 65536 (systematic sampling, without
replacement, only lowers it), so the 1% bound of DESIGN.md sits 5 standard
deviations out. The reported count of kept entries is exact either way.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache
from typing import Dict, List, Tuple

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map_with_path

SCOPES = ("tensor", "layer", "global")
TARGETS = ("grad", "update")
DEFAULT_SAMPLE_SIZE = 65536

_BLOCK = re.compile(r"^(.*?\blayers\.\d+)\.")
# 2^32 / golden ratio: consecutive indices times this constant spread evenly
# over [0, 2^32) (Fibonacci hashing), so the positions whose rank is below any
# cut are a fair, deterministic, evenly spread subset of any tensor.
_FIB = 2654435769
# Tie ranks are 8 bits: a tie fraction is resolved to 1/255 of the tied entries.
_RANK_LEVELS = 255


def unit_of(name: str, scope: str) -> str:
    """The name of the masking unit a parameter belongs to under ``scope``."""
    if scope == "tensor":
        return name
    if scope == "global":
        return "<all>"
    if scope == "layer":
        match = _BLOCK.match(name)
        return match.group(1) if match else name
    raise ValueError(f"unknown mask scope {scope!r} (expected one of {', '.join(SCOPES)})")


def group_units(names: List[str], scope: str) -> Dict[str, List[str]]:
    """Group parameter names into masking units, keeping first-seen order."""
    units: Dict[str, List[str]] = {}
    for name in names:
        units.setdefault(unit_of(name, scope), []).append(name)
    return units


def check_mask_ratio(mask_ratio: float) -> float:
    """Validate that ``mask_ratio`` (the fraction dropped) lies in [0, 1)."""
    if not (0.0 <= float(mask_ratio) < 1.0):
        raise ValueError(f"mask_ratio must be in [0, 1) (the fraction dropped), got {mask_ratio}")
    return float(mask_ratio)


def _index_hash(shape: Tuple[int, ...]) -> mx.array:
    """Fibonacci hash (uint32) of each entry's flat index.

    A broadcast sum of a column and a row term, so that no index array of the
    tensor's full size is materialised for it.
    """
    if len(shape) == 0:
        shape = (1,)
    cols = shape[-1]
    rows = math.prod(shape[:-1])
    col = mx.arange(cols, dtype=mx.uint32) * mx.array(_FIB, mx.uint32)
    row = mx.arange(rows, dtype=mx.uint32) * mx.array((cols * _FIB) & 0xFFFFFFFF, mx.uint32)
    return (row[:, None] + col[None, :]).reshape(shape)


@lru_cache(maxsize=64)
def _position_rank(shape: Tuple[int, ...]) -> mx.array:
    """A fixed uint8 rank (0 .. 254) per position, from the index hash, built once per shape.

    A contiguous constant keeps the tie test in the fast (contiguous) kernel;
    computing the hash from broadcast row/column terms each step made the
    keep-mask kernel ~2x slower on CPU. Costs one byte per entry of each
    distinct parameter shape.
    """
    # 0 .. 254, so that the cut (0 .. 255) fits the same dtype: comparing with
    # a wider type would make MLX materialise a widened copy of the rank.
    rank = (((_index_hash(shape) >> 24) * 255) >> 8).astype(mx.uint8)
    mx.eval(rank)
    return rank


def _sample_stride(total: int, draws: int, row_lengths: List[int]) -> Tuple[int, int]:
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
    """Entries to sample from a large unit: ``sample_size`` at mask_ratio 0.5, fewer elsewhere.

    The kept fraction of a sampled unit has standard deviation
    sqrt(r (1 - r) / n) for n sampled entries; n = 4 r (1 - r) * sample_size
    holds it at 1 / (2 sqrt(sample_size)) (0.2% for 65536) for every ratio r,
    with 36% fewer entries to sample and partition at the default r = 0.2.
    """
    return max(1024, math.ceil(4 * mask_ratio * (1 - mask_ratio) * sample_size))


def _pool_plan(grads: List[mx.array], sample_size: int, mask_ratio: float) -> Tuple[int, int, List[int]]:
    """(stride, width, strides per tensor) of a unit's sample; (1, 1, sizes) means the whole unit (exact).

    The sample takes `width` adjacent entries from every whole stride of each tensor.
    """
    total = sum(g.size for g in grads)
    if total <= sample_size:
        return 1, 1, [g.size for g in grads]
    row_lengths = sorted({g.shape[-1] for g in grads if g.ndim > 1})
    stride, width = _sample_stride(total, sample_entries(sample_size, mask_ratio), row_lengths)
    if stride == 1:
        return 1, 1, [g.size for g in grads]
    # One stride for the whole unit: each tensor contributes in proportion to its size.
    return stride, width, [g.size // stride for g in grads]


def _unit_pool(grads: List[mx.array], stride: int, width: int, counts: List[int], offsets: List[mx.array]) -> mx.array:
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


def unit_thresholds(
    units: List[List[mx.array]], mask_ratio: float, key: mx.array, sample_size: int
) -> Tuple[mx.array, mx.array]:
    """Per unit: the ``mask_ratio`` quantile of its pooled |g|, and the fraction of ties to keep.

    Returns two arrays of shape (len(units),). Exact for units of at most
    ``sample_size`` entries, else estimated from a systematic sample of about
    ``sample_entries(sample_size, mask_ratio)`` entries. The tie fraction is
    what entries equal to the threshold must contribute for the unit to keep
    its target count (exactly, or as estimated from the sample).

    Units whose pools have the same length are stacked and partitioned in one
    call: a step of the tensor scope has hundreds of units, and on CPU every
    small op costs a few microseconds.
    """
    plans = [_pool_plan(grads, sample_size, mask_ratio) for grads in units]
    sampled = [(u, i) for u, (stride, _, _) in enumerate(plans) if stride > 1 for i in range(len(units[u]))]
    offsets: Dict[Tuple[int, int], mx.array] = {}
    if sampled:
        # An offset in 0 .. stride - width, so that the sampled columns fit.
        starts = mx.array([plans[u][0] - plans[u][1] + 1 for u, _ in sampled], mx.float32)
        draws = (mx.random.uniform(shape=(len(sampled),), key=key) * starts).astype(mx.int32)
        offsets = {ui: draws[j : j + 1] for j, ui in enumerate(sampled)}
    by_length: Dict[int, List[int]] = {}
    pools = []
    for u, (grads, (stride, width, counts)) in enumerate(zip(units, plans)):
        pool = _unit_pool(grads, stride, width, counts, [offsets.get((u, i)) for i in range(len(grads))])
        pools.append(pool)
        by_length.setdefault(pool.size, []).append(u)
    thresholds, tie_fractions, order = [], [], []
    for length, members in by_length.items():
        batch = mx.stack([pools[u] for u in members])
        kth = min(int(round(mask_ratio * length)), length - 1)
        threshold = mx.partition(batch, kth, axis=-1)[:, kth]
        # Each unit's target share, scaled to its pool (exact when the pool is the unit).
        totals = [sum(g.size for g in units[u]) for u in members]
        keep_in_pool = mx.array([length * (n - int(round(mask_ratio * n))) / n for n in totals], mx.float32)
        above = mx.sum(batch > threshold[:, None], axis=-1).astype(mx.float32)
        ties = mx.sum(batch == threshold[:, None], axis=-1).astype(mx.float32)
        tie_fractions.append(mx.clip((keep_in_pool - above) / mx.maximum(ties, 1.0), 0.0, 1.0))
        thresholds.append(threshold)
        order.extend(members)
    # Back to unit order.
    restore = mx.array(sorted(range(len(order)), key=order.__getitem__))
    return mx.concatenate(thresholds)[restore], mx.concatenate(tie_fractions)[restore]


def gmt_masks(
    grads: dict,
    mask_ratio: float,
    scope: str = "tensor",
    key: mx.array | None = None,
    sample_size: int = DEFAULT_SAMPLE_SIZE,
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
    thresholds, tie_fractions = unit_thresholds(
        [[flat[n] for n in names] for names in units], mask_ratio, sample_key, sample_size
    )
    # Per tensor: its unit's threshold, and the tie cut on the 0..254 position
    # rank. Ties at zero are zero gradients: never kept. Each tensor rounds its
    # unit's level with its own random dither, so the rounding is unbiased over
    # the unit. Computing these as (tensors,) arrays and slicing one scalar per
    # tensor keeps this scalar arithmetic out of the full-size kernels (fused
    # into them, it was recomputed per entry: 3x slower).
    unit_index = mx.array([u for u, names in enumerate(units) for _ in names])
    names = [n for group in units for n in group]
    tensor_thresholds = thresholds[unit_index]
    tie_levels = mx.where(tensor_thresholds > 0, tie_fractions[unit_index] * _RANK_LEVELS, 0.0)
    dither = mx.random.uniform(shape=(len(names),), key=dither_key)
    tie_cuts = mx.minimum(mx.floor(tie_levels + dither), _RANK_LEVELS).astype(mx.uint8)
    masks: Dict[str, mx.array] = {}
    counts = []
    for j, name in enumerate(names):
        g = flat[name]
        threshold, tie_cut = tensor_thresholds[j], tie_cuts[j]
        magnitude = mx.abs(g)
        tie_kept = (magnitude == threshold) & (_position_rank(tuple(g.shape)) < tie_cut)
        masks[name] = (magnitude > threshold) | tie_kept
        counts.append(mx.sum(masks[name]))  # int32: a tensor has < 2^31 entries
    # int64 for the total: a large model has more than 2^31 entries.
    kept = mx.sum(mx.stack(counts).astype(mx.int64))
    # Rebuild on the gradient tree itself: tree_unflatten would drop empty
    # containers (e.g. a model's list attributes) that optimizers expect.
    return tree_map_with_path(lambda path, _: masks[path], grads), kept


def _mix32(h: mx.array) -> mx.array:
    """MurmurHash3's 32-bit finaliser: every input bit flips each output bit with p ~ 1/2."""
    h = h ^ (h >> 16)
    h = h * mx.array(0x85EBCA6B, mx.uint32)
    h = h ^ (h >> 13)
    h = h * mx.array(0xC2B2AE35, mx.uint32)
    return h ^ (h >> 16)


def random_masks(grads: dict, mask_ratio: float, key: mx.array) -> Tuple[dict, mx.array]:
    """The control: keep each entry with probability 1 - mask_ratio, afresh for each key.

    The random bits are a hash of (position, a per-tensor seed drawn from
    ``key``), computed in the mask's own fused kernel: a counter-based
    generator like MLX's threefry, but ~8x cheaper per entry on CPU.
    """
    mask_ratio = check_mask_ratio(mask_ratio)
    flat = tree_flatten(grads)
    # One uint32 seed per tensor: the two words of a split threefry key are random bits.
    seeds = mx.random.split(key, max(2, len(flat)))
    seeds = seeds[:, 0] ^ seeds[:, 1]
    drop_below = mx.array(min(int(round(mask_ratio * 2**32)), 2**32 - 1), mx.uint32)
    masks, kept = {}, mx.array(0, mx.int64)
    for i, (name, g) in enumerate(flat):
        keep = _mix32(_index_hash(tuple(g.shape)) ^ seeds[i]) >= drop_below
        masks[name] = keep
        kept = kept + mx.sum(keep).astype(mx.int64)
    return tree_map_with_path(lambda path, _: masks[path], grads), kept


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
