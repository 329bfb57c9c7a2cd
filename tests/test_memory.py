"""The peak-memory estimate's arithmetic (gmt_mlx.run.memory): it follows the dtypes, moments and update mode."""

from gmt_mlx.run.memory import advice, estimate

CONFIG = {"hidden_size": 1536, "num_hidden_layers": 28, "intermediate_size": 8960, "num_attention_heads": 12,
          "vocab_size": 49152}
N, LARGEST, BLOCK, OUTER = 1_385_838_080, 49152 * 1536, 46_797_824, 49152 * 1536 + 1536


def _estimate(**kw):
    values = dict(weight_bytes=N * 2, trainable=N, batch_size=1, seq_len=64, masked=True, largest=LARGEST,
                  block=BLOCK, outer=OUTER, train_dtype="bfloat16", moments="8bit", grad_clip=0.0)
    values.update(kw)
    return estimate(CONFIG, **values)


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
    assert small.activations < small.gradients and small.total == small.weights + small.optimizer + \
        small.masking + small.gradients
    assert large.activations > large.gradients and large.total == large.weights + large.optimizer + \
        large.masking + large.activations
    # Per layer both are held.
    per_layer = _estimate(update_per_layer=True)
    assert per_layer.total == per_layer.weights + per_layer.optimizer + per_layer.masking + per_layer.gradients + \
        per_layer.activations


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
