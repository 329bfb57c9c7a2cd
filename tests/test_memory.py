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
    # one block's (bfloat16), and the largest tensor's staged update.
    expected = (OUTER + BLOCK) * 2 + LARGEST * 7 + (1 << 22) * 22
    assert per_layer.gradients == expected and per_layer.masking == 0
    assert per_layer.total < one_graph.total - 3 * N  # measured at this shape: 7.66 vs 14.27 GB
    # A smaller slice, less in flight; accumulation brings back a whole (bfloat16) gradient.
    assert _estimate(update_per_layer=True, chunk=1 << 20).gradients < expected
    assert _estimate(update_per_layer=True, grad_accumulation_steps=2).gradients == expected + 2 * N


def test_float32_weights_count_twice_the_bytes():
    assert _estimate(weight_bytes=4 * N, train_dtype="float32").weights == 2 * _estimate().weights


def test_refusal_advice_names_low_memory_with_its_estimate():
    text = advice("gmt", int(9.6e9))
    assert "--low-memory (estimated ~9.6 GB)" in text
    assert "--low-memory" not in advice("gmt", None)
