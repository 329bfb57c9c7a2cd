"""Accuracy: the kept fraction per unit on one real gradient of the model, every
scope, several random keys; error = |kept - min(1 - mask_ratio, non-zero fraction)|."""

from __future__ import annotations

from typing import List

from harness import MASK_RATIO, Context, ModelSpec, load_model, pad_token, pct, tokenized

NAME = "accuracy"


def real_gradient_accuracy(spec: ModelSpec, folders, batch_size: int, keys: int) -> dict:
    """Kept fraction per unit on one real gradient of the model, every scope, several keys."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from gmt_mlx.core import masking as new
    from gmt_mlx.core.losses import sft_loss
    from gmt_mlx.data.batching import make_batch

    model, tokenizer = load_model(spec.path)
    _, split = tokenized(folders["chat"], tokenizer)
    tokens, mask = make_batch(split, list(range(batch_size)), pad_id=pad_token(tokenizer), pad_multiple=8)
    _, grads = nn.value_and_grad(model, sft_loss)(model, tokens, mask)
    mx.eval(grads)
    out = {}
    names = [n for n, _ in tree_flatten(grads)]
    for scope in ("tensor", "layer", "global"):
        units = new.group_units(names, scope)
        worst, sampled_worst, n_units = 0.0, 0.0, 0
        for k in range(keys):
            masks, kept = new.gmt_masks(grads, MASK_RATIO, scope, mx.random.key(k))
            flat_m, flat_g = dict(tree_flatten(masks)), dict(tree_flatten(grads))
            for unit, members in units.items():
                size = sum(flat_g[n].size for n in members)
                if size < 10_000:
                    continue
                nonzero = sum(int((flat_g[n] != 0).sum().item()) for n in members) / size
                got = sum(int(flat_m[n].sum().item()) for n in members) / size
                err = abs(got - min(1 - MASK_RATIO, nonzero))
                worst = max(worst, err)
                if size > 65536:
                    sampled_worst = max(sampled_worst, err)
                n_units += k == 0
        out[scope] = {
            "units_checked": n_units,
            "keys": keys,
            "max_abs_error": worst,
            "max_abs_error_sampled_units": sampled_worst,
        }
    return out


def run(ctx: Context, spec: ModelSpec) -> dict:
    return real_gradient_accuracy(spec, ctx.folders, ctx.batch_size, keys=3)


def render(result: dict) -> List[str]:
    """Markdown lines of this benchmark's tables."""
    lines: List[str] = []
    lines += [
        "### Kept fraction on a real gradient (target 1 - mask_ratio = 0.8; units >= 10k entries)",
        "",
        "| scope | units | keys | max abs error | max abs error, sampled units |",
        "|---|---|---|---|---|",
    ]
    for scope, a in result.items():
        lines.append(
            f"| {scope} | {a['units_checked']} | {a['keys']} | {pct(a['max_abs_error'])} | "
            f"{pct(a['max_abs_error_sampled_units'])} |"
        )
    lines.append("")
    return lines
