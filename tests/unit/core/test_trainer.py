"""The training loop on the compiled path users run (mx.compile on)."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from gmt_mlx.core.trainer import NonFiniteError, train

INF, NAN = float("inf"), float("nan")


def summed_loss(model, tokens, mask):
    """The loop's loss contract: (sum of token losses over the target positions, their count)."""
    logits = model(tokens[:, :-1]).astype(mx.float32)
    weights = mask[:, 1:].astype(mx.float32)
    return (nn.losses.cross_entropy(logits, tokens[:, 1:]) * weights).sum(), weights.sum()


def weights_of(model) -> dict:
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


@pytest.mark.parametrize("method", ["gmt", "sft"])
def test_non_finite_steps_are_skipped_under_compile(tiny_model_dir, method):
    """A loss that is inf or nan at given steps: those updates are skipped (weights and the
    optimizer's step counter untouched; trainer.make_fused_step), the others applied, and NonFiniteError is raised after
    max_bad_steps bad steps in a row. The poison travels as data (column 0 of the mask,
    never a target), so one compiled trace serves every step, as in a real run."""
    from mlx_lm import load

    from gmt_mlx.config import MaskOptions, OptimizerOptions
    from gmt_mlx.core.optim import build_optimizer

    model, _ = load(str(tiny_model_dir))
    opt = build_optimizer(OptimizerOptions(), 1e-3, seed=0, mask=MaskOptions(method=method, mask_ratio=0.5))
    traces = []

    def loss_fn(m, tokens, mask):
        traces.append(1)  # runs only while tracing when the step is compiled
        loss, count = summed_loss(m, tokens, mask)
        return loss * mask[:, 0].max(), count

    poison = {2: INF, 4: NAN, 5: INF, 6: NAN}  # step -> factor on the loss (1 elsewhere)
    tokens = mx.array(np.random.default_rng(0).integers(0, 384, (2, 12)), mx.int32)

    def batches():
        for step in range(1, 11):
            mask = mx.ones(tokens.shape)
            mask[:, 0] = poison.get(step, 1.0)
            yield tokens, mask

    snapshots, results = [weights_of(model)], []

    def on_step(result):
        results.append(result)
        snapshots.append(weights_of(model))

    with pytest.raises(NonFiniteError, match="3 consecutive"):
        train(model, opt, batches(), iters=8, loss_fn=loss_fn, on_step=on_step, max_bad_steps=3)

    assert len(traces) < len(results), f"traced {len(traces)} times in {len(results)} steps: not compiled"
    assert [r.step for r in results] == [1, 2, 3, 4, 5, 6]
    assert [r.skipped for r in results] == [step in poison for step in range(1, 7)]
    for r in results:
        assert math.isfinite(r.loss) != r.skipped
    for step in range(1, 7):
        before, after = snapshots[step - 1], snapshots[step]
        same = all(np.array_equal(before[k], after[k]) for k in before)
        assert same == (step in poison), f"step {step}: weights {'un' if same else ''}changed"
    assert int(opt.state["step"].item()) == 2  # only steps 1 and 3 reached the optimizer
