"""What the loss covers in a conversation: the final assistant turn, every assistant turn, or all.

Real chat templates (tests/fixtures/chat_templates/*.json, each with where it came
from) on the tiny byte-level tokenizer with each model's marker tokens added:
nothing is downloaded. The targets must decode to exactly the assistant contents
plus each turn's end marker (as the template writes it), nothing of the system,
user or tool turns.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gmt_mlx.config import Config
from gmt_mlx.data.batching import make_batch
from gmt_mlx.data.encoding import Example, TokenizedSplit, encode_example, tokenize_split
from gmt_mlx.errors import UserError
from gmt_mlx.models.tiny import make_tiny_tokenizer

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "chat_templates"  # tests/fixtures

# Per template: the tokens the real tokenizer has as added/special tokens, its BOS,
# what closes an assistant turn, and whether it takes a system message.
TEMPLATES = {
    "smollm2": dict(special=["<|im_start|>", "<|im_end|>"], bos=None, end="<|im_end|>\n", system=True),
    "llama3": dict(
        special=["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        bos="<|begin_of_text|>",
        end="<|eot_id|>",
        system=True,
    ),
    "qwen2_5": dict(special=["<|im_start|>", "<|im_end|>"], bos=None, end="<|im_end|>\n", system=True),
    "gemma2": dict(
        special=["<bos>", "<start_of_turn>", "<end_of_turn>"], bos="<bos>", end="<end_of_turn>\n", system=False
    ),
}

REPLIES = ["The answer is 19.", "Bonjour means hello.", "Twelve plus seven is nineteen."]


def conversation(system: bool) -> list[dict]:
    """A 3-turn chat (a system message first when the template takes one)."""
    messages = [{"role": "system", "content": "You are terse."}] if system else []
    for question, reply in zip(["What is 12 plus 7?", "Translate bonjour.", "Say it in words."], REPLIES):
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
    return messages


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory) -> Path:
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tiny-tok")) / "tokenizer.json"


def template_tokenizer(tokenizer_json: Path, name: str):
    """The tiny tokenizer with `name`'s chat template (verbatim from the fixture) and marker tokens."""
    from transformers import PreTrainedTokenizerFast

    spec = TEMPLATES[name]
    template = json.loads((FIXTURES / f"{name}.json").read_text())["chat_template"]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_json),
        chat_template=template,
        eos_token=spec["end"].strip(),
        bos_token=spec["bos"],
        clean_up_tokenization_spaces=False,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": spec["special"]})
    if name == "qwen2_5":
        tokenizer.add_tokens(["<tool_call>", "</tool_call>"])  # added (not special) tokens in Qwen2.5
    return tokenizer


def span_texts(tokenizer, example: Example) -> list[str]:
    return [tokenizer.decode(example.tokens[start:end]) for start, end in example.target_positions()]


def mask_text(tokenizer, example: Example) -> str:
    """The target tokens as make_batch masks them, decoded."""
    _, mask = make_batch(TokenizedSplit([example], 0, "t"), [0], pad_id=0, pad_multiple=1)
    chosen = np.asarray(mask[0]).nonzero()[0]
    return tokenizer.decode([example.tokens[i] for i in chosen])


def todays_final_turn(tokenizer, messages: list[dict]) -> tuple[list[int], int]:
    """gmt-mlx 0.x's --mask-prompt, written out: the common prefix with the generation prompt."""
    tokens = list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
    prompt = list(
        tokenizer.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True, return_dict=True)[
            "input_ids"
        ]
    )
    n = next((i for i, (a, b) in enumerate(zip(prompt, tokens)) if a != b), min(len(prompt), len(tokens)))
    return tokens, n


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_every_assistant_turn_is_exactly_its_content_and_end_marker(tokenizer_json, name):
    tokenizer = template_tokenizer(tokenizer_json, name)
    end = TEMPLATES[name]["end"]
    example = encode_example(
        {"messages": conversation(TEMPLATES[name]["system"])}, tokenizer, mask_prompt=True, assistant_turns="all"
    )
    assert span_texts(tokenizer, example) == [reply + end for reply in REPLIES]
    # The mask make_batch builds holds these tokens and no others (no system/user token).
    assert mask_text(tokenizer, example) == "".join(reply + end for reply in REPLIES)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_final_turn_is_todays_mask_prompt_token_for_token(tokenizer_json, name):
    tokenizer = template_tokenizer(tokenizer_json, name)
    messages = conversation(TEMPLATES[name]["system"])
    example = encode_example({"messages": messages}, tokenizer, mask_prompt=True)  # assistant_turns="final"
    tokens, prompt_len = todays_final_turn(tokenizer, messages)
    assert example.tokens == tokens and example.spans == [(prompt_len, len(tokens))]
    assert mask_text(tokenizer, example) == REPLIES[-1] + TEMPLATES[name]["end"]
    # Without mask_prompt every token but the first is a target, whatever assistant_turns says.
    for turns in ("final", "all"):
        whole = encode_example({"messages": messages}, tokenizer, mask_prompt=False, assistant_turns=turns)
        assert whole.tokens == tokens and whole.num_targets == len(tokens) - 1


@pytest.mark.parametrize("name", ["smollm2", "llama3"])
def test_truncation_keeps_the_spans_that_fit(tokenizer_json, name):
    tokenizer = template_tokenizer(tokenizer_json, name)
    end = TEMPLATES[name]["end"]
    row = {"messages": conversation(True)}
    full = encode_example(row, tokenizer, mask_prompt=True, assistant_turns="all")
    (s0, e0), (s1, e1), _ = full.spans
    cut = s1 + 3  # three tokens into the second reply
    split = tokenize_split([row], tokenizer, mask_prompt=True, assistant_turns="all", max_seq_length=cut, name="train")
    (example,) = split.examples
    assert split.truncated == 1 and len(example.tokens) == cut and example.spans == [(s0, e0), (s1, cut)]
    assert span_texts(tokenizer, example)[0] == REPLIES[0] + end
    assert REPLIES[1].startswith(span_texts(tokenizer, example)[1])
    assert example.num_targets == (e0 - s0) + 3
    # Cut inside the first user turn: no target left, so the example is dropped.
    dropped = tokenize_split(
        [row], tokenizer, mask_prompt=True, assistant_turns="all", max_seq_length=s0 - 1, name="train"
    )
    assert len(dropped) == 0 and dropped.dropped == 1


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]

TOOL_CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
    },
    {"role": "tool", "content": "sunny, 21 C"},
    {"role": "assistant", "content": "Sunny and 21 degrees."},
]


def test_tool_calls_are_targets_and_tool_results_never(tokenizer_json):
    tokenizer = template_tokenizer(tokenizer_json, "qwen2_5")
    row = {"messages": TOOL_CHAT, "tools": TOOLS}
    every = encode_example(row, tokenizer, mask_prompt=True, assistant_turns="all")
    rendered = tokenizer.decode(every.tokens)
    # The template got the tool definitions and wrapped the result as Qwen2.5 does.
    assert '"name": "get_weather", "description": "Weather in a city"' in rendered
    assert "<|im_start|>user\n<tool_response>\nsunny, 21 C\n</tool_response><|im_end|>" in rendered
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
    assert span_texts(tokenizer, every) == [call, "Sunny and 21 degrees.<|im_end|>\n"]
    assert mask_text(tokenizer, every) == call + "Sunny and 21 degrees.<|im_end|>\n"
    final = encode_example(row, tokenizer, mask_prompt=True, assistant_turns="final")
    assert final.tokens == every.tokens and span_texts(tokenizer, final) == ["Sunny and 21 degrees.<|im_end|>\n"]


def test_a_chat_without_assistant_turns_has_no_targets_in_every_turn_mode(tokenizer_json):
    tokenizer = template_tokenizer(tokenizer_json, "smollm2")
    rows = [{"messages": [{"role": "user", "content": "hello"}]}, {"messages": conversation(True)}]
    split = tokenize_split(rows, tokenizer, mask_prompt=True, assistant_turns="all", max_seq_length=512, name="train")
    assert len(split) == 1 and split.dropped == 1
    # A chat that opens with the assistant: SmolLM2 renders its default system prompt before it, so the
    # turn has no exact start and is left out rather than make that preamble a target.
    opening = [
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "Bye."},
    ]
    opens = encode_example({"messages": opening}, tokenizer, mask_prompt=True, assistant_turns="all")
    assert span_texts(tokenizer, opens) == ["Bye.<|im_end|>\n"]


def test_config_assistant_turns_needs_mask_prompt_and_reaches_tokenizing(tokenizer_json):
    from gmt_mlx.objectives import objective_of

    with pytest.raises(UserError, match="--assistant-turns all needs --mask-prompt"):
        Config(data="d", assistant_turns="all").validate()
    with pytest.raises(UserError, match="--assistant-turns must be one of final, all"):
        Config(data="d", mask_prompt=True, assistant_turns="every").validate()
    config = Config(data="d", mask_prompt=True, assistant_turns="all").validate()
    tokenizer = template_tokenizer(tokenizer_json, "smollm2")
    splits = objective_of(config).tokenize(
        config, {"train": [{"messages": conversation(True)}]}, tokenizer, log=lambda s: None
    )
    assert span_texts(tokenizer, splits["train"].examples[0]) == [reply + "<|im_end|>\n" for reply in REPLIES]


def test_eval_loss_covers_what_the_run_trained_on(tiny_model_dir, tmp_path):
    """A run trained on every assistant turn is evaluated on every assistant turn (its config says so)."""
    from gmt_mlx.config import Config
    from gmt_mlx.evaluation.evaluate import EvalOptions, evaluate
    from gmt_mlx.recipes.finetune import finetune
    from tests.helpers import write_jsonl

    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Add {a} and 1."},
                {"role": "assistant", "content": f"{a + 1}."},
                {"role": "user", "content": f"And {a} and 2?"},
                {"role": "assistant", "content": f"{a + 2}."},
            ]
        }
        for a in range(12)
    ]
    write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    write_jsonl(tmp_path / "data" / "test.jsonl", rows[:4])
    out = tmp_path / "run"
    finetune(
        Config(
            model=str(tiny_model_dir),
            data=str(tmp_path / "data"),
            out=str(out),
            iters=1,
            mask_prompt=True,
            assistant_turns="all",
            samples=0,
            steps_per_save=0,
        ),
        log=lambda *_: None,
    )
    every = evaluate(str(out), options=EvalOptions(generate=False))
    final = evaluate(str(out), options=EvalOptions(generate=False, assistant_turns="final"))
    assert every["tokens"] > final["tokens"] > 0  # both replies of each chat, against the last one only
