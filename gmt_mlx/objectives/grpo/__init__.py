"""GRPO (Shao et al., 2024; TRL's GRPOTrainer): online RL on prompts, completions sampled and scored by --reward.

Its home holds every part of it: the loss (`loss`: group advantages, the
clipped ratio, the KL term), the sampler (`rollouts`), the rewards
(`rewards`), the greedy answers' mean reward as a validation (`reward_eval`,
which `gmt-mlx eval --reward` reuses) and the loop's batches (`batches`:
rounds of rollouts, the sampler's key and a round in use kept in every
checkpoint). `GRPO` is the objective the recipes see.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional

from mlx.utils import tree_flatten

from gmt_mlx.objectives.base import MemoryTerms, Objective, ObjectiveRun, saved_settings
from gmt_mlx.objectives.grpo.batches import RolloutBatches, prompt_splits, rewards_of, split_where, validation_reward
from gmt_mlx.objectives.grpo.loss import grpo_batch_loss


def grpo_options(config) -> dict:
    """`loss.grpo_batch_loss`'s keywords from the config."""
    return {
        "loss_type": config.loss_type,
        "epsilon": config.epsilon,
        "epsilon_high": config.epsilon_high,
        "max_completion_length": config.max_completion_length,
        "reuse": config.num_iterations > 1,
        "beta": config.beta,
        "temperature": config.temperature,
    }


class GRPO(Objective):
    """Group relative policy optimisation: G sampled completions per prompt, their rewards made advantages."""

    name = "grpo"
    rows = "prompts"
    measure = "reward"  # the greedy answers' mean reward; its "loss" is minus it
    report = "reward"
    named = True
    validates_at_start = True  # every run's step 0 is the base model's reward

    def loss(self, config) -> Callable:
        """`grpo_batch_loss` with the GRPO options bound."""
        return partial(grpo_batch_loss, **grpo_options(config))

    def describe(self, config: Dict[str, Any]) -> str:
        """GRPO's loss, reward, group size, scaling, clip and KL term."""
        config = saved_settings(config)
        high = config["epsilon_high"]
        clip = f"clip {config['epsilon']:g}" + (f"/{high:g}" if high is not None else "")
        return (
            f"GRPO ({config['loss_type']} loss), reward {config['reward']}, "
            f"{config['num_generations']} completions per prompt, rewards scaled by "
            f"{config['scale_rewards']}, {clip}, "
            + (f"KL beta {config['beta']:g} to the step-0 model" if config["beta"] else "no KL term")
        )

    def memory_terms(self, config, trainable_bytes: int) -> MemoryTerms:
        """A micro-batch's prompts x G completions decoded at once (the KV cache), each at most
        --max-completion-length tokens past its prompt, and with --beta > 0 the step-0 trainable weights
        (all of them for full/gmt/random, the adapters for lora/dora)."""
        return MemoryTerms(
            rows=config.num_generations,
            completion_tokens=config.max_completion_length,
            rollouts=True,
            reference_bytes=trainable_bytes if config.beta > 0 else 0,
        )

    def rounds(self, config) -> int:
        """A round of rollouts serves --num-iterations optimizer steps."""
        return config.num_iterations

    def check(self, config) -> None:
        """Unknown rewards and bad weights, before the model load."""
        rewards_of(config)

    def tokenize(self, config, rows: Dict[str, list], tokenizer, log: Callable[[str], None]):
        """Prompts only (the completions are sampled), after checking what the rewards need of each row."""
        return prompt_splits(config, rows, tokenizer, rewards_of(config), log)

    def start(self, config, run) -> ObjectiveRun:
        """The rollout batches and the reward validation of the run (`GrpoRun`)."""
        return GrpoRun(config, run)


class GrpoRun(ObjectiveRun):
    """A GRPO run's batches (rollouts sampled as it goes), its validation and the sampler's checkpoint state."""

    def __init__(self, config, run):
        rewards = rewards_of(config)
        # beta > 0: the KL term's reference is the step-0 model, whose trainable weights are the ones held
        # now (a resume loads the checkpoint later; set-up is seeded, so LoRA's initial adapters are the same).
        reference = dict(tree_flatten(run.model.trainable_parameters())) if config.beta > 0 else None
        self.rollouts = RolloutBatches(
            config,
            run.model,
            run.tokenizer,
            run.train_split,
            run.rows["train"],
            rewards,
            run.pad_id,
            reference=reference,
        )
        if run.valid_split is not None:
            self.validate = lambda m: validation_reward(
                m, run.tokenizer, run.valid_split, run.rows["valid"], rewards, config, split_where(config, "valid")
            )

    def restore(self, start_step: int, meta: Optional[dict], checkpoint: Optional[Path]) -> None:
        """The sampling key (and a round in use) from the checkpoint."""
        self.rollouts.restore(start_step, (meta or {}).get("rollouts"), str(checkpoint))

    def batches(self, default: Callable[[], Iterator], count: Callable[[int], None], shard: tuple) -> Iterator:
        """The rollout batches, not the split's."""
        self.rollouts.count, self.rollouts.shard = count, shard
        return iter(self.rollouts)

    def on_step(self, log_step: Callable[[Any], None]) -> Callable[[Any], None]:
        """The rewards of the rollouts the step trained on, beside the loss's metrics."""

        def on_step(result):
            result.metrics.update(self.rollouts.step_metrics())
            log_step(result)

        return on_step

    def checkpoint_state(self) -> Dict[str, Any]:
        """The sampler's key and a round still in use."""
        return {"rollouts": self.rollouts.state()}
