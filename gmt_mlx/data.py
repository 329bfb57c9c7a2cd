"""Datasets, chat templates, prompt masking and length-grouped batches.

Data lives in JSONL files, one example per line, in the three formats that
`mlx_lm.lora` users know:

- chat:        {"messages": [{"role": "user", "content": ...}, ...]}
- completions: {"prompt": ..., "completion": ...}
- text:        {"text": ...}
- preference:  {"prompt": ..., "chosen": ..., "rejected": ...}  (TRL's conventions;
               --train-mode dpo / orpo; strings, or message lists; optional "system")

A data folder holds `train.jsonl` (required), `valid.jsonl` and `test.jsonl`
(optional). Every problem with a file becomes a one-line `UserError` that
names the file and the 1-based line.

Batching owns what mlx-lm gets wrong: batches are grouped by length inside
random windows (so padding is small but the order is still random), the
order is a pure function of (seed, epoch), and resuming at step k skips the
first k batches without building them.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from gmt_mlx.errors import UserError

FORMATS = ("chat", "completions", "text", "preference")
ASSISTANT_TURNS = ("final", "all")  # which assistant turns of a chat are targets under mask_prompt
SPLITS = ("train", "valid", "test")
_KNOWN = "messages | prompt+completion | text | prompt+chosen+rejected"


# --------------------------------------------------------------------------
# Reading and validating JSONL
# --------------------------------------------------------------------------


def _check_messages(messages: object, where: str) -> None:
    """Raise a UserError unless `messages` is a usable chat transcript."""
    if not isinstance(messages, list) or not messages:
        got = "an empty list" if isinstance(messages, list) else type(messages).__name__
        raise UserError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects, got {got}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise UserError(f"{where}: messages[{i}] must be an object with 'role' and 'content', got {type(message).__name__}")
        if not isinstance(message.get("role"), str):
            raise UserError(f"{where}: messages[{i}] has no string 'role'")
        content = message.get("content")
        # Tool-call turns may carry no content; list content is the HF "parts" form the template renders.
        if content is None and "tool_calls" in message:
            continue
        if not isinstance(content, (str, list)):
            got = "missing" if "content" not in message else type(content).__name__
            raise UserError(f"{where}: messages[{i}] 'content' must be a string, got {got}")


def _answer_text(answer: object) -> str:
    """The text of an answer (a string, or the contents of a message list), to tell empty and equal ones."""
    if isinstance(answer, str):
        return answer
    return "\n".join(m["content"] for m in answer if isinstance(m.get("content"), str))


def _check_preference(example: dict, where: str) -> None:
    """Raise a UserError unless `example` is a usable prompt/chosen/rejected row."""
    for key in ("prompt", "chosen", "rejected"):
        if key not in example:
            raise UserError(f"{where}: has {' and '.join(repr(k) for k in ('chosen', 'rejected') if k in example)} "
                            f"but no '{key}' (the preference format needs prompt, chosen and rejected)")
    prompt = example["prompt"]
    if isinstance(prompt, list):
        _check_messages(prompt, f"{where}: 'prompt'")
    elif not isinstance(prompt, str):
        raise UserError(f"{where}: 'prompt' must be a string or a list of messages, got {type(prompt).__name__}")
    for key in ("chosen", "rejected"):
        answer = example[key]
        if isinstance(answer, list):
            _check_messages(answer, f"{where}: '{key}'")
        elif not isinstance(answer, str):
            raise UserError(f"{where}: '{key}' must be a string or a list of messages, got {type(answer).__name__}")
        if not _answer_text(answer).strip():
            raise UserError(f"{where}: '{key}' is empty (a preference pair needs two answers)")
    if _answer_text(example["chosen"]) == _answer_text(example["rejected"]):
        raise UserError(f"{where}: 'chosen' and 'rejected' are the same answer (nothing to prefer)")
    if "system" in example and not isinstance(example["system"], str):
        raise UserError(f"{where}: 'system' must be a string, got {type(example['system']).__name__}")


def detect_format(example: dict, where: str) -> str:
    """Return 'chat', 'completions', 'text' or 'preference' for one example, or raise UserError naming `where`.

    `where` is the location used in messages, normally "file:line".
    """
    if not isinstance(example, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(example).__name__}")
    if "chosen" in example or "rejected" in example:
        _check_preference(example, where)
        return "preference"
    if "messages" in example:
        _check_messages(example["messages"], where)
        return "chat"
    if "prompt" in example or "completion" in example:
        for key in ("prompt", "completion"):
            if key not in example:
                other = "completion" if key == "prompt" else "prompt"
                raise UserError(f"{where}: has '{other}' but no '{key}' (completions format needs both)")
            if not isinstance(example[key], str):
                raise UserError(f"{where}: '{key}' must be a string, got {type(example[key]).__name__}")
        return "completions"
    if "text" in example:
        if not isinstance(example["text"], str):
            raise UserError(f"{where}: 'text' must be a string, got {type(example['text']).__name__}")
        return "text"
    # repr() for odd keys keeps the message one printable line (newlines, lone surrogates).
    keys = ", ".join(k if k.isprintable() else repr(k) for k in sorted(example)) or "none"
    raise UserError(f"{where}: line has none of the known formats ({_KNOWN}); keys found: {keys}")


def _parse_line(line: str, where: str) -> object:
    """json.loads, with every way it can fail turned into a UserError naming `where`."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise UserError(f"{where}: invalid JSON ({err.msg}, column {err.colno})") from None
    except RecursionError:
        # Python's parser recurses per nesting level (~1000 levels max).
        raise UserError(f"{where}: invalid JSON (nested too deeply)") from None
    except ValueError as err:
        # Python 3.11+ refuses integer literals over 4,300 digits (sys.int_max_str_digits).
        if "digits" in str(err):
            raise UserError(f"{where}: invalid JSON (an integer literal of more than "
                            f"{sys.get_int_max_str_digits()} digits)") from None
        raise UserError(f"{where}: invalid JSON ({str(err).splitlines()[0][:120]})") from None


def read_jsonl(path: Path) -> list[dict]:
    """Read a JSONL file of examples, validating every line; blank lines are skipped.

    Lines end at \n (or \r\n) only: U+2028, U+2029 and U+0085 are valid inside
    JSON strings. A leading UTF-8 byte-order mark is skipped. Raises UserError
    ("file:line: ...") for invalid JSON, a line that is not an object, an unknown
    format, or a format that differs from the file's first example; and
    ("file: no examples") for a file without any.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not a JSONL file")
    try:
        raw = path.read_bytes()
        # Editors on Windows write a BOM; it is not part of the first line's JSON.
        text = raw[len(codecs.BOM_UTF8):].decode("utf-8") if raw.startswith(codecs.BOM_UTF8) else raw.decode("utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise UserError(f"{path}:{line}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror})") from None

    rows: list[dict] = []
    first: tuple[str, int] | None = None  # (format, line) of the first example
    # Not str.splitlines(): it also splits at U+2028/U+2029/U+0085 and other controls.
    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        row = _parse_line(line, where)
        fmt = detect_format(row, where)
        if first is None:
            first = (fmt, lineno)
        elif fmt != first[0]:
            # One file, one format: mixing usually means a broken export, and the
            # prompt-masking rules differ per format.
            raise UserError(
                f"{where}: format is {fmt} but the file started as {first[0]} (line {first[1]}); "
                "one file must use one format"
            )
        rows.append(row)
    if not rows:
        raise UserError(f"{path}: no examples")
    return rows


def load_splits(data: str | Path, columns: str | None = None, *, data_config: str | None = None,
                data_splits: str | None = None) -> dict[str, list[dict]]:
    """Load a data folder (train.jsonl required; valid/test.jsonl optional) or one JSONL file.

    Returns {split: rows} for the splits present; a single file becomes {"train": rows}.
    Parquet/CSV/JSON files, save_to_disk folders, Hub dataset ids, and any data with
    ``columns``/``data_config``/``data_splits`` go to sources.load_source (the `datasets` extra).
    """
    from . import sources

    if sources.wants_datasets(str(data), columns, data_config, data_splits):
        return sources.load_source(str(data), columns, data_config, data_splits)
    path = Path(data).expanduser()
    if not path.exists():
        raise UserError(f"{path}: no such file or folder (expected a folder with train.jsonl, or a .jsonl file)")
    if path.is_file():
        return {"train": read_jsonl(path)}
    if (path / "train.jsonl").is_dir():
        raise UserError(f"{path / 'train.jsonl'}: is a directory, not a JSONL file")
    if not (path / "train.jsonl").is_file():
        raise UserError(f"{path}: no train.jsonl (a data folder needs train.jsonl; valid.jsonl and test.jsonl are optional)")
    return {name: read_jsonl(path / f"{name}.jsonl") for name in SPLITS if (path / f"{name}.jsonl").is_file()}


# --------------------------------------------------------------------------
# Tokenizing
# --------------------------------------------------------------------------


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


def _encode_chat(messages: list, tokenizer, mask_prompt: bool, tools=None, assistant_turns: str = "final") -> Example:
    if not has_chat_template(tokenizer):
        raise UserError("chat examples (messages) need a chat template and this model's tokenizer has none; "
                        "use the prompt/completion or text format")
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
        raise UserError("preference rows with message lists need a chat template and this model's tokenizer has "
                        "none; use strings")
    head = _encode_plain(tokenizer, (system + "\n" if system else "") + prompt, first=True)
    tokens = head + _encode_plain(tokenizer, answer, first=False)
    if tokenizer.eos_token_id is not None:
        tokens.append(tokenizer.eos_token_id)
    return Example.after(tokens, len(head))


def encode_pair(example: dict, tokenizer) -> Pair:
    """Tokenize a preference row: the prompt (as a user turn when there is a chat template) with each answer."""
    detect_format(example, "example")
    system = example.get("system")
    return Pair(_encode_answer(tokenizer, example["prompt"], example["chosen"], system),
                _encode_answer(tokenizer, example["prompt"], example["rejected"], system))


def _encode_plain(tokenizer, text: str, *, first: bool) -> list[int]:
    # Only the first piece gets special tokens, so an automatic BOS appears once.
    if first:
        return list(tokenizer.encode(text))
    return list(tokenizer.encode(text, add_special_tokens=False))


def encode_example(example: dict, tokenizer, *, mask_prompt: bool, assistant_turns: str = "final") -> Example:
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


def tokenize_split(rows: list[dict], tokenizer, *, mask_prompt: bool, max_seq_length: int, name: str,
                   assistant_turns: str = "final", preference: bool = False) -> TokenizedSplit:
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
                if not (isinstance(row, dict) and ("chosen" in row or "rejected" in row)):
                    fmt = detect_format(row, f"example {i}")
                    raise UserError(f"example {i}: is in the {fmt} format; --train-mode dpo and orpo need "
                                    "prompt/chosen/rejected rows")
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


# --------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------


def _check_batch_size(n: int, batch_size: int, name: str = "train") -> None:
    # Without a split's name the lengths are a training epoch's (batch_order, length_buckets).
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if n < batch_size:
        examples = "example" if n == 1 else "examples"
        raise UserError(f"{name} split has {n} {examples} but --batch-size is {batch_size}; "
                        "lower --batch-size or add examples")


def batch_order(lengths: list[int], batch_size: int, *, seed: int, epoch: int, group_size: int = 64) -> list[list[int]]:
    """One epoch of batches (lists of example indices), grouped by length yet random.

    A permutation seeded by (seed, epoch) is cut into windows of
    batch_size * group_size examples; each window is sorted by length and
    chunked into batches, and the batch order is shuffled. group_size=1 gives
    plain random batches. The n % batch_size leftover examples sit out this
    epoch. Pure and deterministic in its arguments.
    """
    _check_batch_size(len(lengths), batch_size)
    if group_size < 1:
        raise UserError(f"group_size must be at least 1, got {group_size}")
    rng = np.random.default_rng((seed, epoch))
    perm = rng.permutation(len(lengths))
    # Drop the leftover from the random permutation, not after sorting: otherwise
    # the longest examples of the last window would sit out every epoch.
    perm = perm[: len(perm) - len(perm) % batch_size]
    lens = np.asarray(lengths, dtype=np.int64)
    window = batch_size * group_size
    batches: list[list[int]] = []
    for start in range(0, len(perm), window):
        chunk = perm[start : start + window]
        chunk = chunk[np.argsort(lens[chunk], kind="stable")]
        batches.extend(chunk[i : i + batch_size].tolist() for i in range(0, len(chunk), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def drawn_indices(lengths: list[int], batch_size: int, *, seed: int, steps: int, group_size: int = 64) -> list[int]:
    """The examples that steps 1..``steps`` of `iterate_batches` draw (sorted): what a short run
    needs per-example data for (DPO's reference log-probabilities), and nothing else."""
    steps_per_epoch = len(lengths) // batch_size
    drawn: set[int] = set()
    for epoch in range(-(-steps // steps_per_epoch)):
        order = batch_order(lengths, batch_size, seed=seed, epoch=epoch, group_size=group_size)
        for indices in order[: steps - epoch * steps_per_epoch]:
            drawn.update(indices)
        if len(drawn) == len(lengths):
            break
    return sorted(drawn)


def _padded_length(longest: int, pad_multiple: int, max_seq_length: int | None) -> int:
    # Rounding up bounds the number of distinct shapes mx.compile sees; the cap keeps
    # L within max_seq_length when that is not itself a multiple.
    if pad_multiple < 1:
        raise UserError(f"pad_multiple must be at least 1, got {pad_multiple}")
    length = -(-longest // pad_multiple) * pad_multiple
    if max_seq_length is not None:
        length = min(length, max(max_seq_length, longest))
    return length


def length_buckets(
    lengths: list[int], batch_size: int, *, seed: int, max_buckets: int = 16, group_size: int = 64, epochs: int = 4
) -> list[int]:
    """At most `max_buckets` padded widths that minimise the padding of our batches.

    Rounding every batch up to a multiple of 8 bounds the compiled shapes but
    wastes ~4 positions per row, 7-20% of the short examples we ship. Instead,
    take the longest example of each batch that `batch_order` makes over
    `epochs` epochs, and choose the widths (from those lengths, the longest
    example always included, so every batch of every epoch fits) that minimise
    the total padded width: an optimal 1-D segmentation, by dynamic
    programming. A dataset with at most `max_buckets` distinct batch maxima
    gets exactly those; the number of compiled step shapes is at most
    `max_buckets` whatever the length spread. Pure and deterministic.
    """
    _check_batch_size(len(lengths), batch_size)
    if max_buckets < 1:
        raise UserError(f"max_buckets must be at least 1, got {max_buckets}")
    longest = [max(lengths[i] for i in b) for e in range(epochs)
               for b in batch_order(lengths, batch_size, seed=seed, epoch=e, group_size=group_size)]
    values, counts = np.unique(np.array(longest + [max(lengths)], dtype=np.int64), return_counts=True)
    counts[-1] -= 1  # max(lengths) was added to be a bucket, not as a batch
    if len(values) <= max_buckets:
        return values.tolist()
    # cost[j]: least total width of the batches with maxima values[:j+1] when a
    # bucket ends at values[j]; cost_k[j] = min_i cost_{k-1}[i] + values[j] * (C[j] - C[i]).
    cum = np.cumsum(counts).astype(np.float64)
    width = values.astype(np.float64)
    cost = width * cum
    parents = []
    upper = np.triu(np.ones((len(values), len(values)), dtype=bool), k=1)  # i < j
    for _ in range(max_buckets - 1):
        candidates = np.where(upper, cost[:, None] - cum[:, None] * width[None, :], np.inf)
        best = candidates.argmin(axis=0)
        new = candidates[best, np.arange(len(values))] + width * cum
        improved = new < cost
        parents.append(np.where(improved, best, -1))
        cost = np.where(improved, new, cost)
    # Walk back from the last value: each level's parent is the previous bucket's end.
    buckets, j = [int(values[-1])], len(values) - 1
    for parent in reversed(parents):
        if parent[j] >= 0:
            j = int(parent[j])
            buckets.append(int(values[j]))
    return sorted(buckets)


def _batch_width(longest: int, pad_multiple: int, max_seq_length: int | None, buckets: list[int] | None) -> int:
    """Padded width of a batch whose longest example has `longest` tokens.

    With `buckets`: the smallest bucket that holds it (a batch longer than every
    bucket, from buckets made for another split, keeps its own length); else
    `longest` rounded up to `pad_multiple`.
    """
    if buckets:
        return next((width for width in buckets if width >= longest), longest)
    return _padded_length(longest, pad_multiple, max_seq_length)


def make_batch(
    split: TokenizedSplit, indices: list[int], *, pad_id: int, pad_multiple: int = 32, buckets: list[int] | None = None
) -> tuple[mx.array, mx.array]:
    """Pad the examples at `indices` into (tokens int32 (B, L), mask float32 (B, L)).

    L is the longest example rounded up to pad_multiple (capped at the split's
    max_seq_length), or, given `buckets` (see `length_buckets`), the smallest
    bucket that holds it. mask[b, t] = 1 iff token t is a loss target, i.e.
    inside one of the example's spans and t >= 1: it is predicted from position t-1.

    A preference split's batch has 2B rows, the B chosen answers then the B
    rejected ones, and a third array when the split has its reference
    log-probabilities: (2B,) float32 in the same row order.
    """
    chosen = [split.examples[i] for i in indices]
    if chosen and isinstance(chosen[0], Pair):
        chosen = [p.chosen for p in chosen] + [p.rejected for p in chosen]
    length = _batch_width(max(len(e.tokens) for e in chosen), pad_multiple, split.max_seq_length, buckets)
    tokens = np.full((len(chosen), length), pad_id, dtype=np.int32)
    mask = np.zeros((len(chosen), length), dtype=np.float32)
    for row, example in enumerate(chosen):
        n = len(example.tokens)
        tokens[row, :n] = example.tokens
        for start, end in example.target_positions():
            mask[row, start:end] = 1.0
    if split.reference is not None:
        reference = split.reference[np.asarray(indices, dtype=np.int64)]
        return mx.array(tokens), mx.array(mask), mx.array(np.concatenate([reference[:, 0], reference[:, 1]]).astype(np.float32))
    return mx.array(tokens), mx.array(mask)


def iterate_batches(
    split: TokenizedSplit,
    batch_size: int,
    *,
    seed: int,
    pad_id: int,
    start_step: int = 0,
    pad_multiple: int = 32,
    loop: bool = True,
    group_size: int = 64,
    shard: tuple[int, int] = (0, 1),
    buckets: list[int] | None = None,
    micro_batches: int = 1,
) -> Iterator[tuple[int, int, mx.array, mx.array]]:
    """Yield (step, epoch, tokens, mask[, reference]) (see `make_batch`), step counting from start_step.

    With ``micro_batches`` k > 1 each step's batch (of ``batch_size``
    examples, this rank's share of it when sharded) is yielded as k
    contiguous micro-batches, each padded to its own width: the examples of a
    step do not depend on how it is accumulated (DESIGN.md decision 8).

    Epoch e uses batch_order(seed=seed, epoch=e). With loop=True epochs go on
    forever; with loop=False only epoch 0 is yielded. Resuming at start_step
    gives exactly the batches a fresh iterator yields from that step on,
    without building the skipped ones. Batches are padded as `make_batch`
    does (to `buckets` when given).
    """
    _check_batch_size(len(split.examples), batch_size, split.name)
    if start_step < 0:
        raise UserError(f"start_step must be >= 0, got {start_step}")
    lengths = split.lengths()
    steps_per_epoch = len(split.examples) // batch_size
    step = start_step
    epoch, offset = divmod(start_step, steps_per_epoch)
    while loop or epoch == 0:
        order = batch_order(lengths, batch_size, seed=seed, epoch=epoch, group_size=group_size)
        for indices in order[offset:]:
            if shard[1] > 1:
                # Data-parallel: this rank's contiguous slice of the (length-sorted) global batch.
                per = len(indices) // shard[1]
                indices = indices[shard[0] * per : (shard[0] + 1) * per]
            per = len(indices) // micro_batches
            for part in range(micro_batches):
                batch = make_batch(split, indices[part * per : (part + 1) * per], pad_id=pad_id,
                                   pad_multiple=pad_multiple, buckets=buckets)
                yield (step, epoch, *batch)
            step += 1
        epoch, offset = epoch + 1, 0


def padding_waste(
    split: TokenizedSplit, batch_size: int, *, seed: int, pad_multiple: int = 32, group_size: int = 64,
    buckets: list[int] | None = None,
) -> float:
    """Fraction of padded positions over epoch 0 of iterate_batches (from lengths only).

    Compare with group_size=1 (plain random batches) to see what grouping saves.
    """
    _check_batch_size(len(split.examples), batch_size, split.name)
    lengths = split.lengths()
    padded = real = 0
    for indices in batch_order(lengths, batch_size, seed=seed, epoch=0, group_size=group_size):
        batch_lengths = [lengths[i] for i in indices]
        padded += len(indices) * _batch_width(max(batch_lengths), pad_multiple, split.max_seq_length, buckets)
        real += sum(batch_lengths)
    return 1.0 - real / padded


def token_stats(split: TokenizedSplit) -> dict:
    """Counts to print at start-up: examples, tokens, target tokens, max/mean length, truncated, dropped."""
    lengths = split.lengths()
    return {
        "name": split.name,
        "count": len(lengths),
        "total_tokens": sum(lengths),
        "target_tokens": split.num_target_tokens(),
        "max_length": max(lengths, default=0),
        "mean_length": sum(lengths) / len(lengths) if lengths else 0.0,
        "truncated": split.truncated,
        "dropped": split.dropped,
    }


def pad_id(tokenizer) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its EOS."""
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else int(tokenizer.eos_token_id)
