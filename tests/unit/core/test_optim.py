"""The masked optimizer on a tiny llama: equality at ratio 0, targets, compile, training."""

from __future__ import annotations

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm import load

from gmt_mlx.config import MaskOptions, OptimizerOptions
from gmt_mlx.core.masking import count_entries
from gmt_mlx.core.optim import MaskedOptimizer, build_optimizer, make_schedule
from gmt_mlx.core.trainer import train


def batches(seed: int = 0, vocab: int = 384):
    rng = np.random.default_rng(seed)
    while True:
        tokens = mx.array(rng.integers(0, vocab, (4, 24)), mx.int32)
        mask = mx.array(np.ones((4, 24), np.float32))
        yield tokens, mask


def fixed_batches():
    tokens = mx.array(np.random.default_rng(0).integers(0, 384, (4, 24)), mx.int32)
    while True:
        yield tokens, mx.ones((4, 24))


def run(model_dir, optimizer, iters=4, accumulation=1, data=None):
    model, _ = load(str(model_dir))
    losses = []
    train(
        model,
        optimizer,
        data or batches(),
        iters=iters,
        grad_accumulation_steps=accumulation,
        grad_clip=1.0,
        on_step=lambda r: losses.append(r),
    )
    return model, losses


def params(model):
    return dict(tree_flatten(model.parameters()))


@pytest.mark.parametrize(
    "method,scope,target",
    [
        ("gmt", "tensor", "grad"),
        ("gmt", "layer", "update"),
        ("gmt", "global", "grad"),
        ("random", "tensor", "update"),
    ],
)
def test_mask_ratio_zero_is_bit_for_bit_plain(tiny_model_dir, method, scope, target):
    plain, _ = run(tiny_model_dir, optim.AdamW(1e-3, weight_decay=0.01), accumulation=2)
    masked, _ = run(
        tiny_model_dir,
        MaskedOptimizer(
            optim.AdamW(1e-3, weight_decay=0.01),
            MaskOptions(method=method, mask_ratio=0.0, mask_scope=scope, mask_target=target),
            seed=0,
        ),
        accumulation=2,
    )
    a, b = params(plain), params(masked)
    assert a.keys() == b.keys()
    for name in a:
        assert mx.array_equal(a[name], b[name]).item(), name


def one_step_change(model_dir, target, base):
    """Masks predicted for step 0 and the entries that actually changed in one step."""
    model, _ = load(str(model_dir))
    before = {n: np.array(v) for n, v in tree_flatten(model.parameters())}
    opt = MaskedOptimizer(base, MaskOptions(mask_ratio=0.6, mask_scope="tensor", mask_target=target), seed=3)
    tokens, mask = next(batches())
    import mlx.nn as nn

    from gmt_mlx.core.losses import sft_loss

    (_, _), grads = nn.value_and_grad(model, sft_loss)(model, tokens, mask)
    masks, _ = opt.masks(grads)  # same (seed, step) key the update will use
    opt.update(model, grads)
    after = {n: np.array(v) for n, v in tree_flatten(model.parameters())}
    return {n: np.array(m) for n, m in tree_flatten(masks)}, {n: before[n] != after[n] for n in before}


def test_update_target_changes_exactly_the_kept_entries(tiny_model_dir):
    masks, changed = one_step_change(tiny_model_dir, "update", optim.AdamW(1e-2, weight_decay=0.1))
    for name, m in masks.items():
        assert (changed[name] == m).all(), name
        assert 0 < m.mean() < 1


def test_grad_target_feeds_the_optimizer_the_masked_gradient(tiny_model_dir):
    # Plain SGD moves an entry iff its (masked) gradient is non-zero.
    masks, changed = one_step_change(tiny_model_dir, "grad", optim.SGD(1e-1))
    for name, m in masks.items():
        assert (changed[name] == m).all(), name


def test_adam_with_grad_target_moves_more_than_the_kept_entries(tiny_model_dir):
    """The documented difference: momentum keeps moving entries the mask dropped."""
    model, _ = load(str(tiny_model_dir))
    start = {n: np.array(v) for n, v in tree_flatten(model.parameters())}
    opt = MaskedOptimizer(optim.Adam(1e-2), MaskOptions(mask_ratio=0.8, mask_target="grad"), seed=0)
    train(model, opt, batches(), iters=3)
    moved = sum((start[n] != np.array(v)).sum() for n, v in tree_flatten(model.parameters()))
    assert moved / count_entries(model.parameters()) > 0.2 + 0.05


def test_compiled_step_matches_eager(tiny_model_dir):
    import mlx.nn as nn

    from gmt_mlx.core.losses import sft_loss

    results = []
    for compiled in (False, True):
        model, _ = load(str(tiny_model_dir))
        opt = MaskedOptimizer(
            optim.AdamW(1e-3), MaskOptions(mask_ratio=0.5, mask_scope="layer", mask_target="update"), seed=0
        )
        state = [model.state, opt.state]

        def step(tokens, mask):
            (loss, _), grads = nn.value_and_grad(model, sft_loss)(model, tokens, mask)
            return loss, opt.update(model, grads)["kept"]

        fn = mx.compile(step, inputs=state, outputs=state) if compiled else step
        data = batches()
        for _ in range(3):
            loss, kept = fn(*next(data))
            mx.eval(state, loss, kept)
        results.append(params(model))
    for name in results[0]:
        assert mx.allclose(results[0][name], results[1][name], atol=1e-6).item(), name


@pytest.mark.parametrize("method", ["gmt", "random"])
def test_masked_training_reduces_loss(tiny_model_dir, method):
    schedule = make_schedule(3e-3, 30, kind="cosine", warmup_steps=0, min_lr_ratio=0.0)
    opt = build_optimizer(OptimizerOptions(), schedule, seed=0, mask=MaskOptions(method=method, mask_ratio=0.5))
    _, losses = run(tiny_model_dir, opt, iters=30, data=fixed_batches())
    assert losses[-1].loss < 0.5 * losses[0].loss
    kept = losses[-1].kept / count_entries(load(str(tiny_model_dir))[0].trainable_parameters())
    assert 0.3 < kept < 0.55  # ~half kept; fewer where gradients are exactly zero (absent tokens)


def test_masks_differ_between_steps_and_repeat_for_the_same_step():
    grads = {"w": mx.random.normal((300, 300), key=mx.random.key(0))}
    opt = MaskedOptimizer(optim.SGD(0.1), MaskOptions(method="random", mask_ratio=0.5), seed=7)
    first, _ = opt.masks(grads)
    again, _ = opt.masks(grads)
    assert mx.array_equal(first["w"], again["w"]).item()
    opt.optimizer.state["step"] = mx.array(1, mx.uint64)
    second, _ = opt.masks(grads)
    assert not mx.array_equal(first["w"], second["w"]).item()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"method": "topk"}, "method"),
        ({"mask_scope": "row"}, "scope"),
        ({"mask_target": "weights"}, "target"),
        ({"mask_ratio": 1.0}, "mask_ratio"),
        ({"mask_sample_size": 0}, "mask_sample_size"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MaskedOptimizer(optim.SGD(0.1), MaskOptions(**kwargs), seed=0)


@pytest.mark.parametrize(
    "name",
    [
        "adamw",
        "adam",
        "sgd",
        pytest.param("adafactor", marks=pytest.mark.slow),
        pytest.param("muon", marks=pytest.mark.slow),
    ],
)
def test_every_base_optimizer_can_be_masked(tiny_model_dir, name):
    opt = build_optimizer(OptimizerOptions(optimizer=name), 1e-3, seed=0, mask=MaskOptions(mask_ratio=0.3))
    _, losses = run(tiny_model_dir, opt, iters=2)
    assert np.isfinite(losses[-1].loss)
    # And the mask is really applied: with the update target exactly the kept entries move.
    base = build_optimizer(OptimizerOptions(optimizer=name), 1e-2, seed=0).optimizer
    masks, changed = one_step_change(tiny_model_dir, "update", base)
    for n, m in masks.items():
        assert not changed[n][~m].any(), n  # a dropped entry never moves
    moved = sum(changed[n].sum() for n in masks) / sum(m.sum() for m in masks.values())
    assert moved > 0.95  # ... and (nearly) every kept one does
    if name != "muon":  # Muon orthogonalises the whole update matrix: a zero gradient entry still moves
        plain = build_optimizer(OptimizerOptions(optimizer=name), 1e-2, seed=0).optimizer
        masks, changed = one_step_change(tiny_model_dir, "grad", plain)
        for n, m in masks.items():
            assert not changed[n][~m].any(), n


def test_a_ratio_that_drops_nothing_runs_through_the_masking_and_equals_sft(tiny_model_dir):
    """Unlike ratio 0 (which bypasses the masking code), 1e-6 goes through it and must keep everything."""
    import mlx.nn as nn

    from gmt_mlx.core.losses import sft_loss

    model, _ = load(str(tiny_model_dir))
    (_, _), grads = nn.value_and_grad(model, sft_loss)(model, *next(batches()))
    opt = build_optimizer(OptimizerOptions(), 1e-3, seed=0, mask=MaskOptions(mask_ratio=1e-6))
    masks, kept = opt.masks(grads)
    nonzero = sum(int((g != 0).sum().item()) for _, g in tree_flatten(grads))
    assert kept.item() == nonzero
    for (n, g), (_, m) in zip(tree_flatten(grads), tree_flatten(masks)):
        assert mx.array_equal(m, g != 0).item(), n
    plain, _ = run(tiny_model_dir, build_optimizer(OptimizerOptions(), 1e-3, seed=0), accumulation=2)
    masked, _ = run(
        tiny_model_dir,
        build_optimizer(OptimizerOptions(), 1e-3, seed=0, mask=MaskOptions(mask_ratio=1e-6)),
        accumulation=2,
    )
    a, b = params(plain), params(masked)
    for name in a:
        assert mx.allclose(a[name], b[name], rtol=1e-6, atol=1e-7).item(), name


def test_schedule_warmup_then_decay():
    f = make_schedule(1.0, 10, kind="cosine", warmup_steps=4, min_lr_ratio=0.1)
    lrs = [f(mx.array(i)).item() for i in range(10)]
    assert lrs[0] == pytest.approx(0.25) and lrs[3] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:])) and lrs[-1] >= 0.1 - 1e-6
    assert make_schedule(1.0, 10, kind="constant", warmup_steps=0, min_lr_ratio=0.0)(mx.array(7)).item() == 1.0


def test_global_norm_matches_float64():
    from gmt_mlx.core.trainer import global_norm

    rng = np.random.default_rng(0)
    # A large tensor (where a float32 running sum drifts), odd sizes that do
    # not split into rows of 64, a scalar, bfloat16 and an empty tensor.
    arrays = [rng.normal(size=(3000, 1000)), rng.normal(size=(7, 13)), rng.normal(size=()), rng.normal(size=(96,))]
    tree = {
        "a": [mx.array(a.astype(np.float32)) for a in arrays],
        "b": mx.array(arrays[1]).astype(mx.bfloat16),
        "c": mx.zeros((0, 4)),
    }
    expected = np.sqrt(
        sum(float(np.sum(np.asarray(a, np.float32).astype(np.float64) ** 2)) for a in arrays)
        + float(np.sum(np.array(tree["b"].astype(mx.float32), np.float64) ** 2))
    )
    assert abs(global_norm(tree).item() - expected) <= 1e-5 * expected
