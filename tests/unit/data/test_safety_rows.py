"""Issue 38's questionable rows: errors at file:line, not silently trained on."""

from __future__ import annotations

import json

import pytest

from gmt_mlx.data.formats import read_jsonl
from gmt_mlx.errors import UserError

CHAT_OK = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
CASES = {
    "chosen-user-turn": (
        {
            "prompt": "q",
            "chosen": [{"role": "user", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}],
        },
        "'chosen' holds a user turn (messages[0]); an answer is the assistant's reply: the question "
        "belongs in 'prompt'",
    ),
    "rejected-system-turn": (
        {"prompt": "q", "chosen": "a", "rejected": [{"role": "system", "content": "b"}]},
        "'rejected' holds a system turn (messages[0])",
    ),
    "empty-preference-prompt": (
        {"prompt": " ", "chosen": "a", "rejected": "b"},
        "'prompt' is empty (the answers are preferred as replies to it)",
    ),
    "empty-preference-answer": ({"prompt": "q", "chosen": "", "rejected": "b"}, "'chosen' is empty"),
    "zero-width-role": (
        {"messages": [{"role": "user\u200b", "content": "q"}, {"role": "assistant", "content": "a"}]},
        r"messages[0] has role 'user\u200b', which holds an invisible character (U+200B); "
        "did you mean 'user'?",
    ),
    "spaced-role": (
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant ", "content": "a"}]},
        "messages[1] has role 'assistant ', which holds spaces around it; did you mean 'assistant'?",
    ),
    "list-content-of-numbers": (
        {"messages": [{"role": "user", "content": [1, 2]}, {"role": "assistant", "content": "a"}]},
        "messages[0] 'content' is a list whose item 0 is int",
    ),
    "text-part-without-text": (
        {"messages": [{"role": "user", "content": [{"type": "text"}]}, {"role": "assistant", "content": "a"}]},
        "messages[0] 'content': item 0 is a text part without a string 'text'",
    ),
}


@pytest.mark.parametrize("name", CASES)
def test_questionable_rows_are_errors_at_file_and_line(tmp_path, name):
    row, message = CASES[name]
    first = CHAT_OK if "messages" in row else {"prompt": "q0", "chosen": "a0", "rejected": "b0"}
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(first) + "\n\n" + json.dumps(row) + "\n")
    with pytest.raises(UserError) as err:
        read_jsonl(path)
    assert str(err.value).startswith(f"{path}:3: {message}"), str(err.value)
    assert "\n" not in str(err.value)


def test_empty_grpo_prompt_is_an_error(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(
        json.dumps({"prompt": "What is 1 + 1?", "answer": "2"})
        + "\n"
        + json.dumps({"prompt": "", "answer": "2"})
        + "\n"
    )
    with pytest.raises(UserError, match=r":2: 'prompt' is empty \(nothing to answer\)$"):
        read_jsonl(path, prompts=True)


def test_the_parts_form_and_tool_turns_still_load(tmp_path):
    """What is right stays accepted: text parts, tool roles, a tool call without content."""
    row = {
        "messages": [
            {"role": "system", "content": "s"},
            {"role": "user", "content": [{"type": "text", "text": "q"}]},
            {"role": "assistant", "content": None, "tool_calls": [{"name": "f"}]},
            {"role": "tool", "content": "1"},
            {"role": "assistant", "content": "a"},
        ]
    }
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(row) + "\n")
    assert read_jsonl(path) == [row]
