"""GRPO's part of a run: prompt splits, rollout batches, the validation reward and the key's state.

`--train-mode grpo` runs the same loop, methods and masked optimizer as SFT
(`trainer.train`): only the batches and the loss differ. `RolloutBatches` is
the loop's ``batches`` iterator: for each round it takes the step's prompts
(in the same resumable order as SFT's examples, `batching.batch_order`),
samples ``--num-generations`` completions of each with the weights as they are
now (`rollouts.sample_rollouts`), scores them (`rewards.RewardSet`), turns the
rewards into advantages (`loss.group_advantages`) and yields micro-batches of
arrays that `loss.grpo_batch_loss` reads. A round serves ``--num-iterations``
optimizer steps.

Exact resume: the sampling key after the last round and, when a checkpoint
falls inside a round (--num-iterations > 1), that round's batches themselves
(sampled by weights that no longer exist) go into the checkpoint's state.json
(`RolloutBatches.state`); `restore` takes them back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from gmt_mlx.config import Config
from gmt_mlx.data.batching import PAD_MULTIPLE, batch_order
from gmt_mlx.data.encoding import Example, TokenizedSplit
from gmt_mlx.data.prompts import grpo_prompt, prompt_tokens
from gmt_mlx.data.prompts import split_where as data_split_where
from gmt_mlx.errors import UserError
from gmt_mlx.objectives.grpo.loss import completion_logps, group_advantages
from gmt_mlx.objectives.grpo.reward_eval import reward_evaluation
from gmt_mlx.objectives.grpo.rewards import RewardSet, parse_rewards, reward_stats
from gmt_mlx.objectives.grpo.rollouts import completion_text, key_from_state, key_state, sample_rollouts, stop_token_ids

# The arrays of one micro-batch, in the order grpo_batch_loss takes them after the model.
BATCH_KEYS = ("tokens", "prompt_lengths", "mask", "old_logps", "ref_logps", "advantages")
STATE_FORMAT = 1


def split_where(config: Config, name: str) -> str:
    """How a split's rows are named in messages: its JSONL file when the data is a folder of them."""
    return data_split_where(str(config.data), name)


def prompt_splits(
    config: Config, rows: Dict[str, list], tokenizer, rewards: RewardSet, log: Callable[[str], None] = print
) -> Dict[str, TokenizedSplit]:
    """Each split's prompts as token ids (an `Example` with no targets: the completions are sampled), after
    checking that every row has a prompt and what the rewards need; one line naming the row otherwise.
    Prompts are never cut (a cut question has another answer): one longer than --max-seq-length less
    --max-completion-length is kept whole, with a warning."""
    splits = {}
    for name, split_rows in rows.items():
        where = split_where(config, name)
        examples = []
        for index, row in enumerate(split_rows):
            prompt = grpo_prompt(row)
            if prompt is None:
                raise UserError(
                    f"{where}, row {index + 1}: no prompt (--train-mode grpo reads chat rows or "
                    f"prompt/completion rows, with an answer for answer-based rewards)"
                )
            ids = prompt_tokens(tokenizer, prompt)
            examples.append(Example(ids, []))
        rewards.check_rows(split_rows, where)
        room = config.max_seq_length - config.max_completion_length
        long = sum(len(e.tokens) > room for e in examples)
        if long:
            log(
                f"warning: {long} {name} prompts leave less than --max-completion-length "
                f"{config.max_completion_length} tokens within --max-seq-length {config.max_seq_length}; they are "
                "kept whole (the rows grow past it)"
            )
        splits[name] = TokenizedSplit(examples, 0, name, max_seq_length=config.max_seq_length)
    return splits


def _padded(rows: List[List[int]], pad: int, dtype=np.int32) -> np.ndarray:
    """Rows right-padded to a multiple of PAD_MULTIPLE (few distinct shapes: the compiled step retraces less)."""
    width = -(-max(len(r) for r in rows) // PAD_MULTIPLE) * PAD_MULTIPLE
    out = np.full((len(rows), width), pad, dtype=dtype)
    for b, row in enumerate(rows):
        out[b, : len(row)] = row
    return out


@dataclass
class Round:
    """One batch of rollouts: its micro-batches (arrays by BATCH_KEYS) and their reward metrics."""

    batches: List[Dict[str, np.ndarray]]
    stats: Dict[str, float] = field(default_factory=dict)

    def to_state(self) -> dict:
        # float32 -> Python float -> float32 is exact, so a resumed round is the saved one bit for bit.
        return {"batches": [{k: v.tolist() for k, v in b.items()} for b in self.batches], "stats": self.stats}

    @classmethod
    def from_state(cls, state: dict) -> "Round":
        dtypes = {"tokens": np.int32, "prompt_lengths": np.int32}
        return cls(
            [{k: np.array(v, dtype=dtypes.get(k, np.float32)) for k, v in b.items()} for b in state["batches"]],
            dict(state["stats"]),
        )


class RolloutBatches:
    """The training loop's batches under --train-mode grpo (see the module docstring)."""

    def __init__(
        self,
        config: Config,
        model,
        tokenizer,
        split: TokenizedSplit,
        rows: List[dict],
        rewards: RewardSet,
        pad_id: int,
        count: Callable[[int], None] = lambda tokens: None,
        reference: Optional[Dict[str, mx.array]] = None,
    ):
        self.config, self.model, self.tokenizer, self.split, self.rows = config, model, tokenizer, split, rows
        self.rewards, self.pad_id, self.count = rewards, pad_id, count
        self.reference = reference  # the step-0 trainable weights, for --beta > 0 (None: no KL term)
        # (rank, ranks) of a data-parallel run: every rank samples and scores the whole batch (the same ids, as
        # one process would: one draw covers the decode batch) and trains on its contiguous share of the groups.
        self.shard = (0, 1)
        self.stops = stop_token_ids(tokenizer)
        self.where = split_where(config, "train")
        self.key = mx.random.key(config.seed)
        self.round: Optional[Round] = None
        self.served = 0  # micro-batches yielded: the loop's position
        self.fresh = False  # whether the current step's round was sampled for it (its rollout time counts once)
        self.rollout_seconds = 0.0
        self.update_start = 0.0  # when the step's first micro-batch was handed over (after its rollouts)

    @property
    def prompts_per_round(self) -> int:
        return self.config.batch_size * self.config.grad_accumulation_steps

    def _steps_done(self) -> int:
        return self.served // self.config.grad_accumulation_steps

    def state(self) -> dict:
        """What a checkpoint after the steps served so far needs to go on exactly: the key, and a round still in use."""
        inside = self._steps_done() % self.config.num_iterations != 0
        return {
            "format": STATE_FORMAT,
            "key": key_state(self.key),
            "round": self.round.to_state() if inside and self.round is not None else None,
        }

    def restore(self, start_step: int, state: Optional[dict], where: str) -> None:
        """Continue after ``start_step`` steps, from a checkpoint's `state` (None: a fresh start)."""
        self.served = start_step * self.config.grad_accumulation_steps
        if start_step == 0:
            return
        inside = start_step % self.config.num_iterations != 0
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or (inside and not state.get("round")):
            raise UserError(
                f"{where}: has no GRPO sampling state (the rollouts' key), so the run cannot go on "
                f"exactly; start over with --overwrite"
            )
        self.key = key_from_state(state["key"])
        self.round = Round.from_state(state["round"]) if inside else None

    def step_metrics(self) -> Dict[str, float]:
        """The reward metrics of the rollouts the last step trained on, the time their sampling took (0 on
        a step that reuses them) and the time from then to now (the gradient, mask and update: "update_seconds")."""
        return {
            **(self.round.stats if self.round else {}),
            "rollout_seconds": self.rollout_seconds if self.fresh else 0.0,
            "update_seconds": time.perf_counter() - self.update_start,
        }

    def __iter__(self) -> Iterator[tuple]:
        while True:
            step = self._steps_done()
            self.fresh = step % self.config.num_iterations == 0 or self.round is None
            if self.fresh:
                self.round = self._sample_round(step // self.config.num_iterations)
            self.update_start = time.perf_counter()
            for batch in self.round.batches:
                # Real tokens: prompts + completions (the pad id may equal a stop token, so not "!= pad").
                self.count(int(self._mine(batch["prompt_lengths"]).sum() + self._mine(batch["mask"]).sum()))
                self.served += 1
                yield tuple(mx.array(self._mine(batch[k])) for k in BATCH_KEYS)

    def _mine(self, rows: np.ndarray) -> np.ndarray:
        """This rank's rows of a micro-batch (whole groups: --batch-size is a multiple of the ranks)."""
        rank, ranks = self.shard
        per = len(rows) // ranks
        return rows[rank * per : (rank + 1) * per]

    def _round_indices(self, round_index: int) -> List[int]:
        """The prompts of round ``round_index``: SFT's batch order (seed, epoch), one step's examples a round."""
        per_epoch = len(self.split) // self.prompts_per_round
        epoch, offset = divmod(round_index, per_epoch)
        order = batch_order(self.split.lengths(), self.prompts_per_round, seed=self.config.seed, epoch=epoch)
        return order[offset]

    def _sample_round(self, round_index: int) -> Round:
        t0 = time.perf_counter()
        indices = self._round_indices(round_index)
        size = self.config.batch_size
        batches, scores, lengths, truncated = [], [], [], []
        for start in range(0, len(indices), size):
            batch, micro_scores, rollouts = self._micro_batch(indices[start : start + size])
            batches.append(batch)
            scores += micro_scores
            lengths += rollouts.completion_lengths
            truncated += rollouts.truncated
        stats = reward_stats(scores, self.config.num_generations)
        stats.update({"completion_length": float(np.mean(lengths)), "truncated_fraction": float(np.mean(truncated))})
        self.rollout_seconds = time.perf_counter() - t0
        return Round(batches, stats)

    def _micro_batch(self, indices: List[int]):
        config, g = self.config, self.config.num_generations
        rollouts = sample_rollouts(
            self.model,
            self.tokenizer,
            [self.split.examples[i].tokens for i in indices],
            num_generations=g,
            temperature=config.temperature,
            top_p=config.top_p,
            max_completion_length=config.max_completion_length,
            key=self.key,
            stop_ids=self.stops,
        )
        self.key = rollouts.next_key
        scores = []
        for b, completion in enumerate(rollouts.completion_ids):
            index = indices[b // g]
            row = self.rows[index]
            text = completion_text(self.tokenizer, completion, self.stops)
            scores.append(self.rewards.score(grpo_prompt(row), text, row, index, self.where))
        advantages = group_advantages(
            mx.array([total for total, _ in scores], dtype=mx.float32), g, config.scale_rewards
        )
        tokens = _padded([p + c for p, c in zip(rollouts.prompt_ids, rollouts.completion_ids)], self.pad_id)
        mask = (_padded(rollouts.completion_ids, -1) >= 0).astype(np.float32)
        if config.mask_truncated_completions:  # TRL's: the rewards and advantages stay, the tokens leave the loss
            mask[np.array(rollouts.truncated, dtype=bool)] = 0.0
        batch = {
            "tokens": tokens,
            "prompt_lengths": np.array([len(p) for p in rollouts.prompt_ids], np.int32),
            "mask": mask,
            "old_logps": np.zeros(mask.shape, np.float32),
            "ref_logps": np.zeros(mask.shape, np.float32),
            "advantages": np.array(advantages, dtype=np.float32),
        }
        if config.num_iterations > 1:  # the sampling policy's log-probs, for the ratio on the reused steps
            batch["old_logps"] = self._logps(batch)
        if self.reference is not None:
            batch["ref_logps"] = self._reference_logps(batch)
        return batch, scores, rollouts

    def _reference_logps(self, batch: Dict[str, np.ndarray]) -> np.ndarray:
        """The step-0 model's log-probs of the batch: its trainable weights swapped in for one forward, and the
        current ones (the same arrays, so bit for bit) swapped back. LoRA/DoRA swap only their adapters."""
        current = dict(tree_flatten(self.model.trainable_parameters()))
        self.model.load_weights(list(self.reference.items()), strict=False)
        try:
            return self._logps(batch)
        finally:
            self.model.load_weights(list(current.items()), strict=False)

    def _logps(self, batch: Dict[str, np.ndarray]) -> np.ndarray:
        was_training = getattr(self.model, "training", False)
        self.model.eval()  # no dropout: the log-probs of the policy that sampled
        try:
            logps = completion_logps(
                self.model,
                mx.array(batch["tokens"]),
                mx.array(batch["prompt_lengths"]),
                batch["mask"].shape[1],
                self.config.temperature,
            ) * mx.array(batch["mask"])
            return np.array(logps, dtype=np.float32)
        finally:
            self.model.train(was_training)


def validation_reward(
    model, tokenizer, split: TokenizedSplit, rows: List[dict], rewards: RewardSet, config: Config, where: str
) -> Dict[str, Any]:
    """Mean reward (and each reward's) of greedy answers to the valid prompts (the first --val-batches
    x --batch-size of them; -1: all), as a validation result: "loss" is minus the mean reward, so the
    best checkpoint is the one with the highest reward. `reward_eval.reward_evaluation` scores them, as
    `gmt-mlx eval` of a GRPO run does."""
    count = len(split) if config.val_batches < 0 else min(len(split), config.val_batches * config.batch_size)
    # As many rows decoded together as a training micro-batch decodes.
    scored = reward_evaluation(
        model,
        tokenizer,
        rows[:count],
        rewards,
        max_tokens=config.max_completion_length,
        batch_size=config.batch_size * config.num_generations,
        where=where,
        prompt_ids=[e.tokens for e in split.examples[:count]],
        checked=True,
    )
    result = {
        "loss": -scored["reward"],
        "ppl": None,
        "tokens": count,
        "reward": scored["reward"],
        "completion_length": scored["completion_length"],
    }
    result.update({f"rewards/{name}/mean": value for name, value in scored["rewards"].items()})
    return result


def rewards_of(config: Config) -> RewardSet:
    """The run's rewards (`parse_rewards`: unknown names and bad weights are one-line UserErrors)."""
    return parse_rewards(config.reward, config.reward_weights)
