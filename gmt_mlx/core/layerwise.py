"""A training step that updates the model one transformer block at a time (--update-per-layer).

Why: in the one compiled step (trainer.make_fused_step) MLX's scheduler
decides when each gradient is consumed, and at 1.39B parameters with 8-bit
moments it kept ~3 bytes per parameter of gradients and update temporaries
alive at once (benchmarks/RESULTS.md). Here the backward pass is cut at the
blocks' boundaries and run block by block, last to first; each block's
gradient is masked, applied and evaluated before the next block's exists.
Alive at once: the weights, the optimizer state, the blocks' inputs, one
block's gradient and update temporaries, and the gradient of the parameters
outside the blocks (embeddings, final norm, head), which are updated last.
The price is one more forward pass per step (each block's forward runs again
inside its backward), as with gradient checkpointing.

The cut needs nothing from the architecture but ``model.layers``: the blocks
are stood in for by recorders while the model's own forward runs, so the
embedding scale, masks, rotary tables and head of every mlx-lm model stay
theirs. What needs the whole gradient before the first update cannot run
here: the global mask scope (config refuses it). Global gradient clipping
needs the whole gradient's norm before the first update: with ``grad_clip``
the backward pass runs twice, block by block both times, the first only for
the norm (each gradient freed once its square is summed), the second to
update with the clipping factor that norm gives: one more backward pass per
step, no more memory.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from gmt_mlx.core.compact import QUANTIZED_MOMENTS, CompactAdamW
from gmt_mlx.core.distributed import all_sum_totals, all_sum_tree
from gmt_mlx.core.losses import add_totals, unpack
from gmt_mlx.core.optim import MASK_SAMPLE_KEY, MASK_SAMPLE_SIZE, MaskedOptimizer, apply_update, training_state
from gmt_mlx.core.precision import sum_of_squares
from gmt_mlx.errors import UserError


class _StandIn:
    """Called in a block's place; anything else (a model reads attributes such
    as ``use_sliding`` off its blocks) is the block's."""

    def __init__(self, block: nn.Module, call: Callable):
        self._block, self._call = block, call

    def __call__(self, *args, **kwargs) -> Any:
        return self._call(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._block, name)


@contextmanager
def _standing_in(layers: list, make: Callable) -> Iterator[None]:
    """Replace each block in ``layers`` by a stand-in calling ``make(index, block)`` for the duration."""
    originals = list(layers)
    try:
        for i, block in enumerate(originals):
            layers[i] = _StandIn(block, make(i, block))
        yield
    finally:
        layers[:] = originals


def _arrays(tree) -> List[mx.array]:
    return [v for _, v in tree_flatten(tree) if isinstance(v, mx.array)]


class Blocks:
    """The model's blocks, where their trainable parameters live, and the passes over them."""

    def __init__(self, model: nn.Module):
        layers = getattr(model, "layers", None)
        if not isinstance(layers, list) or not layers:
            raise UserError(
                f"{type(model).__module__} has no list of blocks (model.layers) to update one at a "
                "time; train it with --no-update-per-layer"
            )
        names = {id(module): name for name, module in model.named_modules()}
        self.model, self.layers = model, layers
        self.prefixes = [names[id(block)] + "." for block in layers]

    def split(self, flat: Dict[str, mx.array]) -> Tuple[List[Dict[str, mx.array]], Dict[str, mx.array]]:
        """``flat`` (path -> array) as per-block dicts (block-relative paths) and the rest (full paths)."""
        blocks: List[Dict[str, mx.array]] = [{} for _ in self.layers]
        outer: Dict[str, mx.array] = {}
        for path, value in flat.items():
            for i, prefix in enumerate(self.prefixes):
                if path.startswith(prefix):
                    blocks[i][path[len(prefix) :]] = value
                    break
            else:
                outer[path] = value
        return blocks, outer

    def record(self, loss_fn: Callable, batch) -> Tuple[list, list]:
        """Run the forward pass; return each block's calls (input, args, kwargs) and the last block's outputs.

        A loss may call the model more than once; call k of every block
        belongs to the same model call. Evaluated here, then the graph is dropped.
        """
        calls: List[list] = [[] for _ in self.layers]
        finals: List[mx.array] = []
        last = len(self.layers) - 1

        def make(i, block):
            def call(x, *args, **kwargs):
                calls[i].append((x, args, kwargs))
                y = block(x, *args, **kwargs)
                if i == last:
                    finals.append(y)
                return y

            return call

        with _standing_in(self.layers, make):
            loss_fn(self.model, *batch)  # lazy: only what is evaluated below is computed
        mx.eval(
            [x for block_calls in calls for x, _, _ in block_calls],
            finals,
            _arrays([(a, k) for block_calls in calls for _, a, k in block_calls]),
        )
        return calls, finals

    def top(self, loss_fn: Callable, batch: tuple, outer: Dict[str, mx.array], finals: list) -> tuple:
        """(loss, count, metrics) and the gradients w.r.t. ``outer`` and the last block's outputs."""
        model, last = self.model, len(self.layers) - 1

        def fun(params, outputs):
            model.update(tree_unflatten(list(params.items())))
            given = iter(outputs)
            with _standing_in(
                self.layers, lambda i, _: (lambda x, *a, **k: next(given)) if i == last else (lambda x, *a, **k: x)
            ):
                out = loss_fn(model, *batch)
            loss, count, metrics = unpack(out)
            return loss, count, metrics

        (loss, count, metrics), (g_outer, g_finals) = mx.value_and_grad(fun, argnums=(0, 1))(outer, finals)
        return loss, count, metrics, g_outer, g_finals

    def block(
        self, i: int, params: Dict[str, mx.array], block_calls: list, cotangents: list
    ) -> Tuple[Dict[str, mx.array], list]:
        """Gradients of block ``i``'s ``params`` (relative paths) and of its inputs, given its outputs' cotangents."""
        block, names = self.layers[i], list(params)
        n = len(names)

        def fun(*flat):
            block.update(tree_unflatten(list(zip(names, flat[:n]))))
            return [block(x, *a, **k) for x, (_, a, k) in zip(flat[n:], block_calls)]

        _, grads = mx.vjp(fun, [*params.values(), *(x for x, _, _ in block_calls)], cotangents)
        return dict(zip(names, grads[:n])), grads[n:]

    def bottom(self, loss_fn: Callable, batch, outer: Dict[str, mx.array], cotangents: list) -> Dict[str, mx.array]:
        """Gradients w.r.t. ``outer`` through the first block's inputs (the embedding lookup)."""
        model, names = self.model, list(outer)

        def fun(*flat):
            model.update(tree_unflatten(list(zip(names, flat))))
            inputs = []

            def make(i, _):
                if i == 0:
                    return lambda x, *a, **k: (inputs.append(x), x)[1]
                return lambda x, *a, **k: x

            with _standing_in(self.layers, make):
                loss_fn(model, *batch)  # the loss itself is never evaluated
            return inputs

        _, grads = mx.vjp(fun, list(outer.values()), cotangents)
        return dict(zip(names, grads))


def block_sizes(model: nn.Module) -> Tuple[int, int]:
    """(trainable entries of the largest block, trainable entries outside the blocks), as
    `Blocks` splits them; (0, all) for a model without ``model.layers``."""
    flat = dict(tree_flatten(model.trainable_parameters()))
    try:
        blocks, outer = Blocks(model).split(flat)
    except UserError:
        return 0, sum(v.size for v in flat.values())
    return max(sum(v.size for v in b.values()) for b in blocks), sum(v.size for v in outer.values())


def _at(tree: Any, path: str) -> Any:
    """The entry of a nested dict/list tree at a dotted path."""
    for key in path.split("."):
        tree = tree[int(key)] if isinstance(tree, list) else tree[key]
    return tree


def _nest(prefix: str, flat: Dict[str, mx.array]) -> dict:
    """A partial tree of the model's shape holding ``flat`` (relative to ``prefix``):
    lists are padded with empty dicts, which mlx's tree_map and Module.update skip."""
    return tree_unflatten([(prefix + path, v) for path, v in flat.items()])


def make_layerwise_step(
    model: nn.Module,
    optimizer: Any,
    loss_fn: Callable,
    group: Optional[mx.distributed.Group] = None,
    grad_clip: float = 0.0,
) -> Callable:
    """A step function like trainer.make_fused_step's: ``step(earlier, *batch)`` returns
    (summed loss, count, metric sums, gradient norm of the mean loss, entries kept, applied).

    Parts are updated in the order their gradients appear: block L-1 .. 0,
    then the parameters outside the blocks. The optimizer's step counter is
    held for the step's parts (one schedule value, one rounding seed) and
    advances once, if the step was applied; each part draws its mask's
    random numbers from (seed, step, part). A non-finite loss skips the step
    with nothing changed; a non-finite tensor keeps its weights and moments
    exactly (it is left out of its part's update) and marks the step as not applied.
    With ``grad_clip`` > 0 the update is scaled as trainer.make_fused_step's,
    from a first backward pass for the norm; a non-finite norm changes nothing.
    """
    blocks = Blocks(model)
    group = group if group is not None and group.size() > 1 else None
    update = _PartUpdates(model, optimizer)

    def step(earlier, *batch):
        return _LayerwisePass(blocks, optimizer, update, loss_fn, group, grad_clip).run(earlier, batch)

    return step


class _LayerwisePass:
    """One call of `make_layerwise_step`'s step.

    Only its lists and dicts may hold the weights as they were, each block's
    recorded inputs and the cotangents flowing down: each entry is dropped
    once its part is updated, or the old weights would stay alive beside the
    new ones until the end of the step.
    """

    def __init__(
        self,
        blocks: Blocks,
        optimizer: Any,
        update: _PartUpdates,
        loss_fn: Callable,
        group: Optional[mx.distributed.Group],
        grad_clip: float = 0.0,
    ):
        self.blocks, self.optimizer, self.update, self.loss_fn, self.group = blocks, optimizer, update, loss_fn, group
        self.grad_clip = grad_clip
        self.squares: List[mx.array] = []
        self.kept: List[mx.array] = []
        self.samples: List[mx.array] = []
        self.all_finite = True

    def run(self, earlier: Optional[tuple], batch: tuple) -> tuple:
        """The step's (loss, count, metrics, norm, kept, applied); see make_layerwise_step."""
        self.block_params, self.outer = self.blocks.split(dict(tree_flatten(self.blocks.model.trainable_parameters())))
        self.pending = dict(tree_flatten(earlier[3])) if earlier is not None else {}
        loss, count, metrics = self._forward(earlier, batch)
        self.scale = self.update_scale = 1.0 / mx.maximum(count, 1.0)
        if not mx.isfinite(loss).item():
            return loss, count, metrics, mx.array(float("nan")), mx.array(0, mx.int64), mx.array(False)
        if self.grad_clip > 0:
            norm = self._norm_pass(batch)
            if not mx.isfinite(norm).item():
                return loss, count, metrics, norm, mx.array(0, mx.int64), mx.array(False)
            # The same factor as the fused step's (trainer.make_fused_step).
            self.update_scale = self.scale * mx.minimum(self.grad_clip / (norm + 1e-6), 1.0)
        self.start = self.optimizer.state.get("step")
        # A mask unit of one tensor lets each tensor be updated (and its
        # float32 temporaries freed) on its own; a block-wide unit needs the block.
        optimizer = self.optimizer
        self.whole_block = (
            isinstance(optimizer, MaskedOptimizer) and optimizer.mask_ratio > 0 and optimizer.scope == "layer"
        )
        for i in reversed(range(len(self.blocks.layers))):
            self._update_block(i)
        if self.outer:
            self._update_outer(batch)
        return (loss, count, metrics, *self._finish())

    def _forward(self, earlier: Optional[tuple], batch: tuple) -> tuple:
        """The recording forward pass and the backward of what follows the last block: the step's (loss, count,
        metrics), with ``earlier``'s and over the ranks; keeps the outer gradient and the last block's cotangents."""
        self.calls, finals = self.blocks.record(self.loss_fn, batch)
        loss, count, metrics, self.g_outer, self.cotangents = self.blocks.top(self.loss_fn, batch, self.outer, finals)
        del finals
        loss, count, metrics = add_totals((loss, count, metrics), earlier)
        if self.group is not None:
            loss, count, metrics = all_sum_totals((loss, count, metrics), self.group)
        mx.eval(loss, count, metrics, self.g_outer, self.cotangents)
        return loss, count, metrics

    def _norm_pass(self, batch: tuple) -> mx.array:
        """The step's gradient norm (of the mean loss) from a backward pass that only sums squares: the
        gradients are those the updating pass will see (earlier micro-batches' and the ranks' included)."""
        cotangents, squares = self.cotangents, []
        for i in reversed(range(len(self.blocks.layers))):
            grads, cotangents = self.blocks.block(i, self.block_params[i], self.calls[i], cotangents)
            squares.extend(self._squares(self.blocks.prefixes[i], grads))
            mx.eval(squares, cotangents)
        if self.outer:
            from_bottom = self.blocks.bottom(self.loss_fn, batch, self.outer, cotangents)
            squares.extend(self._squares("", {p: self.g_outer[p] + from_bottom[p] for p in self.outer}))
            mx.eval(squares)
        return mx.sqrt(sum(squares)) * self.scale if squares else mx.array(0.0)

    def _summed(self, prefix: str, grads: Dict[str, mx.array], keep: bool = False) -> Dict[str, mx.array]:
        """A part's gradient with the earlier micro-batches' (``keep``: left for the updating pass), over the ranks."""
        for path in grads:
            if prefix + path in self.pending:
                earlier = self.pending[prefix + path] if keep else self.pending.pop(prefix + path)
                grads[path] = grads[path] + earlier
        if self.group is not None:
            # all_sum_tree nests dotted paths: flattened again, the same keys.
            grads = dict(tree_flatten(all_sum_tree(grads, self.group)))
        return grads

    def _squares(self, prefix: str, grads: Dict[str, mx.array]) -> List[mx.array]:
        return [sum_of_squares(g) for g in self._summed(prefix, grads, keep=True).values()]

    def _update_block(self, i: int) -> None:
        """Block ``i``'s backward pass (its forward runs again inside) and update; the cotangents move down a block."""
        grads, self.cotangents = self.blocks.block(i, self.block_params[i], self.calls[i], self.cotangents)
        self.calls[i] = self.block_params[i] = None
        self._update_part(self.blocks.prefixes[i], grads, self.cotangents)

    def _update_outer(self, batch: tuple) -> None:
        """The parameters outside the blocks: their gradient from the top plus the one through the first block."""
        from_bottom = self.blocks.bottom(self.loss_fn, batch, self.outer, self.cotangents)
        grads = {path: self.g_outer[path] + from_bottom[path] for path in self.outer}
        del from_bottom
        self.g_outer = self.outer = None
        self._update_part("", grads)

    def _update_part(self, prefix: str, grads: Dict[str, mx.array], extra: Any = ()) -> None:
        """Update the finite tensors of one part (``grads``: paths relative to ``prefix``), as one unit or one
        tensor at a time; ``extra`` is evaluated with the gradient."""
        finite = self._finite(prefix, grads, extra)
        del grads
        units = [finite] if self.whole_block and prefix else [{path: g} for path, g in finite.items()]
        for unit in units:
            self._update_unit(prefix, unit)
            unit.clear()  # this gradient is no longer needed

    def _finite(self, prefix: str, grads: Dict[str, mx.array], extra: Any) -> Dict[str, mx.array]:
        """The part's gradient with the earlier micro-batches' and over the ranks, evaluated; its finite tensors.
        Their squared norms are kept for the step's norm."""
        grads = self._summed(prefix, grads)
        part_squares = {path: sum_of_squares(g) for path, g in grads.items()}
        mx.eval(grads, part_squares, extra)
        finite = {path: g for path, g in grads.items() if mx.isfinite(part_squares[path]).item()}
        self.all_finite = self.all_finite and len(finite) == len(grads)
        self.squares.extend(part_squares.values())
        return finite

    def _update_unit(self, prefix: str, unit: Dict[str, mx.array]) -> None:
        """Apply one mask unit's update with the step counter held, and evaluate what it wrote."""
        optimizer, model = self.optimizer, self.blocks.model
        self.kept.append(self.update(prefix, unit, self.update_scale))
        if self.start is not None:
            optimizer.state["step"] = self.start
        if MASK_SAMPLE_KEY in optimizer.state:
            self.samples.append(optimizer.state.pop(MASK_SAMPLE_KEY))
        # What this update wrote: its weights and their state (not a walk of the whole model).
        paths = [prefix + path for path in unit]
        mx.eval(self.kept[-1], [_at(model, p) for p in paths], [_at(optimizer.state, p) for p in paths])

    def _finish(self) -> Tuple[mx.array, mx.array, mx.array]:
        """(gradient norm, entries kept, applied); the step counter advances once, if applied."""
        norm = mx.sqrt(sum(self.squares)) * self.scale if self.squares else mx.array(0.0)
        applied = self.all_finite and bool(mx.isfinite(norm).item())
        if self.start is not None:
            self.optimizer.state["step"] = self.start + 1 if applied else self.start
        if self.samples:
            # Each part stored its own mask sample: the step's is every k-th entry of them all.
            joined = mx.concatenate(self.samples)
            stride = max(1, joined.size // MASK_SAMPLE_SIZE) | 1
            self.optimizer.state[MASK_SAMPLE_KEY] = mx.contiguous(joined[::stride])
        total_kept = sum(self.kept) if self.kept else mx.array(0, mx.int64)
        return norm, total_kept, mx.array(applied)


class _PartUpdates:
    """``update(prefix, grads, scale)``: apply one part's gradient (block-relative paths under
    ``prefix``) and return the entries kept; a compiled function per part.

    Eagerly, the update's chain of float32 temporaries (the gradient, old and
    new moments, their block scales, the weights, the rounding noise) was
    materialised at once: ~70 bytes per entry of the tensor being updated,
    5.8 GB for the 1.39B shape's embedding. So each part's update is one
    compiled function (~37 bytes per entry: MLX fuses at most 11 elementwise
    ops per kernel), traced on the first step (a part's path seeds its
    rounding and masks, so it is a constant of its trace) -- or, with
    `CompactAdamW`'s 8-bit moments, runs in stages that are each compiled and
    evaluated in turn (``staged``: ~20 bytes per entry). Each part's number
    (its mask's random stream) is its position in the model, so it does not
    depend on which other tensors were skipped. With a mask sample to record
    (--mask-overlap) the state gains a key inside the step, which a compiled
    function cannot add: then the update runs eagerly.
    """

    def __init__(self, model: nn.Module, optimizer: Any):
        self.model, self.optimizer = model, optimizer
        self.state = training_state(model, optimizer)
        self.parts = {path: i + 1 for i, (path, _) in enumerate(tree_flatten(model.trainable_parameters()))}
        inner = getattr(optimizer, "optimizer", None)
        self.staged = (
            isinstance(inner, CompactAdamW)
            and inner.moments in QUANTIZED_MOMENTS
            and getattr(optimizer, "target", "grad") == "grad"
        )
        self.eager = self.staged or getattr(optimizer, "record_mask_sample", False)
        self.compiled: Dict[tuple, Callable] = {}

    def __call__(self, prefix: str, grads: Dict[str, mx.array], scale: mx.array) -> mx.array:
        names = tuple(grads)
        part = self.parts[prefix + names[0]]
        if self.eager:
            inner = self.optimizer.optimizer
            inner.staged = self.staged
            try:
                return apply_update(self.optimizer, self.model, _nest(prefix, grads), scale, part)
            finally:
                inner.staged = False
        fn = self.compiled.get((prefix, names))
        if fn is None:

            def run(arrays, scale):
                return apply_update(self.optimizer, self.model, _nest(prefix, dict(zip(names, arrays))), scale, part)

            fn = self.compiled[(prefix, names)] = mx.compile(run, inputs=self.state, outputs=self.state)
        return fn([grads[n] for n in names], scale)
