"""Bytes per entry that ONE tensor's optimizer update needs above what is held, and a step's time per layer.

    python benchmarks/bench_update_memory.py

Part 1: a (8960, 1536) matrix (the MLP shape of Qwen2.5-1.5B) updated by the
masked optimizer, compiled as `layerwise` compiles each part, and eagerly:
MLX's peak during the update minus the memory held before it, per entry. It
counts the new weights and state beside the old (they coexist until the
update ends) and every float32 temporary the update materialises. This is
the in-flight term of the per-layer estimate (gmt_mlx/memory.py,
_PER_TENSOR_UPDATE), paid for the largest tensor. Three ways to run it:
one compiled function, CompactAdamW's stages evaluated in turn ("staged",
what layerwise does for 8-bit moments), and eagerly.

Part 2: seconds per step of the fused step and of the per-layer step on a
16-block llama (hidden 256), float32, same process, alternating; the ratio is
what --update-per-layer costs in time (one more forward pass per step, and
one evaluation per tensor).
"""

from __future__ import annotations

import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from gmt_mlx.config import MaskOptions, OptimizerOptions, PrecisionOptions
from gmt_mlx.core.layerwise import make_layerwise_step
from gmt_mlx.core.losses import sft_loss
from gmt_mlx.core.optim import build_optimizer
from gmt_mlx.core.trainer import make_fused_step, training_state

SHAPE = (8960, 1536)
CASES = [  # method, moments, weights dtype
    ("sft", "float32", "float32"),
    ("gmt", "float32", "float32"),
    ("sft", "8bit", "float32"),
    ("sft", "8bit", "bfloat16"),
    ("gmt", "8bit", "bfloat16"),
    ("gmt", "8bit-factored", "bfloat16"),
    ("gmt", "4bit", "bfloat16"),
]


class _One(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.w = mx.random.normal(SHAPE).astype(dtype)


def update_bytes(method: str, moments: str, dtype: str, mode: str) -> float:
    """``mode``: compiled (one function, as layerwise compiles a part), staged
    (CompactAdamW's stages evaluated in turn, as layerwise runs 8-bit moments) or eager."""
    model = _One(getattr(mx, dtype))
    mask = MaskOptions(method=method, mask_ratio=0.2 if method == "gmt" else 0.0)
    opt = build_optimizer(
        OptimizerOptions(), 1e-5, seed=0, mask=mask, precision=PrecisionOptions(train_dtype=dtype, moments=moments)
    )
    opt.init(model.trainable_parameters())
    state = [model.state, opt.state]
    mx.eval(state)

    def update(g, scale):
        return opt.update(model, {"w": g}, grad_scale=scale)["kept"]

    fn = mx.compile(update, inputs=state, outputs=state) if mode == "compiled" else update
    if mode == "staged":
        if not hasattr(opt.optimizer, "staged"):
            return float("nan")  # mlx's own optimizers have no stages
        opt.optimizer.staged = True
    g = mx.random.normal(SHAPE).astype(getattr(mx, dtype))
    mx.eval(g)
    for _ in range(2):  # the second call: compiled, and the state's final dtypes
        held = mx.get_active_memory()
        mx.reset_peak_memory()
        mx.eval(fn(g, mx.array(1.0)), state)
    return (mx.get_peak_memory() - held) / g.size


def step_times(steps: int = 6) -> dict:
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
    tokens = mx.array(np.random.default_rng(0).integers(0, 512, (4, 128)), mx.int32)
    batch = (tokens, mx.ones(tokens.shape))
    runs = {}
    # "-clip": global clipping at 1.0 (per layer: a norm-only backward pass first).
    for kind in ("fused", "per-layer", "fused-clip", "per-layer-clip"):
        mx.random.seed(0)
        model = llama.Model(args)
        opt = build_optimizer(OptimizerOptions(), 1e-4, seed=0, mask=MaskOptions(mask_ratio=0.2))
        opt.init(model.trainable_parameters())
        clip = 1.0 if kind.endswith("clip") else 0.0
        fn = (
            make_fused_step(model, opt, sft_loss, clip)
            if kind.startswith("fused")
            else make_layerwise_step(model, opt, sft_loss, grad_clip=clip)
        )
        runs[kind] = (fn, training_state(model, opt))
    times = {kind: [] for kind in runs}
    for i in range(steps + 1):
        for kind, (fn, state) in runs.items():
            start = time.perf_counter()
            mx.eval(fn(None, *batch), state)
            if i:  # the first step compiles
                times[kind].append(time.perf_counter() - start)
    return {kind: float(np.median(t)) for kind, t in times.items()}


def main() -> None:
    print(f"One update of a {SHAPE} tensor: MLX peak above what was held, bytes per entry")
    modes = ("compiled", "staged", "eager")
    print("| method | moments | weights | " + " | ".join(modes) + " |")
    print("|---|---|---|" + "---|" * len(modes))
    for method, moments, dtype in CASES:
        cells = " | ".join(f"{update_bytes(method, moments, dtype, mode):.1f}" for mode in modes)
        print(f"| {method} | {moments} | {dtype} | {cells} |")
    times = step_times()
    print(
        f"\nstep time, 16-block llama, gmt, float32, batch 4 x 128 (medians of 6 steps, same process): "
        f"per-layer / fused = {times['per-layer'] / times['fused']:.2f}x; with --grad-clip 1: "
        f"{times['per-layer-clip'] / times['fused-clip']:.2f}x; per-layer clip / no clip = "
        f"{times['per-layer-clip'] / times['per-layer']:.2f}x"
    )


if __name__ == "__main__":
    main()
