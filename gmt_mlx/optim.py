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

from typing import Callable, Dict, Optional, Tuple

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map

from .config import MASKED_METHODS
from .masking import (
    DEFAULT_SAMPLE_SIZE,
    SCOPES,
    TARGETS,
    apply_masks,
    check_mask_ratio,
    count_entries,
    gmt_masks,
    random_masks,
)

# Optimizer-state key of the keep-mask sample (see MaskedOptimizer.apply_gradients).
MASK_SAMPLE_KEY = "mask_sample"
MASK_SAMPLE_SIZE = 65536


def mask_sample(masks: dict, size: int = MASK_SAMPLE_SIZE) -> mx.array:
    """A fixed subset of ~``size`` keep-mask entries (every k-th entry of each tensor,
    k odd so it does not line up with power-of-two rows): the same positions every
    step, so two steps' samples estimate how much their masks overlap."""
    flat = [m.reshape(-1) for _, m in tree_flatten(masks)]
    stride = max(1, sum(m.size for m in flat) // size) | 1
    return mx.concatenate([m[::stride] for m in flat])


class MaskedOptimizer:
    """Apply ``optimizer`` to a masked gradient (target ``grad``) or mask its update (``update``).

    With ``mask_ratio == 0`` the wrapped optimizer is called unchanged, so the
    result is bit-for-bit plain fine-tuning.

    ``update()`` / ``apply_gradients()`` return statistics as arrays (``kept``:
    entries kept this step) so a compiled step can return them. When masking,
    a sample of the keep-mask (`mask_sample`) is also stored in the state
    under ``"mask_sample"``, so a caller can measure the overlap of
    consecutive steps' masks without holding whole masks.
    """

    def __init__(
        self,
        optimizer: optim.Optimizer,
        *,
        method: str = "gmt",
        mask_ratio: float = 0.0,
        scope: str = "tensor",
        target: str = "grad",
        seed: int = 0,
        sample_size: int = DEFAULT_SAMPLE_SIZE,
    ):
        if method not in MASKED_METHODS:
            raise ValueError(f"unknown mask method {method!r} (expected one of {', '.join(MASKED_METHODS)})")
        if scope not in SCOPES:
            raise ValueError(f"unknown mask scope {scope!r} (expected one of {', '.join(SCOPES)})")
        if target not in TARGETS:
            raise ValueError(f"unknown mask target {target!r} (expected one of {', '.join(TARGETS)})")
        if sample_size < 1:
            raise ValueError(f"sample_size must be positive, got {sample_size}")
        self.optimizer = optimizer
        self.method = method
        self.mask_ratio = check_mask_ratio(mask_ratio)
        self.scope = scope
        self.target = target
        self.seed = int(seed)
        self.sample_size = int(sample_size)

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

    def _step_key(self) -> mx.array:
        # A threefry key from (seed, step): deterministic and resume-safe.
        step = self.optimizer.step.astype(mx.uint32).reshape(1)
        return mx.concatenate([mx.array([self.seed & 0xFFFFFFFF], mx.uint32), step])

    def masks(self, gradients: dict) -> Tuple[dict, mx.array]:
        """Keep-masks for this step's (accumulated) gradient, and the number kept."""
        key = self._step_key()
        if self.method == "random":
            return random_masks(gradients, self.mask_ratio, key, self.scope, self.sample_size)
        return gmt_masks(gradients, self.mask_ratio, self.scope, key, self.sample_size)

    def apply_gradients(
        self, gradients: dict, parameters: dict, grad_scale: mx.array | None = None
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

        def scaled(tree):
            return tree if grad_scale is None else tree_map(lambda g: g * grad_scale, tree)

        total = count_entries(gradients)
        if self.mask_ratio == 0.0:
            kept = mx.array(total, mx.int64)
            return self.optimizer.apply_gradients(scaled(gradients), parameters), {"kept": kept}
        masks, kept = self.masks(gradients)
        self.optimizer.state[MASK_SAMPLE_KEY] = mask_sample(masks)
        if self.target == "grad":
            updated = self.optimizer.apply_gradients(scaled(apply_masks(gradients, masks)), parameters)
        else:
            # The optimizer state sees the full gradient; only kept entries move.
            # new * m + p * ~m is where(m, new, p) for finite values (x * 1 = x,
            # x * 0 = 0): arithmetic fuses into the optimizer's kernel at full
            # speed, a select there made the step ~3% slower (SmolLM2-135M, CPU).
            new = self.optimizer.apply_gradients(scaled(gradients), parameters)
            updated = tree_map(lambda n, m, p: n * m + p * ~m, new, masks, parameters)
        return updated, {"kept": kept}

    def update(self, model, gradients: dict, grad_scale: mx.array | None = None) -> Dict[str, mx.array]:
        """Update ``model`` in place; return mask statistics (``grad_scale``: see apply_gradients)."""
        updated, stats = self.apply_gradients(gradients, model, grad_scale)
        model.update(updated)
        return stats


def make_schedule(
    learning_rate: float,
    total_steps: int,
    *,
    kind: str = "cosine",
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
) -> Callable[[mx.array], mx.array]:
    """Learning rate against optimizer step: linear warmup, then cosine / linear / constant.

    Warmup ramps from lr/warmup to lr (never 0, so step 1 already trains);
    the decay phase runs over the remaining steps down to lr * min_lr_ratio.
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


OPTIMIZERS = ("adamw", "adam", "sgd", "adafactor", "muon")


def build_optimizer(
    name: str,
    learning_rate,
    *,
    weight_decay: float = 0.0,
    momentum: Optional[float] = None,
    method: str = "sft",
    mask_ratio: float = 0.0,
    mask_scope: str = "tensor",
    mask_target: str = "grad",
    seed: int = 0,
    sample_size: int = DEFAULT_SAMPLE_SIZE,
) -> MaskedOptimizer:
    """Build the base optimizer and wrap it; unmasked methods (sft, LoRA) get mask_ratio 0.

    ``momentum`` is sgd's and muon's (None: their own defaults, 0 and 0.95);
    Adam's betas and eps stay mlx's defaults.
    """
    if name == "adamw":
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
    masked = method in MASKED_METHODS
    return MaskedOptimizer(
        base,
        method=method if masked else "gmt",
        mask_ratio=mask_ratio if masked else 0.0,
        scope=mask_scope,
        target=mask_target,
        seed=seed,
        sample_size=sample_size,
    )
