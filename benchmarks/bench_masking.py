"""Masking: where GMT's masking time goes on the model's own tensor shapes, each piece
compiled alone and timed relative to one compiled AdamW update of the same tensors,
for the masking code before issue 7 (BEFORE_COMMIT) and now."""

from __future__ import annotations

import sys
from typing import List

from harness import MASK_RATIO, Context, ModelSpec, compiled_masks, load_model, timed_interleaved

NAME = "masking"


def masking_section(spec: ModelSpec, before, reps: int) -> dict:
    """Pieces of the mask on this model's tensor shapes (synthetic gradients), each relative
    to one compiled AdamW update of the same tensors."""
    from functools import partial

    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten, tree_map

    from gmt_mlx.core import masking as new

    model, _ = load_model(spec.path)
    params = model.trainable_parameters()
    mx.random.seed(0)
    grads = tree_map(lambda p: mx.random.normal(p.shape) * 1e-3, params)
    mx.eval(grads)
    flat = [g for _, g in tree_flatten(grads)]
    key = mx.random.key(0)
    adamw = optim.AdamW(1e-5)
    adamw.init(params)
    state = [model.state, adamw.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def adamw_update(g):
        adamw.update(model, g)
        return mx.array(0)

    def compiled(fn):
        c = mx.compile(fn)
        return lambda: c(*flat)

    fns = {"AdamW update (the reference)": lambda: (adamw_update(grads), state)}
    old = sys.modules.get("gmt_mlx_before.masking")
    if old is not None:

        def old_pieces(kind):
            def f(*gs):
                keys = mx.random.split(key, len(gs))
                out = []
                for i, g in enumerate(gs):
                    a = mx.abs(g)
                    if kind == "sample":
                        if g.size > 65536:
                            idx = mx.random.randint(0, g.size, (65536,), key=keys[i])
                            out.append(a.reshape(-1)[idx])
                    elif kind == "threshold":
                        out.append(old.unit_threshold([a], MASK_RATIO, keys[i], 65536))
                    elif kind == "counts":
                        t = mx.array(2.5e-4)
                        out.append(mx.sum(a > t).astype(mx.int64) + mx.sum(a == t).astype(mx.int64))
                    elif kind == "tie hash + mask":
                        t = mx.array(2.5e-4)
                        out.append((a > t) | ((a == t) & (old._position_hash(a.shape, 0) < mx.array(12345, mx.uint32))))
                    elif kind == "where":
                        out.append(mx.where(a > 2.5e-4, g, mx.zeros((), g.dtype)))
                return out

            return f

        for label, kind in (
            ("random gather of the samples", "sample"),
            ("threshold (gather + partition)", "threshold"),
            ("2 counting passes (> T, == T)", "counts"),
            ("tie hash + keep mask", "tie hash + mask"),
            ("mx.where to apply", "where"),
        ):
            fns[f"before: {label}"] = compiled(old_pieces(kind))
        fns["before: gmt_masks, tensor scope"] = lambda: compiled_masks(old, "tensor", key)(grads)

    def new_pieces(kind):
        def f(*gs):
            if kind == "pools":
                plans = [new.pool_plan([g], 65536, MASK_RATIO) for g in gs]
                offset = [mx.array([1], mx.int32)]
                return [new.unit_pool([g], s, w, c, offset) for g, (s, w, c) in zip(gs, plans)]
            if kind == "thresholds":
                return new.unit_thresholds([[g] for g in gs], MASK_RATIO, key, 65536)
            if kind in ("keep", "keep no ties"):
                ts = mx.full((len(gs),), 2.5e-4)
                cuts = mx.full((len(gs),), 77, mx.uint8)
                out = []
                for i, g in enumerate(gs):
                    a = mx.abs(g)
                    k = a > ts[i]
                    if kind == "keep":
                        k = k | ((a == ts[i]) & (new.position_rank(tuple(g.shape)) < cuts[i]))
                    out.append(mx.sum(k))
                return out
            if kind == "multiply":
                return [g * (mx.abs(g) > 2.5e-4) for g in gs]

        return f

    for label, kind in (
        ("strided samples", "pools"),
        ("thresholds (samples + batched partition + tie stats)", "thresholds"),
        ("keep mask + exact count", "keep"),
        ("keep mask + count, no tie test", "keep no ties"),
        ("multiply to apply (alone; fused into the optimizer in a step)", "multiply"),
    ):
        fns[f"after: {label}"] = compiled(new_pieces(kind))
    for scope in ("tensor", "layer", "global"):
        fns[f"after: gmt_masks, {scope} scope"] = lambda scope=scope: (lambda c: c(grads))(
            compiled_masks(new, scope, key)
        )
    medians = timed_interleaved(fns, reps)
    ref = medians["AdamW update (the reference)"]
    total = sum(g.size for g in flat)
    return {"entries": total, "tensors": len(flat), "relative_to_adamw": {k: v / ref for k, v in medians.items()}}


def run(ctx: Context, spec: ModelSpec) -> dict:
    return masking_section(spec, ctx.before, reps=3 if ctx.quick else 4)


def render(result: dict) -> List[str]:
    """Markdown lines of this benchmark's tables."""
    lines: List[str] = []
    mk = result
    lines += [
        f"### Where the masking time goes ({mk['entries']:,} entries in {mk['tensors']} tensors; time / one AdamW "
        f"update of the same tensors)",
        "",
        "| piece | x AdamW update |",
        "|---|---|",
    ]
    for k, v in mk["relative_to_adamw"].items():
        lines.append(f"| {k} | {v:.2f} |")
    lines.append("")
    return lines
