"""Gradient masks for Gradient-Mask Tuning, as pure functions on gradient trees.

Nothing here touches a model, an optimizer or a file, so every function can be
traced by `mx.compile`. The unit that shares one threshold is chosen by the
*scope*:

- ``tensor``: one threshold per parameter tensor (the paper's default);
- ``layer``: one threshold per transformer block (``...layers.N.``); parameters
  outside any block (embeddings, final norm, lm_head) are their own unit;
- ``global``: one threshold across all trainable parameters.

Within a unit the ``mask_ratio`` fraction of entries with the smallest |g| is
dropped. How the threshold is found, and why it is not a sort:

1. The threshold T is the ``mask_ratio`` quantile of |g|. Units with at most
   ``sample_size`` entries get it exactly (``mx.partition``); larger units
   estimate it from a random sample of ``sample_size`` entries, drawn in
   proportion to each tensor's size. A partition of every tensor each step
   costs ~11% of a SmolLM2-135M step on CPU (DESIGN.md); the sample costs a
   small fraction of that.
2. The exact number of entries above T is then counted, and entries *equal*
   to T fill the gap to the target count, chosen by a low-discrepancy hash of
   their position (Fibonacci hashing). So ties (e.g. a constant gradient)
   still keep 1 - mask_ratio of the unit instead of all or nothing.
3. Entries whose gradient is exactly zero are never kept: a unit with fewer
   non-zero entries than the target keeps just its non-zero ones.

The kept fraction is therefore exact for units up to ``sample_size`` entries
and within the sampling error of the quantile otherwise (standard deviation
sqrt(r(1-r)/sample_size), 0.2% absolute at the default 65536).
"""

from __future__ import annotations

import re
from typing import Dict, List, Tuple

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map_with_path

SCOPES = ("tensor", "layer", "global")
TARGETS = ("grad", "update")
DEFAULT_SAMPLE_SIZE = 65536

_BLOCK = re.compile(r"^(.*?\blayers\.\d+)\.")
# 2^32 / golden ratio: consecutive indices times this constant spread evenly
# over [0, 2^32) (Fibonacci hashing), so any prefix of tied entries is a fair,
# deterministic sample of them.
_FIB = 2654435769


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


def _position_hash(shape: Tuple[int, ...], offset: int) -> mx.array:
    """Fibonacci hash of each entry's flat index (+ offset), as 24-bit ints.

    Built as a broadcast sum of a column and a row term so that, inside a
    compiled graph, no index array of the tensor's full size is materialised.
    """
    if len(shape) == 0:
        shape = (1,)
    cols = shape[-1]
    rows = 1
    for dim in shape[:-1]:
        rows *= dim
    col = mx.arange(cols, dtype=mx.uint32) * mx.array(_FIB, mx.uint32)
    row_step = (cols * _FIB) & 0xFFFFFFFF
    base = (offset * _FIB) & 0xFFFFFFFF
    row = mx.arange(rows, dtype=mx.uint32) * mx.array(row_step, mx.uint32) + mx.array(base, mx.uint32)
    hashed = row[:, None] + col[None, :]
    # Keep the top 24 bits: they convert to float32 exactly.
    return (hashed >> 8).reshape(shape)


def unit_threshold(
    abs_grads: List[mx.array], mask_ratio: float, key: mx.array, sample_size: int
) -> mx.array:
    """The ``mask_ratio`` quantile of the pooled entries of ``abs_grads``.

    Exact when the unit has at most ``sample_size`` entries, otherwise
    estimated from a size-proportional random sample of that many entries.
    """
    sizes = [a.size for a in abs_grads]
    total = sum(sizes)
    if total <= sample_size:
        pool = mx.concatenate([a.reshape(-1) for a in abs_grads])
    else:
        keys = mx.random.split(key, len(abs_grads))
        parts = []
        for i, (a, size) in enumerate(zip(abs_grads, sizes)):
            count = max(1, round(sample_size * size / total))
            idx = mx.random.randint(0, size, (count,), key=keys[i])
            parts.append(a.reshape(-1)[idx])
        pool = mx.concatenate(parts)
    kth = min(int(round(mask_ratio * pool.size)), pool.size - 1)
    return mx.partition(pool, kth)[kth]


def unit_masks(
    grads: List[mx.array], mask_ratio: float, key: mx.array, sample_size: int
) -> Tuple[List[mx.array], mx.array]:
    """Keep-masks for the tensors of one unit, and the number of entries kept."""
    abs_grads = [mx.abs(g) for g in grads]
    threshold = unit_threshold(abs_grads, mask_ratio, key, sample_size)
    total = sum(g.size for g in grads)
    target = total - int(round(mask_ratio * total))
    # Exact counts above and at the threshold decide how many ties to keep.
    # Counts are int32 per tensor (a tensor has < 2^31 entries) and int64 per
    # unit, because a global unit of a large model can exceed 2^31 entries.
    above = sum(mx.sum(a > threshold).astype(mx.int64) for a in abs_grads)
    ties = sum(mx.sum(a == threshold).astype(mx.int64) for a in abs_grads)
    positive = threshold > 0  # ties at zero are zero gradients: never kept
    wanted = mx.maximum(target - above, 0)
    tie_fraction = mx.where(
        positive & (ties > 0),
        mx.minimum(wanted.astype(mx.float32) / mx.maximum(ties, 1).astype(mx.float32), 1.0),
        0.0,
    )
    tie_cut = (tie_fraction * (1 << 24)).astype(mx.uint32)
    masks, offset = [], 0
    for a in abs_grads:
        tie_keep = (a == threshold) & positive & (_position_hash(a.shape, offset) < tie_cut)
        masks.append((a > threshold) | tie_keep)
        offset += a.size
    kept = above + mx.where(positive, mx.minimum(wanted, ties), 0)
    return masks, kept


def gmt_masks(
    grads: dict,
    mask_ratio: float,
    scope: str = "tensor",
    key: mx.array | None = None,
    sample_size: int = DEFAULT_SAMPLE_SIZE,
) -> Tuple[dict, mx.array]:
    """GMT keep-masks for a gradient tree: True where the entry is kept.

    Returns the mask tree (same structure as ``grads``) and the number of
    entries kept (an int64 scalar; divide by the total for the kept fraction).
    """
    mask_ratio = check_mask_ratio(mask_ratio)
    if key is None:
        key = mx.random.key(0)
    flat = dict(tree_flatten(grads))
    units = group_units(list(flat), scope)
    unit_keys = mx.random.split(key, max(2, len(units)))
    masks: Dict[str, mx.array] = {}
    kept = mx.array(0, mx.int64)
    for i, names in enumerate(units.values()):
        unit_mask, unit_kept = unit_masks([flat[n] for n in names], mask_ratio, unit_keys[i], sample_size)
        masks.update(zip(names, unit_mask))
        kept = kept + unit_kept
    # Rebuild on the gradient tree itself: tree_unflatten would drop empty
    # containers (e.g. a model's list attributes) that optimizers expect.
    return tree_map_with_path(lambda path, _: masks[path], grads), kept


def random_masks(grads: dict, mask_ratio: float, key: mx.array) -> Tuple[dict, mx.array]:
    """The control: keep each entry independently with probability 1 - mask_ratio."""
    mask_ratio = check_mask_ratio(mask_ratio)
    flat = tree_flatten(grads)
    keys = mx.random.split(key, max(2, len(flat)))
    masks, kept = {}, mx.array(0, mx.int64)
    for i, (name, g) in enumerate(flat):
        keep = mx.random.uniform(shape=g.shape, key=keys[i]) >= mask_ratio
        masks[name] = keep
        kept = kept + mx.sum(keep).astype(mx.int64)
    return tree_map_with_path(lambda path, _: masks[path], grads), kept


def apply_masks(tree: dict, masks: dict) -> dict:
    """Zero the entries of ``tree`` where ``masks`` is False."""
    flat_masks = dict(tree_flatten(masks))
    return tree_map_with_path(lambda path, v: mx.where(flat_masks[path], v, mx.zeros((), v.dtype)), tree)


def count_entries(tree: dict) -> int:
    """Number of scalar entries in a tree of arrays."""
    return sum(v.size for _, v in tree_flatten(tree))
