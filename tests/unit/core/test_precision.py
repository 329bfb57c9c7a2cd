"""Low-precision training: stochastic rounding, compact AdamW moments, the fused step's memory."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from gmt_mlx.config import LOW_MEMORY, MaskOptions, OptimizerOptions, PrecisionOptions, resolve
from gmt_mlx.core.optim import build_optimizer
from gmt_mlx.core.precision import BLOCK, dequantize_root, dequantize_signed, quantize_root, quantize_signed, round_to
from gmt_mlx.core.trainer import train


def _seeds(n):
    return [mx.array(s * 2654435761 & 0xFFFFFFFF, mx.uint32) for s in range(n)]


def test_stochastic_rounding_is_unbiased_and_lands_on_a_neighbour():
    x = mx.array(np.linspace(0.05, 0.051, 4096, dtype=np.float32))
    low = x.astype(mx.bfloat16).astype(mx.float32)
    draws = np.stack([np.array(round_to(x, mx.bfloat16, s).astype(mx.float32)) for s in _seeds(400)])
    xs = np.array(x)
    spacing = 2.0 ** (np.floor(np.log2(xs)) - 7)
    # Every draw is one of the two bfloat16 values around x.
    below = np.floor(xs / spacing) * spacing
    assert np.all((draws == below) | (draws == below + spacing))
    # Unbiased: the mean of the draws is x (to within the sampling error), while nearest is off.
    err = np.abs(draws.mean(axis=0) - xs) / spacing
    assert err.mean() < 0.02
    assert np.abs(np.array(low) - xs).mean() / spacing.mean() > 0.2


def test_nearest_rounding_is_astype():
    x = mx.random.normal((1000,))
    assert mx.array_equal(round_to(x, mx.bfloat16), x.astype(mx.bfloat16))
    assert round_to(x, mx.float32) is x


def test_signed_8bit_round_trip_within_one_step_and_unbiased():
    x = mx.random.normal((64, BLOCK)) * mx.exp(mx.random.normal((64, 1)))
    codes, scale = quantize_signed(x, mx.array(7, mx.uint32))
    assert codes.dtype == mx.int8 and scale.shape == (64,)
    back = dequantize_signed(codes, scale)
    assert mx.all(mx.abs(back - x) <= scale[:, None] * 1.0001).item()
    mean = sum(dequantize_signed(*quantize_signed(x, s)) for s in _seeds(200)) / 200
    assert mx.mean(mx.abs(mean - x) / scale[:, None]).item() < 0.05


def test_root_8bit_never_stores_a_nonzero_second_moment_as_zero():
    # One huge entry per block: linear 8-bit v would round the rest to 0 and divide by ~eps.
    v = mx.full((8, BLOCK), 1e-12).at[:, 0].add(1.0)
    codes, scale = quantize_root(v, mx.array(3, mx.uint32))
    back = dequantize_root(codes, scale)
    assert mx.all(back > 0).item()
    assert mx.all(dequantize_root(*quantize_root(mx.zeros((2, BLOCK)), mx.array(1, mx.uint32))) == 0).item()


def test_4bit_codes_pack_two_to_a_byte_land_on_a_neighbouring_level_and_are_unbiased():
    x = mx.random.normal((64, BLOCK)) * mx.exp(mx.random.normal((64, 1)))
    codes, scale = quantize_signed(x, mx.array(7, mx.uint32), bits=4)
    assert codes.dtype == mx.uint8 and codes.shape == (64, BLOCK // 2) and scale.shape == (64,)
    back = dequantize_signed(codes, scale, bits=4)
    assert back.shape == x.shape and mx.array_equal(mx.max(mx.abs(back), axis=1), mx.max(mx.abs(x), axis=1))
    # Levels are powers of two of the block's largest |x| (and 0 below 2^-6 of it): a draw is off by at most its
    # own size, and has x's sign.
    room = mx.maximum(mx.abs(x), scale[:, None] * 2.0**-6) * 1.0001
    assert mx.all(mx.abs(back - x) <= room).item() and mx.all(back * x >= 0).item()
    mean = sum(dequantize_signed(*quantize_signed(x, s, bits=4), bits=4) for s in _seeds(400)) / 400
    assert mx.mean(mx.abs(mean - x) / room).item() < 0.05
    v = mx.full((8, BLOCK), 1e-12).at[:, 0].add(1.0)
    root_codes, root_scale = quantize_root(v, mx.array(3, mx.uint32), bits=4)
    assert root_codes.shape == (8, BLOCK // 2)
    assert mx.all(dequantize_root(root_codes, root_scale, bits=4) > 0).item()  # never 0: the division stays bounded


def _regression(seed=0, n=2048, d=BLOCK):
    rng = np.random.default_rng(seed)
    x = mx.array(rng.normal(size=(n, d)).astype(np.float32))
    w = mx.array(rng.normal(size=(d, 16)).astype(np.float32))
    return x, x @ w


class _Linear(nn.Module):
    def __init__(self, d=BLOCK, out=16):
        super().__init__()
        self.layer = nn.Linear(d, out, bias=False)

    def __call__(self, x):
        return self.layer(x)


def _fit(optimizer, dtype=mx.float32, steps=60):
    mx.random.seed(0)
    model = _Linear()
    model.set_dtype(dtype)
    x, y = _regression()

    def loss_fn(model, x, y):
        diff = model(x).astype(mx.float32) - y
        return mx.sum(diff * diff), mx.array(diff.size, mx.float32)

    batches = iter(lambda: (x, y), None)
    losses = []
    train(model, optimizer, batches, iters=steps, loss_fn=loss_fn, on_step=lambda r: losses.append(r.loss))
    return model, losses


def test_compact_adamw_float32_matches_mlx_adamw():
    ours, _ = _fit(
        build_optimizer(
            OptimizerOptions(weight_decay=0.01),
            1e-2,
            seed=0,
            precision=PrecisionOptions(train_dtype="bfloat16", moments="float32"),
        ),
        mx.float32,
        steps=20,
    )
    # weights_dtype bfloat16 selects CompactAdamW; on float32 weights nothing is rounded.
    theirs, _ = _fit(build_optimizer(OptimizerOptions(weight_decay=0.01), 1e-2, seed=0), mx.float32, steps=20)
    assert mx.allclose(ours.layer.weight, theirs.layer.weight, atol=1e-6).item()


@pytest.mark.parametrize(
    "moments",
    [
        pytest.param("bfloat16", marks=pytest.mark.slow),
        "8bit",
        pytest.param("4bit", marks=pytest.mark.slow),
        pytest.param("8bit-factored", marks=pytest.mark.slow),
    ],
)
def test_compact_moments_learn_like_float32(moments):
    _, reference = _fit(build_optimizer(OptimizerOptions(), 1e-2, seed=0), mx.float32)
    _, compact = _fit(
        build_optimizer(OptimizerOptions(), 1e-2, seed=0, precision=PrecisionOptions(moments=moments)), mx.float32
    )
    assert compact[-1] < 0.05 * compact[0]  # it learns
    # 4 bits: the rounding noise of m sets a floor near convergence (measured 0.75 against 0.34 here).
    assert compact[-1] < (3.0 if moments == "4bit" else 2.0) * reference[-1] + 1e-3


def test_bfloat16_weights_and_state_keep_their_dtype():
    # Regression: a float32 gradient scale promoted bf16 weights and moments to float32 after step 1.
    opt = build_optimizer(OptimizerOptions(), 1e-3, seed=0, precision=PrecisionOptions(train_dtype="bfloat16"))
    model, _ = _fit(opt, mx.bfloat16, steps=3)
    assert model.layer.weight.dtype == mx.bfloat16
    moments = [v for k, v in tree_flatten(opt.state) if k.endswith((".m", ".v"))]
    assert moments and all(v.dtype == mx.bfloat16 for v in moments)
    sgd = build_optimizer(
        OptimizerOptions(optimizer="sgd", momentum=0.9),
        1e-3,
        seed=0,
        precision=PrecisionOptions(train_dtype="bfloat16"),
    )
    model, _ = _fit(sgd, mx.bfloat16, steps=3)
    assert model.layer.weight.dtype == mx.bfloat16
    assert all(v.dtype == mx.bfloat16 for k, v in tree_flatten(sgd.state) if k.endswith(".v"))


def test_stochastic_rounding_keeps_updates_that_nearest_loses():
    # lr 1e-5 on weights ~0.05-1: every update is below half a bfloat16 spacing.
    def delta(rounding):
        precision = PrecisionOptions(train_dtype="bfloat16", moments="float32", weight_rounding=rounding)
        opt = build_optimizer(OptimizerOptions(), 1e-5, seed=0, precision=precision)
        mx.random.seed(0)
        model = _Linear()
        model.set_dtype(mx.bfloat16)
        start = model.layer.weight.astype(mx.float32)
        x, y = _regression()

        def loss_fn(model, x, y):
            diff = model(x).astype(mx.float32) - y
            return mx.sum(diff * diff), mx.array(diff.size, mx.float32)

        train(model, opt, iter(lambda: (x, y), None), iters=16, loss_fn=loss_fn)
        return model.layer.weight.astype(mx.float32) - start

    mx.random.seed(0)
    reference_opt = build_optimizer(OptimizerOptions(), 1e-5, seed=0)
    ref_model = _Linear()
    start = ref_model.layer.weight.astype(mx.float32)  # the same init as above (seed 0), in float32
    x, y = _regression()

    def loss_fn(model, x, y):
        diff = model(x).astype(mx.float32) - y
        return mx.sum(diff * diff), mx.array(diff.size, mx.float32)

    train(ref_model, reference_opt, iter(lambda: (x, y), None), iters=16, loss_fn=loss_fn)
    reference = (ref_model.layer.weight - start).reshape(-1)
    nearest, stochastic = delta("nearest").reshape(-1), delta("stochastic").reshape(-1)

    def cosine(a, b):
        return (mx.sum(a * b) / mx.sqrt(mx.sum(a * a) * mx.sum(b * b) + 1e-30)).item()

    assert mx.mean(nearest == 0).item() > 0.5  # naive bf16: most updates round away
    assert cosine(stochastic, reference) > 0.9
    assert cosine(stochastic, reference) > cosine(nearest, reference) + 0.2  # measured 0.91 vs 0.59


def test_low_memory_sets_what_the_user_did_not():
    config = resolve(overrides={"low_memory": True, "data": "x"})
    for key, value in LOW_MEMORY.items():
        assert getattr(config, key) == value
    explicit = resolve(overrides={"low_memory": True, "moments": "8bit", "train_dtype": "float32", "data": "x"})
    assert explicit.moments == "8bit" and explicit.train_dtype == "float32" and explicit.dtype == "bfloat16"
    assert resolve(overrides={"data": "x"}).train_dtype == "float32"


def _deep_model():
    from mlx_lm.models import llama

    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=256,
        num_hidden_layers=16,
        intermediate_size=1024,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=512,
        tie_word_embeddings=False,
    )
    mx.random.seed(0)
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


def peak_over_held(step, steps=3):
    """Peak memory of the last of ``steps`` calls of ``step()``, above what stays allocated after it."""
    for _ in range(steps):
        mx.reset_peak_memory()
        step()
    return mx.get_peak_memory() - mx.get_active_memory()


@pytest.mark.parametrize("method", ["sft", pytest.param("gmt", marks=pytest.mark.slow)])
def test_fused_step_never_holds_the_whole_gradient(method):
    """The fused step's peak over weights + state is at least half a gradient below the split step's,
    which holds every gradient between its two calls (trainer.make_fused_step)."""
    from gmt_mlx.core.trainer import make_fused_step, make_step_fns, training_state

    tokens = mx.random.randint(0, 512, (1, 8))
    batch = (tokens, mx.ones((1, 8)))
    over = {}
    for kind in ("split", "fused"):
        model = _deep_model()
        mask = MaskOptions(method=method, mask_ratio=0.2 if method == "gmt" else 0.0)
        opt = build_optimizer(OptimizerOptions(), 1e-5, seed=0, mask=mask)
        opt.init(model.trainable_parameters())
        state = training_state(model, opt)
        if kind == "fused":
            fused = make_fused_step(model, opt)

            def step():
                mx.eval(fused(None, *batch), state)
        else:
            grad_fn, update_fn = make_step_fns(model, opt)

            def step():
                loss, count, _, grads = grad_fn(*batch)
                mx.eval(loss, count, grads)
                mx.eval(update_fn(grads, 1.0 / count, mx.array(1.0)), state)

        over[kind] = peak_over_held(step)
    gradient = sum(v.nbytes for _, v in tree_flatten(model.trainable_parameters()))
    assert over["fused"] < over["split"] - 0.5 * gradient, (over, gradient)
