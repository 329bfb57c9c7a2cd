"""Tests for gmt_mlx.data: reading, formats, prompt masking, truncation, batching."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from gmt_mlx.data.batching import batch_order, iterate_batches, make_batch, padding_waste, token_stats
from gmt_mlx.data.encoding import Example, TokenizedSplit, encode_example, tokenize_split
from gmt_mlx.data.formats import FORMATS, detect_format, read_jsonl
from gmt_mlx.data.sources import load_splits
from gmt_mlx.errors import UserError
from gmt_mlx.models.tiny import make_tiny_tokenizer

EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "data"

CHAT = {
    "messages": [
        {"role": "system", "content": "You are a calculator."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "2 + 3 = 5."},
        {"role": "user", "content": "And 4 + 4?"},
        {"role": "assistant", "content": "4 + 4 = 8."},
    ]
}
COMPLETION = {"prompt": "What is 12 plus 7?", "completion": "The answer is 19."}
TEXT = {"text": "The quick brown fox jumps over the lazy dog."}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(make_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def plain_tokenizer(tmp_path_factory):
    """The same tokenizer without a chat template (completions fall back to plain encoding)."""
    from mlx_lm.utils import load_tokenizer

    path = make_tiny_tokenizer(tmp_path_factory.mktemp("plain"))
    config = json.loads((path / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return load_tokenizer(path)


def write_lines(path: Path, lines: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path


def targets_text(tokenizer, example: Example) -> str:
    return tokenizer.decode(example.tokens[max(example.prompt_len, 1) :])


def synthetic_split(lengths: list[int], prompt_lens: list[int] | None = None, name: str = "train") -> TokenizedSplit:
    prompt_lens = prompt_lens or [0] * len(lengths)
    examples = [Example.after(list(range(1, n + 1)), p) for n, p in zip(lengths, prompt_lens)]
    return TokenizedSplit(examples, truncated=0, name=name)


# ---------------------------------------------------------------- formats


def test_detect_format_each_kind():
    assert detect_format(CHAT, "x:1") == "chat"
    assert detect_format(COMPLETION, "x:1") == "completions"
    assert detect_format(TEXT, "x:1") == "text"
    assert detect_format({"prompt": "q", "chosen": "a", "rejected": "b"}, "x:1") == "preference"
    # A prompt with no completion: GRPO's prompt rows, accepted only when asked for (prompts=True).
    assert detect_format({"prompt": "q", "answer": "a"}, "x:1", prompts=True) == "prompts"
    assert detect_format(COMPLETION, "x:1", prompts=True) == "completions"
    with pytest.raises(UserError, match="no 'completion'"):
        detect_format({"prompt": "q", "answer": "a"}, "x:1")
    with pytest.raises(UserError, match="'prompt' must be a string or a list of messages"):
        detect_format({"prompt": 3}, "x:1", prompts=True)
    assert FORMATS == ("chat", "completions", "text", "preference", "prompts")


@pytest.mark.parametrize(
    "row, needle",
    [
        (
            {"foo": 1, "bar": 2},
            "none of the known formats (messages | prompt+completion | text | prompt+chosen+rejected); "
            "keys found: bar, foo",
        ),
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"role": "user"}]}, "'content' must be a string"),
        ({"messages": ["hi"]}, "messages[0] must be an object"),
        ({"prompt": "a"}, "no 'completion'"),
        ({"prompt": "a", "completion": 3}, "'completion' must be a string"),
        ({"text": None}, "'text' must be a string"),
    ],
)
def test_detect_format_errors_name_where(row, needle):
    with pytest.raises(UserError) as err:
        detect_format(row, "data/train.jsonl:3")
    msg = str(err.value)
    assert msg.startswith("data/train.jsonl:3: ") and needle in msg and "\n" not in msg


def test_encode_chat_masks_all_but_final_assistant_turn(tokenizer):
    full = encode_example(CHAT, tokenizer, mask_prompt=False)
    masked = encode_example(CHAT, tokenizer, mask_prompt=True)
    assert full.tokens == masked.tokens and full.prompt_len == 0
    assert full.tokens == tokenizer.apply_chat_template(CHAT["messages"])
    assert targets_text(tokenizer, masked) == "4 + 4 = 8.<|im_end|>\n"
    assert "2 + 3 = 5." in targets_text(tokenizer, full)


def test_encode_completions_with_chat_template(tokenizer):
    ex = encode_example(COMPLETION, tokenizer, mask_prompt=True)
    assert targets_text(tokenizer, ex) == "The answer is 19.<|im_end|>\n"
    assert tokenizer.decode(ex.tokens).startswith("<|im_start|>user\nWhat is 12 plus 7?")
    assert encode_example(COMPLETION, tokenizer, mask_prompt=False).prompt_len == 0


def test_encode_completions_without_chat_template(plain_tokenizer):
    tok = plain_tokenizer
    ex = encode_example(COMPLETION, tok, mask_prompt=True)
    assert ex.tokens[-1] == tok.eos_token_id
    assert ex.prompt_len == len(tok.encode(COMPLETION["prompt"]))
    assert targets_text(tok, ex) == "The answer is 19.<|im_end|>"
    assert "<|im_start|>" not in tok.decode(ex.tokens)


def test_encode_text_appends_eos_once_and_ignores_mask_prompt(tokenizer):
    ex = encode_example(TEXT, tokenizer, mask_prompt=True)
    assert ex.prompt_len == 0 and ex.tokens[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ex.tokens) == TEXT["text"] + "<|im_end|>"
    already = encode_example({"text": "hi<|im_end|>"}, tokenizer, mask_prompt=False)
    assert already.tokens.count(tokenizer.eos_token_id) == 1


class _BosTokenizer:
    """Wraps a tokenizer so that encode() prepends a BOS, like llama's does."""

    BOS = 1

    def __init__(self, inner):
        self.inner, self.eos_token_id, self.chat_template = inner, inner.eos_token_id, None

    def encode(self, text, add_special_tokens=True):
        ids = self.inner.encode(text)
        return [self.BOS, *ids] if add_special_tokens else ids


def test_automatic_bos_is_not_doubled(plain_tokenizer):
    tok = _BosTokenizer(plain_tokenizer)
    ex = encode_example(COMPLETION, tok, mask_prompt=True)
    assert ex.tokens[0] == tok.BOS and ex.tokens.count(tok.BOS) == 1
    assert encode_example(TEXT, tok, mask_prompt=False).tokens.count(tok.BOS) == 1


# ---------------------------------------------------------------- reading files


def test_read_jsonl_skips_blank_lines(tmp_path):
    path = write_lines(tmp_path / "train.jsonl", [TEXT, "", "   ", TEXT])
    assert read_jsonl(path) == [TEXT, TEXT]


def test_malformed_json_names_file_and_line(tmp_path):
    path = write_lines(tmp_path / "data" / "train.jsonl", [TEXT, "", '{"text": "a" "b"}'])
    with pytest.raises(UserError, match=r"train\.jsonl:3: invalid JSON \(Expecting ',' delimiter"):
        read_jsonl(path)


def test_unknown_format_and_non_object_lines(tmp_path):
    path = write_lines(tmp_path / "train.jsonl", [TEXT, {"foo": 1, "bar": 2}])
    with pytest.raises(UserError, match=r"train\.jsonl:2: line has none of the known formats.*keys found: bar, foo"):
        read_jsonl(path)
    path = write_lines(tmp_path / "valid.jsonl", ["[1, 2]"])
    with pytest.raises(UserError, match=r"valid\.jsonl:1: expected a JSON object, got list"):
        read_jsonl(path)


def test_mixed_formats_name_first_offending_line(tmp_path):
    path = write_lines(tmp_path / "train.jsonl", [COMPLETION, COMPLETION, TEXT, CHAT])
    with pytest.raises(
        UserError, match=r"train\.jsonl:3: format is text but the file started as completions \(line 1\)"
    ):
        read_jsonl(path)


def test_empty_file(tmp_path):
    path = write_lines(tmp_path / "train.jsonl", ["", "  "])
    with pytest.raises(UserError, match=r"train\.jsonl: no examples"):
        read_jsonl(path)


def test_load_splits_folder_file_and_errors(tmp_path):
    write_lines(tmp_path / "d" / "train.jsonl", [TEXT])
    write_lines(tmp_path / "d" / "test.jsonl", [TEXT, TEXT])
    assert {k: len(v) for k, v in load_splits(tmp_path / "d").items()} == {"train": 1, "test": 2}
    assert list(load_splits(str(tmp_path / "d" / "test.jsonl"))) == ["train"]
    write_lines(tmp_path / "nofolder" / "valid.jsonl", [TEXT])
    with pytest.raises(UserError, match="no train.jsonl"):
        load_splits(tmp_path / "nofolder")
    with pytest.raises(UserError, match="no such file or folder"):
        load_splits(tmp_path / "missing")


# ---------------------------------------------------------------- tokenize_split


def test_truncation_counts_and_drops_examples_without_targets(tokenizer):
    prompt = "word " * 40
    rows = [
        {"prompt": "hi", "completion": "ok"},  # short: untouched
        {"prompt": "hi", "completion": "long " * 40},  # cut, keeps targets
        {"prompt": prompt, "completion": "ok"},  # cut inside the prompt: no target left
    ]
    split = tokenize_split(rows, tokenizer, mask_prompt=True, max_seq_length=24, name="train")
    assert split.truncated == 2 and split.dropped == 1 and len(split) == 2
    assert max(split.lengths()) == 24
    assert all(e.num_targets > 0 for e in split.examples)
    stats = token_stats(split)
    assert stats["count"] == 2 and stats["max_length"] == 24 and stats["truncated"] == 2
    assert stats["total_tokens"] == sum(split.lengths())
    assert stats["target_tokens"] == split.num_target_tokens() > 0


# ---------------------------------------------------------------- batching


def test_batch_order_deterministic_and_covers_each_index_once():
    lengths = [int(n) for n in np.random.default_rng(1).integers(5, 300, size=203)]
    a = batch_order(lengths, 4, seed=3, epoch=0, group_size=8)
    assert a == batch_order(lengths, 4, seed=3, epoch=0, group_size=8)
    assert a != batch_order(lengths, 4, seed=3, epoch=1, group_size=8)
    assert a != batch_order(lengths, 4, seed=4, epoch=0, group_size=8)
    flat = [i for b in a for i in b]
    assert len(a) == 203 // 4 and all(len(b) == 4 for b in a)
    assert len(flat) == len(set(flat)) == 200


def test_batch_order_small_split():
    # 5 examples, batch 4: one full batch, the leftover sits out.
    assert [len(b) for b in batch_order([3, 4, 5, 6, 7], 4, seed=0, epoch=0)] == [4]
    assert sorted(batch_order([3, 4], 2, seed=0, epoch=0)[0]) == [0, 1]


def test_grouping_cuts_padding_waste():
    rng = np.random.default_rng(0)
    split = synthetic_split([int(n) for n in rng.integers(8, 512, size=1000)])
    grouped = padding_waste(split, 8, seed=0, pad_multiple=8)
    unsorted = padding_waste(split, 8, seed=0, pad_multiple=8, group_size=1)
    assert grouped < 0.5 * unsorted
    assert 0.0 <= grouped < 0.1 < unsorted


def test_padding_waste_matches_make_batch_shapes():
    split = synthetic_split([5, 9, 17, 33, 40, 41, 70, 3])
    padded = real = 0
    for indices in batch_order(split.lengths(), 2, seed=7, epoch=0):
        tokens, _ = make_batch(split, indices, pad_id=0, pad_multiple=16)
        padded += tokens.size
        real += sum(split.lengths()[i] for i in indices)
    assert padding_waste(split, 2, seed=7, pad_multiple=16) == pytest.approx(1 - real / padded)


def test_make_batch_shapes_and_mask():
    split = synthetic_split([5, 40, 3], prompt_lens=[2, 0, 1])
    tokens, mask = make_batch(split, [0, 1, 2], pad_id=-7, pad_multiple=32)
    assert tokens.shape == mask.shape == (3, 64)
    assert str(tokens.dtype) == "mlx.core.int32" and str(mask.dtype) == "mlx.core.float32"
    t, m = np.array(tokens), np.array(mask)
    assert t[0, :5].tolist() == [1, 2, 3, 4, 5] and (t[0, 5:] == -7).all()
    assert m[0].nonzero()[0].tolist() == [2, 3, 4]  # prompt_len 2: tokens 2..4 are targets
    assert m[1].nonzero()[0].tolist() == list(range(1, 40))  # prompt_len 0: all but the first
    assert m[2].nonzero()[0].tolist() == [1, 2]
    assert m.sum() == split.num_target_tokens()
    # A cap at max_seq_length: 40 rounds to 64 but never above the cap (48).
    split.max_seq_length = 48
    assert make_batch(split, [1], pad_id=0, pad_multiple=32)[0].shape == (1, 48)


def test_several_target_spans_mask_truncate_and_count():
    # Every-assistant-turn examples: one span per turn; token 0 is never a target.
    example = Example(list(range(1, 13)), [(0, 3), (5, 8), (10, 12)])
    split = TokenizedSplit([example, example.truncated(7)], truncated=1, name="train")
    _, mask = make_batch(split, [0, 1], pad_id=0, pad_multiple=1)
    m = np.array(mask)
    assert m[0].nonzero()[0].tolist() == [1, 2, 5, 6, 7, 10, 11]
    assert split.examples[1].spans == [(0, 3), (5, 7)] and m[1].nonzero()[0].tolist() == [1, 2, 5, 6]
    assert [e.num_targets for e in split.examples] == [7, 4] and m.sum() == split.num_target_tokens()


def test_iterate_batches_resume_is_exact():
    split = synthetic_split([int(n) for n in np.random.default_rng(2).integers(2, 90, size=23)])
    fresh = iterate_batches(split, 4, seed=5, pad_id=0, pad_multiple=8, group_size=2)
    reference = [next(fresh) for _ in range(17)]  # 5 steps per epoch: crosses 3 epochs
    assert [r[1] for r in reference] == [0] * 5 + [1] * 5 + [2] * 5 + [3] * 2
    for k in (0, 3, 5, 11):
        resumed = iterate_batches(split, 4, seed=5, pad_id=0, pad_multiple=8, group_size=2, start_step=k)
        for want, got in zip(reference[k:], resumed):
            assert got[:2] == want[:2]
            assert np.array_equal(np.array(got[2]), np.array(want[2]))
            assert np.array_equal(np.array(got[3]), np.array(want[3]))
    once = list(iterate_batches(split, 4, seed=5, pad_id=0, loop=False))
    assert [s for s, *_ in once] == [0, 1, 2, 3, 4]


def test_batch_size_larger_than_split():
    split = synthetic_split([4, 5, 6], name="valid")
    with pytest.raises(UserError, match="valid split has 3 examples but --batch-size is 4"):
        next(iterate_batches(split, 4, seed=0, pad_id=0))
    with pytest.raises(UserError, match="3 examples but --batch-size is 8"):
        batch_order(split.lengths(), 8, seed=0, epoch=0)

    one = synthetic_split([4], name="train")
    with pytest.raises(UserError, match="train split has 1 example but --batch-size is 2; lower --batch-size"):
        next(iterate_batches(one, 2, seed=0, pad_id=0))


# ---------------------------------------------------------------- loader regressions (issue 14, fuzzing)


def test_deep_nesting_is_a_user_error(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "ok"}\n{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(UserError, match=r"train.jsonl:2: invalid JSON \(nested too deeply\)"):
        read_jsonl(path)


def test_huge_integer_literal_is_a_user_error(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "ok", "n": ' + "9" * 5000 + "}\n")
    with pytest.raises(
        UserError, match=r"train.jsonl:1: invalid JSON \(an integer literal of more than 4300 digits\)$"
    ):
        read_jsonl(path)


@pytest.mark.parametrize("char", ["\u2028", "\u2029", "\u0085"])
def test_line_separators_inside_strings_are_text(tmp_path, char):
    # str.splitlines() would cut the line at these; JSON allows them raw inside a string.
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"text": f"a{char}b"}, ensure_ascii=False) + "\n" + '{"text": "c"}\n', encoding="utf-8")
    assert char in path.read_text(encoding="utf-8")
    assert [r["text"] for r in read_jsonl(path)] == [f"a{char}b", "c"]


def test_bom_and_crlf_are_accepted(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"text": "a"}\r\n\r\n{"text": "b"}\r\n')
    assert [r["text"] for r in read_jsonl(path)] == ["a", "b"]
    path.write_bytes(b'{"text": "a"}\n{"text": "b",}\r\n')
    with pytest.raises(UserError, match=r"train.jsonl:2: invalid JSON"):
        read_jsonl(path)


def test_odd_keys_keep_the_message_one_printable_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"a\\nb": 1, "\\u0007": 2}\n')
    with pytest.raises(UserError) as err:
        read_jsonl(path)
    message = str(err.value)
    assert "\n" not in message and message.encode("utf-8") and "keys found:" in message
    path.write_text('{"a\\nb": 1, "\\ud800": 2}\n')  # half a surrogate pair, even in a key: said as such
    with pytest.raises(UserError) as err:
        read_jsonl(path)
    message = str(err.value)
    assert "\n" not in message and message.encode("utf-8") and "lone UTF-16 surrogate (\\ud800" in message


# ---------------------------------------------------------------- shipped examples


def _checked_expressions(text: str) -> list[str]:
    """Assert every 'expr = value' / 'value of expr is value' in text is right; return the exprs."""
    found = re.findall(r"([\d+\-* ]+?) (?:=|is) (\d+)\.", text)
    for expr, value in found:
        assert eval(expr) == int(value), text  # noqa: S307 - digits and + - * only
    return [expr.strip() for expr, _ in found]


def test_shipped_example_datasets(tokenizer):
    # The arithmetic examples of make_examples.py; the reasoning-gym task folders
    # (chain_sum/, leg_counting/, ...) are checked by test_every_example_folder_parses.
    files = sorted(f for f in EXAMPLES.glob("*/*.jsonl") if f.parent.name in ("chat", "completions", "text"))
    assert {f.parent.name for f in files} == {"chat", "completions", "text"}
    seen: set[str] = set()
    for folder in sorted({f.parent for f in files}):
        splits = load_splits(folder)
        assert "train" in splits and "valid" in splits
        for name, rows in splits.items():
            for row in rows:
                fmt = detect_format(row, f"{folder.name}/{name}")
                if fmt == "chat":
                    answer = row["messages"][-1]["content"]
                elif fmt == "completions":
                    answer = row["completion"]
                else:
                    answer = row["text"]
                (expr,) = _checked_expressions(answer)
                assert expr not in seen, f"{folder.name}/{name}: '{expr}' appears twice"
                seen.add(expr)
            split = tokenize_split(rows, tokenizer, mask_prompt=True, max_seq_length=256, name=name)
            assert len(split) == len(rows) and split.truncated == 0


def test_every_example_folder_parses():
    """Every shipped data folder (a study's regimes are subfolders) and loose .jsonl file loads, has a
    train split and no test item inside train."""
    folders = sorted(p.parent for p in EXAMPLES.rglob("train.jsonl"))
    assert {p.name for p in folders} >= {"sums", "chat", "large", "small"}
    loose = sorted(p for p in EXAMPLES.rglob("*.jsonl") if p.parent not in folders)
    assert loose, "the forgetting probe examples/data/ceiling/english.jsonl"
    for folder in (p for p in EXAMPLES.rglob("*") if p.is_dir()):  # none without a train split below it
        assert any(f == folder or folder in f.parents for f in folders), folder
    for folder in folders + loose:
        splits = load_splits(folder)
        assert "train" in splits, folder
        if "test" in splits:
            train = {json.dumps(r, sort_keys=True) for r in splits["train"]}
            assert not any(json.dumps(r, sort_keys=True) in train for r in splits["test"]), folder


class _TemplateTokenizer:
    """Chat formatting set per test: an HF template string and/or mlx-lm's own template function."""

    eos_token_id = 2

    def __init__(self, chat_template, own):
        self.chat_template, self._chat_template = chat_template, own

    def encode(self, text, add_special_tokens=True):
        return [3 + len(word) for word in text.split()]

    def apply_chat_template(self, messages, tokenize=True, add_generation_prompt=False, **kwargs):
        ids = []
        for message in messages:
            ids += [10 if message["role"] == "user" else 12, *self.encode(message["content"]), 11]
        return ids + [12] * add_generation_prompt


@pytest.mark.parametrize(
    "template,own,chat",
    [
        (None, None, False),
        ("", None, False),  # an empty template renders nothing: not a chat model
        ("{{ messages }}", None, True),
        (None, lambda *a, **k: "", True),  # mlx-lm's own template (chat_template_type), the HF one None
    ],
)
def test_one_chat_template_rule_for_training_and_generation(template, own, chat):
    from gmt_mlx.data.encoding import has_chat_template
    from gmt_mlx.evaluation.evaluate import prompt_tokens

    tok = _TemplateTokenizer(template, own)
    assert has_chat_template(tok) is chat
    # A model is prompted at generation exactly as its training prompts were encoded.
    example = encode_example(COMPLETION, tok, mask_prompt=True)
    assert prompt_tokens(tok, COMPLETION["prompt"]) == example.tokens[: example.prompt_len]
    assert (example.tokens[0] == 10) is chat
