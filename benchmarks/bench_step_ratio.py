"""Step ratio GMT / SFT, precisely: the part of a step every full-weight method shares
(forward, backward, gradient norm) and each method's update (clip, mask, AdamW),
timed separately on one real gradient, interleaved; step ratio = (shared + update)
/ (shared + sft's update), at the benchmark batch and at 4 x 256 tokens.
The GMT/SFT step ratios of RESULTS.md come from here."""

from __future__ import annotations

import gc
import math
import statistics
import time
from typing import List

from harness import GMT_CONTENDERS, MASK_RATIO, Context, ModelSpec, fixed_batch, load_model, pad_token, tokenized

NAME = "step-ratio"
# The step benchmark's contenders, and high ratios: what the larger samples cost there (issue 13).
CONTENDERS = GMT_CONTENDERS + [
    "gmt tensor/grad ratio 0.9",
    "gmt tensor/grad ratio 0.99",
    "gmt before tensor/grad ratio 0.99",
    "random ratio 0.9",
]
KEY = "update"  # its key in the results JSON


def _before_masks(before):
    """Today's MaskedOptimizer with the masks of the 'before' code: only the masking
    differs, so the comparison is not skewed by how each version's step is wired."""
    from gmt_mlx.core.optim import MaskedOptimizer

    class Before(MaskedOptimizer):
        def masks(self, gradients):
            return before.gmt_masks(gradients, self.mask_ratio, self.scope, self._step_key(), self.sample_size)

    return Before


def preference_batch(folder, tokenizer, pairs: int):
    """The first ``pairs`` pairs of a preference folder as a DPO batch (tokens, mask, reference),
    with the model-free stand-in reference 0 (the step's cost does not depend on its values)."""
    import numpy as np

    from gmt_mlx.data.batching import make_batch
    from gmt_mlx.data.encoding import tokenize_split
    from gmt_mlx.data.sources import load_splits

    rows = load_splits(folder)["train"][:pairs]
    split = tokenize_split(rows, tokenizer, mask_prompt=True, max_seq_length=2048, name="train", preference=True)
    width = 8 * math.ceil(max(split.lengths()) / 8)
    split.reference = np.zeros((len(split), 2), np.float32)
    tokens, mask, reference = make_batch(split, list(range(pairs)), pad_id=pad_token(tokenizer), pad_multiple=width)
    return (tokens, mask, reference), width


def update_section(
    spec: ModelSpec, folders, batch_size: int, reps: int, before, *, train_mode: str = "sft", contenders=None
) -> dict:
    """The step split in two: the part every full-weight method shares (forward,
    backward, gradient norm: trainer.make_step_fns' grad_fn + trainer.global_norm)
    and the update (clip, mask, optimizer: update_fn), each method's update timed
    `reps` times, interleaved, on the same real gradient. ``train_mode`` "dpo" times the
    DPO step instead (``batch_size`` pairs of the preference folder: twice the rows). The update is where
    the methods differ; short and repeated, it is measured far more precisely than
    whole steps on a shared machine. Step ratio = (shared + update) / (shared +
    sft's update)."""
    import mlx.core as mx
    import numpy as np

    from gmt_mlx.config import Config, MaskOptions
    from gmt_mlx.core import trainer
    from gmt_mlx.core.optim import MaskedOptimizer, build_optimizer
    from gmt_mlx.models.methods import prepare_model
    from gmt_mlx.objectives import objective_of

    defaults = Config()
    model, tokenizer = load_model(spec.path)
    prepare_model(model, Config(method="sft"))
    if train_mode == "sft":
        _, split = tokenized(folders["chat"], tokenizer)
        width = 8 * math.ceil(max(split.lengths()[:batch_size]) / 8)
        (tokens, mask, _), _ = fixed_batch(split, batch_size, pad_token(tokenizer), width)
        batch = (tokens, mask)
    else:
        batch, width = preference_batch(folders["prefs"], tokenizer, batch_size)
    base = build_optimizer(defaults.optim, defaults.learning_rate, seed=0).optimizer
    optimizers = {"sft": MaskedOptimizer(base, MaskOptions(mask_ratio=0.0), seed=0)}
    for name in (contenders or CONTENDERS)[1:]:
        # "... ratio R": that mask ratio instead of MASK_RATIO (the cost of high ratios' larger samples).
        ratio = float(name.rsplit(" ", 1)[1]) if " ratio " in name else MASK_RATIO
        if name.startswith("random"):
            optimizers[name] = MaskedOptimizer(base, MaskOptions(method="random", mask_ratio=ratio), seed=0)
        elif name.startswith("gmt before"):
            if before is not None:
                optimizers[name] = _before_masks(before)(base, MaskOptions(mask_ratio=ratio), seed=0)
        elif name.startswith("gmt tensor/grad sample"):
            mask = MaskOptions(mask_ratio=ratio, mask_sample_size=int(name.rsplit(" ", 1)[1]))
            optimizers[name] = MaskedOptimizer(base, mask, seed=0)
        else:
            scope, target = name.split()[1].split("/")
            mask = MaskOptions(mask_ratio=ratio, mask_scope=scope, mask_target=target)
            optimizers[name] = MaskedOptimizer(base, mask, seed=0)
    loss_fn = objective_of(train_mode).loss(Config(train_mode=train_mode))  # the mode's loss, default options
    fns = {
        name: trainer.make_step_fns(model, opt, loss_fn, grad_clip=defaults.grad_clip)
        for name, opt in optimizers.items()
    }
    grad_fn = fns["sft"][0]
    state = trainer.training_state(model, base)

    # What trainer.train does before and at the update. Since docs/design.md decision 8
    # (trainer.accumulate), grad_fn returns the gradient of the summed loss and
    # update_fn(grads, scale, norm) scales it by 1 / target tokens; before, grad_fn's
    # gradient was already a mean and update_fn took (grads, norm).
    summed = hasattr(trainer, "accumulate")

    def shared():
        loss, ntoks, _, grads = grad_fn(*batch)  # noqa: F821 (the closure's cell; `del batch` below frees it)
        if summed:
            scale = 1.0 / mx.maximum(ntoks, 1.0)
            norm = trainer.global_norm(grads) * scale
            mx.eval(loss, ntoks, scale, norm, grads)
            return grads, scale, norm
        norm = trainer.global_norm(grads)
        mx.eval(loss, ntoks, norm, grads)
        return grads, norm

    args = shared()
    for _, update_fn in fns.values():  # compile
        mx.eval(update_fn(*args), state)
    times = {name: [] for name in fns}
    shared_times = []
    for r in range(reps):
        t0 = time.perf_counter()
        args = shared()
        shared_times.append(time.perf_counter() - t0)
        for name in list(fns) if r % 2 == 0 else list(fns)[::-1]:
            mx.clear_cache()  # the same (cold) start for every update
            t0 = time.perf_counter()
            mx.eval(fns[name][1](*args), state)
            times[name].append(time.perf_counter() - t0)
    shared_s = statistics.median(shared_times)
    sft = statistics.median(times["sft"])
    # The update costs the same whatever the batch; the shared part grows with
    # the tokens of a step. docs/design.md's reference step is 4 x 256 tokens.
    rows = batch[0].shape[0]  # a DPO batch: two rows per pair
    long_tokens = mx.array(np.resize(np.array(batch[0]), (rows, 256)), mx.int32)  # valid ids, repeated
    long_mask = mx.ones((rows, 256))
    long_batch = (long_tokens, long_mask) + ((mx.zeros((rows,)),) if train_mode != "sft" else ())
    long_times = []
    for _ in range(3):
        t0 = time.perf_counter()
        loss, ntoks, _, g = grad_fn(*long_batch)
        mx.eval(loss, ntoks, trainer.global_norm(g), g)
        long_times.append(time.perf_counter() - t0)
        del g
    shared_long = statistics.median(long_times[1:])
    out = {
        "reps": reps,
        "shared_vs_sft_update": shared_s / sft,
        "shared_long_vs_sft_update": shared_long / sft,
        "batch_shape": [rows, width],
        "long_shape": [rows, 256],
        "train_mode": train_mode,
        "result": {},
    }
    for name, ts in times.items():
        update = statistics.median(ts)
        # Per repetition, against sft's update of the same repetition: the spread.
        paired = sorted((shared_s + t) / (shared_s + u) for t, u in zip(ts, times["sft"]))
        out["result"][name] = {
            "update_vs_sft_update": update / sft,
            "step_ratio": (shared_s + update) / (shared_s + sft),
            "step_ratio_quartiles": [paired[len(paired) // 4], paired[(3 * len(paired)) // 4]],
            "step_ratio_long": (shared_long + update) / (shared_long + sft),
        }
    del fns, optimizers, model, args, long_tokens, long_batch, batch
    gc.collect()
    mx.clear_cache()
    return out


def run(ctx: Context, spec: ModelSpec) -> dict:
    return update_section(spec, ctx.folders, ctx.batch_size, reps=12 if ctx.quick else 10, before=ctx.before)


def render(result: dict) -> List[str]:
    """Markdown lines of this benchmark's tables."""
    lines: List[str] = []
    up = result
    b, lb = up.get("batch_shape", ["?", "?"]), up.get("long_shape", ["?", "?"])
    dpo = (
        " (DPO: the sft row is full-weight DPO, every row's loss the DPO loss)" if up.get("train_mode") == "dpo" else ""
    )
    lines += [
        f"### {'DPO step' if dpo else 'Step'} split in two{dpo}: shared forward/backward/norm, then each method's "
        f"update ({up['reps']} interleaved "
        f"repetitions on one real gradient; shared part = {up['shared_vs_sft_update']:.2f} x sft's update at "
        f"{b[0]} x {b[1]} tokens, {up.get('shared_long_vs_sft_update', float('nan')):.2f} x at {lb[0]} x {lb[1]})",
        "",
        f"| method | update / sft update | step / sft step, {b[0]} x {b[1]} tokens | (quartiles over repetitions) | "
        f"step / sft step, {lb[0]} x {lb[1]} tokens |",
        "|---|---|---|---|---|",
    ]
    for name, r in up["result"].items():
        q = r["step_ratio_quartiles"]
        lines.append(
            f"| {name} | {r['update_vs_sft_update']:.3f} | **{r['step_ratio']:.3f}** | ({q[0]:.3f} .. {q[1]:.3f}) | "
            f"{r.get('step_ratio_long', float('nan')):.3f} |"
        )
    lines.append("")
    return lines
