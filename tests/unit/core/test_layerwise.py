"""--update-per-layer: the backward pass block by block (gmt_mlx.core.layerwise)."""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import llama

from gmt_mlx.config import MaskOptions, OptimizerOptions, PrecisionOptions, resolve
from gmt_mlx.core.layerwise import make_layerwise_step
from gmt_mlx.core.losses import dpo_loss, orpo_loss, sft_loss
from gmt_mlx.core.optim import build_optimizer
from gmt_mlx.core.trainer import make_fused_step, make_step_fns, train, training_state
from gmt_mlx.errors import UserError
from tests.helpers import runner

from .test_precision import peak_over_held


def _model(tied=True, layers=3, hidden=64, vocab=100):
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=2 * hidden,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=vocab,
        tie_word_embeddings=tied,
    )
    mx.random.seed(0)
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


def _batch(rows=2, length=12, vocab=100, seed=1):
    tokens = mx.array(np.random.default_rng(seed).integers(0, vocab, (rows, length)), mx.int32)
    return tokens, mx.ones((rows, length))


def _run(
    kind, method, *, tied=True, steps=3, loss_fn=sft_loss, batches=None, accumulate=False, grad_clip=0.0, **precision
):
    model = _model(tied)
    opt = build_optimizer(
        OptimizerOptions(),
        1e-2,
        seed=0,
        mask=MaskOptions(method=method, mask_ratio=0.3),
        precision=PrecisionOptions(**precision),
    )
    opt.init(model.trainable_parameters())
    step = (
        make_fused_step(model, opt, loss_fn, grad_clip)
        if kind == "fused"
        else make_layerwise_step(model, opt, loss_fn, grad_clip=grad_clip)
    )
    grad_fn, _ = make_step_fns(model, opt, loss_fn)
    state = training_state(model, opt)
    stats = []
    for s in range(steps):
        batch = batches[s] if batches else _batch(seed=s)
        earlier = None
        if accumulate:
            earlier = grad_fn(*_batch(seed=100 + s))
            mx.eval(earlier)
        out = step(earlier, *batch)
        mx.eval(out, state)
        stats.append((out[0].item(), out[3].item(), int(out[4].item()), bool(out[5].item())))
    return model, opt, stats


def _weights(model):
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("method", ["sft", "gmt"])
def test_per_layer_trains_like_the_fused_step(method, tied):
    """Same gradients, same per-tensor masks, same updates: the weights agree to float32 rounding
    (the fused step sums some gradients in another order), kept counts exactly."""
    fused, fused_opt, fused_stats = _run("fused", method, tied=tied)
    layer, layer_opt, layer_stats = _run("layer", method, tied=tied)
    a, b = _weights(fused), _weights(layer)
    assert max(np.abs(a[k] - b[k]).max() for k in a) <= 1e-6
    assert [s[2] for s in fused_stats] == [s[2] for s in layer_stats]  # entries kept per step
    np.testing.assert_allclose([s[1] for s in fused_stats], [s[1] for s in layer_stats], rtol=1e-5)  # norms
    assert fused_opt.state["step"].item() == layer_opt.state["step"].item() == 3


@pytest.mark.parametrize("accumulate", [False, True])
def test_per_layer_clips_like_the_fused_step(accumulate):
    """Global clipping per layer: a first backward pass for the norm, the same factor as the fused step's."""
    fused, _, fused_stats = _run("fused", "gmt", accumulate=accumulate, grad_clip=0.05)
    layer, _, layer_stats = _run("layer", "gmt", accumulate=accumulate, grad_clip=0.05)
    unclipped, _, _ = _run("layer", "gmt", accumulate=accumulate)
    a, b, c = _weights(fused), _weights(layer), _weights(unclipped)
    assert min(s[1] for s in fused_stats) > 0.05  # the clip bound every step
    assert max(np.abs(a[k] - b[k]).max() for k in a) <= 1e-6
    assert max(np.abs(a[k] - c[k]).max() for k in a) > 1e-3
    np.testing.assert_allclose([s[1] for s in fused_stats], [s[1] for s in layer_stats], rtol=1e-5)  # unclipped norms


def test_per_layer_clipping_with_a_non_finite_gradient_changes_nothing():
    """A finite loss whose gradient is not (an earlier micro-batch's inf): no tensor moves, no moment either."""
    model = _model()
    opt = build_optimizer(OptimizerOptions(), 1e-2, seed=0, mask=MaskOptions(mask_ratio=0.3))
    opt.init(model.trainable_parameters())
    grad_fn, _ = make_step_fns(model, opt, sft_loss)
    loss, count, metrics, grads = grad_fn(*_batch(seed=5))
    grads["model"]["layers"][0]["mlp"]["up_proj"]["weight"] = mx.full((128, 64), mx.inf)
    before, state = _weights(model), training_state(model, opt)
    moments = [np.array(v) for _, v in tree_flatten(opt.state) if isinstance(v, mx.array)]
    out = make_layerwise_step(model, opt, sft_loss, grad_clip=1.0)((loss, count, metrics, grads), *_batch())
    mx.eval(out, state)
    assert np.isfinite(out[0].item()) and not np.isfinite(out[3].item()) and not bool(out[5].item())
    after = _weights(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert all(
        np.array_equal(a, np.array(b))
        for a, (_, b) in zip(moments, [(k, v) for k, v in tree_flatten(opt.state) if isinstance(v, mx.array)])
    )


@pytest.mark.slow
@pytest.mark.parametrize("moments", ["8bit", "4bit"])
def test_per_layer_with_accumulation_and_compact_moments(moments):
    fused, _, _ = _run("fused", "gmt", accumulate=True, moments=moments, train_dtype="float32")
    layer, _, _ = _run("layer", "gmt", accumulate=True, moments=moments, train_dtype="float32")
    a, b = _weights(fused), _weights(layer)
    assert max(np.abs(a[k] - b[k]).max() for k in a) <= 1e-5


@pytest.mark.parametrize("mode", ["dpo", "orpo"])
def test_per_layer_preference_matches_fused(mode):
    """A preference batch (chosen and rejected rows; DPO: reference log-probs) through the same cut."""
    tokens, mask = _batch(rows=4)
    if mode == "dpo":
        batch, loss_fn = (tokens, mask, mx.array([-30.0, -31.0, -29.0, -33.0])), partial(dpo_loss, beta=0.1)
    else:
        batch, loss_fn = (tokens, mask), partial(orpo_loss, lam=0.1)
    fused, _, _ = _run("fused", "gmt", loss_fn=loss_fn, batches=[batch] * 2, steps=2)
    layer, _, _ = _run("layer", "gmt", loss_fn=loss_fn, batches=[batch] * 2, steps=2)
    a, b = _weights(fused), _weights(layer)
    assert max(np.abs(a[k] - b[k]).max() for k in a) <= 1e-6


def test_random_masks_keep_gmt_counts_per_layer():
    _, _, fused = _run("fused", "random")
    _, _, layer = _run("layer", "random")
    assert [s[2] for s in fused] == [s[2] for s in layer]


class _Poisoned(nn.Module):
    """A block's MLP whose down_proj gets a NaN gradient entry (finite output) once ``active``."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.active = inner, False

    def __call__(self, x):
        out = self.inner(x)
        if not self.active:
            return out
        w = self.inner.down_proj.weight[0, 0]
        # value 0 * sqrt(0) = 0; gradient 0 * inf * sign(0) = NaN
        return out + 0.0 * mx.sqrt(mx.abs(w - mx.stop_gradient(w)))


def test_non_finite_tensor_keeps_its_weights_and_moments_exactly():
    model = _model()
    model.layers[1].mlp = _Poisoned(model.layers[1].mlp)
    opt = build_optimizer(OptimizerOptions(), 1e-2, seed=0, mask=MaskOptions(mask_ratio=0.3))
    opt.init(model.trainable_parameters())
    step = make_layerwise_step(model, opt, sft_loss)
    mx.eval(step(None, *_batch(seed=0)), training_state(model, opt))
    target = "model.layers.1.mlp.inner.down_proj.weight"
    before = _weights(model)
    moments = {k: np.array(v) for k, v in tree_flatten(opt.state) if k.startswith(target)}
    assert moments
    model.layers[1].mlp.active = True
    out = step(None, *_batch(seed=1))
    mx.eval(out, training_state(model, opt))
    assert np.isfinite(out[0].item()) and not out[5].item()  # finite loss, reported as not applied
    assert opt.state["step"].item() == 1  # the schedule did not advance
    after = _weights(model)
    np.testing.assert_array_equal(after[target], before[target])
    for k, v in tree_flatten(opt.state):
        if k in moments:
            np.testing.assert_array_equal(np.array(v), moments[k])
    moved = [k for k in before if not np.array_equal(before[k], after[k])]
    assert "model.layers.2.mlp.down_proj.weight" in moved and "model.layers.0.mlp.down_proj.weight" in moved


def test_non_finite_loss_changes_nothing():
    model = _model()
    opt = build_optimizer(OptimizerOptions(), 1e-2, seed=0, mask=MaskOptions(mask_ratio=0.3))
    opt.init(model.trainable_parameters())
    before = _weights(model)

    def poisoned(m, tokens, mask):
        loss, count = sft_loss(m, tokens, mask)
        return loss * float("nan"), count

    out = make_layerwise_step(model, opt, poisoned)(None, *_batch())
    mx.eval(out)
    assert not out[5].item()
    after = _weights(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("method", ["sft", pytest.param("gmt", marks=pytest.mark.slow)])
def test_per_layer_holds_one_block_not_the_gradient(method):
    """Above the weights and state it keeps, a step per layer peaks at well under the fused
    step's (measured on this 16-block model: 0.16-0.19 vs 0.59-0.81 of the weights' bytes)."""
    model_kw = dict(tied=False, layers=16, hidden=256, vocab=512)
    batch = _batch(rows=1, length=8, vocab=512)
    over = {}
    for kind in ("fused", "layer"):
        model = _model(**model_kw)
        mask = MaskOptions(method=method, mask_ratio=0.2 if method == "gmt" else 0.0)
        opt = build_optimizer(OptimizerOptions(), 1e-5, seed=0, mask=mask)
        opt.init(model.trainable_parameters())
        state = training_state(model, opt)
        fn = make_fused_step(model, opt) if kind == "fused" else make_layerwise_step(model, opt, sft_loss)
        over[kind] = peak_over_held(lambda: mx.eval(fn(None, *batch), state))
    weights = sum(v.nbytes for _, v in tree_flatten(model.trainable_parameters()))
    assert over["layer"] < 0.3 * weights, (over, weights)
    assert over["layer"] < 0.5 * over["fused"], over


def test_train_loop_per_layer_and_its_guards():
    model = _model()
    opt = build_optimizer(OptimizerOptions(), 1e-2, seed=0, mask=MaskOptions(mask_ratio=0.3))
    losses = []
    train(
        model, opt, iter([_batch(seed=0)] * 20), iters=8, update_per_layer=True, on_step=lambda r: losses.append(r.loss)
    )
    assert losses[-1] < losses[0] * 0.7


def test_config_per_layer_rules():
    assert resolve(overrides={"low_memory": True, "data": "x"}).update_per_layer
    # Clipping per layer costs a backward pass, not the per-layer update; the global mask scope does.
    assert resolve(overrides={"low_memory": True, "data": "x"}).grad_clip == 1.0
    assert resolve(overrides={"low_memory": True, "grad_clip": 0.5, "data": "x"}).update_per_layer
    assert not resolve(overrides={"low_memory": True, "mask_scope": "global", "data": "x"}).update_per_layer
    with pytest.raises(UserError, match="global"):
        resolve(overrides={"update_per_layer": True, "grad_clip": 0.0, "mask_scope": "global", "data": "x"})
    assert resolve(overrides={"update_per_layer": True, "grad_clip": 0.0, "data": "x"}).update_per_layer


def test_mask_sample_covers_every_part():
    model = _model()
    opt = build_optimizer(OptimizerOptions(), 1e-2, seed=0, mask=MaskOptions(mask_ratio=0.3, mask_overlap=True))
    opt.init(model.trainable_parameters())
    step = make_layerwise_step(model, opt, sft_loss)
    mx.eval(step(None, *_batch()), training_state(model, opt))
    sample = opt.state["mask_sample"]
    total = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    # Every tensor contributed (the last part alone would be the embedding: 6,400 entries).
    assert sample.size > 0.9 * min(total, 65536) and 0.5 < sample.astype(mx.float32).mean().item() < 0.9


@pytest.mark.slow
def test_low_memory_run_killed_and_resumed_is_bit_for_bit(tiny_model_dir, chat_data, tmp_path):
    """--low-memory (bfloat16 weights, 8-bit moments, updated per layer) through SIGKILLs and resume."""
    from gmt_mlx.run.killcheck import kill_and_resume

    problems = kill_and_resume(
        str(tiny_model_dir),
        str(chat_data),
        tmp_path,
        method="gmt",
        iters=8,
        save_every=3,
        extra=["--learning-rate", "1e-3", "--mask-ratio", "0.5", "--low-memory"],
    )
    assert problems == []


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_adapters_per_layer_train_like_fused(tiny_model_dir, chat_data, tmp_path, method):
    """finetune end to end: the per-layer update of adapter weights equals the fused step's."""
    from gmt_mlx.config import Config
    from gmt_mlx.recipes.finetune import finetune

    finals = []
    for per_layer in (False, True):
        out = tmp_path / f"run-{per_layer}"
        finetune(
            Config(
                model=str(tiny_model_dir),
                data=str(chat_data),
                out=str(out),
                method=method,
                iters=4,
                learning_rate=1e-3,
                grad_clip=0.0,
                update_per_layer=per_layer,
                steps_per_eval=4,
                samples=0,
            ),
            log=lambda *_: None,
        )
        finals.append({k: np.array(v) for k, v in mx.load(str(out / "model" / "model.safetensors")).items()})
    a, b = finals
    assert max(np.abs(a[k] - b[k]).max() for k in a) <= 1e-5


def test_low_memory_run_exports_in_every_dtype_and_gguf(tiny_model_dir, chat_data, tmp_path):
    """A --low-memory run (bfloat16 weights, updated per layer) exports as HF in any dtype and as GGUF."""
    from gmt_mlx.cli import app

    run = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "finetune",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(chat_data),
            "--out",
            str(run),
            "--iters",
            "3",
            "--learning-rate",
            "1e-3",
            "--low-memory",
            "--samples",
            "0",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "updated per layer" in result.output
    saved = mx.load(str(run / "model" / "model.safetensors"))
    assert all(v.dtype == mx.bfloat16 for v in saved.values())  # --low-memory saves what it trained
    for dtype in ("float32", "float16"):
        out = tmp_path / dtype
        result = runner.invoke(app, ["export", str(run), "--dtype", dtype, "--out", str(out)])
        assert result.exit_code == 0, result.output
        exported = mx.load(str(out / "model.safetensors"))
        assert {str(v.dtype) for v in exported.values()} == {f"mlx.core.{dtype}"}
        # bfloat16 values are exact in float32 (and these small weights in float16 to its precision)
        for k, v in saved.items():
            np.testing.assert_allclose(
                np.array(exported[k].astype(mx.float32)), np.array(v.astype(mx.float32)), rtol=1e-3, atol=1e-6
            )
    result = runner.invoke(app, ["export", str(run), "--format", "gguf", "--out", str(tmp_path / "gguf")])
    assert result.exit_code == 0, result.output
    assert list((tmp_path / "gguf").glob("*.gguf"))


@pytest.mark.parametrize(
    "moments",
    [pytest.param("8bit", marks=pytest.mark.slow), "4bit", pytest.param("8bit-factored", marks=pytest.mark.slow)],
)
def test_row_slices_update_exactly_as_the_whole_tensor(monkeypatch, moments):
    """The staged update of a large tensor in slices of rows (CHUNK_ENTRIES) gives the weights and
    8-bit state bit for bit of the whole tensor at once: the rounding noise follows each entry's
    position in the tensor (masking.hash_start), not in its slice."""
    import gmt_mlx.core.compact as compact_module

    results = []
    for chunk in (1 << 30, 512):  # whole tensors; then slices of 4 rows of 128
        monkeypatch.setattr(compact_module, "CHUNK_ENTRIES", chunk)
        model = _model(hidden=128)
        model.set_dtype(mx.bfloat16)
        opt = build_optimizer(
            OptimizerOptions(),
            1e-2,
            seed=0,
            mask=MaskOptions(mask_ratio=0.3),
            precision=PrecisionOptions(train_dtype="bfloat16", moments=moments),
        )
        opt.init(model.trainable_parameters())
        step = make_layerwise_step(model, opt, sft_loss)
        for s in range(3):
            mx.eval(step(None, *_batch(seed=s)), training_state(model, opt))
        flat = {
            **{k: v for k, v in tree_flatten(model.parameters())},
            **{"state." + k: v for k, v in tree_flatten(opt.state) if isinstance(v, mx.array)},
        }
        results.append({k: np.array(v.astype(mx.float32) if v.dtype == mx.bfloat16 else v) for k, v in flat.items()})
    whole, sliced = results
    assert whole.keys() == sliced.keys()
    for k in whole:
        np.testing.assert_array_equal(whole[k], sliced[k], err_msg=k)
    moved = np.abs(
        whole["model.embed_tokens.weight"]
        - np.array(_model(hidden=128).model.embed_tokens.weight.astype(mx.bfloat16).astype(mx.float32))
    )
    assert moved.max() > 0  # the embedding (100 x 128 = 25 slices) was trained
