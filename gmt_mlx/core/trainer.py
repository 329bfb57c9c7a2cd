"""The compiled training step and the loop, nothing else.

Loss, batches and callbacks are parameters, so tests can pass in mocks. GMT
lives in exactly one place: the optimizer wrapper, called between gradient
accumulation and the parameter update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

from gmt_mlx.config import MemoryOptions, OptimizerOptions
from gmt_mlx.core.distributed import all_sum_totals, all_sum_tree, any_rank
from gmt_mlx.core.layerwise import make_layerwise_step
from gmt_mlx.core.losses import add_totals, sft_loss, unpack
from gmt_mlx.core.optim import apply_update, training_state
from gmt_mlx.core.precision import sum_of_squares

# tokens (B, L) int32, target mask (B, L), then whatever else the loss takes
# (a DPO batch: the reference log-probabilities of its rows).
Batch = Tuple[mx.array, ...]


@dataclass
class StepResult:
    step: int
    loss: float
    ntoks: int
    grad_norm: float
    kept: int
    learning_rate: float
    skipped: bool = False  # non-finite loss or gradient: the update was not applied
    metrics: Dict[str, float] = field(default_factory=dict)  # the loss's per-unit means (DPO: reward accuracy, ...)


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""

    def __init__(self, step: int, count: int):
        super().__init__(f"{count} consecutive steps with a non-finite loss or gradient (last at step {step})")
        self.step, self.count = step, count


def make_step_fns(
    model: nn.Module, optimizer: Any, loss_fn: Callable = sft_loss, grad_clip: float = 0.0
) -> Tuple[Callable, Callable]:
    """Compile the two halves of a step over the explicit training state.

    ``grad_fn(*batch)`` returns (summed loss, count, metric sums, gradient of
    the summed loss) for one micro-batch; ``update_fn(grads, scale, norm)`` applies
    ``scale * grads`` (scale: 1 / the step's count, times the clipping factor
    from ``norm``, the norm of the scaled gradient), masked, and returns the
    number of entries kept. Splitting them lets accumulation and the
    all-reduce sum micro-batches before the mask is built (once per step), and
    lets the loop skip the update when the gradient is not finite.
    """
    state = training_state(model, optimizer)
    loss_and_grad = nn.value_and_grad(model, loss_fn)

    @partial(mx.compile, inputs=state, outputs=state)
    def grad_fn(*batch):
        out, grads = loss_and_grad(model, *batch)
        loss, count, metrics = unpack(out)
        # A Linear's weight gradient comes out of the matmul's vjp transposed
        # (column-major). Every later pass (norm, mask, optimizer) mixes it
        # with row-major arrays and falls off MLX's contiguous kernels: one
        # copy here made SmolLM2-135M's whole SFT step 7% and its GMT step
        # 16% faster on CPU (benchmarks/RESULTS.md). A no-op for arrays that
        # are already contiguous.
        return loss, count, metrics, tree_map(mx.contiguous, grads)

    @partial(mx.compile, inputs=state, outputs=state)
    def update_fn(grads, scale, norm):
        # The same clipping as optim.clip_grad_norm, reusing the norm we already have.
        if grad_clip > 0:
            scale = scale * mx.minimum(grad_clip / (norm + 1e-6), 1.0)
        return apply_update(optimizer, model, grads, scale)

    return grad_fn, update_fn


def make_fused_step(
    model: nn.Module,
    optimizer: Any,
    loss_fn: Callable = sft_loss,
    grad_clip: float = 0.0,
    group: Optional[mx.distributed.Group] = None,
) -> Callable:
    """One compiled function for a step's last micro-batch: gradient, all-reduce, mask and update.

    ``step_fn(earlier, *batch)``: ``earlier`` is None or the (loss, count,
    metric sums, gradient) summed over the step's earlier micro-batches
    (`accumulate`). Returns (summed loss, count, metric sums, gradient norm of
    the step's mean loss, entries kept, applied).

    Why one graph: each tensor's gradient is consumed by its own threshold,
    mask and update and freed right after, so the gradients of the whole
    model are never alive at once (the split grad_fn / update_fn of
    `make_step_fns` hold all of them across the two calls). What still
    couples every tensor is opt-in: global gradient clipping (the clip factor
    needs the whole norm first), the global mask scope and accumulation's
    buffer. The per-tensor statistics (squared norm, kept count) are small
    outputs; `train` evaluates them with the state in one `mx.eval`.

    A step whose loss or gradient is not finite is reported as not applied,
    the optimizer's step counter (so the schedule) does not advance, and its
    non-finite tensors keep their weights (all of them, if the loss is not
    finite): they reach the optimizer as zero gradients, so their moments
    decay by one step. Keeping every weight and moment exactly unchanged would
    need every gradient before the first update (the all-or-nothing check) or
    a second copy of the state (a select on it held every tensor's old and
    new moments alive: +2 GB on a 309M model).
    """
    state = training_state(model, optimizer)
    loss_and_grad = nn.value_and_grad(model, loss_fn)
    group = group if group is not None and group.size() > 1 else None

    def step(earlier, *batch):
        out, grads = loss_and_grad(model, *batch)
        loss, count, metrics = add_totals(unpack(out), earlier)
        grads = tree_map(mx.contiguous, grads)  # see make_step_fns
        if earlier is not None:
            grads = tree_map(mx.add, earlier[3], grads)
        if group is not None:
            grads = all_sum_tree(grads, group)
            loss, count, metrics = all_sum_totals((loss, count, metrics), group)
        scale = 1.0 / mx.maximum(count, 1.0)
        squares = tree_map(sum_of_squares, grads)
        norm = mx.sqrt(sum(v for _, v in tree_flatten(squares))) * scale
        if grad_clip > 0:
            scale = scale * mx.minimum(grad_clip / (norm + 1e-6), 1.0)
        finite = mx.isfinite(loss)
        ok = tree_map(lambda q: finite & mx.isfinite(q), squares)
        applied = finite & mx.isfinite(norm)
        kept = _update_where_ok(optimizer, model, grads, scale, ok, applied)
        return loss, count, metrics, norm, kept, applied

    first = partial(mx.compile, inputs=state, outputs=state)(lambda *batch: step(None, *batch))
    rest = partial(mx.compile, inputs=state, outputs=state)(lambda earlier, *batch: step(earlier, *batch))
    return lambda earlier, *batch: first(*batch) if earlier is None else rest(earlier, *batch)


def _update_where_ok(
    optimizer: Any, model: nn.Module, grads: dict, scale: mx.array, ok: dict, applied: mx.array
) -> mx.array:
    """Apply ``scale * grads`` to the tensors that are ``ok`` (a boolean scalar per tensor), the fused
    step's update; return the entries kept. The step counter advances only if ``applied``."""
    # A tensor that is not ok reaches the optimizer as a zero gradient and keeps its weights.
    grads = tree_map(lambda k, g: mx.where(k, g, 0), ok, grads)
    old = tree_map(lambda g, p: p, grads, model.trainable_parameters())
    old_step = optimizer.state.get("step")
    kept = apply_update(optimizer, model, grads, scale)
    new = tree_map(lambda g, p: p, grads, model.trainable_parameters())
    model.update(tree_map(lambda k, n, p: mx.where(k, n, p), ok, new, old))
    if old_step is not None:
        # A scalar: the step counter (and with it the schedule) advances only on applied steps.
        optimizer.state["step"] = mx.where(applied, optimizer.state["step"], old_step)
    return kept


def global_norm(grads) -> mx.array:
    return mx.sqrt(sum(sum_of_squares(g) for _, g in tree_flatten(grads)))


def accumulate(
    grad_fn: Callable, batches: Iterator[Batch], micro_batches: int, group: Optional[mx.distributed.Group] = None
) -> tuple:
    """Sum (loss, count, metric sums, gradient) over ``micro_batches`` micro-batches (then over ranks,
    with ``group``)."""
    loss_sum, count, metrics, grads = mx.array(0.0), mx.array(0.0), None, None
    for _ in range(micro_batches):
        loss, n, micro_metrics, micro = grad_fn(*next(batches))
        grads = micro if grads is None else tree_map(mx.add, grads, micro)
        del micro  # else this gradient stays alive through on_step/on_eval (validation, checkpoints)
        metrics = micro_metrics if metrics is None else tree_map(mx.add, metrics, micro_metrics)
        loss_sum, count = loss_sum + loss, count + n
        mx.eval(grads, loss_sum, count, metrics)  # bound the graph (and memory) per micro-batch
    if group is not None and group.size() > 1:
        grads = all_sum_tree(grads, group)
        loss_sum, count, metrics = all_sum_totals((loss_sum, count, metrics), group)
    return loss_sum, count, metrics, grads


def train(
    model: nn.Module,
    optimizer,
    batches: Iterator[Batch],
    *,
    iters: int,
    start_step: int = 0,
    grad_accumulation_steps: int = OptimizerOptions.grad_accumulation_steps,
    grad_clip: float = 0.0,
    loss_fn: Callable = sft_loss,
    on_step: Optional[Callable[[StepResult], None]] = None,
    on_eval: Optional[Callable[[int], None]] = None,
    steps_per_eval: int = 0,
    should_stop: Optional[Callable[[], bool]] = None,
    max_bad_steps: int = 0,
    group: Optional[mx.distributed.Group] = None,
    update_per_layer: bool = MemoryOptions.update_per_layer,
) -> int:
    """Run optimizer steps ``start_step + 1 .. iters``; return the last step completed.

    A step's gradient is the gradient of the summed loss over its
    ``grad_accumulation_steps`` micro-batches on every rank (``batches``
    yields this rank's shard), divided by the step's total count of target
    tokens (docs/design.md decision 8): a batch of 8 equals 4 x 2 accumulated
    equals 2 ranks of 4. The mask is built from it after the all-reduce, so
    every rank builds the same one. A step whose loss or gradient is not
    finite is not applied; after ``max_bad_steps`` such steps in a row (0:
    never) `NonFiniteError` is raised. ``should_stop()`` is polled between
    steps (Ctrl-C sets it). ``on_eval(step)`` runs every ``steps_per_eval``
    steps and at ``iters``. With ``update_per_layer`` the step's last
    micro-batch runs block by block (`layerwise.make_layerwise_step`) instead
    of in one compiled function (with ``grad_clip``, a backward pass more for the norm).
    """
    if hasattr(optimizer, "init"):
        # Create the state before compiling, so the step's guard sees it (a no-op on a restored state).
        optimizer.init(model.trainable_parameters())
    grad_fn, _ = make_step_fns(model, optimizer, loss_fn, grad_clip)
    if update_per_layer:
        step_fn = make_layerwise_step(model, optimizer, loss_fn, group, grad_clip)
    else:
        step_fn = make_fused_step(model, optimizer, loss_fn, grad_clip, group)
    state = training_state(model, optimizer)
    model.train()
    bad_in_a_row, step = 0, start_step
    for step in range(start_step + 1, iters + 1):
        earlier = None
        if grad_accumulation_steps > 1:
            earlier = accumulate(grad_fn, batches, grad_accumulation_steps - 1)
        loss_sum, count, metric_sums, norm, kept_arr, applied = step_fn(earlier, *next(batches))
        del earlier  # the accumulation buffer: freed before on_step/on_eval (validation, checkpoints)
        # The small outputs first, in the same evaluation as the state: see make_fused_step.
        mx.eval(norm, kept_arr, applied, loss_sum, count, metric_sums, state)
        scale = 1.0 / mx.maximum(count, 1.0)
        loss_value, norm_value = (loss_sum * scale).item(), norm.item()
        skipped = not applied.item()
        kept = 0 if skipped else int(kept_arr.item())
        bad_in_a_row = bad_in_a_row + 1 if skipped else 0
        if on_step is not None:
            # The optimizer stores the learning rate it last used (the schedule at this step).
            lr = optimizer.state["learning_rate"].item() if "learning_rate" in optimizer.state else float("nan")
            metrics = {k: v.item() * scale.item() for k, v in metric_sums.items()}
            on_step(StepResult(step, loss_value, int(count.item()), norm_value, kept, lr, skipped, metrics))
        if max_bad_steps > 0 and bad_in_a_row >= max_bad_steps:
            raise NonFiniteError(step, bad_in_a_row)
        if on_eval is not None and ((steps_per_eval > 0 and step % steps_per_eval == 0) or step == iters):
            on_eval(step)
            model.train()
        # Every rank must stop at the same step, or the others would wait forever.
        if should_stop is not None and any_rank(should_stop(), group) and step < iters:
            return step
    return step


def evaluate_loss(model: nn.Module, batches, loss_fn: Callable = sft_loss) -> Dict[str, float]:
    """Mean loss per unit (target token, or pair) over ``batches``, its perplexity, and the loss's metric means.

    "tokens" is the count of units (pairs for a preference loss, which has no perplexity).
    """
    total, count, sums = loss_sums(model, batches, loss_fn)
    return mean_metrics(total, count, sums)


def loss_sums(model: nn.Module, batches, loss_fn: Callable = sft_loss) -> Tuple[float, float, Dict[str, float]]:
    """The summed loss, unit count and metric sums of ``loss_fn`` over ``batches`` (eval mode)."""
    model.eval()
    total, count, sums = 0.0, 0.0, {}
    for batch in batches:
        loss, n, metrics = unpack(loss_fn(model, *batch))
        mx.eval(loss, n, metrics)
        total += loss.item()
        count += n.item()
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + value.item()
    return total, count, sums


def mean_metrics(total: float, count: float, sums: Dict[str, float]) -> Dict[str, float]:
    """Means from a loss's summed values: the loss and metrics per unit; "exact_match" per row (`sft_eval_loss`).

    A token-level loss (no per-unit metrics) has a perplexity; a preference loss does not.
    """
    if count == 0:
        return {"loss": float("nan"), "ppl": float("nan"), "tokens": 0}
    sums = dict(sums)
    rows = sums.pop("rows", None)  # > 0 whenever count is: a target token lies in some row
    per_row = {"exact_match": sums.pop("exact_match") / rows} if rows is not None else {}
    mean = total / count
    ppl = math.exp(min(mean, 50.0)) if not sums else None
    return {"loss": mean, "ppl": ppl, "tokens": int(count), **{k: v / count for k, v in sums.items()}, **per_row}
