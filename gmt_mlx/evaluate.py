"""Evaluation helpers: validation loss over a split, and greedy generation."""

from __future__ import annotations

from typing import List, Optional

import mlx.nn as nn

from .data import TokenizedSplit, batch_order, make_batch
from .losses import sft_loss
from .trainer import evaluate_loss


def split_loss(
    model: nn.Module,
    split: TokenizedSplit,
    *,
    batch_size: int,
    pad_id: int,
    max_batches: int = -1,
    pad_multiple: int = 8,
) -> dict:
    """Token-weighted loss and perplexity over (the first ``max_batches`` batches of) a split.

    Uses every example (the last batch may be smaller), in a fixed
    length-grouped order so the value is comparable across steps and runs.
    """
    order = batch_order(split.lengths(), min(batch_size, len(split)), seed=0, epoch=0)
    covered = {i for batch in order for i in batch}
    leftover = [i for i in range(len(split)) if i not in covered]
    if leftover:
        order.append(leftover)
    if max_batches > 0:
        order = order[:max_batches]
    batches = (make_batch(split, idx, pad_id=pad_id, pad_multiple=pad_multiple) for idx in order)
    return evaluate_loss(model, batches, sft_loss)


def prompt_of(row: dict) -> Optional[object]:
    """The prompt part of a data row (chat messages before the last, or the prompt)."""
    if "messages" in row and len(row["messages"]) > 1:
        return row["messages"][:-1]
    if "prompt" in row:
        return row["prompt"]
    return None


def generate_text(model: nn.Module, tokenizer, prompt, *, max_tokens: int = 64, chat: Optional[bool] = None) -> str:
    """Greedy continuation of ``prompt`` (a string or a list of chat messages).

    A string is wrapped as a user turn when the tokenizer has a chat template
    (unless ``chat=False``).
    """
    from mlx_lm.generate import generate

    has_template = getattr(tokenizer, "chat_template", None) is not None
    if isinstance(prompt, list):
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
    elif (chat is None and has_template) or chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    else:
        ids = tokenizer.encode(prompt)
    model.eval()
    return generate(model, tokenizer, ids, max_tokens=max_tokens, verbose=False)


def describe_prompt(prompt) -> str:
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
