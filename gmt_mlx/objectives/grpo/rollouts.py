"""Rollouts for online RL (GRPO): G sampled completions per prompt, and their log-probabilities.

`sample_rollouts` runs mlx-lm's own batched generation (``BatchGenerator``:
batched prefill of uneven prompts, one decode step for the whole batch,
finished rows dropped) and keeps what it samples as token ids: a completion is
never decoded and re-encoded (text -> ids does not give back the sampled ids
for every sequence), and its stop token (EOS / end of turn) is kept, since the
policy chose it and the loss must count it. `rollout_logps` scores the same
ids under a model in one forward over prompt + completion, as the policy
sampled them (a completion's log-probability is conditional on its prompt).

Randomness is an explicit MLX key (``mx.random.key(seed)``), never the global
``mx.random`` state: a rollout batch is a function of (model, prompts, options,
key) alone, so a resume that restores the key samples the same ids bit for
bit. Each sampling step splits the key once, as the global state does, so
``key=s`` draws exactly what mlx-lm's own sampler draws after
``mx.random.seed(s)`` (greedy decoding uses no key). The key after the batch
is `Rollouts.next_key`, the key of the next batch; a checkpoint keeps it as
two integers (`key_state`) and gets it back with `key_from_state`. One draw
covers the whole decode batch, so the ids also depend on the batch's make-up:
a resume must sample with the same prompts, options and ``batch_size``, from
the same weights (and, for bit-equal logits, on the same backend).

Layer: objectives (GRPO's home), below evaluation, which reuses it for the
greedy answers of `gmt-mlx eval --reward`; of the package it needs only
loss.py's `completion_logps` (the same log-probs the GRPO loss takes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from gmt_mlx.config import GrpoOptions
from gmt_mlx.objectives.grpo.loss import completion_logps


@dataclass
class Rollouts:
    """B = len(prompts) x group_size sampled completions, a prompt's group on consecutive rows.

    ``prompt_ids[b]`` is row b's prompt (unpadded, as given), ``completion_ids[b]``
    the tokens sampled after it, the stop token included when there was one;
    ``truncated[b]`` is True when the row hit max_completion_length without a
    stop token. ``key`` is the key the batch was sampled with, ``next_key`` the
    key after it.
    """

    prompt_ids: List[List[int]]
    completion_ids: List[List[int]]
    truncated: List[bool]
    group_size: int
    key: mx.array
    next_key: mx.array

    def __len__(self) -> int:
        return len(self.completion_ids)

    @property
    def completion_lengths(self) -> List[int]:
        return [len(c) for c in self.completion_ids]

    def completion_mask(self) -> mx.array:
        """(B, T) float32, 1 on completion tokens and 0 on padding; T is the longest completion."""
        lengths = np.array(self.completion_lengths)
        width = max(int(lengths.max(initial=0)), 1)
        return mx.array((np.arange(width)[None, :] < lengths[:, None]).astype(np.float32))

    def padded_tokens(self, pad_id: int) -> Tuple[mx.array, mx.array]:
        """((B, L) int32 prompt + completion rows, right-padded with ``pad_id``; (B,) prompt lengths).

        Right padding changes nothing a causal model computes for the real
        tokens (padding only comes after them), and every row starts at position 0.
        """
        rows = [p + c for p, c in zip(self.prompt_ids, self.completion_ids)]
        width = max(len(r) for r in rows)
        tokens = np.full((len(rows), width), pad_id, dtype=np.int32)
        for b, row in enumerate(rows):
            tokens[b, : len(row)] = row
        return mx.array(tokens), mx.array([len(p) for p in self.prompt_ids], dtype=mx.int32)


def completion_text(tokenizer, ids: List[int], stops: List[int]) -> str:
    """A completion's text for the rewards: its ids decoded without the stop token that ended it."""
    if ids and ids[-1] in stops:
        ids = ids[:-1]
    return tokenizer.decode(ids)


def key_state(key: mx.array) -> List[int]:
    """A key as plain integers, for a JSON checkpoint."""
    return [int(v) for v in np.array(key, dtype=np.uint32)]


def key_from_state(state: Sequence[int]) -> mx.array:
    """The key `key_state` wrote."""
    return mx.array(np.array(state, dtype=np.uint32))


@mx.compile
def _draw(logprobs: mx.array, key: mx.array, inv_temp: mx.array) -> Tuple[mx.array, mx.array]:
    """(tokens, next key): the global state's own step (split, draw with the second half), in one compiled call."""
    key, draw_key = mx.random.split(key)
    return mx.random.categorical(logprobs * inv_temp, key=draw_key), key


class KeyedSampler:
    """mlx-lm's temperature / top-p sampler (make_sampler(temp, top_p)), drawing from an explicit key.

    A sampler in mlx-lm's sense: (B, V) log-probabilities in, (B,) tokens out.
    mlx-lm's own draws from the global ``mx.random`` state, which anything
    else may advance; this one splits ``self.key`` once per call instead, so
    the draws are the key's alone. Temperature 0 is greedy and uses no key.
    """

    def __init__(self, key: mx.array, temperature: float, top_p: float = GrpoOptions.top_p):
        self.key = key
        self.temperature = temperature
        self.top_p = top_p
        self._inv_temp = mx.array(1.0 / temperature if temperature > 0 else 1.0, dtype=mx.float32)

    def __call__(self, logprobs: mx.array) -> mx.array:
        if self.temperature == 0:
            return mx.argmax(logprobs, axis=-1)
        from mlx_lm.sample_utils import apply_top_p

        if 0 < self.top_p < 1:
            logprobs = apply_top_p(logprobs, self.top_p)
        tokens, self.key = _draw(logprobs, self.key, self._inv_temp)
        return tokens


def stop_token_ids(tokenizer) -> List[int]:
    """The ids that end a completion: mlx-lm's wrapper's ``eos_token_ids`` (EOS and the
    generation config's end-of-turn ids), else a plain tokenizer's ``eos_token_id``."""
    ids = getattr(tokenizer, "eos_token_ids", None)
    if ids is None:
        eos = getattr(tokenizer, "eos_token_id", None)
        ids = [] if eos is None else (eos if isinstance(eos, (list, tuple)) else [eos])
    return sorted(int(i) for i in ids)


def _check_options(prompts_ids, num_generations, temperature, top_p, max_completion_length) -> None:
    if num_generations < 1 or max_completion_length < 1:
        raise ValueError(
            f"num_generations and max_completion_length must be at least 1, "
            f"got {num_generations} and {max_completion_length}"
        )
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature} and {top_p}")
    if not prompts_ids or any(len(p) == 0 for p in prompts_ids):
        raise ValueError("every prompt needs at least one token")


def _generate(generator, prompts: List[List[int]], max_tokens: int):
    """Run ``generator`` to the end: each row's sampled ids (stop token kept) and whether it ran out of length."""
    uids = generator.insert(prompts, [max_tokens] * len(prompts))
    tokens = {uid: [] for uid in uids}
    truncated = {}
    while responses := generator.next_generated():
        for r in responses:
            tokens[r.uid].append(int(r.token))
            if r.finish_reason is not None:
                truncated[r.uid] = r.finish_reason == "length"
    return [tokens[u] for u in uids], [truncated[u] for u in uids]


def sample_rollouts(
    model: nn.Module,
    tokenizer,
    prompts_ids: Sequence[Sequence[int]],
    *,
    num_generations: int,
    temperature: float = GrpoOptions.temperature,
    top_p: float = GrpoOptions.top_p,
    max_completion_length: int = 256,
    key: mx.array | int = 0,
    stop_ids: Optional[Iterable[int]] = None,
    batch_size: Optional[int] = None,
) -> Rollouts:
    """``num_generations`` completions of each prompt (token ids, e.g. `encoding.chat_ids` with the
    generation prompt), sampled at ``temperature`` / ``top_p`` for at most ``max_completion_length`` tokens.

    A completion ends at its first token in ``stop_ids`` (default: the
    tokenizer's EOS / end-of-turn ids, `stop_token_ids`), which it keeps.
    ``key`` is an MLX key or an int seed (``mx.random.key(seed)``); the same
    key, model and inputs give the same ids. ``batch_size`` rows decode at
    once (default: all of them). The model is put in eval mode while sampling
    and given back in the mode it was in.
    """
    from mlx_lm.generate import BatchGenerator

    _check_options(prompts_ids, num_generations, temperature, top_p, max_completion_length)
    start = mx.random.key(key) if isinstance(key, int) else key
    rows = [[int(t) for t in p] for p in prompts_ids for _ in range(num_generations)]
    stops = stop_token_ids(tokenizer) if stop_ids is None else sorted(int(i) for i in stop_ids)
    sampler = KeyedSampler(start, temperature, top_p)
    size = len(rows) if batch_size is None else batch_size
    generator = BatchGenerator(
        model,
        max_tokens=max_completion_length,
        stop_tokens=[[t] for t in stops],
        sampler=sampler,
        completion_batch_size=size,
        prefill_batch_size=size,
    )
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        completions, truncated = _generate(generator, rows, max_completion_length)
    finally:
        generator.close()
        model.train(was_training)
    mx.eval(sampler.key)
    return Rollouts(rows, completions, truncated, num_generations, start, sampler.key)


def rollout_logps(
    model: nn.Module, rollouts: Rollouts, pad_id: int, temperature: float = GrpoOptions.temperature
) -> mx.array:
    """(B, T) float32 log-probabilities of each completion token given its prompt and the completion
    before it, at ``temperature``; 0 past a row's end (`Rollouts.completion_mask` says where).

    One forward over the right-padded prompt + completion rows (`Rollouts.padded_tokens`):
    the distribution the tokens were sampled from at that temperature, before top-p (as TRL scores them).
    Differentiable in the model's parameters, so a loss can call it.
    """
    tokens, prompt_lengths = rollouts.padded_tokens(pad_id)
    mask = rollouts.completion_mask()
    return completion_logps(model, tokens, prompt_lengths, mask.shape[1], temperature) * mask
