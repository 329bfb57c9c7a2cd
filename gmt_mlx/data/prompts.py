"""What a data row asks the model, as text and as token ids, and how a split is named in messages.

Shared by evaluation (greedy answers to the prompts, scorers and rewards)
and the recipes (the sample answers, GRPO's prompts).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

from gmt_mlx.data.encoding import chat_ids, has_chat_template


def prompt_of(row: dict) -> Optional[object]:
    """The prompt part of a data row (chat messages before the last, all of them when the last is the
    user's, or the prompt)."""
    messages = row.get("messages")
    if (
        isinstance(messages, list)
        and messages
        and isinstance(messages[-1], dict)
        and messages[-1].get("role") != "assistant"
    ):
        return messages
    if "messages" in row and len(row["messages"]) > 1:
        return row["messages"][:-1]
    if "prompt" in row:
        return row["prompt"]
    return None


def grpo_prompt(row: dict) -> Any:
    """A row's prompt as the model is asked it: chat messages without their final assistant turn(s), or the
    prompt of a prompt/completion or prompt-only row (a completion ignored); None for a row without one (text)."""
    messages = row.get("messages")
    if isinstance(messages, list):
        while messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
            messages = messages[:-1]
        return messages or None
    return row.get("prompt") if isinstance(row.get("prompt"), (str, list)) else None


def prompt_tokens(tokenizer, prompt, *, chat: Optional[bool] = None) -> List[int]:
    """Token ids of a prompt: chat messages (or a string, wrapped as a user turn when the
    tokenizer has a chat template, unless ``chat=False``) end with the generation prompt."""
    if isinstance(prompt, list):
        return chat_ids(tokenizer, prompt, add_generation_prompt=True)
    if (chat is None and has_chat_template(tokenizer)) or chat:
        return chat_ids(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)
    return [int(t) for t in tokenizer.encode(prompt)]


def describe_prompt(prompt) -> str:
    """A prompt as one string for logs: its last message's content, or the prompt itself."""
    if isinstance(prompt, list):
        return prompt[-1].get("content", "") if prompt else ""
    return str(prompt)


def sample_prompts(rows: List[dict], count: int) -> list:
    """Up to ``count`` prompts from data rows, in file order."""
    out = []
    for row in rows:
        prompt = prompt_of(row)
        if prompt is not None:
            out.append(prompt)
        if len(out) >= count:
            break
    return out


def split_where(data: str, split: str) -> str:
    """How a split's rows are named in messages: its JSONL file when the data is a folder of them."""
    return str(Path(data) / f"{split}.jsonl") if Path(data).is_dir() else f"{data} ({split} split)"
