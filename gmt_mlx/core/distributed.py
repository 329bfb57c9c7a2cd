"""Data-parallel helpers on MLX's own distributed layer (`mlx.launch`).

Launched with `mlx.launch -n N -- gmt-mlx finetune ...` (ring, MPI or NCCL
backend), every rank runs the same command. `--batch-size` stays the global
batch: each rank takes a contiguous 1/N slice of every global batch. Summed
token losses, their gradients and the target-token counts are summed over
ranks after accumulation, and the sum is divided by the global count
(trainer.train): the gradient of the global batch's mean loss, the same
quantity a single process computes. Clipping and masking come after, so
every rank builds the same GMT / random mask and the weights stay identical.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Dict, List, Optional, Tuple

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from gmt_mlx.errors import UserError

# Concatenate gradients into buffers of about this size per all-reduce: one
# collective per tensor would pay the network latency hundreds of times.
ALL_REDUCE_BYTES = 32 * 1024**2


def init_group(backend: str = "any") -> mx.distributed.Group:
    """The global group: size 1 when not launched by `mlx.launch`."""
    try:
        return mx.distributed.init(backend=backend)
    except (RuntimeError, ValueError) as err:
        raise UserError(f"the {backend} distributed backend could not start ({str(err).splitlines()[0]})") from None


def is_main(group: Optional[mx.distributed.Group]) -> bool:
    return group is None or group.rank() == 0


def all_sum_tree(tree: Any, group: mx.distributed.Group) -> Any:
    """Sum a tree of arrays over all ranks, a few large all-reduces at a time."""
    if group.size() == 1:
        return tree
    flat = tree_flatten(tree)
    out: Dict[str, mx.array] = {}
    bucket: List = []
    size = 0

    def flush():
        if not bucket:
            return
        dtype = bucket[0][1].dtype
        joined = mx.concatenate([v.reshape(-1).astype(dtype) for _, v in bucket])
        summed = mx.distributed.all_sum(joined, group=group)
        offset = 0
        for name, v in bucket:
            out[name] = summed[offset : offset + v.size].reshape(v.shape).astype(v.dtype)
            offset += v.size
        bucket.clear()

    for name, value in flat:
        if bucket and (bucket[0][1].dtype != value.dtype or size + value.nbytes > ALL_REDUCE_BYTES):
            flush()
            size = 0
        bucket.append((name, value))
        size += value.nbytes
    flush()
    return tree_unflatten([(name, out[name]) for name, _ in flat])


def all_sum_totals(
    totals: Tuple[mx.array, mx.array, Dict[str, mx.array]], group: mx.distributed.Group
) -> Tuple[mx.array, mx.array, Dict[str, mx.array]]:
    """A step's (summed loss, count, metric sums) summed over all ranks."""
    loss, count, metrics = totals
    return (
        mx.distributed.all_sum(loss, group=group),
        mx.distributed.all_sum(count, group=group),
        {k: mx.distributed.all_sum(v, group=group) for k, v in metrics.items()},
    )


def check_batch_size(batch_size: int, size: int) -> None:
    if batch_size % size:
        raise UserError(
            f"--batch-size {batch_size} is the global batch and must be divisible by the "
            f"{size} ranks (each rank takes batch_size / ranks examples)"
        )


def config_digest(config: Dict[str, Any]) -> int:
    """A 31-bit hash of a config dict, identical on every rank with the same config."""
    text = json.dumps(config, sort_keys=True, default=str)
    return int(hashlib.sha256(text.encode()).hexdigest()[:7], 16)


def check_same_config(config: Dict[str, Any], group: mx.distributed.Group) -> None:
    """Refuse to train when the ranks were started with different configs."""
    if group.size() == 1:
        return
    mine = config_digest(config)
    every = mx.distributed.all_gather(mx.array([mine], mx.int32), group=group)
    digests = [int(v) for v in every.tolist()]
    if len(set(digests)) > 1:
        odd = [r for r, d in enumerate(digests) if d != digests[0]]
        raise UserError(
            f"the ranks were started with different configs (ranks {odd} differ from rank 0); "
            "run the same command, with the same data, on every rank"
        )


def any_rank(flag: bool, group: Optional[mx.distributed.Group]) -> bool:
    """True if ``flag`` is set on any rank (so all ranks stop at the same step)."""
    if group is None or group.size() == 1:
        return flag
    total = mx.distributed.all_sum(mx.array([1.0 if flag else 0.0]), group=group)
    return total.item() > 0
