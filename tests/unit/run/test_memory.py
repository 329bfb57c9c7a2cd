"""The peak-memory estimate's arithmetic (gmt_mlx.run.memory): it follows the dtypes, moments and update mode."""

from gmt_mlx.config import Config
from gmt_mlx.run.memory import Footprint, advice, estimate

CONFIG = {
    "hidden_size": 1536,
    "num_hidden_layers": 28,
    "intermediate_size": 8960,
    "num_attention_heads": 12,
    "vocab_size": 49152,
}
N, LARGEST, BLOCK, OUTER = 1_385_838_080, 49152 * 1536, 46_797_824, 49152 * 1536 + 1536


def _estimate(**kw):
    """The estimate for these values: Footprint's, the step's and Config fields (masked: gmt, else sft)."""
    values = dict(
        weight_bytes=N * 2,
        trainable=N,
        batch_size=1,
        seq_len=64,
        masked=True,
        largest=LARGEST,
        block=BLOCK,
        outer=OUTER,
        train_dtype="bfloat16",
        moments="8bit",
        grad_clip=0.0,
    )
    values.update(kw)
    footprint = Footprint(**{k: values.pop(k) for k in list(values) if k in Footprint.__dataclass_fields__})
    step = {k: values.pop(k) for k in ("seq_len", "rollout_rows", "rollout_tokens", "reference_bytes") if k in values}
    rows = values.pop("batch_size")
    config = Config(method="gmt" if values.pop("masked") else "sft", **values)
    return estimate(
        CONFIG,
        footprint,
        batch_rows=rows,
        optim=config.optim,
        precision=config.precision,
        memory=config.memory,
        mask=config.mask,
        **step,
    )


def test_state_follows_the_moment_storage():
    assert _estimate(moments="float32").optimizer == 8 * N
    assert _estimate(moments="bfloat16").optimizer == 4 * N
    assert abs(_estimate(moments="8bit").optimizer - (2 + 8 / 128) * N) < 2
    assert _estimate(moments="8bit-factored").optimizer < 1.1 * N


def test_per_layer_holds_one_slice_not_the_gradient():
    one_graph, per_layer = _estimate(), _estimate(update_per_layer=True)
    # No whole gradient, no masks across the step: the gradients outside the blocks and
    # one block's (bfloat16), and the largest tensor's staged update; GMT's tie ranks
    # (2 bytes per entry of each shape: here the largest's) and the largest's mask.
    expected = (OUTER + BLOCK) * 2 + LARGEST * 7 + (1 << 22) * 22
    assert per_layer.gradients == expected and per_layer.masking == LARGEST * 2 + LARGEST
    assert per_layer.total < one_graph.total - 3 * N  # measured at this shape: 6.83 vs 14.42 GB
    # A smaller slice, less in flight; accumulation brings back a whole (bfloat16) gradient.
    assert _estimate(update_per_layer=True, chunk=1 << 20).gradients < expected
    assert _estimate(update_per_layer=True, grad_accumulation_steps=2).gradients == expected + 2 * N


def test_float32_weights_count_twice_the_bytes():
    assert _estimate(weight_bytes=4 * N, train_dtype="float32").weights == 2 * _estimate().weights


def test_refusal_advice_names_low_memory_with_its_estimate():
    text = advice("gmt", int(9.6e9))
    assert "--low-memory (estimated ~9.6 GB)" in text
    assert "--low-memory" not in advice("gmt", None)


def test_fused_step_holds_the_whole_gradient_with_or_without_clipping():
    # MLX runs the whole backward pass before the first update (135M: the same peak either way).
    clipped, unclipped = _estimate(grad_clip=1.0), _estimate(grad_clip=0.0)
    assert clipped.total == unclipped.total
    plain = _estimate(train_dtype="float32", moments="float32", weight_bytes=4 * N, masked=False)
    assert plain.gradients == N * 4 + LARGEST * 1  # float32 gradient, and ~1 byte per entry of the largest
    # Accumulation adds its buffer.
    assert _estimate(grad_accumulation_steps=2).gradients - _estimate().gradients == N * 2


def test_fused_step_counts_the_larger_of_gradients_and_activations():
    small, large = _estimate(batch_size=1), _estimate(batch_size=64, seq_len=1024)
    assert (
        small.activations < small.gradients
        and small.total == small.weights + small.optimizer + small.masking + small.gradients
    )
    assert (
        large.activations > large.gradients
        and large.total == large.weights + large.optimizer + large.masking + large.activations
    )
    # Per layer both are held.
    per_layer = _estimate(update_per_layer=True)
    assert (
        per_layer.total
        == per_layer.weights + per_layer.optimizer + per_layer.masking + per_layer.gradients + per_layer.activations
    )


def test_compact_update_in_flight_by_storage():
    # CompactAdamW's fused update: bytes per parameter plus per entry of the largest tensor.
    assert _estimate(moments="8bit").gradients == N * 2 + int(N * 2.7 + LARGEST * 9.6)
    assert _estimate(moments="4bit").gradients == N * 2 + int(N * 2.7 + LARGEST * 17.8)
    assert _estimate(moments="8bit-factored").gradients == N * 2 + int(N * 3.0)


def test_gmt_tie_ranks_follow_the_distinct_shapes():
    one, more = _estimate(update_per_layer=True), _estimate(update_per_layer=True, shapes=LARGEST + 30_000_000)
    assert more.masking - one.masking == 2 * 30_000_000
    assert _estimate(update_per_layer=True, masked=False).masking == 0


def test_a_tensor_updated_in_one_slice():
    # Rows that are not whole blocks of 128 (SmolLM2-135M's 576 columns): the staged update takes the
    # whole tensor as one slice, 22 bytes per entry.
    whole = _estimate(update_per_layer=True, chunk=LARGEST)
    assert whole.gradients == (OUTER + BLOCK) * 2 + LARGEST * 22


def test_mlx_optimizers_on_bfloat16_weights_work_on_float32_copies():
    bf16 = _estimate(optimizer="adafactor", masked=False)
    f32 = _estimate(optimizer="adafactor", masked=False, train_dtype="float32", weight_bytes=4 * N)
    assert bf16.gradients == N * 2 + int(N * 2.4) + LARGEST * 6
    assert f32.gradients == N * 4 + LARGEST * 6


def test_grpo_rollouts_kv_cache_and_reference_weights():
    from gmt_mlx.run.memory import KV_STEP, rollout_kv_bytes

    gqa = {**CONFIG, "num_key_value_heads": 2}  # 12 heads of 128: 2 KV heads of 128
    # 4 prompts x 8 completions, 100 + 412 tokens (two blocks of 256), 28 layers, a key and a value, bfloat16.
    assert rollout_kv_bytes(gqa, 32, 512, 2) == 32 * 512 * 28 * 2 * 2 * 128 * 2
    assert rollout_kv_bytes(gqa, 32, 513, 2) == rollout_kv_bytes(gqa, 32, 512 + KV_STEP, 2)  # grown by a block
    assert rollout_kv_bytes({**gqa, "head_dim": 64}, 32, 512, 2) == rollout_kv_bytes(gqa, 32, 512, 2) // 2
    assert rollout_kv_bytes(CONFIG, 32, 512, 2) == 6 * rollout_kv_bytes(gqa, 32, 512, 2)  # no GQA: all 12 heads
    assert rollout_kv_bytes(gqa, 0, 512, 2) == 0
    plain = _estimate(update_per_layer=True)
    kv = rollout_kv_bytes(CONFIG, 32, 512, 2)
    grpo = _estimate(update_per_layer=True, rollout_rows=32, rollout_tokens=512)
    assert grpo.rollouts == kv
    # Sampled before the step: the larger of the cache and the step's gradients and activations counts.
    assert grpo.total == plain.total - plain.gradients - plain.activations + max(
        kv, plain.gradients + plain.activations
    )
    small = _estimate(update_per_layer=True, rollout_rows=1, rollout_tokens=64)
    assert small.total == plain.total
    # --beta > 0: the step-0 trainable weights (the caller's bytes: all of them, or LoRA's adapters) are added.
    kl = _estimate(rollout_rows=1, rollout_tokens=64, reference_bytes=2 * N)
    assert kl.total == _estimate().total + 2 * N and "reference weights" in kl.describe()


def test_grpo_estimate_at_start_up_counts_the_reference_only_with_a_kl_term(tiny_model_dir, tmp_path):
    from mlx.utils import tree_flatten

    from gmt_mlx.config import resolve
    from gmt_mlx.models.loading import load_base
    from gmt_mlx.models.methods import prepare_model
    from gmt_mlx.recipes.setup import check_memory
    from gmt_mlx.run.memory import rollout_kv_bytes

    class Split:
        def lengths(self):
            return [20, 30]

    def memory(**values):
        config = resolve(
            overrides={
                "model": str(tiny_model_dir),
                "data": "unused",
                "memory_check": False,
                "train_mode": "grpo",
                "num_generations": 4,
                "batch_size": 2,
                "max_completion_length": 16,
                **values,
            }
        )
        model, _, model_config, _ = load_base(config.model)
        sizes = prepare_model(model, config)
        trainable = sum(v.nbytes for _, v in tree_flatten(model.trainable_parameters()))
        return check_memory(config, model, model_config, sizes, Split(), lambda _: None), trainable, model_config

    plain, _, model_config = memory()
    assert plain.reference == 0 and plain.rollouts > 0
    # The longest prompt + --max-completion-length, --batch-size x --num-generations rows, the weights' float32.
    assert plain.rollouts == rollout_kv_bytes(model_config, 2 * 4, 30 + 16, 4)
    full, full_bytes, _ = memory(beta=0.04, method="full")
    assert full.reference == full_bytes
    lora, lora_bytes, _ = memory(beta=0.04, method="lora")
    assert lora.reference == lora_bytes < full_bytes / 2  # the adapters only
