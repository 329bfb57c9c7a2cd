"""Encoding: chat templates, prompt masking and tokenized splits.

A row becomes token ids and a target mask (`Example`; a preference row, a
`Pair` of them). Chat rows go through the tokenizer's own template; under
mask_prompt only the assistant's answer is a target.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from gmt_mlx.config import ASSISTANT_TURNS, DataOptions
from gmt_mlx.data.formats import detect_format, is_preference_row
from gmt_mlx.errors import UserError


@dataclass
class Example:
    """One tokenized example and which of its tokens are loss targets.

    `spans` are half-open [start, end) token ranges: a masked prompt is one span
    after it, every assistant turn of a chat is one span per turn. Token 0 is
    never a target, whatever the spans say: nothing predicts it.
    """

    tokens: list[int]
    spans: list[tuple[int, int]]

    @classmethod
    def after(cls, tokens: list[int], prompt_len: int) -> "Example":
        """An example whose targets are every token from `prompt_len` on (0: all of it)."""
        return cls(tokens, [(prompt_len, len(tokens))])

    @property
    def prompt_len(self) -> int:
        """Tokens before the first target (all of them when there is none)."""
        return self.spans[0][0] if self.spans else len(self.tokens)

    def target_positions(self) -> list[tuple[int, int]]:
        """The spans clipped to [1, len(tokens)), empty ones left out."""
        n = len(self.tokens)
        clipped = [(max(start, 1), min(end, n)) for start, end in self.spans]
        return [(start, end) for start, end in clipped if start < end]

    @property
    def num_targets(self) -> int:
        """Tokens that are loss targets."""
        return sum(end - start for start, end in self.target_positions())

    def truncated(self, length: int) -> "Example":
        """The first `length` tokens, with the spans cut to match."""
        spans = [(start, min(end, length)) for start, end in self.spans if start < length]
        return Example(self.tokens[:length], spans)

    @property
    def length(self) -> int:
        return len(self.tokens)


@dataclass
class Pair:
    """A preference pair: the prompt with its chosen answer, and with its rejected one (answers are the targets)."""

    chosen: Example
    rejected: Example

    @property
    def length(self) -> int:
        """The longer of the two: the width a batch needs for this pair."""
        return max(len(self.chosen.tokens), len(self.rejected.tokens))

    @property
    def num_targets(self) -> int:
        return self.chosen.num_targets + self.rejected.num_targets

    def truncated(self, length: int) -> "Pair":
        return Pair(self.chosen.truncated(length), self.rejected.truncated(length))


def has_chat_template(tokenizer) -> bool:
    """Whether ``tokenizer`` formats chats: training and generation both ask this, so that a
    model is prompted the way it was trained."""
    # An empty template renders nothing; mlx-lm's wrapper may hold its own template in
    # `_chat_template` (a function, e.g. for `chat_template_type` models) while the HF one is None.
    return bool(getattr(tokenizer, "chat_template", None)) or getattr(tokenizer, "_chat_template", None) is not None


def chat_ids(tokenizer, messages: list, **kwargs) -> list[int]:
    """Token ids of ``messages`` through the chat template (``kwargs`` go to apply_chat_template)."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    # A bare transformers>=5 tokenizer returns a BatchEncoding; mlx-lm's wrapper a list.
    if isinstance(out, Mapping):
        out = out["input_ids"]
    return [int(t) for t in out]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _assistant_spans(messages: list, tokens: list[int], tokenizer, kwargs: dict) -> list[tuple[int, int]]:
    """The token span of each assistant turn in `tokens` (the whole chat rendered).

    A turn starts where the template's generation prompt after the turns before
    it stops matching (the rule of the final turn, so "final" and "all" agree on
    it), and ends where the chat rendered up to and including it stops matching.
    No template-specific markers: any template works.
    """
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        try:
            prompt = chat_ids(tokenizer, messages[:i], add_generation_prompt=True, **kwargs)
        except Exception:
            if i > 0:
                raise
            continue  # an opening assistant turn, and a template that cannot render an empty chat
        start = _common_prefix(prompt, tokens)
        if i == 0 and start < len(prompt):
            continue  # an opening assistant turn after a preamble (a default system prompt): no exact start
        last = i == len(messages) - 1
        end = len(tokens) if last else _common_prefix(chat_ids(tokenizer, messages[: i + 1], **kwargs), tokens)
        if end > start:
            spans.append((start, end))
    return spans


def _encode_chat(
    messages: list, tokenizer, mask_prompt: bool, tools=None, assistant_turns: str = DataOptions.assistant_turns
) -> Example:
    if not has_chat_template(tokenizer):
        raise UserError(
            "chat examples (messages) need a chat template and this model's tokenizer has none; "
            "use the prompt/completion or text format"
        )
    if assistant_turns not in ASSISTANT_TURNS:
        raise UserError(f"assistant_turns must be one of {', '.join(ASSISTANT_TURNS)}, got {assistant_turns!r}")
    kwargs = {"tools": tools} if tools is not None else {}
    tokens = chat_ids(tokenizer, messages, **kwargs)
    if not mask_prompt:
        return Example.after(tokens, 0)
    if assistant_turns == "all":
        return Example(tokens, _assistant_spans(messages, tokens, tokenizer, kwargs))
    if len(messages) < 2:
        # A lone message has no prompt to mask: train on all of it.
        return Example.after(tokens, 0)
    prompt = chat_ids(tokenizer, messages[:-1], add_generation_prompt=True, **kwargs)
    # Some templates render earlier turns differently once a reply follows (e.g. strip
    # <think> blocks); the common prefix never masks a token of the final reply.
    return Example.after(tokens, _common_prefix(prompt, tokens))


def _encode_answer(tokenizer, prompt: object, answer: object, system: str | None) -> Example:
    """The prompt followed by one answer, the answer's tokens (and end marker) the only targets."""
    if has_chat_template(tokenizer):
        context = [{"role": "system", "content": system}] if system else []
        context += [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        reply = [{"role": "assistant", "content": answer}] if isinstance(answer, str) else list(answer)
        tokens = chat_ids(tokenizer, context + reply)
        return Example.after(tokens, _common_prefix(chat_ids(tokenizer, context, add_generation_prompt=True), tokens))
    if not (isinstance(prompt, str) and isinstance(answer, str)):
        raise UserError(
            "preference rows with message lists need a chat template and this model's tokenizer has none; use strings"
        )
    head = _encode_plain(tokenizer, (system + "\n" if system else "") + prompt, first=True)
    tokens = head + _encode_plain(tokenizer, answer, first=False)
    if tokenizer.eos_token_id is not None:
        tokens.append(tokenizer.eos_token_id)
    return Example.after(tokens, len(head))


def encode_pair(example: dict, tokenizer) -> Pair:
    """Tokenize a preference row: the prompt (as a user turn when there is a chat template) with each answer."""
    detect_format(example, "example")
    system = example.get("system")
    return Pair(
        _encode_answer(tokenizer, example["prompt"], example["chosen"], system),
        _encode_answer(tokenizer, example["prompt"], example["rejected"], system),
    )


def _encode_plain(tokenizer, text: str, *, first: bool) -> list[int]:
    # Only the first piece gets special tokens, so an automatic BOS appears once.
    if first:
        return list(tokenizer.encode(text))
    return list(tokenizer.encode(text, add_special_tokens=False))


def encode_example(
    example: dict, tokenizer, *, mask_prompt: bool, assistant_turns: str = DataOptions.assistant_turns
) -> Example:
    """Tokenize one example; with mask_prompt only the reply (completion / assistant turns) is a target.

    - chat: the tokenizer's chat template; with assistant_turns="final" the
      prompt is the template of all turns but the last, with the generation
      prompt (what mlx-lm does); with "all" every assistant turn (tool calls
      included) is a target and nothing else (TRL's assistant_only_loss).
    - completions: a [user, assistant] chat when the tokenizer has a chat
      template, else encode(prompt) + encode(completion) + eos.
    - text: encode(text) + eos (unless already last); mask_prompt is ignored.
    """
    fmt = detect_format(example, "example")
    if fmt == "preference":
        raise UserError("a preference row (prompt/chosen/rejected) needs --train-mode dpo or orpo")
    if fmt == "chat":
        return _encode_chat(example["messages"], tokenizer, mask_prompt, example.get("tools"), assistant_turns)
    eos = tokenizer.eos_token_id
    if fmt == "completions":
        if has_chat_template(tokenizer):
            messages = [
                {"role": "user", "content": example["prompt"]},
                {"role": "assistant", "content": example["completion"]},
            ]
            return _encode_chat(messages, tokenizer, mask_prompt, example.get("tools"), assistant_turns)
        prompt = _encode_plain(tokenizer, example["prompt"], first=True)
        tokens = prompt + _encode_plain(tokenizer, example["completion"], first=False)
        if eos is not None:
            tokens.append(eos)
        return Example.after(tokens, len(prompt) if mask_prompt else 0)
    tokens = _encode_plain(tokenizer, example["text"], first=True)
    if eos is not None and (not tokens or tokens[-1] != eos):
        tokens.append(eos)
    return Example.after(tokens, 0)


@dataclass
class TokenizedSplit:
    """A tokenized split.

    `truncated` counts examples cut to max_seq_length (the caller warns);
    `dropped` counts examples left without any target token (after truncation,
    or too short to have one) and therefore removed. A preference split holds
    `Pair`s (a pair is dropped when either answer has no target left) and,
    for DPO, `reference`: the step-0 model's summed log-probabilities of each
    pair's (chosen, rejected) answer, shape (n, 2).
    """

    examples: list[Example] | list[Pair]
    truncated: int
    name: str
    dropped: int = 0
    max_seq_length: int | None = None
    reference: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def preference(self) -> bool:
        return bool(self.examples) and isinstance(self.examples[0], Pair)

    def lengths(self) -> list[int]:
        """Token count of each example (of a pair's longer answer)."""
        return [e.length for e in self.examples]

    def fingerprint(self) -> str:
        """A hash of every example's tokens and targets: what the reference log-probabilities are valid for."""
        digest = hashlib.sha256()
        for example in self.examples:
            for part in (example.chosen, example.rejected) if isinstance(example, Pair) else (example,):
                digest.update(np.asarray(part.tokens, dtype=np.int64).tobytes())
                digest.update(np.asarray(part.target_positions(), dtype=np.int64).tobytes())
                digest.update(b"|")
        return digest.hexdigest()

    def num_target_tokens(self, indices: list[int] | None = None) -> int:
        """Loss-target tokens in the whole split, or in the examples at `indices`."""
        chosen = self.examples if indices is None else [self.examples[i] for i in indices]
        return sum(e.num_targets for e in chosen)


def tokenize_split(
    rows: list[dict],
    tokenizer,
    *,
    mask_prompt: bool,
    max_seq_length: int,
    name: str,
    assistant_turns: str = DataOptions.assistant_turns,
    preference: bool = False,
) -> TokenizedSplit:
    """Tokenize rows, cutting each to max_seq_length tokens (see `encode_example` for the targets).

    A cut example is counted in `truncated`; it is kept only if it still has at
    least one target token (otherwise it is counted in `dropped` too). With
    ``preference`` the rows must be prompt/chosen/rejected pairs (`encode_pair`)
    and every other format is refused; without it, pairs are.
    """
    if max_seq_length < 2:
        # One token has nothing to predict it from.
        raise UserError(f"max_seq_length must be at least 2, got {max_seq_length}")
    examples: list[Example] = []
    truncated = dropped = 0
    for i, row in enumerate(rows, start=1):
        try:
            if preference:
                if not is_preference_row(row):
                    fmt = detect_format(row, f"example {i}")
                    raise UserError(
                        f"example {i}: is in the {fmt} format; --train-mode dpo and orpo need "
                        "prompt/chosen/rejected rows"
                    )
                example = encode_pair(row, tokenizer)
            else:
                example = encode_example(row, tokenizer, mask_prompt=mask_prompt, assistant_turns=assistant_turns)
        except UserError as err:
            raise UserError(f"{name} split: {err}") from None
        except Exception as err:  # a chat template that rejects these messages, say
            msg = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise UserError(f"{name} split, example {i}: could not tokenize ({msg})") from err
        if example.length > max_seq_length:
            example = example.truncated(max_seq_length)
            truncated += 1
        parts = (example.chosen, example.rejected) if preference else (example,)
        if any(part.num_targets == 0 for part in parts):
            dropped += 1
            continue
        examples.append(example)
    return TokenizedSplit(examples, truncated, name, dropped=dropped, max_seq_length=max_seq_length)
