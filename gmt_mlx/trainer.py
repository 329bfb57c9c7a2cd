"""The compiled training step and the loop, nothing else.

Loss, batches and callbacks are parameters, so tests can pass in mocks. GMT
lives in exactly one place: the optimizer wrapper, called between gradient
accumulation and the parameter update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, Iterator, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map

from .losses import sft_loss

Batch = Tuple[mx.array, mx.array]  # tokens (B, L) int32, target mask (B, L)


@dataclass
class StepResult:
    step: int
    loss: float
    ntoks: int
    grad_norm: float
    kept: int
    learning_rate: float


def make_step_fns(model: nn.Module, optimizer, loss_fn: Callable = sft_loss, grad_clip: float = 0.0):
    """Compile the two halves of a step over the explicit training state.

    ``grad_fn(tokens, mask)`` returns (loss, ntoks, grads) for one micro-batch;
    ``update_fn(grads)`` clips, masks and applies the accumulated gradient and
    returns (grad_norm, kept). Splitting them lets gradient accumulation sum
    micro-batches before the mask is built, once per optimizer step.
    """
    state = [model.state, optimizer.state]
    loss_and_grad = nn.value_and_grad(model, loss_fn)

    @partial(mx.compile, inputs=state, outputs=state)
    def grad_fn(tokens, mask):
        (loss, ntoks), grads = loss_and_grad(model, tokens, mask)
        return loss, ntoks, grads

    @partial(mx.compile, inputs=state, outputs=state)
    def update_fn(grads):
        if grad_clip > 0:
            grads, norm = optim.clip_grad_norm(grads, grad_clip)
        else:
            _, norm = optim.clip_grad_norm(grads, float("inf"))
        stats = optimizer.update(model, grads)
        # A plain mlx optimizer returns None: everything was kept.
        kept = stats["kept"] if stats else mx.array(sum(g.size for _, g in tree_flatten(grads)), mx.int64)
        return norm, kept

    return grad_fn, update_fn


def train(
    model: nn.Module,
    optimizer,
    batches: Iterator[Batch],
    *,
    iters: int,
    start_step: int = 0,
    grad_accumulation_steps: int = 1,
    grad_clip: float = 0.0,
    loss_fn: Callable = sft_loss,
    on_step: Optional[Callable[[StepResult], None]] = None,
    on_eval: Optional[Callable[[int], None]] = None,
    steps_per_eval: int = 0,
) -> None:
    """Run optimizer steps ``start_step + 1 .. iters``.

    ``batches`` yields micro-batches; each optimizer step consumes
    ``grad_accumulation_steps`` of them and averages their gradients (the
    paper's Gamma = 1/N sum of micro-batch gradients). ``on_step`` gets every
    step's result; ``on_eval(step)`` runs every ``steps_per_eval`` steps and at
    the end.
    """
    grad_fn, update_fn = make_step_fns(model, optimizer, loss_fn, grad_clip)
    state = [model.state, optimizer.state]
    model.train()
    for step in range(start_step + 1, iters + 1):
        loss_sum, ntoks_sum, grads = mx.array(0.0), mx.array(0.0), None
        for _ in range(grad_accumulation_steps):
            tokens, mask = next(batches)
            loss, ntoks, micro = grad_fn(tokens, mask)
            grads = micro if grads is None else tree_map(mx.add, grads, micro)
            loss_sum, ntoks_sum = loss_sum + loss, ntoks_sum + ntoks
            if grad_accumulation_steps > 1:
                mx.eval(grads, loss_sum, ntoks_sum)  # bound the graph (and memory) per micro-batch
        if grad_accumulation_steps > 1:
            grads = tree_map(lambda g: g / grad_accumulation_steps, grads)
        norm, kept = update_fn(grads)
        mx.eval(state, loss_sum, ntoks_sum, norm, kept)
        # The optimizer stores the learning rate it just used (schedule at this step).
        lr = optimizer.state["learning_rate"].item()
        if on_step is not None:
            on_step(
                StepResult(
                    step=step,
                    loss=loss_sum.item() / grad_accumulation_steps,
                    ntoks=int(ntoks_sum.item()),
                    grad_norm=norm.item(),
                    kept=int(kept.item()),
                    learning_rate=lr,
                )
            )
        if on_eval is not None and ((steps_per_eval > 0 and step % steps_per_eval == 0) or step == iters):
            on_eval(step)
            model.train()


def evaluate_loss(model: nn.Module, batches, loss_fn: Callable = sft_loss) -> Dict[str, float]:
    """Token-weighted mean loss over ``batches`` (and its perplexity)."""
    model.eval()
    total, count = 0.0, 0.0
    for tokens, mask in batches:
        loss, ntoks = loss_fn(model, tokens, mask)
        mx.eval(loss, ntoks)
        total += loss.item() * ntoks.item()
        count += ntoks.item()
    if count == 0:
        return {"loss": float("nan"), "ppl": float("nan"), "tokens": 0}
    mean = total / count
    return {"loss": mean, "ppl": math.exp(min(mean, 50.0)), "tokens": int(count)}
