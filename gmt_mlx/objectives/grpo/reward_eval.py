"""Greedy answers scored by GRPO's rewards (`--reward`): `gmt-mlx eval --reward`, the test split of
`compare --train-mode grpo`, and a GRPO run's validation reward, one measure for all three."""

from __future__ import annotations

from typing import Callable, List, Optional

import mlx.nn as nn
import numpy as np

from gmt_mlx.data.formats import is_preference_row
from gmt_mlx.data.prompts import describe_prompt, grpo_prompt, prompt_tokens
from gmt_mlx.data.scorers import reference_of
from gmt_mlx.errors import UserError
from gmt_mlx.objectives.grpo.rewards import RewardSet, reward_stats
from gmt_mlx.objectives.grpo.rollouts import completion_text, sample_rollouts, stop_token_ids


def limited(rows: List[dict], limit: Optional[int]) -> List[dict]:
    """The first ``limit`` rows (None or negative: all)."""
    return rows[:limit] if limit is not None and limit >= 0 else rows


def check_reward_rows(rows: List[dict], rewards: RewardSet, where: Optional[str] = None) -> None:
    """A one-line UserError naming the first row with no prompt, or without what a reward reads."""
    for index, row in enumerate(rows):
        if not isinstance(row, dict) or grpo_prompt(row) is None:
            raise UserError(
                f"{where + ', ' if where else ''}row {index + 1}: no prompt to answer "
                f"(--reward scores answers to chat or prompt rows)"
            )
    rewards.check_rows(rows, where)


def reward_evaluation(
    model: nn.Module,
    tokenizer,
    rows: List[dict],
    rewards: RewardSet,
    *,
    max_tokens: int,
    batch_size: int,
    where: Optional[str] = None,
    prompt_ids: Optional[List[List[int]]] = None,
    checked: bool = False,
    on_batch: Optional[Callable[[int, int], None]] = None,
) -> dict:
    """Greedy answers to every row's prompt, scored by ``rewards``, as GRPO's validation scores them.

    Each answer is decoded from the sampled ids without its stop token
    (`rollouts.completion_text`), ``batch_size`` prompts decoded together in
    the rows' order. Every row needs a prompt and what the rewards read (an
    answer, metadata): a one-line UserError names the first that lacks them
    (``where``: the file), before any generation; ``checked`` skips that
    check. ``prompt_ids``: the prompts already tokenized. Returns {"reward":
    mean weighted total, "rewards": {name: mean}, "reward_count",
    "completion_length", "reward_items": [{prompt, reference, answer, reward,
    rewards}]}.
    """
    if not checked:
        check_reward_rows(rows, rewards, where)
    prompts = [grpo_prompt(row) for row in rows]
    ids = prompt_ids if prompt_ids is not None else [prompt_tokens(tokenizer, p) for p in prompts]
    stops = stop_token_ids(tokenizer)
    scores, items, lengths = [], [], []
    for start in range(0, len(rows), batch_size):
        indices = list(range(start, min(start + batch_size, len(rows))))
        rollouts = sample_rollouts(
            model,
            tokenizer,
            [ids[i] for i in indices],
            num_generations=1,
            temperature=0.0,
            max_completion_length=max_tokens,
            key=0,
            stop_ids=stops,
        )
        for index, completion in zip(indices, rollouts.completion_ids):
            text = completion_text(tokenizer, completion, stops)
            total, values = rewards.score(prompts[index], text, rows[index], index, where)
            scores.append((total, values))
            items.append(
                {
                    "prompt": describe_prompt(prompts[index]),
                    "reference": reference_of(rows[index]),
                    "answer": text,
                    "reward": total,
                    "rewards": values,
                }
            )
        lengths += rollouts.completion_lengths
        if on_batch is not None:
            on_batch(indices[-1] + 1, len(rows))
    if not scores:
        return {"reward": None, "rewards": {}, "reward_count": 0, "completion_length": None, "reward_items": []}
    stats = reward_stats(scores, 1)
    return {
        "reward": stats["reward"],
        "rewards": {name: stats[f"rewards/{name}/mean"] for name in rewards.names},
        "reward_count": len(scores),
        "completion_length": float(np.mean(lengths)),
        "reward_items": items,
    }


def has_completions(rows: List[dict]) -> bool:
    """Whether a split's rows carry answers to train or score a loss on: not prompt rows with no completion,
    nor chats whose last turn is the user's (files hold one format: the first row decides)."""
    if not rows or not isinstance(rows[0], dict):
        return True
    row = rows[0]
    if "prompt" in row and "completion" not in row and not is_preference_row(row):
        return False
    messages = row.get("messages")
    return not (
        isinstance(messages, list)
        and messages
        and isinstance(messages[-1], dict)
        and messages[-1].get("role") != "assistant"
    )
