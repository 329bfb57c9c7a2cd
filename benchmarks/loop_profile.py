#!/usr/bin/env python
"""Where our full fine-tuning step differs from mlx_lm's: a profile of the two loops' step bodies.

    python benchmarks/loop_profile.py [--model smollm2-135m] [--reps 7]

bench.py runs the two tools' loops as they are; this takes them apart on one
fixed batch (4 x 64 random tokens), with mlx_lm's trainable set (every block,
embeddings frozen), steps interleaved, medians, printed as ratios:

- ours: the step of gmt_mlx.core.trainer.train (compiled grad_fn, the global
  gradient norm, compiled update_fn with clipping at 1.0 and AdamW, and the
  .item() syncs the loop makes);
- ours without the norm and clipping (grad_fn + update_fn only);
- mlx_lm: the body of mlx_lm.tuner.trainer.train's compiled `step` (value and
  grad of its default_loss, then Adam's update, in one compiled function);
- the global norm alone, as trainer.global_norm computes it (mx.square) and
  as it did before (`** 2`), uncompiled, on the same gradient.

Re-executes with an optimized BLAS like bench.py (--no-blas to keep MLX's).
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--no-blas", action="store_true")
    args = parser.parse_args()
    if not args.no_blas:
        from gmt_mlx.platform.blas import maybe_reexec_with_blas

        maybe_reexec_with_blas()

    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    import numpy as np
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.trainer import default_loss

    from gmt_mlx.core.losses import sft_loss
    from gmt_mlx.core.trainer import global_norm, make_step_fns, training_state
    from gmt_mlx.models.loading import load_base

    model, *_ = load_base(args.model)
    model.freeze()
    for layer in model.layers:
        layer.unfreeze()
    batch, width = 4, 64
    tokens = mx.array(np.random.default_rng(0).integers(0, 1000, (batch, width)), mx.int32)
    mask = mx.ones((batch, width))
    lengths = mx.array([[0, width]] * batch, mx.int32)

    adamw, adamw_plain, adam = optim.AdamW(1e-5), optim.AdamW(1e-5), optim.Adam(1e-5)
    grad_fn, update_fn = make_step_fns(model, adamw, sft_loss, 1.0)
    plain_grad_fn, plain_update_fn = make_step_fns(model, adamw_plain, sft_loss, 0.0)
    ours_state, plain_state = training_state(model, adamw), training_state(model, adamw_plain)
    theirs_state = [model.state, adam.state, mx.random.state]
    loss_and_grad = nn.value_and_grad(model, default_loss)

    @partial(mx.compile, inputs=theirs_state, outputs=theirs_state)
    def their_step(tokens, lengths):  # mlx_lm.tuner.trainer.train's step, accumulation 1
        (loss, ntoks), grads = loss_and_grad(model, tokens, lengths)
        adam.update(model, grads)
        return loss, ntoks

    def ours():  # the body of gmt_mlx.core.trainer.train for one step
        loss, ntoks, _, grads = grad_fn(tokens, mask)
        norm = global_norm(grads)
        mx.eval(loss, ntoks, norm)
        loss.item(), norm.item()
        kept = update_fn(grads, norm)
        mx.eval(ours_state, kept)
        kept.item()

    def ours_without_norm():
        loss, ntoks, _, grads = plain_grad_fn(tokens, mask)
        mx.eval(loss, ntoks, grads)
        kept = plain_update_fn(grads, mx.array(1.0))
        mx.eval(plain_state, kept)

    def theirs():
        loss, ntoks = their_step(tokens, lengths)
        mx.eval(theirs_state, loss, ntoks)

    _, _, _, grads = grad_fn(tokens, mask)
    mx.eval(grads)

    def norm_square():
        mx.eval(global_norm(grads))

    def norm_pow():
        mx.eval(mx.sqrt(sum(mx.sum(g.astype(mx.float32) ** 2) for _, g in tree_flatten(grads))))

    fns = {
        "ours (trainer step)": ours,
        "ours without norm and clipping": ours_without_norm,
        "mlx_lm step": theirs,
        "global norm, mx.square (now)": norm_square,
        "global norm, ** 2 (before)": norm_pow,
    }
    times = {k: [] for k in fns}
    for r in range(args.reps + 1):
        for name in list(fns) if r % 2 == 0 else list(fns)[::-1]:
            t0 = time.perf_counter()
            fns[name]()
            if r > 0:
                times[name].append(time.perf_counter() - t0)
    ref = statistics.median(times["mlx_lm step"])
    print(
        f"{args.model}, batch {batch} x {width}, {args.reps} interleaved repetitions; medians relative to mlx_lm's "
        f"step\n"
    )
    print("| | x mlx_lm step |\n|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts) / ref:.3f} |")


if __name__ == "__main__":
    main()
