"""GRPO rollouts (objectives/grpo/rollouts.py): ids as sampled, stop token kept, truncation, determinism
from an explicit key, groups on consecutive rows, log-probs over prompt + completion.

Two models: the tiny random llama (real batched generation, KV caches, uneven
prompts) and a bigram model whose next token is scripted by the last one, so
a test can make the sampler write an exact sequence.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from gmt_mlx.data.encoding import chat_ids
from gmt_mlx.models.loading import load_base
from gmt_mlx.objectives.grpo.rollouts import (
    KeyedSampler,
    Rollouts,
    key_from_state,
    key_state,
    rollout_logps,
    sample_rollouts,
    stop_token_ids,
)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model, tokenizer, _, _ = load_base(str(tiny_model_dir))
    return model, tokenizer


def chat_prompt(tokenizer, text: str) -> list[int]:
    return chat_ids(tokenizer, [{"role": "user", "content": text}], add_generation_prompt=True)


@pytest.fixture(scope="module")
def prompts(tiny):
    """Three prompts of different lengths."""
    tokenizer = tiny[1]
    out = [chat_prompt(tokenizer, t) for t in ("hi", "What is 12 plus 7? The answer is", "the lazy dog")]
    assert len({len(p) for p in out}) == 3
    return out


class Bigram(nn.Module):
    """A causal LM whose logits at a position are ``table[token there]``: no cache needed."""

    def __init__(self, vocab_size: int, script: dict[int, int], margin: float = 60.0):
        super().__init__()
        table = np.zeros((vocab_size, vocab_size), dtype=np.float32)
        for prev, nxt in script.items():
            table[prev, nxt] = margin
        self.table = mx.array(table)
        self.layers = []  # mlx-lm's make_prompt_cache: one (here no) cache per layer

    def __call__(self, inputs: mx.array, cache=None) -> mx.array:
        return self.table[inputs]


def step_by_step_logps(model, prompt: list[int], completion: list[int]) -> np.ndarray:
    """Each completion token's log-prob, one token at a time through a KV cache (generation's own path)."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    logits = model(mx.array(prompt)[None], cache=cache)[:, -1]
    out = []
    for token in completion:
        logps = logits.astype(mx.float32) - mx.logsumexp(logits.astype(mx.float32), axis=-1, keepdims=True)
        out.append(logps[0, token].item())
        logits = model(mx.array([[token]]), cache=cache)[:, -1]
    return np.array(out)


def greedy_step_by_step(model, prompt: list[int], stops: list[int], max_len: int) -> list[int]:
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    logits = model(mx.array(prompt)[None], cache=cache)[:, -1]
    out = []
    while len(out) < max_len:
        out.append(int(mx.argmax(logits, axis=-1).item()))
        if out[-1] in stops:
            break
        logits = model(mx.array([[out[-1]]]), cache=cache)[:, -1]
    return out


def reencoding_pair(tokenizer) -> tuple[int, int]:
    """Two ordinary tokens whose decoded text (whole characters, no half of a UTF-8 byte sequence)
    encodes back to other ids: in the tiny vocabulary "'" + "st" re-encodes as "'", "s", "t"."""
    vocab = len(tokenizer.get_vocab())
    specials = set(stop_token_ids(tokenizer)) | {tokenizer.pad_token_id}
    for a in range(3, vocab):
        for b in range(3, vocab):
            if {a, b} & specials:
                continue
            text = tokenizer.decode([a, b])
            if "\ufffd" not in text and tokenizer.encode(text, add_special_tokens=False) != [a, b]:
                return a, b
    pytest.skip("no re-encoding pair in this vocabulary")


def test_ids_are_kept_as_sampled_with_the_stop_token(tiny):
    """The sampler is made to write a, b, EOS where decode + encode of a, b gives other ids:
    the rollout holds a, b, EOS, not the re-encoded text."""
    tokenizer = tiny[1]
    a, b = reencoding_pair(tokenizer)
    eos = stop_token_ids(tokenizer)[0]
    prompt = chat_prompt(tokenizer, "hi")
    model = Bigram(len(tokenizer.get_vocab()), {prompt[-1]: a, a: b, b: eos})
    out = sample_rollouts(model, tokenizer, [prompt], num_generations=2, temperature=1.0, max_completion_length=8)
    assert out.completion_ids == [[a, b, eos], [a, b, eos]]
    assert out.truncated == [False, False]
    assert tokenizer.encode(tokenizer.decode(out.completion_ids[0]), add_special_tokens=False) != [a, b, eos]


def test_truncation_flag(tiny):
    tokenizer = tiny[1]
    eos = stop_token_ids(tokenizer)[0]
    a, b = 40, 41
    prompts = [[5, 7], [5, 9]]
    looping = Bigram(len(tokenizer.get_vocab()), {7: a, 9: b, a: a, b: eos})
    out = sample_rollouts(looping, tokenizer, prompts, num_generations=1, temperature=1.0, max_completion_length=4)
    assert out.completion_ids == [[a, a, a, a], [b, eos]]
    assert out.truncated == [True, False]
    # A stop token that is also the last token allowed is a finished completion, not a truncated one.
    out = sample_rollouts(looping, tokenizer, [[5, 9]], num_generations=1, temperature=1.0, max_completion_length=2)
    assert out.completion_ids == [[b, eos]] and out.truncated == [False]


def test_stop_ids_override(tiny):
    tokenizer = tiny[1]
    model = Bigram(len(tokenizer.get_vocab()), {7: 40, 40: 41, 41: 42, 42: 2})
    out = sample_rollouts(model, tokenizer, [[7]], num_generations=1, max_completion_length=8, stop_ids=[41])
    assert out.completion_ids == [[40, 41]] and out.truncated == [False]


def test_bigram_logps_are_the_tables(tiny):
    tokenizer = tiny[1]
    vocab = len(tokenizer.get_vocab())
    rng = np.random.default_rng(0)
    model = Bigram(vocab, {})
    model.table = mx.array(rng.normal(size=(vocab, vocab)).astype(np.float32))
    out = sample_rollouts(model, tokenizer, [[5, 7], [9]], num_generations=2, max_completion_length=6, key=3)
    got = np.array(rollout_logps(model, out, pad_id=0))
    table = np.array(model.table)
    table = table - np.log(np.exp(table).sum(axis=1, keepdims=True))
    for row, (prompt, completion) in enumerate(zip(out.prompt_ids, out.completion_ids)):
        previous = [prompt[-1]] + completion[:-1]
        np.testing.assert_allclose(got[row, : len(completion)], table[previous, completion], atol=1e-5)
        assert np.all(got[row, len(completion) :] == 0)


def test_groups_are_consecutive_and_prompts_unpadded(tiny, prompts):
    model, tokenizer = tiny
    out = sample_rollouts(model, tokenizer, prompts, num_generations=3, max_completion_length=5, key=0)
    assert len(out) == 9 and out.group_size == 3
    assert out.prompt_ids == [p for p in prompts for _ in range(3)]
    assert all(1 <= len(c) <= 5 for c in out.completion_ids)
    # Completions of a group are different draws, not one draw copied.
    assert len({tuple(c) for c in out.completion_ids[:3]}) > 1


def test_same_key_same_ids_and_the_global_state_is_untouched(tiny, prompts):
    model, tokenizer = tiny
    options = dict(num_generations=2, temperature=1.0, top_p=0.9, max_completion_length=6)
    mx.random.seed(11)
    expected_global = mx.random.uniform(shape=(4,))
    mx.random.seed(11)
    first = sample_rollouts(model, tokenizer, prompts, key=mx.random.key(7), **options)
    assert np.array_equal(np.array(mx.random.uniform(shape=(4,))), np.array(expected_global))
    again = sample_rollouts(model, tokenizer, prompts, key=7, **options)
    other = sample_rollouts(model, tokenizer, prompts, key=8, **options)
    assert again.completion_ids == first.completion_ids and again.truncated == first.truncated
    assert other.completion_ids != first.completion_ids
    assert key_state(again.next_key) == key_state(first.next_key) != key_state(first.key)


def test_resume_from_the_saved_key_continues_bit_for_bit(tiny, prompts):
    """Batch 2 sampled from batch 1's next_key equals batch 2 sampled from that key written to JSON and read back."""
    model, tokenizer = tiny
    options = dict(num_generations=2, temperature=1.0, max_completion_length=6)
    first = sample_rollouts(model, tokenizer, prompts, key=5, **options)
    second = sample_rollouts(model, tokenizer, prompts, key=first.next_key, **options)
    saved = key_state(first.next_key)
    assert all(isinstance(v, int) for v in saved)
    resumed = sample_rollouts(model, tokenizer, prompts, key=key_from_state(saved), **options)
    assert resumed.completion_ids == second.completion_ids
    assert key_state(resumed.next_key) == key_state(second.next_key)
    assert second.completion_ids != first.completion_ids


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_draws_are_mlx_lms_own_from_the_same_seed(tiny, prompts, top_p):
    """key=s samples what mlx-lm's batch_generate with make_sampler(temp, top_p) samples after
    mx.random.seed(s): the same distribution and the same draws (batch_generate drops the stop token)."""
    from mlx_lm.generate import batch_generate
    from mlx_lm.sample_utils import make_sampler

    model, tokenizer = tiny
    ours = sample_rollouts(
        model, tokenizer, prompts, num_generations=2, temperature=1.2, top_p=top_p, max_completion_length=10, key=4
    )
    mx.random.seed(4)
    theirs = batch_generate(
        model,
        tokenizer,
        ours.prompt_ids,
        max_tokens=10,
        sampler=make_sampler(1.2, top_p),
        prefill_batch_size=len(ours),
        completion_batch_size=len(ours),
        return_token_ids=True,
    )
    assert [c if cut else c[:-1] for c, cut in zip(ours.completion_ids, ours.truncated)] == theirs.token_ids


def test_smaller_decode_batches_keep_groups_and_determinism(tiny, prompts):
    """batch_size below the row count: mlx-lm's continuous batching, rows still in prompt-major order,
    greedy ids as in one batch, sampled ids a function of the key."""
    model, tokenizer = tiny
    whole = sample_rollouts(model, tokenizer, prompts, num_generations=2, temperature=0.0, max_completion_length=6)
    parts = sample_rollouts(
        model, tokenizer, prompts, num_generations=2, temperature=0.0, max_completion_length=6, batch_size=2
    )
    assert parts.prompt_ids == whole.prompt_ids and parts.completion_ids == whole.completion_ids
    options = dict(num_generations=2, temperature=1.0, max_completion_length=6, key=9, batch_size=4)
    assert (
        sample_rollouts(model, tokenizer, prompts, **options).completion_ids
        == sample_rollouts(model, tokenizer, prompts, **options).completion_ids
    )


def test_greedy_uses_no_key_and_tiny_top_p_is_greedy(tiny, prompts):
    model, tokenizer = tiny
    greedy = sample_rollouts(model, tokenizer, prompts, num_generations=1, temperature=0.0, max_completion_length=6)
    assert key_state(greedy.next_key) == key_state(greedy.key)
    nucleus = sample_rollouts(
        model, tokenizer, prompts, num_generations=1, temperature=1.0, top_p=1e-6, max_completion_length=6, key=1
    )
    assert nucleus.completion_ids == greedy.completion_ids


def test_uneven_prompts_change_neither_ids_nor_logps(tiny, prompts):
    """Greedy completions in a batch of uneven prompts are each prompt's own (step by step, alone), and a
    row's log-probs in the right-padded batch equal its log-probs alone."""
    model, tokenizer = tiny
    stops = stop_token_ids(tokenizer)
    batch = sample_rollouts(model, tokenizer, prompts, num_generations=1, temperature=0.0, max_completion_length=8)
    for prompt, completion in zip(prompts, batch.completion_ids):
        assert completion == greedy_step_by_step(model, prompt, stops, 8)
    batch_logps = np.array(rollout_logps(model, batch, pad_id=tokenizer.pad_token_id))
    for row in range(len(prompts)):
        alone = Rollouts(
            [batch.prompt_ids[row]], [batch.completion_ids[row]], [batch.truncated[row]], 1, batch.key, batch.next_key
        )
        alone_logps = np.array(rollout_logps(model, alone, pad_id=tokenizer.pad_token_id))[0]
        n = len(batch.completion_ids[row])
        np.testing.assert_allclose(batch_logps[row, :n], alone_logps[:n], atol=1e-5)


def test_logps_match_a_step_by_step_forward(tiny, prompts):
    """One forward over prompt + completion gives what generation's own token-by-token pass gives,
    for sampled (temperature 1.3, top-p 0.95) completions: log-probs at temperature 1, with the prompt."""
    model, tokenizer = tiny
    out = sample_rollouts(
        model, tokenizer, prompts, num_generations=2, temperature=1.3, top_p=0.95, max_completion_length=7, key=2
    )
    logps = rollout_logps(model, out, pad_id=tokenizer.pad_token_id)
    mask = np.array(out.completion_mask())
    assert logps.shape == mask.shape == (6, max(out.completion_lengths))
    got = np.array(logps)
    for row, (prompt, completion) in enumerate(zip(out.prompt_ids, out.completion_ids)):
        np.testing.assert_allclose(
            got[row, : len(completion)], step_by_step_logps(model, prompt, completion), atol=1e-4
        )
        assert mask[row].sum() == len(completion) and np.all(got[row][mask[row] == 0] == 0)


def test_logps_are_differentiable(tiny, prompts):
    from mlx.utils import tree_flatten

    model, tokenizer = tiny
    out = sample_rollouts(model, tokenizer, prompts[:1], num_generations=2, max_completion_length=4)
    grads = nn.value_and_grad(model, lambda: rollout_logps(model, out, pad_id=0).sum())()[1]
    assert any(float(mx.abs(g).sum()) > 0 for _, g in tree_flatten(grads))


def test_model_mode_is_given_back(tiny, prompts):
    model, tokenizer = tiny
    model.train()
    sample_rollouts(model, tokenizer, prompts[:1], num_generations=1, max_completion_length=2)
    assert model.training
    model.eval()
    sample_rollouts(model, tokenizer, prompts[:1], num_generations=1, max_completion_length=2)
    assert not model.training


def test_keyed_sampler_splits_once_per_step():
    sampler = KeyedSampler(mx.random.key(0), temperature=1.0)
    logprobs = mx.zeros((3, 10))
    sampler(logprobs)
    assert key_state(sampler.key) == key_state(mx.random.split(mx.random.key(0))[0])


@pytest.mark.parametrize(
    "options",
    [dict(num_generations=0), dict(max_completion_length=0), dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5)],
)
def test_bad_options_are_refused(tiny, options):
    model, tokenizer = tiny
    settings = dict(num_generations=1, max_completion_length=4) | options
    with pytest.raises(ValueError):
        sample_rollouts(model, tokenizer, [[1, 2]], **settings)


def test_an_empty_prompt_is_refused(tiny):
    with pytest.raises(ValueError):
        sample_rollouts(*tiny, [[1, 2], []], num_generations=1)


def test_the_pad_id_changes_nothing_even_when_it_is_the_stop_token(tiny, prompts):
    """Completions are found by length, never by looking for pad ids: SmolLM2's pad is its <|im_end|>."""
    model, tokenizer = tiny
    out = sample_rollouts(model, tokenizer, prompts, num_generations=2, max_completion_length=6, key=1)
    eos = stop_token_ids(tokenizer)[0]
    np.testing.assert_array_equal(
        np.array(rollout_logps(model, out, pad_id=eos)),
        np.array(rollout_logps(model, out, pad_id=tokenizer.pad_token_id)),
    )
