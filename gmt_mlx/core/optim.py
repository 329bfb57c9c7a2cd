"""The masked optimizer: GMT (and the random-mask control) as an optimizer wrapper.

`MaskedOptimizer` wraps any `mlx.optimizers.Optimizer` the way
`mlx.optimizers.MultiOptimizer` does: it owns no parameters of its own, its
`.state` *is* the wrapped optimizer's state, so a training step can be
compiled with ``mx.compile(inputs=state, outputs=state)``.

The random keys for the sampled threshold and for the random control are
derived from ``(seed, optimizer step)``, so they need no state of their own
and a resumed run draws exactly the masks the uninterrupted run would have.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Callable, Dict, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_map_with_path

from gmt_mlx.config import (
    MASK_SCOPES,
    MASK_TARGETS,
    MASKED_METHODS,
    METHOD_ALIASES,
    METHODS,
    OPTIMIZERS,
    WEIGHT_ROUNDINGS,
    MaskOptions,
    OptimizerOptions,
    PrecisionOptions,
    check_mask_ratio,
)
from gmt_mlx.core.compact import COMPACT_MOMENTS, CompactAdamW
from gmt_mlx.core.masking import apply_masks, count_entries, gmt_masks, random_masks
from gmt_mlx.core.precision import SALT_WEIGHTS, round_to, step_seed, tensor_seed

# Optimizer-state key of the keep-mask sample (see MaskedOptimizer.apply_gradients).
MASK_SAMPLE_KEY = "mask_sample"
MASK_SAMPLE_SIZE = 65536


def mask_sample(masks: dict, size: int = MASK_SAMPLE_SIZE) -> mx.array:
    """A fixed subset of ~``size`` keep-mask entries (every k-th entry of each tensor,
    k odd so it does not line up with power-of-two rows): the same positions every
    step, so two steps' samples estimate how much their masks overlap."""
    flat = [m.reshape(-1) for _, m in tree_flatten(masks)]
    stride = max(1, sum(m.size for m in flat) // size) | 1
    # Copies, not strided views: a view keeps its whole mask alive.
    return mx.concatenate([mx.contiguous(m[::stride]) for m in flat])


class MaskedOptimizer:
    """Apply ``optimizer`` to a masked gradient (target ``grad``) or mask its update (``update``).

    ``mask`` (Config's `MaskOptions`; None: no mask): with ``mask_ratio == 0``, or
    a method that does not mask (sft, lora, dora), the wrapped optimizer is
    called unchanged, so the result is bit-for-bit plain fine-tuning.
    ``precision``: how low-precision weights are rounded (None: Config's default).

    ``update()`` / ``apply_gradients()`` return statistics as arrays (``kept``:
    entries kept this step) so a compiled step can return them. With
    ``mask.mask_overlap``, a sample of the keep-mask (`mask_sample`) is also
    stored in the state under ``"mask_sample"``, so a caller can measure the
    overlap of consecutive steps' masks. It costs memory: in the fused step
    (trainer.make_fused_step) the join of the samples kept every mask alive
    until the end of the step (+2.6 GB, 8.5 bytes per parameter, on a 309M
    model in float32), so it is off unless asked for.
    """

    def __init__(
        self,
        optimizer: optim.Optimizer,
        mask: Optional[MaskOptions] = None,
        *,
        seed: int,
        precision: Optional[PrecisionOptions] = None,
    ):
        # None: no mask (the wrapped optimizer unchanged), and Config's default precision options.
        mask = mask or MaskOptions(mask_ratio=0.0)
        precision = precision or PrecisionOptions()
        method = METHOD_ALIASES.get(mask.method, mask.method)
        if method not in METHODS:
            raise ValueError(f"unknown mask method {mask.method!r} (expected one of {', '.join(MASKED_METHODS)})")
        if mask.mask_scope not in MASK_SCOPES:
            raise ValueError(f"unknown mask scope {mask.mask_scope!r} (expected one of {', '.join(MASK_SCOPES)})")
        if mask.mask_target not in MASK_TARGETS:
            raise ValueError(f"unknown mask target {mask.mask_target!r} (expected one of {', '.join(MASK_TARGETS)})")
        if mask.mask_sample_size < 1:
            raise ValueError(f"mask_sample_size must be positive, got {mask.mask_sample_size}")
        if precision.weight_rounding not in WEIGHT_ROUNDINGS:
            raise ValueError(
                f"unknown weight rounding {precision.weight_rounding!r} (expected one of {', '.join(WEIGHT_ROUNDINGS)})"
            )
        masked = method in MASKED_METHODS  # the unmasked methods (sft, lora, dora) drop nothing
        self.optimizer = optimizer
        self.weight_rounding = precision.weight_rounding
        self.record_mask_sample = mask.mask_overlap
        self.method = method if masked else "gmt"
        self.mask_ratio = check_mask_ratio(mask.mask_ratio) if masked else 0.0
        self.scope = mask.mask_scope
        self.target = mask.mask_target
        self.seed = int(seed)
        self.sample_size = int(mask.mask_sample_size)

    # The wrapped optimizer's state is ours: compile and checkpoints see one tree.
    @property
    def state(self) -> dict:
        return self.optimizer.state

    @state.setter
    def state(self, state: dict) -> None:
        self.optimizer.state = state

    @property
    def step(self) -> mx.array:
        return self.optimizer.step

    @property
    def learning_rate(self) -> mx.array:
        return self.optimizer.learning_rate

    def init(self, parameters: dict) -> None:
        self.optimizer.init(parameters)

    def _step_key(self, part: int = 0) -> mx.array:
        # A threefry key from (seed, step, part): deterministic and resume-safe.
        # Part 0 is the whole model in one update; a step updated per layer
        # (layerwise) gives each block its own part, so its own random numbers.
        step = self.optimizer.step.astype(mx.uint32).reshape(1)
        word = (self.seed + part * 0x9E3779B9) & 0xFFFFFFFF
        return mx.concatenate([mx.array([word], mx.uint32), step])

    def masks(self, gradients: dict, part: int = 0) -> Tuple[dict, mx.array]:
        """Keep-masks for this step's (accumulated) gradient, and the number kept."""
        flat = tree_flatten(gradients)
        names = tuple(name for name, _ in flat)
        build = _mask_builder(names, self.method, self.mask_ratio, self.scope, self.sample_size)
        masks, kept = build([g for _, g in flat], self._step_key(part))
        found = dict(zip(names, masks))
        # Rebuilt on the gradient tree itself (see masking.gmt_masks).
        return tree_map_with_path(lambda path, _: found[path], gradients), kept

    def apply_gradients(
        self, gradients: dict, parameters: dict, grad_scale: mx.array | None = None, part: int = 0
    ) -> Tuple[dict, Dict[str, mx.array]]:
        """Return the updated parameters (same tree as ``gradients``) and mask statistics.

        ``grad_scale`` (a positive scalar, e.g. the gradient-clipping factor)
        multiplies the gradient the wrapped optimizer sees. Pass it here rather
        than scaling the gradient beforehand: a positive scale does not change
        the mask, so the mask is built from the gradient as given and the
        scaling fuses into the optimizer's kernel. A pre-scaled gradient has to
        be materialised for the sampled threshold: a whole extra copy of the
        gradient (+14% peak memory and ~2% step time on SmolLM2-135M).
        """

        # Weights stored in a low-precision dtype are updated in float32 and
        # rounded back once, at the end (stochastically by default: see
        # precision.round_to), so the optimizer's arithmetic never rounds.
        stored = tree_map(lambda g, p: p, gradients, parameters)
        low = any(p.dtype != mx.float32 for _, p in tree_flatten(stored))
        # CompactAdamW casts each weight itself, inside its update's kernel; a
        # cast here would be a float32 copy of the weights given to it.
        cast = low and not isinstance(self.optimizer, CompactAdamW)
        work = tree_map(lambda p: p.astype(mx.float32), stored) if cast else stored
        seed = step_seed(self.seed, self.optimizer.step) if low and self.weight_rounding == "stochastic" else None
        state_dtypes = _state_dtypes(self.optimizer) if low else None

        def rounding_seed(path: str) -> mx.array | None:
            return None if seed is None else tensor_seed(seed, path, SALT_WEIGHTS)

        if low and isinstance(self.optimizer, CompactAdamW):
            # It rounds each weight itself, as soon as (a slice of) it is computed.
            dtypes = {path: p.dtype for path, p in tree_flatten(stored)}
            self.optimizer.weight_rounder = lambda path, x, start: round_to(x, dtypes[path], rounding_seed(path), start)
        updated, kept = self._masked_update(gradients, work, grad_scale, part)
        if low:
            if isinstance(self.optimizer, CompactAdamW):
                self.optimizer.weight_rounder = None
            _restore_state_dtypes(self.optimizer, state_dtypes)
            updated = tree_map_with_path(
                lambda path, new, p: round_to(new, p.dtype, rounding_seed(path)), updated, stored
            )
        return updated, {"kept": kept}

    def _masked_update(
        self, gradients: dict, work: dict, grad_scale: mx.array | None, part: int
    ) -> Tuple[dict, mx.array]:
        """The wrapped optimizer's update of ``work`` under this step's mask: (updated weights, entries kept)."""

        def scaled(tree: dict) -> dict:
            return tree if grad_scale is None else tree_map(lambda g: g * grad_scale, tree)

        if self.mask_ratio == 0.0:
            return self.optimizer.apply_gradients(scaled(gradients), work), mx.array(count_entries(gradients), mx.int64)
        masks, kept = self.masks(gradients, part)
        if self.record_mask_sample:
            self.optimizer.state[MASK_SAMPLE_KEY] = mask_sample(masks)
        if self.target == "grad":
            return self.optimizer.apply_gradients(scaled(apply_masks(gradients, masks)), work), kept
        # The optimizer state sees the full gradient; only kept entries move.
        # new * m + p * ~m is where(m, new, p) for finite values (x * 1 = x,
        # x * 0 = 0): arithmetic fuses into the optimizer's kernel at full
        # speed, a select there made the step ~3% slower (SmolLM2-135M, CPU).
        new = self.optimizer.apply_gradients(scaled(gradients), work)
        return tree_map(lambda n, m, p: n * m + p * ~m, new, masks, work), kept

    def update(
        self, model: nn.Module, gradients: dict, grad_scale: mx.array | None = None, part: int = 0
    ) -> Dict[str, mx.array]:
        """Update ``model`` in place; return mask statistics (``grad_scale``: see apply_gradients;
        ``part``: which part of a step updated in parts, see layerwise)."""
        updated, stats = self.apply_gradients(gradients, model, grad_scale, part)
        model.update(updated)
        return stats


def training_state(model: nn.Module, optimizer: Any) -> list:
    """Everything a step reads and writes: weights, optimizer state and the RNG
    (LoRA dropout draws from it; without it a compiled step would replay one mask)."""
    return [model.state, optimizer.state, mx.random.state]


def apply_update(optimizer: Any, model: nn.Module, grads: dict, scale: mx.array, part: int = 0) -> mx.array:
    """Apply ``scale * grads`` to ``model`` (masked by a `MaskedOptimizer`); return the entries kept.

    The mask is built from the unscaled gradient (a positive scale does not
    change it) and the scale fuses into the optimizer's kernel. ``part``: see
    MaskedOptimizer.update. A plain mlx optimizer keeps everything.
    """
    if isinstance(optimizer, MaskedOptimizer):
        return optimizer.update(model, grads, grad_scale=scale, part=part)["kept"]
    optimizer.update(model, tree_map(lambda g: g * scale, grads))
    return mx.array(sum(g.size for _, g in tree_flatten(grads)), mx.int64)


@lru_cache(maxsize=1024)
def _mask_builder(names: tuple, method: str, mask_ratio: float, scope: str, sample_size: int) -> Callable:
    """The masks of the tensors ``names`` (a list of arrays, and a key), compiled.

    Inside a compiled step this is traced inline; called eagerly (the staged
    update of layerwise) its comparisons, ties and counts fuse instead of each
    materialising a tensor-sized array. Keyed by the names, which decide the
    mask units, so that no two trees share a trace.
    """
    build = random_masks if method == "random" else gmt_masks

    def run(grads: list, key: mx.array):
        masks, kept = build(dict(zip(names, grads)), mask_ratio, scope=scope, key=key, sample_size=sample_size)
        return [masks[name] for name in names], kept

    return mx.compile(run)


def _state_dtypes(optimizer: optim.Optimizer) -> dict:
    """The dtype of every array in an optimizer's state (before a step), by path."""
    return {path: v.dtype for path, v in tree_flatten(optimizer.state)}


def _restore_state_dtypes(optimizer: optim.Optimizer, dtypes: dict) -> None:
    """Keep a wrapped mlx optimizer's state in the dtype it was created in.

    Its arithmetic on a float32 gradient (the scaled one) promotes a bfloat16
    moment to float32, which would silently double the state's memory after
    the first step. (`CompactAdamW` stores its moments itself.)
    """
    if isinstance(optimizer, CompactAdamW) or not dtypes:
        return
    # In place: a compiled step's outputs are this very dict's contents.
    optimizer.state.update(
        tree_map_with_path(
            lambda path, v: v.astype(dtypes[path]) if path in dtypes and v.dtype != dtypes[path] else v, optimizer.state
        )
    )


def make_schedule(
    learning_rate: float,
    total_steps: int,
    *,
    kind: str,
    warmup_steps: int,
    min_lr_ratio: float,
) -> Callable[[mx.array], mx.array]:
    """Learning rate against optimizer step: linear warmup, then cosine / linear / constant.

    Warmup ramps from lr/warmup to lr (never 0, so step 1 already trains);
    the decay phase runs over the remaining steps down to lr * min_lr_ratio.
    The keywords are Config's lr_schedule, warmup_steps and min_lr_ratio (see `schedule_of`).
    """
    end = learning_rate * min_lr_ratio
    decay_steps = max(1, total_steps - warmup_steps)
    if kind == "cosine":
        decay = optim.cosine_decay(learning_rate, decay_steps, end)
    elif kind == "linear":
        decay = optim.linear_schedule(learning_rate, end, decay_steps)
    elif kind == "constant":
        decay = lambda step: mx.array(learning_rate, mx.float32)  # noqa: E731
    else:
        raise ValueError(f"unknown lr schedule {kind!r} (expected cosine, linear or constant)")
    if warmup_steps <= 0:
        return decay
    # Step 0 is the first update: start at lr/warmup_steps, reach lr at the last warmup step.
    warmup = optim.linear_schedule(learning_rate / warmup_steps, learning_rate, max(1, warmup_steps - 1))
    return optim.join_schedules([warmup, decay], [warmup_steps])


def schedule_of(options: OptimizerOptions, total_steps: int) -> Callable[[mx.array], mx.array]:
    """`make_schedule` for the optimizer options' peak rate, schedule, warmup and final ratio."""
    return make_schedule(
        options.learning_rate,
        total_steps,
        kind=options.lr_schedule,
        warmup_steps=options.warmup_steps,
        min_lr_ratio=options.min_lr_ratio,
    )


def build_optimizer(
    options: OptimizerOptions,
    learning_rate,
    *,
    seed: int,
    mask: Optional[MaskOptions] = None,
    precision: Optional[PrecisionOptions] = None,
) -> MaskedOptimizer:
    """Build the base optimizer ``options.optimizer`` and wrap it in a `MaskedOptimizer`.

    ``learning_rate``: a number or a schedule (`schedule_of`); it replaces
    ``options.learning_rate``, the peak. ``mask``: the step's mask (None, or a
    method that does not mask: none). ``precision``: the weights' dtype and the
    moments' storage (None: Config's defaults). ``seed``: the masks' and the
    roundings' random numbers. ``options.momentum`` is sgd's and muon's (None:
    their own defaults, 0 and 0.95); Adam's betas and eps stay mlx's defaults.
    ``precision.moments`` (adam/adamw): how the moments are stored
    (`CompactAdamW`); "auto" keeps them in the weights' dtype. float32 moments
    on float32 weights use mlx's own AdamW/Adam.
    """
    precision = precision or PrecisionOptions()
    name, weight_decay, momentum = options.optimizer, options.weight_decay, options.momentum
    weights_dtype, moments = precision.train_dtype, precision.moments
    if moments == "auto":
        moments = weights_dtype if weights_dtype in COMPACT_MOMENTS else "float32"
    if name in ("adam", "adamw") and not (moments == "float32" and weights_dtype == "float32"):
        base = CompactAdamW(
            learning_rate, weight_decay=weight_decay if name == "adamw" else 0.0, moments=moments, seed=seed
        )
    elif name == "adamw":
        base = optim.AdamW(learning_rate, weight_decay=weight_decay)
    elif name == "adam":
        base = optim.Adam(learning_rate)
    elif name == "sgd":
        base = optim.SGD(learning_rate, momentum=momentum or 0.0, weight_decay=weight_decay)
    elif name == "adafactor":
        base = optim.Adafactor(learning_rate, relative_step=False, scale_parameter=False)
    elif name == "muon":
        base = optim.Muon(learning_rate, momentum=0.95 if momentum is None else momentum, weight_decay=weight_decay)
    else:
        raise ValueError(f"unknown optimizer {name!r} (expected one of {', '.join(OPTIMIZERS)})")
    return MaskedOptimizer(base, mask, seed=seed, precision=precision)
